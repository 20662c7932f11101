"""Moving per-pixel values (probabilities, maps) from one `PixelGrid` to another, by geometry.

Grids of different pixel sizes are aligned through level-0 coordinates: pixel ``i`` of a grid with downsample
``d`` covers level-0 ``[i*d, (i+1)*d)``, so its centre is at ``(i + 0.5) * d``.  Sampling is bilinear at the
target pixels' centres (``align_corners=False`` semantics), clamped at the source's border: exact, unlike a
resize by a scale factor, for any ratio of downsamples and any region offset (MagNet's stages and the global
baseline's upsampling rely on it).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..geometry import Region
from .grid import PixelGrid

__all__ = ["warp_to_grid", "softmax_summary"]


def warp_to_grid(
    values: torch.Tensor,
    src: tuple[PixelGrid, Region],
    dst: tuple[PixelGrid, Region],
    *,
    mode: str = "bilinear",
) -> torch.Tensor:
    """Resample values from one grid region onto another.

    Parameters
    ----------
    values : torch.Tensor
        ``(C, h, w)`` or ``(N, C, h, w)`` float on ``src``'s region (``(h, w) = src_region.shape``).
    src, dst : (PixelGrid, Region)
        Source and target grids with the region (in their own pixels) the values cover / should cover.
    mode : {"bilinear", "nearest"}
        Interpolation (``"nearest"`` for label images).

    Returns
    -------
    torch.Tensor
        Values on ``dst``'s region, ``(C, H, W)`` (or ``(N, C, H, W)``), same device and dtype.
    """
    sgrid, sreg = src
    dgrid, dreg = dst
    squeeze = values.dim() == 3
    v = values[None] if squeeze else values
    if tuple(v.shape[-2:]) != sreg.shape:
        raise ValueError(f"values {tuple(v.shape)} do not cover the source region {sreg.shape}")
    device = v.device
    coords = []
    for axis in (0, 1):
        n_out = dreg.shape[axis]
        start = (dreg.row, dreg.col)[axis]
        s0 = (sreg.row, sreg.col)[axis]
        n_in = sreg.shape[axis]
        centres = (np.arange(start, start + n_out, dtype=np.float64) + 0.5) * dgrid.downsample[axis]
        src_index = centres / sgrid.downsample[axis] - s0  # continuous source coordinate, pixel i spans [i, i+1)
        coords.append(torch.from_numpy(src_index / n_in * 2 - 1).to(device=device, dtype=torch.float32))
    ys, xs = coords
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # (H, W, 2) holding (x, y)
    grid = grid[None].expand(v.shape[0], -1, -1, -1)
    dtype = v.dtype
    out = F.grid_sample(v.float(), grid, mode=mode, padding_mode="border", align_corners=False).to(dtype)
    return out[0] if squeeze else out


def softmax_summary(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels and uncertainty from probabilities.

    Parameters
    ----------
    probs : torch.Tensor
        ``(C, H, W)`` class probabilities.

    Returns
    -------
    labels : torch.Tensor
        ``(H, W)`` uint8 argmax.
    uncertainty : torch.Tensor
        ``(H, W)`` float32 ``1 - (p_top1 - p_top2)`` in 0..1 (MagNet's uncertainty; 0 for a single class).
    """
    if probs.shape[0] == 1:
        return torch.zeros(probs.shape[1:], dtype=torch.uint8), torch.zeros(probs.shape[1:], dtype=torch.float32)
    top = torch.topk(probs.float(), 2, dim=0)
    labels = top.indices[0].to(torch.uint8)
    uncertainty = 1.0 - (top.values[0] - top.values[1])
    return labels, uncertainty
