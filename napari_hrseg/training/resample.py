"""Resampling images and label maps to a model's pixel size, keeping them aligned.

Images are resampled with an antialiased bilinear filter, label maps (semantic classes and instance ids) with
nearest neighbour, and both through the same pixel-centre mapping (Pillow's ``resize`` with an explicit source
``box``), so a label pixel always sits on the image pixel it describes, also for fractional crop origins.

Conventions: arrays are ``(H, W)`` or ``(H, W, C)``, rows first; a ``box`` is ``(row0, col0, row1, col1)`` in
fractional source pixels (half-open), the output ``shape`` is ``(height, width)`` in output pixels.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image

from ..errors import TrainingError
from ..slide import Slide

__all__ = [
    "scaled_shape",
    "resize_box",
    "resample_image",
    "resample_labels",
    "read_array_box",
    "read_slide_at_mpp",
    "read_levels_at",
]

Box = tuple[float, float, float, float]


def scaled_shape(shape: Sequence[int], factor: float | tuple[float, float]) -> tuple[int, int]:
    """Size ``(H, W)`` of an image of ``shape`` after scaling by ``factor`` (output px per input px), >= 1."""
    fy, fx = (factor, factor) if np.isscalar(factor) else factor  # type: ignore[misc]
    return max(1, int(round(shape[0] * fy))), max(1, int(round(shape[1] * fx)))


def _to_pil(arr: np.ndarray, nearest: bool) -> tuple[Image.Image, np.dtype]:
    dtype = arr.dtype
    if arr.ndim == 2:
        if dtype == np.uint8:
            return Image.fromarray(arr, mode="L"), dtype
        if nearest:
            # Instance ids / classes of any integer width go through Pillow's 32-bit integer mode; ids beyond
            # 2**31 do not occur in label images.
            return Image.fromarray(arr.astype(np.int32), mode="I"), dtype
        return Image.fromarray(arr.astype(np.float32), mode="F"), dtype
    if arr.ndim == 3 and arr.shape[2] == 3 and dtype == np.uint8:
        return Image.fromarray(arr, mode="RGB"), dtype
    raise TrainingError(f"cannot resample an array of shape {arr.shape} and dtype {dtype}", subject="resample")


def resize_box(arr: np.ndarray, box: Box, shape: tuple[int, int], *, nearest: bool) -> np.ndarray:
    """Resample the part ``box`` of ``arr`` to ``shape``.

    Parameters
    ----------
    arr : numpy.ndarray
        ``(H, W)`` labels / float map, or ``(H, W, 3)`` uint8 RGB.
    box : (float, float, float, float)
        ``(row0, col0, row1, col1)`` in ``arr``'s pixels; may be fractional but must lie inside ``arr``.
    shape : (int, int)
        Output ``(height, width)``.
    nearest : bool
        Nearest neighbour (labels) instead of antialiased bilinear (images).
    """
    r0, c0, r1, c1 = box
    if (r0, c0) == (0, 0) and (r1, c1) == arr.shape[:2] and tuple(shape) == arr.shape[:2]:
        return arr.copy()
    img, dtype = _to_pil(np.ascontiguousarray(arr), nearest)
    out = img.resize((int(shape[1]), int(shape[0])), Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR,
                     box=(c0, r0, c1, r1))
    res = np.asarray(out)
    if res.dtype != dtype:
        if nearest or dtype.kind == "f":
            res = res.astype(dtype)
        else:
            res = np.clip(np.rint(res), 0, np.iinfo(dtype).max).astype(dtype)
    return res


def resample_image(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resample a whole ``(H, W, 3)`` uint8 image to ``shape`` (antialiased bilinear)."""
    return resize_box(image, (0, 0, image.shape[0], image.shape[1]), shape, nearest=False)


