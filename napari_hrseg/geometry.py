"""Regions of a slide in level-0 pixels, and their conversion to and from pyramid levels.

Every piece of napari-hrseg speaks in level-0 pixel coordinates, ``(row, col)``, rows first, so geometry is
converted exactly once at each boundary (napari's ``corner_pixels``, a vendor library's ``(x, y)``, a
GeoJSON polygon).  A pyramid level ``l`` has a per-axis downsample ``(dy, dx) = level0_shape / level_shape``;
these are *exact* ratios (an SVS level of 2221 rows under a 4443-row level 0 has ``dy = 2.00045``), so that the
last pixel of every level ends exactly at the slide's edge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

from .errors import RegionError

__all__ = ["Region", "Downsample"]

#: Per-axis downsample factor of a pyramid level relative to level 0, ``(dy, dx)``, both >= 1.
Downsample = tuple[float, float]

# Level coordinates are computed as level0 / downsample; a float error of 1e-9 must not push an exact
# boundary (e.g. 4096 / 2.0) across an integer, so rounding is done with this tolerance.
_EPS = 1e-6


@dataclass(frozen=True, order=True)
class Region:
    """An axis-aligned rectangle in pixel coordinates (level 0 unless documented otherwise).

    Parameters
    ----------
    row, col : int
        Top-left corner, in pixels.  May be negative (a region partly left of or above the slide).
    height, width : int
        Size in pixels, >= 0.
    """

    row: int
    col: int
    height: int
    width: int

    def __post_init__(self):
        for name in ("row", "col", "height", "width"):
            value = getattr(self, name)
            if not isinstance(value, int):
                # Accept numpy integers and integral floats, but never silently truncate 10.5.
                if float(value) != int(value):
                    raise RegionError(f"{name}={value!r} is not a whole number of pixels", subject="Region")
                object.__setattr__(self, name, int(value))
        if self.height < 0 or self.width < 0:
            raise RegionError(
                f"negative size {self.height}x{self.width}", subject="Region", hint="height and width must be >= 0"
            )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_bounds(cls, row0: float, col0: float, row1: float, col1: float) -> "Region":
        """Smallest integer region covering the half-open box ``[row0, row1) x [col0, col1)``."""
        r0 = math.floor(row0 + _EPS)
        c0 = math.floor(col0 + _EPS)
        r1 = math.ceil(row1 - _EPS)
        c1 = math.ceil(col1 - _EPS)
        return cls(r0, c0, max(0, r1 - r0), max(0, c1 - c0))

    @classmethod
    def from_shape(cls, shape: tuple[int, ...]) -> "Region":
        """The whole of an array of ``shape`` (``(H, W, ...)``)."""
        return cls(0, 0, int(shape[0]), int(shape[1]))

    @classmethod
    def parse(cls, text: str) -> "Region":
        """Parse ``"row,col,height,width"`` (the CLI's ``--region``)."""
        parts = [p.strip() for p in text.split(",")]
        if len(parts) != 4:
            raise RegionError(
                f"expected 4 comma-separated integers, got {text!r}", subject="--region", hint="write row,col,height,width"
            )
        try:
            return cls(*(int(p) for p in parts))
        except ValueError as exc:
            raise RegionError(f"{text!r} is not four integers", subject="--region", hint="write row,col,height,width") from exc

    # ------------------------------------------------------------------ properties
    @property
    def end_row(self) -> int:
        """One past the last row."""
        return self.row + self.height

    @property
    def end_col(self) -> int:
        """One past the last column."""
        return self.col + self.width

    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)``."""
        return (self.height, self.width)

    @property
    def area(self) -> int:
        """Number of pixels."""
        return self.height * self.width

    @property
    def is_empty(self) -> bool:
        return self.height == 0 or self.width == 0

    @property
    def slices(self) -> tuple[slice, slice]:
        """``(rows, cols)`` slices; only meaningful for a region inside its array (see :meth:`clip`)."""
        return (slice(self.row, self.end_row), slice(self.col, self.end_col))

    @property
    def center(self) -> tuple[float, float]:
        """Centre ``(row, col)`` in (fractional) pixels."""
        return (self.row + self.height / 2, self.col + self.width / 2)

    # ------------------------------------------------------------------ set operations
    def intersect(self, other: "Region") -> "Region":
        """Overlap of two regions (possibly empty, then anchored at the max corner)."""
        r0, c0 = max(self.row, other.row), max(self.col, other.col)
        r1, c1 = min(self.end_row, other.end_row), min(self.end_col, other.end_col)
        return Region(r0, c0, max(0, r1 - r0), max(0, c1 - c0))

    def intersects(self, other: "Region") -> bool:
        return not self.intersect(other).is_empty

    def contains(self, other: "Region") -> bool:
        return (
            other.row >= self.row
            and other.col >= self.col
            and other.end_row <= self.end_row
            and other.end_col <= self.end_col
        )

    def clip(self, shape: tuple[int, ...]) -> "Region":
        """Part of the region inside an array of ``shape`` (``(H, W, ...)``)."""
        return self.intersect(Region.from_shape(shape))

    def expand(self, halo: int | tuple[int, int]) -> "Region":
        """Grow by ``halo`` pixels on every side (``(rows, cols)`` for different amounts)."""
        hy, hx = (halo, halo) if isinstance(halo, int) else halo
        return Region(self.row - hy, self.col - hx, self.height + 2 * hy, self.width + 2 * hx)

    def translate(self, drow: int, dcol: int) -> "Region":
        return Region(self.row + drow, self.col + dcol, self.height, self.width)

    def relative_to(self, outer: "Region") -> "Region":
        """This region in the coordinates of ``outer``'s top-left corner."""
        return self.translate(-outer.row, -outer.col)

    # ------------------------------------------------------------------ pyramid levels
    def to_level(self, downsample: Downsample) -> "Region":
        """The smallest region of a level (in that level's pixels) that covers this level-0 region.

        Parameters
        ----------
        downsample : (float, float)
            ``(dy, dx)`` of the level relative to level 0.
        """
        dy, dx = downsample
        return Region.from_bounds(self.row / dy, self.col / dx, self.end_row / dy, self.end_col / dx)

    def from_level(self, downsample: Downsample) -> "Region":
        """The level-0 region covered by this region of a level (in that level's pixels).

        Exact at the slide's far edge: ``Region.from_shape(level.shape).from_level(ds)`` is the whole of level 0
        when ``ds = level0.shape / level.shape``.
        """
        dy, dx = downsample
        return Region.from_bounds(self.row * dy, self.col * dx, self.end_row * dy, self.end_col * dx)

    def level_bounds(self, downsample: Downsample) -> tuple[float, float, float, float]:
        """Fractional ``(row0, col0, row1, col1)`` of this level-0 region in a level's pixel coordinates."""
        dy, dx = downsample
        return (self.row / dy, self.col / dx, self.end_row / dy, self.end_col / dx)

    # ------------------------------------------------------------------ tiling helpers
    def grid(self, tile: int | tuple[int, int]) -> Iterator["Region"]:
        """Non-overlapping tiles of at most ``tile`` pixels covering this region, row-major."""
        th, tw = (tile, tile) if isinstance(tile, int) else tile
        if th <= 0 or tw <= 0:
            raise RegionError(f"tile size {tile!r} must be positive", subject="Region.grid")
        for r in range(self.row, self.end_row, th):
            for c in range(self.col, self.end_col, tw):
                yield Region(r, c, min(th, self.end_row - r), min(tw, self.end_col - c))

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.row, self.col, self.height, self.width)

    def __str__(self) -> str:
        return f"{self.row},{self.col},{self.height},{self.width}"
