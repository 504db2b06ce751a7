"""Image decoding that turns whatever a dataset holds into 8-bit RGB, or a precise reason why not.

Real image collections hold every mode PIL knows. A silent ``img.convert("RGB")`` gets several of them
wrong, so each is converted deliberately:

- 16-bit and 32-bit greyscale (``I;16``, ``I``, ``F``): ``convert`` clips to 255 and gives a white
  image; the values are rescaled to 8 bits instead (by the bit depth, or by the maximum for floats).
- Transparency (``RGBA``, ``LA``, ``PA``, palette images with a transparent index): ``convert``
  drops the alpha channel and shows whatever colour hides under it (often black); the image is
  composited onto ``background`` (white by default) instead, as a viewer would show it.
- ``CMYK``, ``YCbCr``, ``L``, ``1``, palette without transparency: PIL's conversion is right.
- Animated images: the first frame.

Unusable media raise :class:`MediaError` with a one-line reason the stage puts in its rejected table:
an empty file, bytes PIL cannot identify, truncated data, or more pixels than ``max_pixels`` (checked
from the header before any pixel is decoded, so a decompression bomb costs nothing).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485  # PIL's own bomb threshold


class MediaError(ValueError):
    """Media that cannot be used; the message is the reason recorded for it."""


def _rescale(arr: np.ndarray, mode: str) -> np.ndarray:
    arr = arr.astype(np.float64)
    if mode.startswith("I;16"):
        top = 65535.0
    elif mode == "I":  # 32-bit int; 16-bit PNGs also open as "I" in some PIL versions
        top = 65535.0 if arr.max(initial=0) <= 65535 else float(arr.max())
    else:  # "F": floats of any range
        lo = arr.min(initial=0)
        arr = arr - lo
        top = float(arr.max(initial=0)) or 1.0
    return np.clip(np.round(arr / top * 255.0), 0, 255).astype(np.uint8)


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """8-bit RGB of any PIL image (see the module docstring for what each mode needs)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I", "F") or mode.startswith("I;16"):
        return Image.fromarray(_rescale(np.asarray(img), mode), mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 background: tuple[int, int, int] = (255, 255, 255)) -> tuple[Image.Image, str]:
    """``(8-bit RGB image, the mode it had)`` from encoded bytes, or :class:`MediaError`."""
    if not data:
        raise MediaError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # PIL warns above its own limit; ours (max_pixels) decides, just below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise MediaError(f"over the decompression-bomb limit ({e})") from None
    except UnidentifiedImageError:
        raise MediaError(f"not an image format PIL can read ({len(data)} bytes, starts "
                         f"{data[:8]!r})") from None
    except OSError as e:
        raise MediaError(f"unreadable image header ({e})") from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise MediaError(f"image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise MediaError(f"{w}x{h} = {w * h} pixels is over the decompression-bomb limit "
                         f"max_pixels={max_pixels}")
    mode = img.mode
    try:
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)
        img.load()
    except (OSError, SyntaxError, ValueError) as e:  # truncated data, corrupt chunks, bad CRCs
        raise MediaError(f"truncated or corrupt image data ({e})") from None
    return to_rgb(img, background), mode
