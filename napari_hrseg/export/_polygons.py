"""Exact conversion between label rasters and polygons, chunk by chunk.

Tracing
-------
Each object's polygon follows the *pixel edges* of its pixels (a pixel ``(row, col)`` is the unit square
``[col, col + 1) x [row, row + 1)``, QuPath's convention too), so the polygon covers exactly the object's pixels and
rasterising it again (pixel-centre rule, below) gives back the same pixels: the round trip is lossless, not merely
close.  A chunk is traced by run-length encoding its rows (a run is a ``1 x n`` rectangle of one value) and taking
the union of each value's rectangles with GEOS, which yields valid polygons with holes.  Pieces that touch an inner
chunk border are held back and merged with their neighbours' pieces at the end, so objects crossing chunk borders
come out whole, while the raster is only ever read one chunk at a time.

Rasterising
-----------
A pixel belongs to a polygon when its centre ``(col + 0.5, row + 0.5)`` lies inside (even-odd rule over all rings,
so holes and multi-part objects need no special case).  A scanline fill computes, for every row centre, where the
polygon's edges cross it, and fills between pairs of crossings; the work is proportional to the number of crossings
plus the filled area, so a large annotation is rasterised tile by tile without a bounding-box-sized point test.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from ..geometry import Region

__all__ = ["TracedObject", "trace_labels", "block_runs", "rasterize", "geometry_rings"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TracedObject:
    """One object traced from a label raster.

    Parameters
    ----------
    value : int
        The label value (instance id, or class index for semantic labels).
    geometry : shapely Polygon or MultiPolygon
        Exact outline in the labels' own pixel coordinates, ``x = column``, ``y = row``.
    """

    value: int
    geometry: BaseGeometry


def block_runs(block: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Run-length encode the non-zero runs of every row.

    Parameters
    ----------
    block : ndarray, shape (H, W)

    Returns
    -------
    rows, col_start, col_end, values : ndarray
        One entry per run of equal non-zero values; ``col_end`` is exclusive.  Row-major order.
    """
    h, w = block.shape
    starts = np.ones((h, w), dtype=bool)
    starts[:, 1:] = block[:, 1:] != block[:, :-1]
    rows, cols = np.nonzero(starts)
    values = block[rows, cols]
    ends = np.empty_like(cols)
    ends[:-1] = cols[1:]
    if len(cols):
        ends[-1] = w
    last_in_row = np.ones(len(rows), dtype=bool)
    last_in_row[:-1] = rows[1:] != rows[:-1]
    ends[last_in_row] = w
    keep = values != 0
    return rows[keep], cols[keep], ends[keep], values[keep]


def _merge_vertical(rows: np.ndarray, c0: np.ndarray, c1: np.ndarray) -> tuple[np.ndarray, ...]:
    """Stack identical runs of consecutive rows into taller rectangles (fewer, larger boxes for GEOS to union)."""
    if len(rows) == 0:
        return rows, rows, c0, c1
    order = np.lexsort((rows, c1, c0))
    r, a, b = rows[order], c0[order], c1[order]
    new = np.ones(len(r), dtype=bool)
    new[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1]) | (r[1:] != r[:-1] + 1)
    group = np.cumsum(new) - 1
    top = r[new]
    bottom = np.zeros(len(top), dtype=r.dtype)
    np.maximum.at(bottom, group, r + 1)
    return top, bottom, a[new], b[new]


def _union_runs(rows: np.ndarray, c0: np.ndarray, c1: np.ndarray, row_offset: int, col_offset: int) -> BaseGeometry:
    top, bottom, left, right = _merge_vertical(rows, c0, c1)
    boxes = shapely.box(left + col_offset, top + row_offset, right + col_offset, bottom + row_offset)
    if len(boxes) == 1:
        return boxes[0]
    # GEOS leaves collinear vertices where rectangles met; simplifying with tolerance 0 removes exactly those.
    return shapely.simplify(shapely.union_all(boxes), 0.0)


def trace_block(block: np.ndarray, row_offset: int = 0, col_offset: int = 0) -> Iterator[tuple[int, BaseGeometry]]:
    """Yield ``(value, geometry)`` for each non-zero value of a block, in the array's coordinates."""
    rows, c0, c1, values = block_runs(block)
    if len(values) == 0:
        return
    order = np.argsort(values, kind="stable")
    values_sorted = values[order]
    splits = np.flatnonzero(np.diff(values_sorted)) + 1
    for idx in np.split(order, splits):
        yield int(values[idx[0]]), _union_runs(rows[idx], c0[idx], c1[idx], row_offset, col_offset)


