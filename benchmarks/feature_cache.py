"""Images/s of feature extraction through the cache pipeline vs the bare encoder.

    python benchmarks/feature_cache.py --variant tiny --images 512 --batch-size 64
    python benchmarks/feature_cache.py --variant ViT-B/16 --images 64 --batch-size 16

Three numbers on the same random-weight CLIP and batch size:
  host      decode (JPEG files on disk) + CLIP preprocessing only, on the pipeline's threads;
  encoder   the jitted, sharded encoder alone on a batch already preprocessed and on device;
  pipeline  `features.image_features` end to end (decode + preprocess + encode + chunk files +
            verified merge) into a fresh cache, after a warm-up run so compilation is excluded.
The pipeline keeps up when `pipeline` is close to min(host, encoder): host work overlaps the
device. Images are JPEGs of 500x375 (a typical ImageNet size) written once to a temp folder.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import tempfile
import time

import numpy as np
from PIL import Image


def write_images(folder: str, count: int, size=(500, 375), classes: int = 10) -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    for i in range(count):
        path = os.path.join(folder, f"c{i % classes}", f"{i:06d}.jpg")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # Smooth content (upsampled noise), like a photo, so JPEG sizes are realistic.
        image = Image.fromarray(np.roll(base, i, axis=1)).resize(size, Image.Resampling.BILINEAR)
        image.save(path, quality=90)


def time_host(ds, image_size: int, batch: int, workers: int) -> float:
    from calfuse_jax.preprocess import preprocess

    starts = range(0, len(ds), batch)
    job = lambda s: preprocess(ds.load_batch(range(s, min(s + batch, len(ds)))), image_size)  # noqa: E731
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        list(pool.map(job, starts))
    return len(ds) / (time.perf_counter() - start)


def time_encoder(model, params, image_size: int, batch: int, repeats: int, dtype) -> float:
    import jax

    from calfuse_jax import features, sharding

    mesh = sharding.make_mesh()
    batch = sharding.padded_size(batch, mesh)
    encoder = features.make_image_encoder(model, params, mesh, dtype)
    pixels = np.random.default_rng(0).normal(size=(batch, image_size, image_size, 3))
    pixels = pixels.astype(np.float32)
    jax.block_until_ready(encoder(pixels))  # compile
    start = time.perf_counter()
    for _ in range(repeats):
        out = encoder(pixels)
    jax.block_until_ready(out)
    return batch * repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", default="tiny")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import jax

    from calfuse_jax import clip, features
    from calfuse_jax.data.images import FileDataset, folder_dataset

    with tempfile.TemporaryDirectory() as tmp:
        write_images(os.path.join(tmp, "images"), args.images)
        ds = folder_dataset(os.path.join(tmp, "images"))
        checkpoint = clip.random_checkpoint(os.path.join(tmp, "ckpt"), args.variant)
        model, params = clip.from_pretrained(checkpoint)
        size, dtype = model.image_size, features.default_compute_dtype()
        host = time_host(ds, size, args.batch_size, args.workers)
        encoder = time_encoder(model, params, size, args.batch_size, args.repeats, dtype)
        common = dict(
            weights_id="bench", batch_size=args.batch_size, progress=False, num_workers=args.workers
        )
        first = slice(0, args.batch_size)  # same batch shape: compiles what the timed run uses
        warm = FileDataset(
            ds.root, ds.files[first], ds.labels[first], ds.class_names, description="warm-up"
        )
        features.image_features(warm, model, params, cache_dir=os.path.join(tmp, "c0"), **common)
        start = time.perf_counter()
        features.image_features(ds, model, params, cache_dir=os.path.join(tmp, "c1"), **common)
        pipeline = len(ds) / (time.perf_counter() - start)
    load = os.getloadavg()
    print(
        f"variant={args.variant} image_size={size} batch={args.batch_size} "
        f"images={args.images} devices={jax.device_count()} ({jax.default_backend()}) "
        f"dtype={np.dtype(dtype).name} workers={args.workers} load={load[0]:.2f}"
    )
    print(f"host (decode+preprocess) {host:9.1f} img/s")
    print(f"bare encoder             {encoder:9.1f} img/s")
    print(
        f"cache pipeline           {pipeline:9.1f} img/s "
        f"({pipeline / min(host, encoder):.0%} of min(host, encoder))"
    )


if __name__ == "__main__":
    main()
