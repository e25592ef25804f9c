"""The feature cache under real faults (review cases CC-8 to CC-12): bytes flipped in a chunk
file an interrupted extraction left, NaN features, a folder where a cache file should be, and two
real processes filling one entry at once. Each time the cache ends with one entry whose manifest
certifies exactly the clean extraction's numbers (CC-13 is in test_bad_files_cli.py)."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from calfuse_jax import features
from calfuse_jax.feature_cache import FeatureCacheError, file_sha256
from tests.feature_cache_worker import KWARGS, dataset, extract_together, model_and_params
from tests.processes import REPO


@pytest.fixture(scope="module")
def stand_in():
    return model_and_params()


def extract(stand_in, cache_dir):
    """Features of `dataset()` (20 images, 5 chunks of one batch of 4) cached in `cache_dir`."""
    model, params = stand_in
    return features.image_features(dataset(), model, params, cache_dir=cache_dir, **KWARGS)


def entry(cache_dir):
    (folder,) = (cache_dir / "images").iterdir()
    return folder


def assert_certifies(folder, expected):
    """The manifest certifies the features file on disk, and that file holds `expected`."""
    manifest = json.loads((folder / "manifest.json").read_text())
    assert file_sha256(folder / "features.npy") == manifest["files"]["features.npy"]["sha256"]
    np.testing.assert_array_equal(np.load(folder / "features.npy"), expected)
    assert not (folder / "chunks").exists()


@pytest.fixture(scope="module")
def clean(stand_in, tmp_path_factory):
    """Features of an uninterrupted extraction into a cache of its own."""
    return extract(stand_in, tmp_path_factory.mktemp("clean"))[0]


def flip_low_bit(raw, offset):  # CC-9: feature [0, 1] changes in its last mantissa bit
    raw[offset + 4] ^= 0x01


def flip_exponent(raw, offset):  # CC-10: feature [0, 1] becomes ~1e38 (still finite)
    raw[offset + 7] ^= 0x40


def write_nan(raw, offset):  # CC-12: a NaN in feature [0, 1]
    raw[offset + 4 : offset + 8] = np.float32(np.nan).tobytes()


@pytest.mark.parametrize("damage", [flip_low_bit, flip_exponent, write_nan])
def test_a_damaged_chunk_is_recomputed_and_never_certified(
    damage, stand_in, counted, clean, tmp_path
):
    counted["limit"] = 2  # interrupted after 2 of the 5 chunks: 2 chunk files on disk
    with pytest.raises(KeyboardInterrupt):
        extract(stand_in, tmp_path)
    folder = entry(tmp_path)
    first, _ = sorted((folder / "chunks").glob("*.npy"))
    raw = bytearray(first.read_bytes())
    damage(raw, len(raw) - np.load(first).nbytes)  # offset: the float data after the header
    first.write_bytes(bytes(raw))
    counted["limit"] = None
    with pytest.warns(UserWarning, match=r"chunk .*failed verification"):
        feats, _ = extract(stand_in, tmp_path)
    assert counted["calls"] == 2 + 4  # the damaged chunk and the 3 missing, not the good one
    np.testing.assert_array_equal(feats, clean)
    assert_certifies(folder, clean)


def test_nan_features_stop_with_a_message_and_nothing_is_cached(stand_in, counted, tmp_path):
    counted["poison"] = 1  # the encoder returns NaN for the second image of every batch
    with pytest.raises(FeatureCacheError, match=r"NaN/Inf features for 1 images .*rows \[1\]"):
        extract(stand_in, tmp_path)  # stops at the first chunk
    folder = entry(tmp_path)
    assert not (folder / "manifest.json").exists() and not list(folder.glob("chunks/*.npy"))


def test_a_nan_entry_certified_by_an_older_version_is_recomputed(stand_in, clean, tmp_path):
    extract(stand_in, tmp_path)
    folder = entry(tmp_path)
    # What the old write_verified left: NaN features with their own sha256 in the manifest.
    poisoned = clean.copy()
    poisoned[3, 2] = np.nan
    np.save(folder / "features.npy", poisoned)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["features.npy"]["sha256"] = file_sha256(folder / "features.npy")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match="failed verification.*NaN/Inf"):
        feats, _ = extract(stand_in, tmp_path)
    np.testing.assert_array_equal(feats, clean)
    assert_certifies(folder, clean)


@pytest.mark.parametrize("name", ["manifest.json", "features.npy"])
def test_a_folder_in_place_of_a_cache_file_is_replaced(name, stand_in, clean, tmp_path):  # CC-8
    extract(stand_in, tmp_path)
    folder = entry(tmp_path)
    (folder / name).unlink()
    (folder / name / "stray").mkdir(parents=True)
    with pytest.warns(UserWarning, match="failed verification"):
        feats, _ = extract(stand_in, tmp_path)
    np.testing.assert_array_equal(feats, clean)
    assert (folder / name).is_file()
    assert_certifies(folder, clean)


def test_two_processes_filling_one_entry_share_it(clean, tmp_path):
    """This process and a real second one extract the same entry at once: one encodes, the
    other waits for the lock and reads the finished entry; both return the certified numbers."""
    cache, ready = tmp_path / "cache", tmp_path / "ready"
    ready.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device there
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    worker = subprocess.Popen(
        [sys.executable, "tests/feature_cache_worker.py", cache, ready, tmp_path / "out.npz"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not (ready / "worker").exists() and worker.poll() is None:
            assert time.monotonic() < deadline, "the worker did not start"
            time.sleep(0.01)
        here, calls_here = extract_together(cache, ready, "test")
        log = worker.communicate(timeout=120)[0]
    finally:
        worker.kill()
    assert worker.returncode == 0, log[-3000:]
    there = np.load(tmp_path / "out.npz")
    assert sorted([calls_here, int(there["calls"])]) == [0, 5]  # 20 images encoded once
    folder = entry(cache)
    for feats in (here, there["features"]):
        assert_certifies(folder, feats)
    # One device in the worker, four here: equal up to fp32 rounding (relative ~5e-7 seen).
    np.testing.assert_allclose(here, clean, rtol=1e-6, atol=1e-6)
