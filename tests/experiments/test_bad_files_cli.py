"""Bad files met by `python -m experiments.run`: an image that cannot be decoded (review cases
BD-1, BD-2, BD-3, BD-11, BD-15) is exit 2 with one message naming the file, nothing certified in
the feature cache; a damaged random-weight checkpoint in the cache (CC-13) is rewritten."""

import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from calfuse_jax.feature_cache import file_sha256
from experiments import run


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def truncated(path):  # BD-1: a real PNG cut in the middle of its pixel data
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path.with_suffix(".png"))
    data = path.with_suffix(".png").read_bytes()
    path.with_suffix(".png").write_bytes(data[: len(data) // 2])
    return path.with_suffix(".png")


def empty(path):  # BD-2
    path.with_suffix(".png").write_bytes(b"")
    return path.with_suffix(".png")


def not_an_image(path):  # BD-3: text behind an image extension
    path.with_suffix(".jpg").write_text("these are my notes, not a photo\n")
    return path.with_suffix(".jpg")


def decompression_bomb(path):  # BD-11: a valid PNG header claiming 30000 x 30000 pixels
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0))
    idat = png_chunk(b"IDAT", zlib.compress(b"\0" * 1000))
    path.with_suffix(".png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + header + idat + png_chunk(b"IEND", b"")
    )
    return path.with_suffix(".png")


def symlink_loop(path):  # BD-15: loop-a.jpg -> loop-b.jpg -> loop-a.jpg
    a, b = path.with_name("loop-a.jpg"), path.with_name("loop-b.jpg")
    os.symlink(b.name, a)
    os.symlink(a.name, b)
    return a


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One feature cache (and random-weight checkpoint) for every run of this module."""
    return tmp_path_factory.mktemp("cache")


def image_folder(root):
    """ROOT/{train,test}/<class>/<i>.png: 2 classes x 3 tiny images per split."""
    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True)
            for i in range(3):
                pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def run_folder(root, cache, tmp_path):
    return run.main(
        [
            "--config",
            "folder",
            f"--config.dataset.root={root}",
            "--config.model.name=random:tiny",
            f"--config.cache_dir={cache}",
            "--config.train.epochs=0",
            "--config.progress=false",
            "--workdir",
            str(tmp_path / "run"),
        ]  # fmt: skip
    )


def assert_names_the_file(bad, capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    # One paragraph: the message (file, cause, fix) and the pointer to --traceback.
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and f"cannot decode the image {str(bad)!r}" in lines[0], err
    assert "Replace that file" in lines[0]


@pytest.mark.parametrize(
    "make_bad", [truncated, empty, not_an_image, decompression_bomb, symlink_loop]
)
def test_an_undecodable_image_is_exit_2_naming_the_file(make_bad, cache, tmp_path, capsys):
    root = image_folder(tmp_path / "images")
    bad = make_bad(root / "train" / "dog" / "bad")
    assert run_folder(root, cache, tmp_path) == 2
    assert_names_the_file(bad, capsys)
    # Nothing certified for the split holding it (the manifest is written only at the end).
    assert not list((cache / "features" / "images").glob("*/manifest.json"))


def test_a_damaged_random_checkpoint_in_the_cache_is_rewritten(cache, tmp_path, capsys):
    root = image_folder(tmp_path / "images")
    bad = empty(root / "train" / "dog" / "bad")
    assert run_folder(root, cache, tmp_path) == 2  # writes the checkpoint, stops at the image
    capsys.readouterr()
    (weights,) = cache.glob("models/random-tiny-seed*/model.safetensors")
    good = file_sha256(weights)
    with open(weights, "r+b") as f:
        f.truncate(100)  # CC-13: safetensors cannot even parse the header
    # The run gets past the weights again (its error is the image's, not a SafetensorError).
    assert run_folder(root, cache, tmp_path) == 2
    assert_names_the_file(bad, capsys)
    assert file_sha256(weights) == good  # rewritten, identical (seeded)
