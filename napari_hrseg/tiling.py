"""Tiled inference as two small objects (MONAI's Splitter/Merger pattern): a `Tiler` and a `Stitcher`.

The `Tiler` cuts a target region of a pixel grid into *cores* (the output pixels a tile owns; together
they partition the region) and *windows* (the input pixels a tile reads: its lattice cell grown by the
model's halo).  Cores lie on a lattice anchored at ``anchor`` (grid origin by default, so a pixel gets the same
tile, hence the same label, whichever viewport asked for it), with sizes and halos rounded up to the model's
``stride``: every window then starts on the model's feature lattice and is a multiple of the stride in size,
so a convolutional model computes on a tile exactly the features it computes on the whole image.  All windows
have the same shape, so tiles batch.

The `Stitcher` takes each tile's output over its window (``add(tile, values)``) and writes it into an output
array: ``"crop"`` keeps each tile's core only (exact, no overlap, what whole slides use), ``"cosine"`` blends
tiles that write ``overlap`` pixels beyond their cores with a weight window whose ramps are cosine-squared
(see `blend_window`).  The output is a numpy array in memory or a zarr array on disk (same code: both are
sliced the same way), so a whole slide never has to fit in memory.

Devices: the model computes wherever it lives (GPU or CPU); values handed to ``add`` may be torch tensors on
any device and are moved to the CPU there.  The stitched output is always held by the host (RAM or disk).

What "exact" means: with a halo at least the model's receptive-field reach, tiled inference of a region equals
one forward pass over the region padded by the halo (and up to a multiple of the stride) with the same
surroundings, in eval mode, to float rounding (tests/test_tiling.py checks it on odd sizes and overlaps).
Pixels outside the slide are read as the slide's background (white glass for brightfield, via
``Slide.read(..., pad=True)``): that is what a model trained on tissue crops at slide edges has seen.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from .errors import RegionError
from .geometry import Region

__all__ = ["Tile", "Tiler", "Stitcher", "blend_window", "round_up", "estimate_halo"]

log = logging.getLogger(__name__)


def round_up(value: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``value``."""
    multiple = max(1, int(multiple))
    return int(math.ceil(value / multiple) * multiple)


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, (int, np.integer)):
        return int(value), int(value)
    a, b = value
    return int(a), int(b)


@dataclass(frozen=True)
class Tile:
    """One tile of a `Tiler`, all regions in grid pixels (absolute, not relative to the target region).

    Parameters
    ----------
    index : int
        Position in the tiler's row-major order.
    cell : (int, int)
        ``(row, col)`` of the lattice cell, counted from the tiler's first cell.
    core : Region
        Output pixels this tile owns (inside the target region; cores partition it).
    write : Region
        Output pixels this tile writes: ``core`` grown by the overlap and clipped to the target region
        (equal to ``core`` when blending is ``"crop"``).
    window : Region
        Input pixels the tile reads (may extend beyond the target region and the slide).
    """

    index: int
    cell: tuple[int, int]
    core: Region
    write: Region
    window: Region

    @property
    def core_in_window(self) -> Region:
        """``core`` relative to the window's top-left corner."""
        return self.core.relative_to(self.window)

    @property
    def write_in_window(self) -> Region:
        """``write`` relative to the window's top-left corner."""
        return self.write.relative_to(self.window)


