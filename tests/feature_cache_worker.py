"""The second process of `test_feature_cache_faults.py`'s concurrency test (not a test module).

Usage: python tests/feature_cache_worker.py CACHE_DIR READY_DIR OUT.npz
The test process runs `extract_together` too: each creates a file in READY_DIR and waits until
both exist (so that both begin together, whatever their start-up time), then extracts the
features of a small dataset into the shared CACHE_DIR with a slow preprocessing step (so that
the extractions overlap). This process saves them with its number of encoder calls to OUT.npz.
"""

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from calfuse_jax import features
from calfuse_jax.data.shapes import ShapesDataset
from calfuse_jax.preprocess import preprocess
from tests.test_features import SIZE, StandIn

KWARGS = dict(weights_id="w", image_size=SIZE, batch_size=4, chunk_size=4, progress=False)


def slow_preprocess(images, image_size):
    """CLIP preprocessing plus 0.2 s per batch: 5 batches take a second, long enough to overlap."""
    time.sleep(0.2)
    return preprocess(images, image_size)


def dataset():
    return ShapesDataset("train", num_per_class=2, image_size=12)  # 20 images: 5 chunks of 4


def model_and_params():
    model = StandIn()
    params = model.init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)), method=model.encode_image)
    return model, params["params"]


def extract_together(cache_dir, ready_dir, name: str) -> tuple[np.ndarray, int]:
    """Creates READY_DIR/NAME, waits (bounded) until READY_DIR holds two files, then extracts
    `dataset()` into `cache_dir`; returns (features, number of encoder calls made here)."""
    model, params = model_and_params()
    calls = []
    real = features.make_image_encoder

    def counting(*args, **kwargs):
        encoder = real(*args, **kwargs)
        return lambda pixels: calls.append(1) or encoder(pixels)

    features.make_image_encoder = counting
    try:
        open(os.path.join(ready_dir, name), "w").close()
        deadline = time.monotonic() + 60
        while len(os.listdir(ready_dir)) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        feats, _ = features.image_features(
            dataset(), model, params, cache_dir=cache_dir, preprocess=slow_preprocess, **KWARGS
        )
    finally:
        features.make_image_encoder = real
    return feats, len(calls)


def main(cache_dir: str, ready_dir: str, out: str) -> None:
    feats, calls = extract_together(cache_dir, ready_dir, "worker")
    np.savez(out, features=feats, calls=calls)


if __name__ == "__main__":
    # Imported under its module name, so that `slow_preprocess` (part of the cache key) is the
    # same function here as in the test process.
    from tests.feature_cache_worker import main as imported_main

    imported_main(*sys.argv[1:4])
