"""Tissue detection at a coarse level, so whole-slide inference skips glass.

Brightfield (RGB): at ~16 µm/px the colour saturation ``(max - min) / max`` of glass is under ~0.03 and that
of stained tissue, even pale stroma or fat borders, above ~0.05.  The threshold is Otsu's on the saturation
histogram, clamped to ``[min_saturation, max_saturation]``: Otsu alone splits a field of *all* tissue into two
halves (then the clamp keeps all of it) and finds a threshold in the noise of a slide that is *all* glass (then
the floor keeps none).  Pixels brighter than glass-white minus a margin but saturated (dust glints) are rare at
this scale; pen ink is saturated and counts as tissue (it costs some tiles, never a missed region).
Fluorescence / multiplex (not RGB): Otsu on the brightest channel (tissue is bright on a dark background).

Morphology (in µm, so the result does not depend on the level read): a 3x3 median against speckle, a closing
that bridges gaps narrower than ``close_um``, holes smaller than ``hole_um2`` filled (a tile inside a small
lumen still gets segmented), and fragments smaller than ``min_area_um2`` removed.

The coarse image is read from the coarsest pyramid level at least as fine as the target pixel size and
mean-pooled down to it with dask, chunk by chunk: memory stays bounded even for a slide with one level.
"""

from __future__ import annotations

import logging
import threading
import weakref
from dataclasses import dataclass

import dask.array as da
import numpy as np
from scipy import ndimage as ndi

from ..geometry import Downsample, Region
from ..slide import Slide
from .grid import _finest_level_at_most

__all__ = ["TissueMask", "detect_tissue", "tissue_mask_for", "coarse_image"]

log = logging.getLogger(__name__)

#: Pixel size, in µm, tissue detection works at by default.
TISSUE_MPP = 16.0
#: Downsample used when the slide's pixel size is unknown (16 µm at 0.5 µm/px).
TISSUE_DOWNSAMPLE = 32.0


@dataclass(frozen=True, eq=False)
class TissueMask:
    """Where the tissue is, on a coarse grid.

    Parameters
    ----------
    mask : numpy.ndarray
        ``(h, w)`` bool, True on tissue.
    downsample : (float, float)
        ``(dy, dx)`` of a mask pixel relative to level 0 (mask pixel ``i`` covers level-0 ``[i*dy, (i+1)*dy)``).
    threshold : float
        The threshold applied (saturation for RGB, normalised intensity otherwise).
    level : int
        Pyramid level the coarse image was read from.
    method : str
        ``"saturation"`` or ``"intensity"``.
    """

    mask: np.ndarray
    downsample: Downsample
    threshold: float
    level: int
    method: str

    def __post_init__(self):
        # Summed-area table: any region's tissue pixel count in O(1), for millions of tile queries.
        sat = np.zeros((self.mask.shape[0] + 1, self.mask.shape[1] + 1), dtype=np.int64)
        sat[1:, 1:] = self.mask.astype(np.int64).cumsum(0).cumsum(1)
        object.__setattr__(self, "_sat", sat)

    @property
    def fraction(self) -> float:
        """Tissue fraction of the whole slide, 0..1."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    def _footprint(self, region: Region) -> Region:
        return region.to_level(self.downsample).clip(self.mask.shape)

    def tissue_pixels(self, region: Region) -> int:
        """Number of mask pixels on tissue under a level-0 region."""
        fp = self._footprint(region)
        if fp.is_empty:
            return 0
        s = self._sat  # type: ignore[attr-defined]
        return int(s[fp.end_row, fp.end_col] - s[fp.row, fp.end_col] - s[fp.end_row, fp.col] + s[fp.row, fp.col])

    def tissue_fraction(self, region: Region) -> float:
        """Fraction, 0..1, of a level-0 region's mask footprint that is tissue (0 outside the slide)."""
        fp = self._footprint(region)
        return self.tissue_pixels(region) / fp.area if not fp.is_empty else 0.0

    def has_tissue(self, region: Region, margin: int = 1) -> bool:
        """True if a level-0 region, grown by ``margin`` mask pixels, touches tissue.

        The margin keeps tiles whose edge grazes tissue that the coarse mask only half-resolved.
        """
        fp = region.to_level(self.downsample).expand(margin).clip(self.mask.shape)
        if fp.is_empty:
            return False
        s = self._sat  # type: ignore[attr-defined]
        return bool(s[fp.end_row, fp.end_col] - s[fp.row, fp.end_col] - s[fp.end_row, fp.col] + s[fp.row, fp.col] > 0)

    def layer_transform(self) -> dict[str, tuple[float, float]]:
        """napari ``scale``/``translate`` placing the mask over the level-0 image layer."""
        dy, dx = self.downsample
        return {"scale": (dy, dx), "translate": ((dy - 1) / 2, (dx - 1) / 2)}


