"""Preprocessing on the device (`preprocess.device_preprocess`, `features.image_features` with
preprocess_path="device") against transformers' CLIPImageProcessor (PIL backend).

Tolerance: pixels within 1e-6 of CLIPImageProcessor (normalised units; 0 grey levels: the uint8
crops are equal), image features of a tiny CLIP at cosine >= 1 - 1e-6, zero-shot top-1 agreement
100%. Justification: the device path replays Pillow's integer arithmetic (same 22-bit taps, same
rounding and clipping after each pass) and normalises through a table of the host's float64
formula, so its pixels are the host path's bit for bit (observed max 0 grey levels, max-abs 0.0).
1e-6 is the host path's own tolerance (tests/test_preprocess.py): a one-grey-level error anywhere
is 1 / 255 / std >= 1.4e-2 in these units and fails it. What remains is the encoder's float
rounding in another XLA program (observed cosine 1 - 1e-7 or closer), far below what could change
an argmax: no prediction changes.
"""

import dataclasses

import numpy as np
import pytest
from PIL import Image

from calfuse_jax import clip, feature_cache, features
from calfuse_jax.data.images import ArrayDataset, FileDataset
from calfuse_jax.models.clip import VARIANTS
from calfuse_jax.preprocess import (
    CLIP_STD,
    device_preprocess,
    device_resize_and_crop,
    resize_and_crop,
)

transformers = pytest.importorskip("transformers")
TOL = 1e-6
CLASSES = ("apple", "bicycle", "cloud", "dolphin", "forest")


def _reference(images, size):
    processor = transformers.CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    pixels = processor(images=list(images), return_tensors="np")["pixel_values"]
    return pixels.transpose(0, 2, 3, 1)  # [B, S, S, 3]


