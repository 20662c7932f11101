"""Region-of-interest operations in plain PyTorch: what torchvision.ops would have given.

Conventions (torchvision's):

- A feature map pixel ``(i, j)`` covers ``[j, j + 1) x [i, i + 1)`` in its own pixel units, so its centre sits
  at ``(j + 0.5, i + 0.5)``.  Image boxes are continuous ``(x1, y1, x2, y2)``: an object whose pixels span
  columns ``c0..c1`` (inclusive) has ``x1 = c0`` and ``x2 = c1 + 1``.
- RoIs are ``(K, 5)`` rows ``(batch_index, x1, y1, x2, y2)`` in image pixels; ``spatial_scale`` maps them onto
  a feature map (``1 / stride``).

Contents: `roi_align` (exact torchvision semantics, vectorised), `multilevel_roi_align` (FPN level assignment),
`box_iou`, `nms` / `batched_nms` (greedy, exact), and helpers that move between the ``(x1, y1, x2, y2)``
convention used here and the ``(row0, col0, row1, col1)`` convention of the rest of napari-hrseg.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "roi_align",
    "multilevel_roi_align",
    "map_roi_levels",
    "box_area",
    "box_iou",
    "nms",
    "batched_nms",
    "boxes_to_rowcol",
    "boxes_from_rowcol",
    "clip_boxes",
    "scale_boxes",
]


# --------------------------------------------------------------------------------------------- roi_align
def _as_pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def roi_align(
    features: torch.Tensor,
    rois: torch.Tensor,
    output_size: int | Sequence[int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> torch.Tensor:
    """RoIAlign with torchvision's semantics, in plain (differentiable) torch.

    Each output bin is the average of ``gh x gw`` bilinear samples placed at the centres of a regular
    sub-grid of the bin.  ``gh = sampling_ratio`` when positive, else ``ceil(roi_height / out_height)``
    (adaptive, per RoI); likewise ``gw``.  Bilinear sampling follows torchvision's CPU kernel exactly: a
    sample more than one pixel outside the map (``y < -1`` or ``y > H``) contributes 0; otherwise its
    coordinates are clamped into ``[0, H - 1]`` (so a sample within one pixel of the border takes the border
    value rather than fading to zero, unlike ``grid_sample``'s zero padding).

    The implementation is exact for adaptive sampling too: RoIs are grouped by image and by their sub-grid
    ``(gh, gw)``; each group is one ``grid_sample`` over all its RoIs' sample points followed by a
    ``(gh, gw)`` average pool.  No Python loop over RoIs.

    Parameters
    ----------
    features : torch.Tensor
        ``(N, C, H, W)`` feature map.
    rois : torch.Tensor
        ``(K, 5)`` rows ``(batch_index, x1, y1, x2, y2)`` in image coordinates.
    output_size : int or (int, int)
        ``(out_h, out_w)`` bins.
    spatial_scale : float
        Multiplies box coordinates to reach feature coordinates (``1 / stride``).
    sampling_ratio : int
        Samples per bin along each axis; ``<= 0`` for adaptive ``ceil(roi_size / out_size)``.
    aligned : bool
        ``True`` shifts boxes by -0.5 feature pixel so that a box edge at ``x`` maps onto the pixel-edge
        convention (Detectron2 / mmcv ``aligned=True``).  ``False`` keeps the legacy behaviour, including the
        clamp of RoI sizes to at least 1 feature pixel.

    Returns
    -------
    torch.Tensor
        ``(K, C, out_h, out_w)``, same dtype as ``features``.
    """
    out_h, out_w = _as_pair(output_size)
    n, c, height, width = features.shape
    k = rois.shape[0]
    if k == 0:
        return features.new_zeros((0, c, out_h, out_w))
    rois = rois.to(features.dtype)
    offset = 0.5 if aligned else 0.0
    batch_idx = rois[:, 0].long()
    x1 = rois[:, 1] * spatial_scale - offset
    y1 = rois[:, 2] * spatial_scale - offset
    x2 = rois[:, 3] * spatial_scale - offset
    y2 = rois[:, 4] * spatial_scale - offset
    roi_w = x2 - x1
    roi_h = y2 - y1
    if not aligned:
        roi_w = roi_w.clamp(min=1.0)
        roi_h = roi_h.clamp(min=1.0)
    bin_h = roi_h / out_h
    bin_w = roi_w / out_w

    if sampling_ratio > 0:
        grid_h = torch.full((k,), sampling_ratio, dtype=torch.long, device=features.device)
        grid_w = grid_h.clone()
    else:
        # torchvision: ceil(roi_height / pooled_height) computed in the feature dtype; a non-positive size
        # (possible with aligned=True) gives no samples and a zero output.
        grid_h = torch.ceil(roi_h / out_h).long().clamp(min=0)
        grid_w = torch.ceil(roi_w / out_w).long().clamp(min=0)
    out = features.new_zeros((k, c, out_h, out_w))
    # RoIs sharing a sample grid (gh, gw) and an image are sampled by one grid_sample: every RoI's
    # (out_h * gh) x (out_w * gw) sample points are stacked along the grid's height, then average-pooled by
    # (gh, gw).  Typically a handful of groups, never a loop over RoIs.
    groups = torch.stack([grid_h, grid_w, batch_idx], dim=1)
    for gh, gw, b in torch.unique(groups, dim=0).tolist():
        if gh <= 0 or gw <= 0:
            continue  # no samples: torchvision returns 0 for these bins
        sel = torch.nonzero((grid_h == gh) & (grid_w == gw) & (batch_idx == b), as_tuple=False).squeeze(1)
        m = sel.numel()
        t_y = (torch.arange(out_h * gh, device=features.device, dtype=features.dtype) + 0.5) / gh  # in bins
        t_x = (torch.arange(out_w * gw, device=features.device, dtype=features.dtype) + 0.5) / gw
        y = y1[sel, None] + t_y[None] * bin_h[sel, None]  # (m, out_h * gh) index coordinates
        x = x1[sel, None] + t_x[None] * bin_w[sel, None]
        out[sel] = _sample_and_pool(features[b : b + 1], y, x, gh, gw)
    return out


def _sample_and_pool(feature: torch.Tensor, y: torch.Tensor, x: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    """Bin averages for ``m`` RoIs of one image with separable sample coordinates ``y`` ``(m, Sy)``, ``x`` ``(m, Sx)``.

    torchvision's border rule: a sample with ``y < -1``, ``y > H``, ``x < -1`` or ``x > W`` contributes 0, any
    other has its coordinates clamped into the map before bilinear interpolation.  After that clamp every sample
    lies inside the map, so ``grid_sample`` (border padding, never reached beyond rounding) interpolates it
    exactly as torchvision does.
    """
    _, c, height, width = feature.shape
    m, sy = y.shape
    sx = x.shape[1]
    valid = ((y >= -1.0) & (y <= height))[:, :, None] & ((x >= -1.0) & (x <= width))[:, None, :]
    y = y.clamp(0.0, height - 1.0)
    x = x.clamp(0.0, width - 1.0)
    gy = (2.0 * y + 1.0) / height - 1.0
    gx = (2.0 * x + 1.0) / width - 1.0
    grid = torch.stack([gx[:, None, :].expand(m, sy, sx), gy[:, :, None].expand(m, sy, sx)], dim=-1)
    samples = F.grid_sample(feature, grid.reshape(1, m * sy, sx, 2), mode="bilinear", padding_mode="border",
                            align_corners=False)  # (1, C, m * sy, sx)
    samples = samples.view(c, m, sy, sx).transpose(0, 1) * valid[:, None].to(samples.dtype)
    if gh == 1 and gw == 1:
        return samples
    return F.avg_pool2d(samples, (gh, gw), stride=(gh, gw))


def map_roi_levels(rois: torch.Tensor, num_levels: int, finest_scale: float = 56.0) -> torch.Tensor:
    """FPN level of each RoI (mmdet's rule): ``floor(log2(sqrt(w * h) / finest_scale + 1e-6))`` in ``[0, L-1]``.

    Level 0 is the finest map (P2, stride 4).  Objects under ``2 * finest_scale`` px go to P2.
    """
    scale = torch.sqrt((rois[:, 3] - rois[:, 1]).clamp(min=0) * (rois[:, 4] - rois[:, 2]).clamp(min=0))
    levels = torch.floor(torch.log2(scale / finest_scale + 1e-6))
    return levels.clamp(min=0, max=num_levels - 1).long()


def multilevel_roi_align(
    features: Sequence[torch.Tensor],
    rois: torch.Tensor,
    output_size: int | Sequence[int],
    strides: Sequence[int],
    sampling_ratio: int = 0,
    aligned: bool = True,
    finest_scale: float = 56.0,
) -> torch.Tensor:
    """RoIAlign each RoI from the FPN level its size selects (one vectorised `roi_align` per level).

    Parameters
    ----------
    features : sequence of torch.Tensor
        Pyramid maps, finest first, each ``(N, C, H_l, W_l)``.
    rois : torch.Tensor
        ``(K, 5)`` ``(batch_index, x1, y1, x2, y2)`` in image pixels.
    strides : sequence of int
        Stride of each map.

    Returns
    -------
    torch.Tensor
        ``(K, C, out_h, out_w)`` in the order of ``rois``.
    """
    out_h, out_w = _as_pair(output_size)
    levels = map_roi_levels(rois, len(features), finest_scale)
    out = features[0].new_zeros((rois.shape[0], features[0].shape[1], out_h, out_w))
    for lvl, (feat, stride) in enumerate(zip(features, strides)):
        idx = torch.nonzero(levels == lvl, as_tuple=False).squeeze(1)
        if idx.numel():
            out[idx] = roi_align(feat, rois[idx], (out_h, out_w), 1.0 / stride, sampling_ratio, aligned)
    return out


# --------------------------------------------------------------------------------------------- boxes
def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Areas ``(K,)`` of ``(x1, y1, x2, y2)`` boxes (0 for inverted boxes)."""
    return (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU ``(A, B)`` of ``(x1, y1, x2, y2)`` boxes (continuous coordinates, no +1)."""
    area_a = box_area(a)
    area_b = box_area(b)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression (torchvision.ops.nms semantics).

    Visits boxes by decreasing score and keeps a box unless it overlaps an already kept box with
    IoU ``> iou_threshold``.  The IoU matrix is computed once (O(K^2) memory); the greedy pass is a loop
    over kept boxes on a boolean matrix, so it costs microseconds per box.  Ties in score keep the lower index.

    Returns
    -------
    torch.Tensor
        int64 indices of the kept boxes, by decreasing score.
    """
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    iou = box_iou(boxes[order], boxes[order])
    suppress = (iou > iou_threshold).cpu().numpy()
    n = suppress.shape[0]
    removed = np.zeros(n, dtype=bool)
    keep = []
    for i in range(n):
        if removed[i]:
            continue
        keep.append(i)
        removed |= suppress[i]
    keep_t = torch.as_tensor(keep, dtype=torch.long, device=boxes.device)
    return order[keep_t]


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """NMS applied independently within each group (e.g. image index or class): boxes of different groups never
    suppress each other.  Same output convention as `nms`.

    Uses torchvision's coordinate trick: each group is shifted by a multiple of the largest coordinate, so one
    `nms` call serves every group.
    """
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    span = boxes.max() - boxes.min() + 1
    shifted = boxes - boxes.min() + (groups.to(boxes.dtype) * span)[:, None]
    return nms(shifted, scores, iou_threshold)


def clip_boxes(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Clip ``(x1, y1, x2, y2)`` boxes to ``[0, width] x [0, height]``."""
    x = boxes[:, 0::2].clamp(0, width)
    y = boxes[:, 1::2].clamp(0, height)
    return torch.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], dim=1)


def scale_boxes(boxes: torch.Tensor, factor: float, min_margin: float = 0.0) -> torch.Tensor:
    """Grow ``(x1, y1, x2, y2)`` boxes about their centres by ``factor``, and by at least ``min_margin`` px a side."""
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    cy = (boxes[:, 1] + boxes[:, 3]) / 2
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    hw = torch.maximum(w * factor, w + 2 * min_margin) / 2
    hh = torch.maximum(h * factor, h + 2 * min_margin) / 2
    return torch.stack([cx - hw, cy - hh, cx + hw, cy + hh], dim=1)


def boxes_to_rowcol(boxes: torch.Tensor) -> torch.Tensor:
    """``(x1, y1, x2, y2)`` -> ``(row0, col0, row1, col1)`` (same half-open pixel-edge coordinates)."""
    return boxes[:, [1, 0, 3, 2]]


def boxes_from_rowcol(boxes: torch.Tensor) -> torch.Tensor:
    """``(row0, col0, row1, col1)`` -> ``(x1, y1, x2, y2)``."""
    return boxes[:, [1, 0, 3, 2]]