def resample_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resample a whole ``(H, W)`` label or instance map to ``shape`` (nearest; values are never mixed)."""
    return resize_box(labels, (0, 0, labels.shape[0], labels.shape[1]), shape, nearest=True)


def read_array_box(read, array_shape: tuple[int, int], box: Box, shape: tuple[int, int], *, nearest: bool,
                   fill: float, channels: int | None = None, dtype=None) -> np.ndarray:
    """Crop-and-resample ``box`` of a (possibly lazy, possibly huge) 2-D array to ``shape``, padding outside.

    Only the pixels covering the box are read.  The part of the box outside the array is ``fill`` (white glass
    for images, `IGNORE_INDEX` or 0 for labels).

    Parameters
    ----------
    read : callable
        ``read(row0, row1, col0, col1) -> ndarray`` returning that integer window of the array (inside it).
    array_shape : (int, int)
        ``(H, W)`` of the array.
    box : (float, float, float, float)
        ``(row0, col0, row1, col1)`` in the array's pixels, may extend outside it.
    shape : (int, int)
        Output ``(height, width)``.
    nearest : bool
        Nearest neighbour (labels) or antialiased bilinear (images).
    fill : float
        Value outside the array.
    channels, dtype
        Output channels (None for 2-D) and dtype.
    """
    r0, c0, r1, c1 = box
    h, w = shape
    out_shape = (h, w) if channels is None else (h, w, channels)
    out = np.full(out_shape, fill, dtype=dtype)
    sy, sx = (r1 - r0) / h, (c1 - c0) / w  # source pixels per output pixel
    # Output pixels whose source footprint lies inside the array; the rest stays `fill`.
    oy0 = max(0, math.ceil(-r0 / sy - 1e-9)) if r0 < 0 else 0
    ox0 = max(0, math.ceil(-c0 / sx - 1e-9)) if c0 < 0 else 0
    oy1 = min(h, math.floor((array_shape[0] - r0) / sy + 1e-9))
    ox1 = min(w, math.floor((array_shape[1] - c0) / sx + 1e-9))
    if oy1 <= oy0 or ox1 <= ox0:
        return out
    # Source box of the inside part, and the integer window that covers it (plus one pixel of filter support).
    br0, bc0 = r0 + oy0 * sy, c0 + ox0 * sx
    br1, bc1 = r0 + oy1 * sy, c0 + ox1 * sx
    pad = 0 if nearest else int(math.ceil(max(sy, sx, 1.0))) + 1
    wr0, wc0 = max(0, int(math.floor(br0)) - pad), max(0, int(math.floor(bc0)) - pad)
    wr1 = min(array_shape[0], int(math.ceil(br1)) + pad)
    wc1 = min(array_shape[1], int(math.ceil(bc1)) + pad)
    window = np.asarray(read(wr0, wr1, wc0, wc1))
    if dtype is not None and window.dtype != dtype and nearest:
        window = window.astype(dtype)
    part = resize_box(window, (br0 - wr0, bc0 - wc0, br1 - wr0, bc1 - wc0), (oy1 - oy0, ox1 - ox0), nearest=nearest)
    out[oy0:oy1, ox0:ox1] = part
    return out


def read_slide_at_mpp(slide: Slide, box0: Box, shape: tuple[int, int]) -> np.ndarray:
    """Pixels of a slide's level-0 ``box0`` resampled to ``shape``, read from the best pyramid level.

    The level read is the coarsest one that is still at least as fine as the output (so downsampling is
    antialiased, never upsampled from a coarser level); outside the slide is white glass.

    Parameters
    ----------
    slide : Slide
        RGB uint8 slide.
    box0 : (float, float, float, float)
        ``(row0, col0, row1, col1)`` in level-0 pixels, fractional allowed.
    shape : (int, int)
        Output ``(height, width)``.

    Returns
    -------
    numpy.ndarray
        ``(height, width, 3)`` uint8.
    """
    r0, c0, r1, c1 = box0
    out_ds = min((r1 - r0) / shape[0], (c1 - c0) / shape[1])
    level = slide.level_for_downsample(max(1.0, out_ds))
    dy, dx = slide.downsamples[level]
    arr = slide.levels[level]

    def read(a, b, c, d):
        return np.asarray(arr[a:b, c:d].compute(scheduler="threads"))

    return read_array_box(read, arr.shape[:2], (r0 / dy, c0 / dx, r1 / dy, c1 / dx), shape, nearest=False,
                          fill=slide.background_value, channels=slide.n_channels, dtype=slide.dtype)


def read_levels_at(levels: Sequence, level0_shape: tuple[int, int], box0: Box, shape: tuple[int, int], *,
                   fill: int, dtype=np.uint8) -> np.ndarray:
    """A label pyramid's ``box0`` (level-0 pixels of the *slide*) resampled (nearest) to ``shape``.

    Parameters
    ----------
    levels : sequence of array-like
        ``(H_l, W_l)`` label levels, finest first (numpy, dask or zarr arrays).  Their downsample relative to
        the slide is ``level0_shape / level.shape`` per axis, so a label pyramid stored at a coarser working
        level than the slide still lines up.
    level0_shape : (int, int)
        The slide's level-0 ``(H, W)``.
    box0 : (float, float, float, float)
        Level-0 box.
    shape : (int, int)
        Output ``(height, width)``.
    fill : int
        Value outside the labels (`IGNORE_INDEX` for classes, 0 for instance ids).
    """
    r0, c0, r1, c1 = box0
    out_ds = min((r1 - r0) / shape[0], (c1 - c0) / shape[1])
    best = 0
    for i, lev in enumerate(levels):
        ds = min(level0_shape[0] / lev.shape[0], level0_shape[1] / lev.shape[1])
        if ds <= max(1.0, out_ds) * 1.01:
            best = i
    lev = levels[best]
    dy, dx = level0_shape[0] / lev.shape[0], level0_shape[1] / lev.shape[1]

    def read(a, b, c, d):
        win = lev[a:b, c:d]
        return np.asarray(win.compute(scheduler="threads") if hasattr(win, "compute") else win)

    return read_array_box(read, tuple(lev.shape[:2]), (r0 / dy, c0 / dx, r1 / dy, c1 / dx), shape, nearest=True,
                          fill=fill, dtype=dtype)