def _smooth_images(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 [count, H, W, 3] like small photos: upsampled 4x4 noise, a little grain on top
    (pure noise would be harder than real data for the resize's clipping, smooth-only easier)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize((width, height), Image.Resampling.BILINEAR), np.int16)
        out.append(np.clip(smooth + rng.integers(-8, 9, smooth.shape), 0, 255).astype(np.uint8))
    return np.stack(out)


def _grey_levels(a: np.ndarray, b: np.ndarray) -> float:
    """Max difference of two normalised pixel arrays, in grey levels of the uint8 input."""
    return float((np.abs(a - b) * np.asarray(CLIP_STD) * 255).max())


@pytest.fixture(scope="module")
def clip224(tmp_path_factory):
    """A tiny CLIP that takes 224 x 224 (patch 32: 49 tokens), so CIFAR's 32 x 32 is upsampled
    by 7 as with a real CLIP, and a non-square source is resized and cropped."""
    arch = dataclasses.replace(VARIANTS["tiny"], image_size=224, patch_size=32)
    folder = clip.random_checkpoint(tmp_path_factory.mktemp("ckpt224"), arch, seed=1)
    return folder, *clip.from_pretrained(folder)


@pytest.mark.parametrize("shape", [(32, 32), (37, 53), (61, 29), (300, 224)])
@pytest.mark.parametrize("size", [224, 30])
def test_pixels_equal_clip_image_processor(shape, size):
    import jax

    images = _smooth_images(6, *shape, seed=shape[0])
    reference = _reference(images, size)
    ours = np.asarray(jax.jit(device_preprocess, static_argnums=1)(images, size))
    assert ours.shape == reference.shape and ours.dtype == np.float32
    assert _grey_levels(ours, reference) == 0.0
    assert np.abs(ours - reference).max() <= TOL
    noise = np.random.default_rng(1).integers(0, 256, (3, *shape, 3), dtype=np.uint8)
    np.testing.assert_array_equal(  # pure noise: the worst case for clipping after each pass
        np.asarray(jax.jit(device_resize_and_crop, static_argnums=1)(noise, size)),
        np.stack([resize_and_crop(x, size) for x in noise]),  # PIL itself
    )


def _zero_shot(feats: np.ndarray, text: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Top-1 class of cos(image, text) [N]. A random CLIP's features share one large direction
    (every image would get the same class), so both sides first subtract the same `centre`."""
    return np.argmax(features.normalise(feats - centre) @ text.T, axis=1)


@pytest.mark.parametrize("shape", [(32, 32), (37, 53)])
def test_features_and_zero_shot_match_clip_image_processor(clip224, tmp_path, shape):
    import jax

    folder, model, params = clip224
    images = _smooth_images(40, *shape, seed=7)
    ds = ArrayDataset(images, np.arange(40) % 5, CLASSES, description=f"smooth{shape}")
    wid = feature_cache.weights_id(folder)
    feats, _ = features.image_features(
        ds, model, params, cache_dir=tmp_path, weights_id=wid, batch_size=16,
        progress=False, preprocess_path="device",
    )  # fmt: skip
    encode = jax.jit(lambda p, x: features.encode_images(model, p, x))
    expected = np.asarray(encode(params, _reference(images, 224)))
    cosine = np.sum(features.normalise(feats) * features.normalise(expected), axis=1)
    assert cosine.min() >= 1 - 1e-6
    text = features.text_features(
        CLASSES, model, params, clip.load_tokenizer(folder), cache_dir=tmp_path, weights_id=wid
    )
    centre = expected.mean(axis=0)
    ours, theirs = _zero_shot(feats, text, centre), _zero_shot(expected, text, centre)
    assert len(np.unique(theirs)) > 1  # the check can see a flip: not one class for all
    np.testing.assert_array_equal(ours, theirs)


def test_auto_sends_uint8_and_keys_each_path_apart(clip224, tmp_path, monkeypatch):
    folder, model, params = clip224
    ds = ArrayDataset(_smooth_images(10, 32, 32), np.arange(10) % 5, CLASSES, description="s")
    seen = []
    real = features.make_image_encoder

    def spy(*args, **kwargs):
        encoder = real(*args, **kwargs)
        return lambda pixels: seen.append((pixels.dtype, pixels.shape)) or encoder(pixels)

    monkeypatch.setattr(features, "make_image_encoder", spy)
    common = dict(cache_dir=tmp_path, weights_id="w", batch_size=8, progress=False)
    auto, _ = features.image_features(ds, model, params, **common)
    assert seen == [(np.uint8, (8, 32, 32, 3))] * 2  # only the raw images cross to the device
    host, _ = features.image_features(ds, model, params, preprocess_path="host", **common)
    assert seen[2:] == [(np.float32, (8, 224, 224, 3))] * 2  # a host cache is not reused ...
    assert len(list((tmp_path / "images").iterdir())) == 2  # ... nor overwritten
    np.testing.assert_allclose(auto, host, atol=1e-5)
    device, _ = features.image_features(ds, model, params, preprocess_path="device", **common)
    assert len(seen) == 4  # auto chose the device path: its cache entry serves "device"
    np.testing.assert_array_equal(device, auto)


def test_device_path_refuses_what_it_cannot_preprocess(clip224, tmp_path):
    folder, model, params = clip224
    Image.fromarray(_smooth_images(1, 20, 30)[0]).save(tmp_path / "a.png")
    files = FileDataset(tmp_path, ["a.png"], [0], ["a"], description="files")
    common = dict(cache_dir=tmp_path / "c", weights_id="w", progress=False)
    with pytest.raises(ValueError, match="differ in size"):
        features.image_features(files, model, params, preprocess_path="device", **common)
    with pytest.raises(ValueError, match="one of"):
        features.image_features(files, model, params, preprocess_path="gpu", **common)
    liar = ArrayDataset(_smooth_images(2, 32, 32), [0, 1], ["a", "b"], description="liar")
    liar.load = lambda i: np.zeros((16, 16, 3), np.uint8)  # breaks its fixed_size promise
    with pytest.raises(ValueError, match="preprocess=host"):
        features.image_features(liar, model, params, **common)
    feats, _ = features.image_features(files, model, params, **common)  # auto: host for files
    assert feats.shape == (1, model.embed_dim)