def _iter_blocks(labels: Any, chunks: tuple[int, int], region: Region) -> Iterator[tuple[Region, np.ndarray]]:
    ch, cw = chunks
    # Start on the storage chunk grid so every read is whole chunks.
    r_first = (region.row // ch) * ch
    c_first = (region.col // cw) * cw
    for r in range(r_first, region.end_row, ch):
        for c in range(c_first, region.end_col, cw):
            tile = Region(r, c, ch, cw).intersect(region)
            if tile.is_empty:
                continue
            block = np.asarray(labels[tile.slices])
            yield tile, block


def trace_labels(
    labels: Any,
    *,
    chunks: tuple[int, int],
    split_components: bool,
    region: Region | None = None,
    values: set[int] | None = None,
) -> Iterator[TracedObject]:
    """Trace every object of a (possibly huge, lazily read) label array, one storage chunk at a time.

    Parameters
    ----------
    labels : array-like, shape (H, W)
        numpy, dask or zarr; only ``labels[slices]`` of one chunk at a time is read.
    chunks : (int, int)
        Block shape to read by (the storage chunks).
    split_components : bool
        True for semantic labels: each connected region of a class is its own object (diagonal-only contact
        separates regions, as QuPath's "split" does).  False for instance labels: all pixels of an id are one
        object (a Polygon, or a MultiPolygon for a fragmented object).
    region : Region, optional
        Part of the array to trace (in the array's pixels); default the whole array.
    values : set of int, optional
        Trace only these label values.

    Yields
    ------
    TracedObject
        Objects wholly inside one chunk first, as their chunk is read; objects crossing chunk borders at the end.
    """
    full = Region.from_shape(labels.shape)
    region = full if region is None else region.clip(labels.shape)
    wanted = None if values is None else np.fromiter(values, dtype=np.int64)
    # An instance id may be fragmented into pieces that touch no common border; a first cheap pass (unique values
    # per chunk) finds the ids present in several chunks, whose pieces are then merged whatever their position.
    spread: set[int] = set() if split_components else _ids_in_several_blocks(labels, chunks, region, wanted)
    pending: dict[int, list[BaseGeometry]] = {}
    for tile, block in _iter_blocks(labels, chunks, region):
        if wanted is not None:
            block = np.where(np.isin(block, wanted), block, 0)
        if not block.any():
            continue
        # Borders shared with another block of the traced region: a piece touching one may continue there.
        inner = (
            tile.row > region.row,
            tile.end_row < region.end_row,
            tile.col > region.col,
            tile.end_col < region.end_col,
        )
        for value, geom in trace_block(block, tile.row, tile.col):
            parts = shapely.get_parts(geom) if split_components else [geom]
            for part in parts:
                if split_components:
                    xmin, ymin, xmax, ymax = part.bounds
                    continues = (
                        (inner[0] and ymin <= tile.row)
                        or (inner[1] and ymax >= tile.end_row)
                        or (inner[2] and xmin <= tile.col)
                        or (inner[3] and xmax >= tile.end_col)
                    )
                else:
                    continues = value in spread
                if continues:
                    pending.setdefault(value, []).append(part)
                else:
                    yield TracedObject(value, part)
    for value in sorted(pending):
        merged = shapely.simplify(shapely.union_all(pending[value]), 0.0)
        if split_components:
            for part in shapely.get_parts(merged):
                yield TracedObject(value, part)
        else:
            yield TracedObject(value, merged)


def _ids_in_several_blocks(labels: Any, chunks: tuple[int, int], region: Region, wanted: np.ndarray | None) -> set[int]:
    seen: set[int] = set()
    several: set[int] = set()
    for _, block in _iter_blocks(labels, chunks, region):
        if not block.any():
            continue
        ids = np.unique(block)
        ids = ids[ids != 0]
        if wanted is not None:
            ids = ids[np.isin(ids, wanted)]
        for i in ids.tolist():
            if i in seen:
                several.add(i)
            else:
                seen.add(i)
    return several


# ---------------------------------------------------------------------- rasterising
def geometry_rings(geom: BaseGeometry) -> list[np.ndarray]:
    """All rings (exteriors and holes) of a polygonal geometry as ``(N, 2)`` arrays of ``(x, y)``."""
    rings: list[np.ndarray] = []
    for poly in shapely.get_parts(geom):
        if poly.geom_type != "Polygon" or poly.is_empty:
            continue
        rings.append(np.asarray(poly.exterior.coords, dtype=np.float64))
        rings.extend(np.asarray(r.coords, dtype=np.float64) for r in poly.interiors)
    return rings


def _edges(rings: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    if not rings:
        empty = np.zeros(0)
        return empty, empty, empty, empty
    starts = np.concatenate([r[:-1] for r in rings if len(r) > 1] or [np.zeros((0, 2))])
    ends = np.concatenate([r[1:] for r in rings if len(r) > 1] or [np.zeros((0, 2))])
    x0, y0 = starts[:, 0], starts[:, 1]
    x1, y1 = ends[:, 0], ends[:, 1]
    keep = y0 != y1  # horizontal edges never cross a row centre
    return x0[keep], y0[keep], x1[keep], y1[keep]


def rasterize(
    geom: BaseGeometry | list[np.ndarray],
    region: Region,
    *,
    scale: tuple[float, float] = (1.0, 1.0),
) -> np.ndarray:
    """Boolean mask of the pixels of ``region`` whose centres lie inside a polygonal geometry.

    Parameters
    ----------
    geom : shapely geometry or list of (N, 2) rings
        Polygon(s) in ``(x, y)`` coordinates; with ``scale = (sy, sx)`` the coordinates are divided by it first
        (level-0 pixels to a level's pixels: ``scale`` = the level's downsample).
    region : Region
        Pixels to compute, in the (scaled) raster's coordinates; may extend outside any array.
    scale : (float, float)
        ``(sy, sx)`` dividing the geometry's coordinates.

    Returns
    -------
    ndarray of bool, shape region.shape
    """
    rings = geometry_rings(geom) if isinstance(geom, BaseGeometry) else geom
    if scale != (1.0, 1.0):
        rings = [r / np.array([scale[1], scale[0]]) for r in rings]
    x0, y0, x1, y1 = _edges(rings)
    h, w = region.shape
    mask = np.zeros((h, w), dtype=bool)
    if len(x0) == 0 or h == 0 or w == 0:
        return mask
    ylo, yhi = np.minimum(y0, y1), np.maximum(y0, y1)
    # Row r (centre r + 0.5) is crossed by an edge when ylo <= r + 0.5 < yhi (half-open: a vertex counts once).
    r_start = np.ceil(ylo - 0.5).astype(np.int64)
    r_stop = np.ceil(yhi - 0.5).astype(np.int64)
    r_start = np.maximum(r_start, region.row)
    r_stop = np.minimum(r_stop, region.end_row)
    counts = np.maximum(r_stop - r_start, 0)
    total = int(counts.sum())
    if total == 0:
        return mask
    edge = np.repeat(np.arange(len(x0)), counts)
    offsets = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    rows = r_start[edge] + offsets
    yc = rows + 0.5
    xs = x0[edge] + (yc - y0[edge]) * (x1[edge] - x0[edge]) / (y1[edge] - y0[edge])
    order = np.lexsort((xs, rows))
    rows, xs = rows[order], xs[order]
    # Pair crossings row by row: (1st, 2nd), (3rd, 4th), ...  Valid polygons cross every row an even number of times.
    xa, xb, rr = xs[0::2], xs[1::2], rows[0::2]
    if len(xa) != len(xb) or np.any(rows[1::2] != rr):
        raise ValueError("polygon rings are not closed")
    # Pixel c is filled when xa <= c + 0.5 < xb.
    ca = np.clip(np.ceil(xa - 0.5).astype(np.int64) - region.col, 0, w)
    cb = np.clip(np.ceil(xb - 0.5).astype(np.int64) - region.col, 0, w)
    keep = cb > ca
    if not np.any(keep):
        return mask
    rr, ca, cb = rr[keep] - region.row, ca[keep], cb[keep]
    toggles = np.zeros((h, w + 1), dtype=np.int32)
    np.add.at(toggles, (rr, ca), 1)
    np.add.at(toggles, (rr, cb), -1)
    mask[:] = np.cumsum(toggles, axis=1)[:, :w] > 0
    return mask