def coarse_image(slide: Slide, downsample: float) -> tuple[np.ndarray, Downsample, int]:
    """The whole slide at about ``downsample`` (mean-pooled), read lazily from the best level.

    Returns
    -------
    image : numpy.ndarray
        ``(h, w, C)`` float32 (slide value range).
    downsample : (float, float)
        Exact ``(dy, dx)`` of its pixels relative to level 0.
    level : int
        Level read.
    """
    level = _finest_level_at_most(slide, (downsample, downsample), 0.0)
    lds = slide.downsamples[level]
    factor = max(1, int(round(downsample / ((lds[0] + lds[1]) / 2))))
    arr = slide.levels[level]
    if factor > 1:
        # Pad to a multiple of the factor with the background (glass), then mean-pool chunk by chunk.
        ph, pw = (-arr.shape[0]) % factor, (-arr.shape[1]) % factor
        if ph or pw:
            arr = da.pad(arr, ((0, ph), (0, pw), (0, 0)), mode="constant", constant_values=slide.background_value)
        chunk = max(factor, (2048 // factor) * factor)
        arr = arr.rechunk((chunk, chunk, -1))
        arr = da.coarsen(np.mean, arr.astype(np.float32), {0: factor, 1: factor})
    image = np.asarray(arr.compute(scheduler="threads"), dtype=np.float32)
    return image, (lds[0] * factor, lds[1] * factor), level


def detect_tissue(
    slide: Slide,
    *,
    mpp: float = TISSUE_MPP,
    min_saturation: float = 0.04,
    max_saturation: float = 0.10,
    close_um: float = 64.0,
    hole_um2: float = 200_000.0,
    min_area_um2: float = 5_000.0,
) -> TissueMask:
    """Find tissue at a coarse level.

    Parameters
    ----------
    slide : Slide
        Any slide; its pixel size may be unknown (then a downsample of 32 is used and sizes in µm assume
        0.5 µm/px).
    mpp : float
        Pixel size, in µm, to work at (~16-32 µm: fine enough for 0.1 mm fragments, tiny for a whole slide).
    min_saturation, max_saturation : float
        Clamp of the Otsu saturation threshold (RGB).
    close_um : float
        Gaps narrower than this are bridged (µm).
    hole_um2 : float
        Holes smaller than this (µm²) are filled.
    min_area_um2 : float
        Fragments smaller than this (µm²) are dropped.

    Returns
    -------
    TissueMask
    """
    from skimage.filters import threshold_otsu

    slide_mpp = slide.mpp or 0.5
    target_ds = mpp / slide.mpp if slide.mpp else TISSUE_DOWNSAMPLE
    image, ds, level = coarse_image(slide, target_ds)
    pixel_um = slide_mpp * (ds[0] + ds[1]) / 2
    if slide.is_rgb:
        mx = image.max(axis=-1)
        mn = image.min(axis=-1)
        feature = (mx - mn) / np.maximum(mx, 1.0)
        feature = ndi.median_filter(feature, size=3)
        threshold = float(np.clip(_otsu(feature, threshold_otsu), min_saturation, max_saturation))
        method = "saturation"
    else:
        feature = image.max(axis=-1)
        lo, hi = np.percentile(feature, (0.5, 99.5))
        feature = (feature - lo) / max(hi - lo, 1e-6)
        feature = ndi.median_filter(feature, size=3)
        threshold = float(_otsu(feature, threshold_otsu))
        method = "intensity"
    mask = feature > threshold
    radius = max(1, int(round(close_um / pixel_um / 2)))
    mask = ndi.binary_closing(mask, structure=_disk(radius), border_value=0)
    px_area = pixel_um**2
    mask = ~_drop_small(~mask, hole_um2 / px_area)  # fill small holes
    mask = _drop_small(mask, min_area_um2 / px_area)
    log.info(
        "%s: tissue %.1f%% at %.3g µm/px (level %d, %s threshold %.3f)", slide.name, 100 * mask.mean(), pixel_um, level, method, threshold
    )
    return TissueMask(mask=mask, downsample=ds, threshold=threshold, level=level, method=method)


def _otsu(values: np.ndarray, threshold_otsu) -> float:
    flat = values[np.isfinite(values)]
    if flat.size == 0 or float(flat.max() - flat.min()) < 1e-6:
        return float("inf")  # a uniform image: no contrast, nothing to separate (clamped for RGB)
    return float(threshold_otsu(flat))


def _drop_small(mask: np.ndarray, min_pixels: float) -> np.ndarray:
    """``mask`` without 8-connected components of fewer than ``min_pixels`` pixels."""
    labels, n = ndi.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_pixels
    keep[0] = False
    return keep[labels]


def _disk(radius: int) -> np.ndarray:
    y, x = np.ogrid[-radius : radius + 1, -radius : radius + 1]
    return x * x + y * y <= radius * radius


_CACHE: "weakref.WeakKeyDictionary[Slide, TissueMask]" = weakref.WeakKeyDictionary()
_CACHE_LOCK = threading.Lock()


def tissue_mask_for(slide: Slide) -> TissueMask:
    """`detect_tissue` with default settings, computed once per open slide (viewer requests reuse it)."""
    with _CACHE_LOCK:
        cached = _CACHE.get(slide)
    if cached is not None:
        return cached
    mask = detect_tissue(slide)
    with _CACHE_LOCK:
        _CACHE[slide] = mask
    return mask
