"""Image decoding: every PIL mode becomes correct 8-bit RGB; unusable bytes give a precise reason."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from vision.io import MediaError, decode_image, to_rgb


def _png(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _rgb(data: bytes) -> np.ndarray:
    img, _ = decode_image(data)
    assert img.mode == "RGB"
    return np.asarray(img)


def test_rgb_passes_through_unchanged():
    arr = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    out, mode = decode_image(_png(Image.fromarray(arr)))
    assert mode == "RGB"
    np.testing.assert_array_equal(np.asarray(out), arr)


def test_grayscale_is_replicated_to_three_channels():
    out = _rgb(_png(Image.fromarray(np.full((4, 4), 77, np.uint8), "L")))
    assert (out == 77).all()


def test_16bit_grayscale_is_rescaled_not_clipped():
    # convert("RGB") would clip 30000 to 255 (white); the value is 30000/65535 of full scale.
    arr = np.full((4, 4), 30000, np.uint16)
    img = Image.fromarray(arr)
    assert img.mode.startswith("I;16")
    out = _rgb(_png(img))
    assert np.all(np.abs(out.astype(int) - round(30000 / 65535 * 255)) <= 1)


def test_float_image_is_min_max_scaled():
    img = Image.fromarray(np.linspace(-1, 3, 16, dtype=np.float32).reshape(4, 4), "F")
    out = np.asarray(to_rgb(img))
    assert out.min() == 0 and out.max() == 255


def test_rgba_is_composited_on_the_background():
    arr = np.zeros((2, 2, 4), np.uint8)
    arr[0, 0] = (255, 0, 0, 255)   # opaque red stays red
    arr[1, 1] = (0, 0, 0, 0)       # transparent black shows the background, not black
    out = _rgb(_png(Image.fromarray(arr, "RGBA")))
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[1, 1]) == (255, 255, 255)
    img, _ = decode_image(_png(Image.fromarray(arr, "RGBA")), background=(0, 128, 0))
    assert tuple(np.asarray(img)[1, 1]) == (0, 128, 0)


def test_palette_with_transparency_and_without():
    p = Image.new("P", (3, 3), 1)
    p.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    assert tuple(_rgb(_png(p))[0, 0]) == (10, 20, 30)
    p.info["transparency"] = 1
    assert tuple(_rgb(_png(p, transparency=1))[0, 0]) == (255, 255, 255)


def test_cmyk_jpeg_converts():
    img = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    out, mode = decode_image(_png(img, "JPEG", quality=95))
    assert mode == "CMYK"
    r, g, b = np.asarray(out).reshape(-1, 3).mean(0)
    assert r > 200 and g < 60 and b < 60


def test_la_and_one_bit_modes():
    assert _rgb(_png(Image.new("LA", (2, 2), (100, 255))))[0, 0].tolist() == [100, 100, 100]
    assert _rgb(_png(Image.new("1", (2, 2), 1)))[0, 0].tolist() == [255, 255, 255]


def test_zero_byte_file():
    with pytest.raises(MediaError, match="empty file"):
        decode_image(b"")


def test_not_an_image():
    with pytest.raises(MediaError, match="not an image format"):
        decode_image(b"this is a text file, not a PNG")


def test_truncated_image():
    data = _png(Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), np.uint8)))
    with pytest.raises(MediaError, match="truncated or corrupt"):
        decode_image(data[: len(data) // 2])


def test_truncated_jpeg():
    arr = np.random.default_rng(2).integers(0, 256, (64, 64, 3), np.uint8)
    data = _png(Image.fromarray(arr), "JPEG")
    with pytest.raises(MediaError, match="truncated or corrupt"):
        decode_image(data[: len(data) // 2])


def test_decompression_bomb_is_rejected_from_the_header():
    data = _png(Image.new("L", (300, 200)))
    with pytest.raises(MediaError, match="300x200 = 60000 pixels is over the decompression-bomb"):
        decode_image(data, max_pixels=50_000)
    assert decode_image(data, max_pixels=60_000)[0].size == (300, 200)


def test_over_pils_own_limit_is_rejected_not_crashing(monkeypatch):
    # PIL raises DecompressionBombError above 2x its limit while opening: still a clean rejection.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(MediaError, match="decompression-bomb"):
        decode_image(_png(Image.new("L", (100, 100))), max_pixels=10**9)


def test_animated_gif_uses_the_first_frame():
    frames = [Image.new("RGB", (4, 4), c) for c in [(255, 0, 0), (0, 0, 255)]]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    out = _rgb(buf.getvalue())
    r, g, b = out.reshape(-1, 3).mean(0)
    assert r > 200 and b < 60
