"""Pixel conversions applied when opening, each with the note that `Slide.conversions` shows the user.

Decisions (documented in the README's format table as well):

- **RGBA -> RGB**: composited over white, ``rgb * a + 255 * (1 - a)``.  Transparent means "no tissue", which on a
  slide is white glass; for an opaque alpha (the MICCAI PNGs) this equals dropping the alpha channel.
- **Single channel**: ``(Y, X)`` becomes ``(Y, X, 1)``; values untouched.
- **16-bit and other non-8-bit data are kept** in their dtype (uint16 fluorescence, float images): converting to
  8 bits would throw away dynamic range a model or a measurement may need; napari sets contrast limits itself.
- **Channel-first** ``(C, Y, X)`` (QPTIFF, OME-Zarr ``c,y,x``) is presented channels-last; chunks stay aligned.
- **Aperio JPEG 2000 with compression 33003** stores YCbCr components without the codestream's colour
  transform; they are converted to RGB with the full-range BT.601 matrix (as OpenSlide does).
- **Palette** images are expanded to RGB; **MinIsWhite** grey images are inverted to the usual black-is-zero.
"""

from __future__ import annotations

import numpy as np

__all__ = ["rgba_to_rgb", "ycbcr_to_rgb", "palette_to_rgb", "invert", "NOTES"]

NOTES = {
    "rgba": "RGBA -> RGB: composited over white (an opaque alpha is simply dropped)",
    "single": "single channel (Y, X) -> (Y, X, 1)",
    "ycbcr_j2k": "Aperio JPEG 2000 (33003) YCbCr components -> RGB (BT.601 full range)",
    "palette": "palette indices -> RGB",
    "miniswhite": "MinIsWhite grey values inverted to black-is-zero",
    "channel_first": "channel-first (C, Y, X) planes presented as (Y, X, C)",
}


def rgba_to_rgb(block: np.ndarray) -> np.ndarray:
    """``(h, w, 4)`` -> ``(h, w, 3)``, composited over white (integer dtypes: their maximum; floats: 1.0)."""
    rgb, alpha = block[..., :3], block[..., 3:4]
    if np.issubdtype(block.dtype, np.integer):
        top = np.iinfo(block.dtype).max
        if np.all(alpha == top):  # opaque: the common case, exact and cheap
            return np.ascontiguousarray(rgb)
        a = alpha.astype(np.float32) / top
        out = rgb.astype(np.float32) * a + top * (1.0 - a)
        return np.clip(np.rint(out), 0, top).astype(block.dtype)
    a = np.clip(alpha, 0, 1)
    return (rgb * a + (1 - a)).astype(block.dtype)


def ycbcr_to_rgb(block: np.ndarray) -> np.ndarray:
    """Full-range BT.601 YCbCr ``(h, w, 3)`` uint8 -> RGB uint8 (JFIF / Aperio 33003 convention)."""
    y = block[..., 0].astype(np.float32)
    cb = block[..., 1].astype(np.float32) - 128.0
    cr = block[..., 2].astype(np.float32) - 128.0
    out = np.empty(block.shape, dtype=np.float32)
    out[..., 0] = y + 1.402 * cr
    out[..., 1] = y - 0.344136 * cb - 0.714136 * cr
    out[..., 2] = y + 1.772 * cb
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def palette_to_rgb(block: np.ndarray, colormap: np.ndarray) -> np.ndarray:
    """Indices ``(h, w, 1)`` and a TIFF colormap ``(3, n)`` of uint16 -> RGB uint8 ``(h, w, 3)``."""
    lut = (np.asarray(colormap).T >> 8).astype(np.uint8) if colormap.dtype == np.uint16 else colormap.T
    return lut[block[..., 0]]


def invert(block: np.ndarray) -> np.ndarray:
    """MinIsWhite -> MinIsBlack for integer data."""
    return (np.iinfo(block.dtype).max - block).astype(block.dtype)
