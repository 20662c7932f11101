"""`PixelGrid`: the raster a model sees, at its pixel size, read from the right pyramid level.

A model trained at 0.5 µm/px must see 0.5 µm pixels.  The grid for a pixel size is:

- a pyramid level whose pixel size is within `MPP_TOLERANCE` (10 %) of it, read as it is (a *native* grid:
  no resampling, so a 20x slide with 0.499 µm pixels feeds a 0.5 µm model directly); otherwise
- the next finer level, area-resampled on the fly to exactly that pixel size (a 40x slide whose levels are
  0.25, 1.0 and 4.0 µm gives a 0.5 µm grid from the 0.25 µm level).  Level 0 is only ever resampled when no
  coarser level is fine enough.

Resampling is *area averaging* (each output pixel is the mean of the input area it covers, fractional overlaps
weighted), computed per read from exactly the pixels under the read's footprint, so reading a region in tiles
gives the same pixels as reading it whole: tiled inference stays exact on resampled grids too.

A model that needs finer pixels than the slide's level 0 (a 0.25 µm model on a 0.5 µm slide) is refused
rather than fed invented detail (`IncompatibleModelError`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from ..errors import IncompatibleModelError, RegionError, SlideError
from ..geometry import Downsample, Region
from ..slide import Slide

__all__ = ["PixelGrid", "MPP_TOLERANCE"]

log = logging.getLogger(__name__)

#: Relative pixel-size difference under which a pyramid level is used as it is (no resampling).  Scanner
#: "20x" and "40x" pixel sizes vary by a few percent between vendors, well inside the scale jitter models are
#: trained with, and resampling would cost more than it gains.
MPP_TOLERANCE = 0.10

_EPS = 1e-9


@dataclass(frozen=True)
class PixelGrid:
    """A raster covering the whole slide at one pixel size.

    Parameters
    ----------
    level : int
        Pyramid level pixels are read from.
    downsample : (float, float)
        ``(dy, dx)`` of a grid pixel relative to level 0.
    shape : (int, int)
        ``(H, W)`` of the whole slide on this grid.
    level_downsample : (float, float)
        ``(dy, dx)`` of ``level`` relative to level 0.
    native : bool
        True when the grid is the level itself (no resampling).
    mpp : float or None
        Grid pixel size in µm (mean of both axes), None when the slide's pixel size is unknown.
    """

    level: int
    downsample: Downsample
    shape: tuple[int, int]
    level_downsample: Downsample
    native: bool
    mpp: float | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def of_level(cls, slide: Slide, level: int) -> "PixelGrid":
        """The native grid of a pyramid level."""
        ds = slide.downsamples[level]
        return cls(level, ds, slide.level_shapes[level], ds, True, slide.level_mpp(level))

    @classmethod
    def for_downsample(
        cls, slide: Slide, downsample: float | Downsample, *, tolerance: float = MPP_TOLERANCE, allow_upsampling: bool = False
    ) -> "PixelGrid":
        """The grid whose pixels are ``downsample`` level-0 pixels.

        Parameters
        ----------
        downsample : float or (float, float)
            Wanted ``(dy, dx)`` relative to level 0.
        tolerance : float
            Relative difference under which a pyramid level is used natively.
        allow_upsampling : bool
            Allow a grid finer than level 0 (otherwise `IncompatibleModelError`).
        """
        dy, dx = (float(downsample), float(downsample)) if np.isscalar(downsample) else map(float, downsample)  # type: ignore[arg-type]
        if not (dy > 0 and dx > 0):
            raise RegionError(f"downsample {downsample!r} must be positive", subject=slide.name)
        level = _finest_level_at_most(slide, (dy, dx), tolerance)
        lds = slide.downsamples[level]
        if abs(lds[0] / dy - 1) <= tolerance and abs(lds[1] / dx - 1) <= tolerance:
            return cls.of_level(slide, level)
        if (dy < 1 / (1 + tolerance) or dx < 1 / (1 + tolerance)) and not allow_upsampling:
            raise IncompatibleModelError(
                f"needs pixels {1 / min(dy, dx):.2f}x finer than the slide's finest level",
                subject=slide.name,
                hint="use a model trained at the slide's pixel size or coarser, or pass --mpp if the file's pixel size is wrong",
            )
        h0, w0 = slide.level_shapes[0]
        shape = (max(1, math.ceil(h0 / dy - 1e-6)), max(1, math.ceil(w0 / dx - 1e-6)))
        mpp = None if slide.mpp_yx is None else float((slide.mpp_yx[0] * dy + slide.mpp_yx[1] * dx) / 2)
        return cls(level, (dy, dx), shape, lds, False, mpp)

    @classmethod
    def for_mpp(cls, slide: Slide, mpp: float, *, tolerance: float = MPP_TOLERANCE) -> "PixelGrid":
        """The grid at a pixel size of ``mpp`` µm (e.g. a model config's ``mpp``).

        Raises
        ------
        SlideError
            If the slide does not state its pixel size (hint: ``--mpp``).
        IncompatibleModelError
            If ``mpp`` is finer than the slide's level 0 (beyond ``tolerance``).
        """
        if slide.mpp_yx is None:
            raise SlideError(
                "the slide's pixel size is unknown, so the pyramid level matching the model cannot be chosen",
                subject=slide.path or slide.name,
                hint="pass --mpp with the level-0 pixel size in µm (e.g. 0.25 for 40x, 0.5 for 20x)",
            )
        my, mx = slide.mpp_yx
        try:
            return cls.for_downsample(slide, (mpp / my, mpp / mx), tolerance=tolerance)
        except IncompatibleModelError as exc:
            raise IncompatibleModelError(
                f"the model works at {mpp:g} µm/px but the slide's finest level is {slide.mpp:.4g} µm/px",
                subject=slide.path or slide.name,
                hint="use a model trained at the slide's pixel size or coarser, or pass --mpp if the file's pixel size is wrong",
            ) from exc

    # ------------------------------------------------------------------ geometry
    @property
    def extent(self) -> Region:
        """The whole grid, in grid pixels."""
        return Region(0, 0, *self.shape)

    def from_level0(self, region: Region) -> Region:
        """Smallest grid region covering a level-0 region (outward rounding), not clipped."""
        return region.to_level(self.downsample)

    def to_level0(self, grid_region: Region) -> Region:
        """Level-0 region covered by a grid region."""
        return grid_region.from_level(self.downsample)

    @property
    def scale_from_level(self) -> tuple[float, float]:
        """Grid pixel size in ``level`` pixels (1 for native grids, > 1 when downscaling)."""
        return (self.downsample[0] / self.level_downsample[0], self.downsample[1] / self.level_downsample[1])

    def describe(self) -> str:
        how = "native" if self.native else f"area-resampled {self.scale_from_level[0]:.3g}x from level {self.level}"
        mpp = f"{self.mpp:.4g} µm/px" if self.mpp else f"downsample {self.downsample[0]:.4g}"
        return f"level {self.level}, {mpp}, {self.shape[0]} x {self.shape[1]} px ({how})"

    # ------------------------------------------------------------------ reading
    def read(self, slide: Slide, grid_region: Region, *, fill: float | None = None) -> np.ndarray:
        """Pixels of a grid region, padded with ``fill`` outside the slide.

        Parameters
        ----------
        slide : Slide
            The slide this grid was made for.
        grid_region : Region
            Grid pixels; may extend beyond the slide (the outside is ``fill``, white glass for brightfield,
            which is what a tile at a slide's edge looks like to a model trained on tissue at glass).
        fill : float, optional
            Default ``slide.background_value``.

        Returns
        -------
        numpy.ndarray
            ``(h, w, C)`` in the slide's dtype, ``(h, w) = grid_region.shape``.
        """
        if grid_region.is_empty:
            raise RegionError(f"grid region {grid_region} is empty", subject=slide.name)
        if self.native:
            return slide.read_level(self.level, grid_region, pad=True, fill=fill)
        return self._read_resampled(slide, grid_region, fill)

    def _read_resampled(self, slide: Slide, g: Region, fill: float | None) -> np.ndarray:
        sy, sx = self.scale_from_level
        # Footprint of the grid region in level pixels (fractional), and the integer box of level pixels under it.
        y0, y1 = g.row * sy, g.end_row * sy
        x0, x1 = g.col * sx, g.end_col * sx
        box = Region.from_bounds(y0, x0, y1, x1)
        pixels = slide.read_level(self.level, box, pad=True, fill=fill)
        wy = _area_weights(g.row, g.height, sy, box.row, box.height)
        wx = _area_weights(g.col, g.width, sx, box.col, box.width)
        h_in, w_in, c = pixels.shape
        flat = pixels.reshape(h_in, w_in * c).astype(np.float32)
        rows = (wy @ flat).reshape(g.height, w_in, c)  # (h_out, w_in, C)
        cols = wx @ rows.transpose(1, 0, 2).reshape(w_in, g.height * c)  # (w_out, h_out * C)
        out = cols.reshape(g.width, g.height, c).transpose(1, 0, 2)
        if np.issubdtype(pixels.dtype, np.integer):
            info = np.iinfo(pixels.dtype)
            return np.clip(np.rint(out), info.min, info.max).astype(pixels.dtype)
        return out.astype(pixels.dtype)


def _finest_level_at_most(slide: Slide, downsample: Downsample, tolerance: float) -> int:
    """Coarsest level that is still at least as fine as ``downsample`` (within ``tolerance``) on both axes."""
    dy, dx = downsample
    best = 0
    for i, (ly, lx) in enumerate(slide.downsamples):
        if ly <= dy * (1 + tolerance) and lx <= dx * (1 + tolerance):
            best = i
    return best


def _area_weights(start: int, n_out: int, scale: float, box_start: int, n_in: int) -> sp.csr_matrix:
    """Sparse ``(n_out, n_in)`` area-averaging matrix along one axis.

    Output pixel ``g`` (absolute grid index ``start + i``) covers input ``[g * scale, (g + 1) * scale)``
    (absolute level coordinates); its weight on input pixel ``k`` is the overlap of that interval with
    ``[k, k + 1)`` divided by ``scale``.  Computed from absolute indices so that every read of the same grid
    pixel uses the same weights (tiles agree bit for bit).
    """
    g = np.arange(start, start + n_out, dtype=np.float64)
    lo = g * scale - box_start
    hi = (g + 1) * scale - box_start
    first = np.floor(lo + _EPS).astype(np.int64)
    last = np.ceil(hi - _EPS).astype(np.int64)  # exclusive
    span = int((last - first).max())
    k = first[:, None] + np.arange(span)[None, :]
    overlap = np.clip(np.minimum(hi[:, None], k + 1) - np.maximum(lo[:, None], k), 0.0, None) / scale
    valid = (k < last[:, None]) & (overlap > 0)
    k = np.clip(k, 0, n_in - 1)
    rows = np.broadcast_to(np.arange(n_out)[:, None], k.shape)
    m = sp.csr_matrix((overlap[valid].astype(np.float32), (rows[valid], k[valid])), shape=(n_out, n_in))
    return m
