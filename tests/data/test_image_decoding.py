"""`decode_image` on 16-bit files (review case BD-8) and on files it cannot decode.

Reference for 16 bits: NumPy's `x >> 8` (the high byte), the reduction PIL itself applies to
16-bit RGB PNGs, so grey and colour 16-bit files of one picture decode alike; PIL's plain
`convert("RGB")` instead clips at 255, turning a 0..65535 gradient into [0 255 255 ...]."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from calfuse_jax.data.images import ImageDecodeError, decode_image
from calfuse_jax.preprocess import preprocess

RNG = np.random.default_rng(0)
# A full-range gradient, values whose low byte is >= 128 (x >> 8 and round(x / 257) differ
# there: 0x12FF -> 18 vs 19), and random pixels.
WIDE = np.concatenate(
    [
        np.linspace(0, 65535, 16).astype(np.uint16)[None].repeat(2, 0),
        np.full((2, 16), 0x12FF, np.uint16),
        RNG.integers(0, 65536, (4, 16)).astype(np.uint16),
    ]
)


def reference(wide: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3]: the high byte of each 16-bit value, grey repeated over RGB."""
    high = (np.clip(wide.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
    return np.repeat(high[..., None], 3, -1) if high.ndim == 2 else high


def saved(image: Image.Image, fmt: str) -> io.BytesIO:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    buffer.seek(0)
    return buffer


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def rgb16_png(pixels: np.ndarray) -> io.BytesIO:
    """A 16-bit-per-channel RGB PNG of uint16 [H, W, 3] (PIL cannot write one)."""
    height, width, _ = pixels.shape
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    data = png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(rows))
    return io.BytesIO(b"\x89PNG\r\n\x1a\n" + data + png_chunk(b"IEND", b""))


def test_16_bit_grey_png_is_scaled_not_clipped():
    file = saved(Image.fromarray(WIDE), "PNG")
    assert Image.open(file).mode == "I;16"
    file.seek(0)
    decoded = decode_image(file)
    assert decoded.dtype == np.uint8 and decoded.shape == (*WIDE.shape, 3)
    np.testing.assert_array_equal(decoded, reference(WIDE))
    assert decoded[0, :, 0].tolist()[:4] == [0, 17, 34, 51]  # was [0, 255, 255, 255]


def test_16_bit_big_endian_and_32_bit_integer_tiffs():
    big = Image.frombytes("I;16B", WIDE.shape[::-1], WIDE.astype(">u2").tobytes())
    file = saved(big, "TIFF")
    assert Image.open(file).mode == "I;16B"
    file.seek(0)
    np.testing.assert_array_equal(decode_image(file), reference(WIDE))
    # Mode I (32-bit): taken as 16-bit data, values outside 0..65535 clipped first.
    ints = np.concatenate([WIDE, [[0] * 16]]).astype(np.int32)
    ints[-1, :2] = -5, 70000
    file = saved(Image.fromarray(ints, "I"), "TIFF")
    assert Image.open(file).mode == "I"
    file.seek(0)
    decoded = decode_image(file)
    np.testing.assert_array_equal(decoded, reference(ints))
    assert decoded[-1, :2, 0].tolist() == [0, 255]


def test_16_bit_rgb_png_keeps_the_high_byte():
    """PIL exposes a 16-bit RGB PNG as 8-bit RGB itself; pinned to the same reference."""
    pixels = np.stack([WIDE, WIDE[:, ::-1], np.full_like(WIDE, 0x12FF)], -1)
    np.testing.assert_array_equal(decode_image(rgb16_png(pixels)), reference(pixels))


def test_preprocess_scales_a_16_bit_pil_image_too():
    image = Image.open(saved(Image.fromarray(WIDE), "PNG"))
    np.testing.assert_array_equal(preprocess([image], 8), preprocess([reference(WIDE)], 8))


@pytest.mark.parametrize("data", [b"", b"GIF89a broken", b"\x89PNG\r\n\x1a\n\0\0"])
def test_an_undecodable_file_object_is_an_image_decode_error(data, tmp_path):
    with pytest.raises(ImageDecodeError, match=r"cannot decode the image 'record 7'"):
        decode_image(io.BytesIO(data), name="record 7")
    path = tmp_path / "x.png"
    path.write_bytes(data)
    with pytest.raises(ImageDecodeError, match=f"cannot decode the image '{path}'"):
        decode_image(path)
