"""CLIP image preprocessing: bicubic resize of the shorter side, center crop, CLIP mean/std.

Same steps and arithmetic as OpenAI CLIP / transformers' `CLIPImageProcessor` (PIL backend): PIL
bicubic resize on uint8 RGB so that the short side equals `image_size` (long side
`int(size * long / short)`), crop the centre (offsets `(h - size) // 2`), scale by 1/255 in float64,
then `(x - mean) / std` in float32. Output is channels-last, ready for `encode_image`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from calfuse_jax.data.images import pil_to_rgb, to_rgb

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _to_pil(image) -> Image.Image:
    if isinstance(image, Image.Image):  # 16-bit modes scaled to 8 bits, not clipped
        return Image.fromarray(pil_to_rgb(image))
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise TypeError(
            f"preprocess takes PIL images or uint8 arrays [H, W, 3] / [H, W]; got dtype "
            f"{array.dtype} (convert with (x * 255).round().astype(np.uint8) if x is in [0, 1])"
        )
    if array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (1, 3, 4)):
        return Image.fromarray(to_rgb(array))  # grey repeated, alpha dropped: as convert("RGB")
    raise ValueError(f"preprocess expects channels-last images [H, W, 3], got shape {array.shape}")


def resize_and_crop(image, image_size: int) -> np.ndarray:
    """One image -> uint8 [image_size, image_size, 3]: bicubic shorter-side resize, centre crop."""
    pil = _to_pil(image)
    width, height = pil.size
    short, long = min(width, height), max(width, height)
    new_long = int(image_size * long / short)
    size = (image_size, new_long) if width <= height else (new_long, image_size)  # (w, h)
    array = np.asarray(pil.resize(size, resample=Image.Resampling.BICUBIC))
    top = (array.shape[0] - image_size) // 2
    left = (array.shape[1] - image_size) // 2
    return array[top : top + image_size, left : left + image_size]


def normalize(uint8_images: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] -> float32 (x / 255 - mean) / std, with transformers' rounding order."""
    scaled = (uint8_images.astype(np.float64) * (1 / 255)).astype(np.float32)
    return (scaled - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)


def preprocess(images: Sequence, image_size: int) -> np.ndarray:
    """PIL images or uint8 arrays -> normalised float32 pixels [B, image_size, image_size, 3]."""
    if isinstance(images, (Image.Image, np.ndarray)) and not (
        isinstance(images, np.ndarray) and images.ndim == 4
    ):
        images = [images]
    if len(images) == 0:
        return np.zeros((0, image_size, image_size, 3), np.float32)
    crops = np.stack([resize_and_crop(image, image_size) for image in images])
    return normalize(crops)
