"""CLIP image preprocessing, bit-equal to transformers' `CLIPImageProcessor` (PIL backend):
bicubic resize of the shorter side, centre crop, CLIP mean/std. `device_preprocess` replays PIL's
fixed-point resampling inside a jitted function for same-size uint8 images, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax.numpy as jnp
import numpy as np
from PIL import Image

from calfuse_jax.data.images import pil_to_rgb, to_rgb

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# v2: 16-bit images scaled to 8 bits instead of clipped (`data.images.pil_to_rgb`).
PREPROCESS_VERSION = "clip-bicubic-shortside-centercrop-meanstd-v2"
# Device path: equal pixels, but another XLA program (sums may round differently).
DEVICE_PREPROCESS_VERSION = PREPROCESS_VERSION + "+device-pil-fixedpoint-v1"
PREPROCESS_PATHS = ("auto", "host", "device")  # auto: device for fixed-size sources


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


def _resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(w, h) with the shorter side `size`, the longer `int(size * long / short)`."""
    new_long = int(size * max(width, height) / min(width, height))
    return (size, new_long) if width <= height else (new_long, size)


def resize_and_crop(image, image_size: int) -> np.ndarray:
    """One image -> uint8 [image_size, image_size, 3]: bicubic shorter-side resize, centre crop."""
    pil = _to_pil(image)
    size = _resized_size(*pil.size, image_size)
    array = np.asarray(pil.resize(size, resample=Image.Resampling.BICUBIC))
    top, left = (array.shape[0] - image_size) // 2, (array.shape[1] - image_size) // 2
    return array[top : top + image_size, left : left + image_size]


def normalize(uint8_images: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] -> float32 (x / 255 - mean) / std, with transformers' rounding order."""
    scaled = (uint8_images.astype(np.float64) * (1 / 255)).astype(np.float32)
    return (scaled - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)


def preprocess(images: Sequence, image_size: int) -> np.ndarray:
    """PIL images or uint8 arrays -> normalised float32 pixels [B, image_size, image_size, 3]."""
    if isinstance(images, Image.Image) or (isinstance(images, np.ndarray) and images.ndim != 4):
        images = [images]
    if len(images) == 0:
        return np.zeros((0, image_size, image_size, 3), np.float32)
    return normalize(np.stack([resize_and_crop(image, image_size) for image in images]))


_PRECISION_BITS = 22  # Pillow's PRECISION_BITS (32 - 8 - 2) for 8-bit images


def _bicubic(x: np.ndarray) -> np.ndarray:
    """Pillow's `bicubic_filter` (a = -0.5), support 2."""
    x, a = np.abs(x), -0.5
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def pil_taps(in_size: int, out_size: int, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's taps (`precompute_coeffs`, `normalize_coeffs_8bpc`) for outputs first..+count:
    (indices, weights) int32 [count, K], out[o] = sum_k in[indices[o, k]] * weights[o, k] in 22-bit
    fixed point; unused taps have weight 0 and index 0."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    ksize = int(np.ceil(support)) * 2 + 1
    indices, weights = np.zeros((2, count, ksize), np.int32)
    for row, out in enumerate(range(first, first + count)):
        center = (out + 0.5) * scale
        low = max(int(center - support + 0.5), 0)
        high = min(int(center + support + 0.5), in_size)
        taps = np.arange(low, high)
        w = _bicubic((taps - center + 0.5) / filterscale)
        w = w / w.sum() if w.sum() != 0.0 else w
        fixed = np.where(w < 0, -0.5 + w * (1 << _PRECISION_BITS), 0.5 + w * (1 << _PRECISION_BITS))
        indices[row, : len(taps)] = taps
        weights[row, : len(taps)] = fixed.astype(np.int64)  # C's (int) cast truncates to zero
    return indices, weights


def _resample_axis(pixels: jnp.ndarray, axis: int, in_size: int, out_size: int, first: int,
                   count: int) -> jnp.ndarray:  # fmt: skip
    """One Pillow pass along `axis` of int32 [B, H, W, 3] in 0..255, outputs first..+count."""
    if in_size == out_size:  # Pillow skips the pass; its taps would be the identity
        return jnp.take(pixels, jnp.arange(first, first + count), axis=axis)
    indices, weights = pil_taps(in_size, out_size, first, count)
    low, high = int(indices.min()), int((indices + (weights != 0)).max())
    pixels = jnp.take(pixels, jnp.arange(low, high), axis=axis)  # only the rows the crop reads
    shape = [1] * pixels.ndim
    shape[axis] = count
    total = jnp.full((), 1 << (_PRECISION_BITS - 1), jnp.int32)  # Pillow's rounding offset
    for k in range(indices.shape[1]):
        tap = jnp.take(pixels, jnp.asarray(np.maximum(indices[:, k] - low, 0)), axis=axis)
        total = total + tap * jnp.asarray(weights[:, k]).reshape(shape)
    return jnp.clip(total >> _PRECISION_BITS, 0, 255)  # Pillow's clip8


def device_resize_and_crop(images: jnp.ndarray, image_size: int) -> jnp.ndarray:
    """uint8 [B, H, W, 3] -> int32 [B, S, S, 3] in 0..255, equal to `resize_and_crop` per image."""
    height, width = images.shape[1:3]
    new_w, new_h = _resized_size(width, height, image_size)
    top, left = (new_h - image_size) // 2, (new_w - image_size) // 2
    pixels = images.astype(jnp.int32)
    pixels = _resample_axis(pixels, 2, width, new_w, left, image_size)  # horizontal first
    return _resample_axis(pixels, 1, height, new_h, top, image_size)


def device_preprocess(images: jnp.ndarray, image_size: int) -> jnp.ndarray:
    """uint8 [B, H, W, 3] -> float32 [B, S, S, 3], equal to `preprocess` (traceable; jit it)."""
    crops = device_resize_and_crop(images, image_size)
    table = jnp.asarray(normalize(np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, 1)))
    return table[crops, jnp.arange(3)]  # [256, 3] looked up per channel


def resolve_preprocess(custom: Callable | None, path: str, ds) -> tuple[Callable | None, str]:
    """(host function, or None: on the device; cache-key version) for `image_features`."""
    if path not in PREPROCESS_PATHS:
        raise ValueError(f"preprocess_path must be one of {PREPROCESS_PATHS}, got {path!r}")
    fixed = getattr(ds, "fixed_size", None) is not None
    if path == "device" and (custom is not None or not fixed):
        why = "a custom preprocess runs on the host" if fixed else "its images differ in size"
        raise ValueError(
            f"preprocess_path='device' cannot preprocess {ds.identity!r} ({why}); use 'host' "
            "or 'auto' (--config.features.preprocess=auto)"
        )
    if custom is None and fixed and path != "host":
        return None, DEVICE_PREPROCESS_VERSION
    if custom is None:
        return preprocess, PREPROCESS_VERSION
    name = getattr(custom, "__qualname__", repr(custom))
    return custom, f"custom:{getattr(custom, '__module__', '')}.{name}"
