"""Teacher predictions for auto-labelling and ranking: pixels at the model's pixel size, tiled with context.

`PixelGrid` presents an image array or a region of a `Slide` as a pixel grid at *any* pixel size (the model's:
the output grid of auto-labels and uncertainty maps), resampling from the best pyramid level; `tiles` cuts a grid
into cores with halos aligned to the model's stride (`napari_hrseg.tiling.Tiler`, crop-to-core); `probabilities`
runs the model on one window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from ..errors import TrainingError
from ..geometry import Region
from ..models.base import HrsegModel, to_input_tensor
from ..slide import Slide
from ..tiling import Tiler
from .resample import read_slide_at_mpp

__all__ = ["PixelGrid", "tiles", "probabilities", "predict_probabilities"]


@dataclass(frozen=True, eq=False)
class PixelGrid:
    """An image, or a level-0 region of a slide, as pixels at ``mpp``.

    Parameters
    ----------
    source : numpy.ndarray or Slide
        ``(H, W, 3)`` uint8 image already at ``mpp`` (then ``region`` is in its pixels), or a slide with a known
        pixel size (then ``region`` is in level-0 pixels and pixels are read from the best pyramid level).
    region : Region
        Part of the source covered by the grid.
    mpp : float
        Pixel size of the grid in µm (the model's); ignored for arrays.
    """

    source: np.ndarray | Slide
    region: Region
    mpp: float

    @classmethod
    def of(cls, source: np.ndarray | Slide, region: Region | None = None, mpp: float | None = None) -> "PixelGrid":
        """The grid of ``region`` (default: all) of ``source`` at ``mpp`` (default: the slide's own)."""
        if isinstance(source, Slide):
            if source.mpp is None:
                raise TrainingError("the slide's pixel size is unknown", subject=source.name,
                                    hint="state it with slide.with_mpp(µm)")
            full = Region.from_shape(source.shape)
            mpp = float(mpp or source.mpp)
        else:
            source = np.asarray(source)
            if source.ndim != 3 or source.shape[2] != 3 or source.dtype != np.uint8:
                raise TrainingError(f"image of shape {source.shape} and dtype {source.dtype} is not (H, W, 3) uint8",
                                    subject="image")
            full = Region.from_shape(source.shape)
            mpp = float(mpp or 0.0)
        region = full if region is None else region
        if region.is_empty or not region.intersects(full):
            raise TrainingError(f"region {region} does not overlap the image", subject="region")
        return cls(source, region, mpp)

    @property
    def is_slide(self) -> bool:
        return isinstance(self.source, Slide)

    @property
    def factors(self) -> tuple[float, float]:
        """Level-0 (or array) pixels per grid pixel, ``(fy, fx)``."""
        if not self.is_slide:
            return (1.0, 1.0)
        my, mx = self.source.mpp_yx  # type: ignore[union-attr]
        return (self.mpp / my, self.mpp / mx)

    @property
    def shape(self) -> tuple[int, int]:
        """``(H, W)`` of the grid."""
        fy, fx = self.factors
        return max(1, int(round(self.region.height / fy))), max(1, int(round(self.region.width / fx)))

    def to_level0(self, box: Region) -> Region:
        """The level-0 (or array) region covered by ``box`` of the grid (outward-rounded)."""
        fy, fx = self.factors
        return Region.from_bounds(self.region.row + box.row * fy, self.region.col + box.col * fx,
                                  self.region.row + box.end_row * fy, self.region.col + box.end_col * fx)

    def from_level0(self, region: Region) -> Region:
        """The grid box covering a level-0 (or array) region (outward-rounded, not clipped)."""
        fy, fx = self.factors
        return Region.from_bounds((region.row - self.region.row) / fy, (region.col - self.region.col) / fx,
                                  (region.end_row - self.region.row) / fy, (region.end_col - self.region.col) / fx)

    def read(self, box: Region) -> np.ndarray:
        """``(h, w, 3)`` uint8 pixels of ``box`` (grid pixels, may extend outside: white glass there)."""
        if self.is_slide:
            fy, fx = self.factors
            r0 = self.region.row + box.row * fy
            c0 = self.region.col + box.col * fx
            return read_slide_at_mpp(self.source, (r0, c0, r0 + box.height * fy, c0 + box.width * fx), box.shape)
        arr = self.source
        absolute = box.translate(self.region.row, self.region.col)
        out = np.full(box.shape + (3,), 255, np.uint8)
        inside = absolute.clip(arr.shape)
        if not inside.is_empty:
            out[inside.relative_to(absolute).slices] = arr[inside.slices]
        return out


def tiles(shape: tuple[int, int], tile: int, halo: int, stride: int = 1) -> Iterator[tuple[Region, Region]]:
    """``(core, window)`` pairs covering a grid of ``shape``: cores partition it, windows add ``halo`` (both
    rounded up to ``stride`` so every window starts on the model's feature lattice); see `Tiler`."""
    for t in Tiler(Region.from_shape(shape), tile_size=int(tile), halo=int(halo), stride=max(1, int(stride))):
        yield t.core, t.window


@torch.no_grad()
def probabilities(model: HrsegModel, pixels: np.ndarray, device: torch.device | None = None) -> np.ndarray:
    """Softmax probabilities ``(C, h, w)`` float32 of one ``(h, w, 3)`` uint8 window, model in eval mode."""
    device = device or model.device
    x = to_input_tensor(pixels, model.config, device)
    logits = model(x)["logits"].float()
    return torch.softmax(logits, dim=1)[0].cpu().numpy()


def predict_probabilities(model: HrsegModel, grid: PixelGrid, *, tile: int = 512, halo: int | None = None,
                          device: torch.device | None = None) -> np.ndarray:
    """Probabilities ``(C, H, W)`` over a whole (small) grid, tile by tile with the model's halo."""
    was_training = model.training
    model.eval()
    try:
        h, w = grid.shape
        out = np.empty((model.config.num_classes, h, w), np.float32)
        halo = model.halo if halo is None else halo
        for core, window in tiles((h, w), tile, halo, model.stride):
            p = probabilities(model, grid.read(window), device)
            out[(slice(None),) + core.slices] = p[(slice(None),) + core.relative_to(window).slices]
        return out
    finally:
        model.train(was_training)
