"""Lazy pyramids: dask arrays whose chunks call a render function, with no input arrays and no disk.

Each level is a `dask.array.map_blocks` over an empty chunk grid: the graph is a single Blockwise layer, so a
100,000-pixel-wide level costs microseconds to build and nothing is rendered until a chunk is computed.  The
chunk's position comes from ``block_id``; every chunk is computed independently (no overlap, no neighbours).
"""

from __future__ import annotations

import math
from typing import Callable

import dask.array as da
import numpy as np

__all__ = ["level_shapes", "default_level_count", "lazy_level"]

#: ``render(level, row0, col0, height, width) -> ndarray`` of the chunk (2-D or ``(h, w, C)``).
RenderFn = Callable[[int, int, int, int, int], np.ndarray]


def level_shapes(height: int, width: int, n_levels: int) -> list[tuple[int, int]]:
    """``(rows, cols)`` of each level: level ``l`` is the level-0 size divided by ``2**l``, rounded up."""
    return [(max(1, math.ceil(height / 2**l)), max(1, math.ceil(width / 2**l))) for l in range(n_levels)]


def default_level_count(height: int, width: int, tile: int) -> int:
    """Levels down to the first that fits in one tile (at least 1): 9 for 100,000 px and 512-px tiles."""
    n = 1
    while max(math.ceil(height / 2 ** (n - 1)), math.ceil(width / 2 ** (n - 1))) > tile:
        n += 1
    return n


def _chunks(n: int, tile: int) -> tuple[int, ...]:
    full, rest = divmod(n, tile)
    return (tile,) * full + ((rest,) if rest else ())


def lazy_level(
    render: RenderFn, level: int, shape: tuple[int, int], tile: int, dtype, channels: int | None, name: str
) -> da.Array:
    """One level as a dask array of ``shape`` (plus ``channels`` last, if given) in ``tile``-sized chunks.

    ``name`` must identify the content (slide parameters, kind and level): dask uses it as the graph key, so two
    arrays with the same name are assumed identical.
    """
    chunks = (_chunks(shape[0], tile), _chunks(shape[1], tile))
    if channels is not None:
        chunks = chunks + ((channels,),)
    rows, cols = chunks[0], chunks[1]
    row_starts = np.concatenate([[0], np.cumsum(rows)[:-1]]).tolist()
    col_starts = np.concatenate([[0], np.cumsum(cols)[:-1]]).tolist()

    def block(block_id=None):
        i, j = block_id[0], block_id[1]
        return render(level, row_starts[i], col_starts[j], rows[i], cols[j])

    meta = np.empty((0,) * len(chunks), dtype=dtype)
    return da.map_blocks(block, chunks=chunks, dtype=dtype, meta=meta, name=name)