class Tiler:
    """Cuts a region of a pixel grid into lattice-aligned tiles with halos.

    Parameters
    ----------
    region : Region
        Target region in grid pixels.
    tile_size : int or (int, int)
        Core size; rounded up to a multiple of ``stride``.
    halo : int or (int, int)
        Context read on each side of a lattice cell; rounded up to a multiple of ``stride``.
    stride : int
        The model's coarsest feature stride (``model.stride``); 1 for no alignment.
    overlap : int or (int, int)
        Pixels each tile writes beyond its core on each side (for weighted blending); 0 for crop-to-core.
        Must not exceed ``halo`` (a tile never writes what it computed without context).
    anchor : (int, int)
        Grid point the lattice is anchored at; must be a multiple of ``stride`` from the origin of whatever
        whole-image pass the result is compared with.

    Examples
    --------
    >>> tiler = Tiler(Region(0, 0, 300, 500), tile_size=128, halo=64, stride=32)
    >>> len(tiler), tiler.window_shape
    (12, (256, 256))
    """

    def __init__(
        self,
        region: Region,
        tile_size: int | tuple[int, int] = 512,
        halo: int | tuple[int, int] = 0,
        *,
        stride: int = 1,
        overlap: int | tuple[int, int] = 0,
        anchor: tuple[int, int] = (0, 0),
    ):
        if region.is_empty:
            raise RegionError(f"cannot tile an empty region {region}", subject="Tiler")
        self.region = region
        self.stride = max(1, int(stride))
        th, tw = _pair(tile_size)
        if th <= 0 or tw <= 0:
            raise RegionError(f"tile size {tile_size!r} must be positive", subject="Tiler")
        self.tile_size = (round_up(th, self.stride), round_up(tw, self.stride))
        hy, hx = _pair(halo)
        self.halo = (round_up(hy, self.stride), round_up(hx, self.stride))
        self.overlap = _pair(overlap)
        if self.overlap[0] > self.halo[0] or self.overlap[1] > self.halo[1] or min(self.overlap) < 0:
            raise RegionError(f"overlap {overlap!r} must be between 0 and the halo {self.halo}", subject="Tiler")
        self.anchor = (int(anchor[0]), int(anchor[1]))
        th, tw = self.tile_size
        # Lattice cells intersecting the region: first and one-past-last cell index along each axis.
        self._r0 = (region.row - self.anchor[0]) // th
        self._c0 = (region.col - self.anchor[1]) // tw
        self._r1 = -((-(region.end_row - self.anchor[0])) // th)
        self._c1 = -((-(region.end_col - self.anchor[1])) // tw)

    @classmethod
    def for_model(
        cls,
        model: Any,
        region: Region,
        tile_size: int | tuple[int, int] = 512,
        *,
        halo: int | tuple[int, int] | None = None,
        overlap: int | tuple[int, int] = 0,
        anchor: tuple[int, int] = (0, 0),
    ) -> "Tiler":
        """A tiler with the model's halo (``model.halo``) and stride (``model.stride``).

        ``halo`` overrides the model's; the overlap is added to it so that written pixels keep full context.
        """
        stride = int(getattr(model, "stride", 1))
        base = _pair(int(getattr(model, "halo", 0)) if halo is None else halo)
        ov = _pair(overlap)
        return cls(region, tile_size, (base[0] + ov[0], base[1] + ov[1]), stride=stride, overlap=ov, anchor=anchor)

    # ------------------------------------------------------------------ shape
    @property
    def grid_shape(self) -> tuple[int, int]:
        """``(rows, cols)`` of tiles."""
        return (self._r1 - self._r0, self._c1 - self._c0)

    @property
    def window_shape(self) -> tuple[int, int]:
        """Shape of every window (constant, so windows batch)."""
        return (self.tile_size[0] + 2 * self.halo[0], self.tile_size[1] + 2 * self.halo[1])

    def __len__(self) -> int:
        r, c = self.grid_shape
        return r * c

    def __iter__(self) -> Iterator[Tile]:
        for i in range(len(self)):
            yield self[i]

    def __getitem__(self, index: int) -> Tile:
        rows, cols = self.grid_shape
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        i, j = divmod(index, cols)
        return self.tile_at((i, j), index)

    def tile_at(self, cell: tuple[int, int], index: int | None = None) -> Tile:
        """The tile of lattice cell ``(i, j)`` (counted from the first cell)."""
        i, j = cell
        th, tw = self.tile_size
        lattice = Region(self.anchor[0] + (self._r0 + i) * th, self.anchor[1] + (self._c0 + j) * tw, th, tw)
        core = lattice.intersect(self.region)
        write = core.expand(self.overlap).intersect(self.region) if self.overlap != (0, 0) else core
        window = lattice.expand(self.halo)
        if index is None:
            index = i * self.grid_shape[1] + j
        return Tile(index, (i, j), core, write, window)

    def __repr__(self) -> str:
        return (
            f"Tiler(region={self.region}, tile_size={self.tile_size}, halo={self.halo}, stride={self.stride}, "
            f"overlap={self.overlap}, tiles={len(self)})"
        )


# ---------------------------------------------------------------------- blending
def blend_window(length: int, ramp: int, *, start_edge: bool = False, end_edge: bool = False) -> np.ndarray:
    """1-D blending weights for a written span of ``length`` pixels whose ends overlap neighbours by ``ramp``.

    The weight rises as ``sin²`` over the first ``2 * ramp`` pixels, stays 1, and falls symmetrically at the
    end; two neighbours whose spans overlap by ``2 * ramp`` pixels then have weights summing to 1 across the
    overlap (``sin² + cos² = 1``), a smooth cross-fade.  An end that lies on the target region's edge has no
    neighbour and keeps weight 1 (``start_edge`` / ``end_edge``).  Weights are >= 1e-3, never 0.

    Returns
    -------
    numpy.ndarray
        ``(length,)`` float32.
    """
    w = np.ones(length, dtype=np.float64)
    width = 2 * ramp
    if width > 0:
        t = (np.arange(length) + 0.5) / width
        rise = np.sin(np.clip(t, 0, 1) * np.pi / 2) ** 2
        fall = rise[::-1]
        if not start_edge:
            w = np.minimum(w, rise)
        if not end_edge:
            w = np.minimum(w, fall)
    return np.maximum(w, 1e-3).astype(np.float32)


class Stitcher:
    """Assembles tile outputs into one array covering a target region.

    Parameters
    ----------
    region : Region
        Target region in grid pixels (the `Tiler`'s region).
    out : array-like
        ``(..., H, W)`` output array with ``(H, W) = region.shape``: a numpy array, a zarr array, or anything
        sliced like them.  ``"crop"`` writes values into it directly (any dtype, e.g. uint8 labels);
        ``"cosine"`` accumulates float sums into it and needs ``weights``.
    mode : {"crop", "cosine"}
        Crop each tile to its core, or blend tiles over their overlap with `blend_window`.
    weights : array-like, optional
        ``(H, W)`` float32 accumulator of blending weights (numpy or zarr), ``"cosine"`` only; default a new
        in-memory array of zeros.
    """

    def __init__(self, region: Region, out: Any, *, mode: str = "crop", weights: Any = None):
        if tuple(out.shape[-2:]) != region.shape:
            raise ValueError(f"output of shape {out.shape} does not cover the region {region.shape}")
        if mode not in ("crop", "cosine"):
            raise ValueError(f"mode {mode!r} is not 'crop' or 'cosine'")
        if mode == "cosine" and not np.issubdtype(np.dtype(out.dtype), np.floating):
            raise ValueError("cosine blending averages values, so the output must be a float array (not labels)")
        self.region = region
        self.out = out
        self.mode = mode
        if mode == "cosine" and weights is None:
            weights = np.zeros(region.shape, dtype=np.float32)
        self.weights = weights
        self._written = 0
        self._finalized = False

    @classmethod
    def in_memory(cls, region: Region, channels: int | None, dtype: Any = np.float32, *, mode: str = "crop") -> "Stitcher":
        """A stitcher into a new zeroed numpy array ``(channels, H, W)`` (or ``(H, W)`` for ``channels=None``)."""
        shape = region.shape if channels is None else (channels,) + region.shape
        return cls(region, np.zeros(shape, dtype=dtype), mode=mode)

    def add(self, tile: Tile, values: Any) -> None:
        """Add one tile's output.

        Parameters
        ----------
        tile : Tile
            The tile (from a `Tiler` over the same region).
        values : numpy.ndarray or torch.Tensor
            ``(..., h, w)`` covering ``tile.window`` (``(h, w) = tile.window.shape``), or exactly
            ``tile.write`` (``(h, w) = tile.write.shape``).
        """
        if self._finalized:
            raise RuntimeError("the stitcher was already finalized")
        values = _to_numpy(values)
        h, w = values.shape[-2:]
        if (h, w) == tile.window.shape:
            src = tile.write_in_window
            values = values[..., src.row : src.end_row, src.col : src.end_col]
        elif (h, w) != tile.write.shape:
            raise ValueError(f"values of shape {values.shape} match neither the window {tile.window.shape} nor the write region {tile.write.shape}")
        dst = tile.write.relative_to(self.region)
        index = (Ellipsis, slice(dst.row, dst.end_row), slice(dst.col, dst.end_col))
        if self.mode == "crop":
            self.out[index] = values.astype(self.out.dtype, copy=False)
        else:
            wy = blend_window(tile.write.height, self._ramp(tile, 0), start_edge=tile.write.row == self.region.row,
                              end_edge=tile.write.end_row == self.region.end_row)
            wx = blend_window(tile.write.width, self._ramp(tile, 1), start_edge=tile.write.col == self.region.col,
                              end_edge=tile.write.end_col == self.region.end_col)
            weight = wy[:, None] * wx[None, :]
            self.out[index] = self.out[index] + (values * weight).astype(self.out.dtype)
            self.weights[index[1:]] = self.weights[index[1:]] + weight
        self._written += tile.core.area

    @staticmethod
    def _ramp(tile: Tile, axis: int) -> int:
        # The overlap on this axis: how far the write region reaches beyond the core (same on both sides
        # except where clipped at the region's edge, which blend_window treats as an edge).
        if axis == 0:
            return max(tile.core.row - tile.write.row, tile.write.end_row - tile.core.end_row)
        return max(tile.core.col - tile.write.col, tile.write.end_col - tile.core.end_col)

    @property
    def coverage(self) -> float:
        """Fraction of the region's pixels whose owning tile was added (0..1)."""
        return self._written / max(1, self.region.area)

    def finalize(self, *, require_complete: bool = False, block: int = 2048) -> Any:
        """Finish and return the output array.

        For ``"cosine"`` the weighted sums are divided by the weights, ``block`` rows at a time (so a zarr
        output is normalised without loading it whole).

        Parameters
        ----------
        require_complete : bool
            Raise `RegionError` if some tile was never added.
        """
        if require_complete and self._written < self.region.area:
            raise RegionError(
                f"only {self.coverage:.1%} of the region was computed", subject="Stitcher", hint="add every tile before finalize()"
            )
        if self.mode == "cosine" and not self._finalized:
            for r in range(0, self.region.height, block):
                rows = slice(r, min(r + block, self.region.height))
                wt = np.asarray(self.weights[rows, :])
                vals = np.asarray(self.out[..., rows, :])
                self.out[..., rows, :] = np.where(wt > 0, vals / np.maximum(wt, 1e-12), 0).astype(self.out.dtype)
        self._finalized = True
        return self.out


def _to_numpy(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor, possibly on a GPU
        values = values.detach()
        if str(values.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            values = values.float()
        return values.cpu().numpy()
    return np.asarray(values)


def estimate_halo(
    model: Any, *, size: int = 512, offsets: int = 4, seed: int = 0, max_size: int = 2048, rtol: float = 0.0
) -> int:
    """Measure how far, in input pixels, one input pixel influences a model's output, rounded up to its stride.

    A tile needs at least this much context for tiled inference to be exact.  Measured by perturbing one
    pixel of a random input (at ``offsets`` positions modulo the stride) and finding the farthest output that
    changed at all (outputs beyond a convolutional receptive field are bit-identical).  An architecture can
    set ``halo`` from it; ``tests/test_tiling.py`` uses it to show exactness.

    Parameters
    ----------
    model : HrsegModel
        Evaluated in eval mode on its current device (not modified otherwise).
    size : int
        Side of the probe image; doubled (up to ``max_size``) while the influence reaches its border.
    rtol : float
        Ignore changes below ``rtol`` times the largest change (0: any change counts, the strict reach).
    """
    import torch

    stride = int(getattr(model, "stride", 1))
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        gen = torch.Generator().manual_seed(seed)
        while True:
            reach = 0
            touched_border = False
            x = torch.randn((1, model.config.in_channels, size, size), generator=gen).to(device)
            with torch.inference_mode():
                base = model(x)["logits"]
                for k in range(offsets):
                    c = size // 2 + (k * stride) // max(1, offsets)
                    x2 = x.clone()
                    x2[..., c, c] += 10.0
                    diff = (model(x2)["logits"] - base).abs().amax(dim=(0, 1))
                    changed = torch.nonzero(diff > rtol * diff.max())
                    if changed.numel() == 0:
                        continue
                    lo = changed.min(dim=0).values
                    hi = changed.max(dim=0).values
                    reach = max(reach, int(c - lo.min()), int(hi.max() - c))
                    touched_border |= bool(lo.min() == 0 or hi.max() == size - 1)
            if not touched_border or size >= max_size:
                return round_up(reach, stride)
            size *= 2
    finally:
        model.train(was_training)
