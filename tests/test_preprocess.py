"""Preprocessing equals transformers' CLIPImageProcessor (PIL backend: the resize CLIP uses).

Tolerance 1e-6 (max-abs, normalised units). Justification: both sides resize the same uint8 RGB
image with the same PIL bicubic kernel to the same size (short side -> image_size, long side
int(size * long / short)), crop at the same integer offsets, and then apply the same float
operations (x * (1/255) in float64, cast to float32, (x - mean) / std in float32), so the results
are bit-identical in practice (observed max-abs 0.0). 1e-6 is about 4 float32 ulp at the largest
values (|x| <= 2.2, ulp 2.4e-7): room for a different NumPy build's rounding only, while a
one-pixel shift of the crop or another resample filter moves values by > 1e-2.
"""

import numpy as np
import pytest
from PIL import Image

from calfuse_jax import clip
from calfuse_jax.preprocess import resize_and_crop

transformers = pytest.importorskip("transformers")
TOL = 1e-6


def _reference(images, size):
    processor = transformers.CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    pixels = processor(images=images, return_tensors="np")["pixel_values"]  # [B, 3, H, W]
    return pixels.transpose(0, 2, 3, 1)


@pytest.mark.parametrize("size", [32, 224])
def test_matches_clip_image_processor(size):
    rng = np.random.default_rng(size)
    # landscape, portrait, odd sizes, square, smaller than the crop (upsampled), extreme aspect
    shapes = [(40, 57), (57, 40), (33, 17), (300, 200), (size, size), (10, 12), (23, 240)]
    images = [Image.fromarray(rng.integers(0, 256, (*s, 3), dtype=np.uint8)) for s in shapes]
    ours = clip.preprocess(images, size)
    assert ours.shape == (len(shapes), size, size, 3) and ours.dtype == np.float32
    assert np.abs(ours - _reference(images, size)).max() <= TOL


def test_array_grayscale_and_rgba_inputs():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (45, 31, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (45, 31), dtype=np.uint8)
    rgba = Image.fromarray(rng.integers(0, 256, (20, 50, 4), dtype=np.uint8), "RGBA")
    ours = clip.preprocess([rgb, gray, rgba], 32)
    reference = _reference([Image.fromarray(rgb), Image.fromarray(gray).convert("RGB"),
                            rgba.convert("RGB")], 32)  # fmt: skip
    assert np.abs(ours - reference).max() <= TOL
    batch = clip.preprocess(np.stack([rgb, rgb]), 32)  # a uint8 batch [B, H, W, 3] works too
    np.testing.assert_array_equal(batch[0], ours[0])


def test_crop_is_centred_and_constant_image_normalises_to_formula():
    image = np.zeros((32, 48, 3), np.uint8)
    image[:, 8:40] = 255  # white centre band exactly as wide as the crop
    crop = resize_and_crop(image, 32)
    assert crop.shape == (32, 32, 3) and crop.min() == 255
    pixels = clip.preprocess([np.full((5, 7, 3), 128, np.uint8)], 4)
    expected = (128 / 255 - np.array(clip.CLIP_MEAN)) / np.array(clip.CLIP_STD)
    np.testing.assert_allclose(pixels[0, 0, 0], expected, atol=1e-6)


def test_rejects_float_images():
    with pytest.raises(TypeError, match="uint8"):
        clip.preprocess([np.zeros((8, 8, 3), np.float32)], 4)
