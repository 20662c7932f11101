"""Instance proposals without a full detector: a CenterNet-style centre heatmap with box sizes.

A small head on the stride-``s`` FPN map (P2, ``s = 4``) predicts, per cell,

- ``heatmap``: one logit per object class, the chance that an object's box centre falls in the cell;
- ``offset``: the sub-cell position of that centre, ``(dx, dy)`` in cells, in ``[0, 1)``;
- ``size``: the box ``(width, height)`` in cells.

Training targets (Zhou et al., "Objects as Points", 2019): an object with box centre ``(cx, cy)`` (image
pixels, pixel-edge convention, see `roi_ops`) lands in cell ``(floor(cy / s), floor(cx / s))``; the heatmap
gets an axis-aligned Gaussian around that cell (peak exactly 1, ``sigma = max(min_sigma, 0.54 * extent / 6)``
cells per axis, TTFNet's elliptical rule) and the cell gets the offset and size targets.  Losses: the
penalty-reduced focal loss on the heatmap, L1 on offsets (weight 1) and sizes (weight 0.1), each averaged over
objects.

Decoding: sigmoid, 3x3 max-pool peak extraction (a cell survives only if it is the maximum of its 3x3
neighbourhood), top-k, score threshold, boxes from sizes, then class-wise greedy box NMS in torch.

Choices for small dense objects (H&E nuclei, 8-40 px at 0.5 µm/px, often touching): the heatmap stays on P2
(a finer map costs 4x the head compute) with sub-cell offsets, so two nuclei whose centres are >= 2 cells
(8 px) apart keep separate peaks; the Gaussian floor ``min_sigma = 0.5`` cell keeps neighbouring peaks apart
(two touching 10 px nuclei leave a valley of < 5 % between them); box NMS uses IoU 0.5 because touching
nuclei have small box overlaps and a stricter threshold would delete real neighbours; ``max_detections``
defaults to 1000 per image (a dense 512 x 512 tile at 0.5 µm/px holds 200-400 nuclei).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import ConvBNReLU
from .losses import heatmap_focal_loss
from .roi_ops import batched_nms

__all__ = ["CenterHead", "CenterTargets", "center_targets", "center_losses", "decode_centers", "Detections"]

#: TTFNet's ratio between the Gaussian's 3-sigma extent and the box size.
GAUSSIAN_ALPHA = 0.54


class CenterHead(nn.Module):
    """Heatmap / offset / size head on one feature map.

    Parameters
    ----------
    in_channels : int
        Channels of the input map.
    width : int
        Channels of the two shared 3x3 convs.
    num_classes : int
        Object classes (background excluded): heatmap channels.
    """

    def __init__(self, in_channels: int, width: int, num_classes: int, norm: str = "bn"):
        super().__init__()
        self.trunk = nn.Sequential(ConvBNReLU(in_channels, width, 3, norm=norm), ConvBNReLU(width, width, 3, norm=norm))
        self.heatmap = nn.Conv2d(width, num_classes, 1)
        self.offset = nn.Conv2d(width, 2, 1)
        self.size = nn.Conv2d(width, 2, 1)
        # CenterNet's prior: start with every cell at p = 0.1 so the focal loss does not explode on step 1.
        nn.init.constant_(self.heatmap.bias, -math.log((1 - 0.1) / 0.1))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``heatmap`` ``(N, K, h, w)`` logits, ``offset`` and ``size`` ``(N, 2, h, w)`` as ``(x, y)`` in cells."""
        t = self.trunk(x)
        return {"heatmap": self.heatmap(t), "offset": self.offset(t), "size": self.size(t)}


@dataclass
class CenterTargets:
    """Targets on the head's grid.

    Attributes
    ----------
    heatmap : torch.Tensor
        ``(N, K, h, w)`` Gaussian-splatted centres, exactly 1 at each object's centre cell.
    offset, size : torch.Tensor
        ``(N, 2, h, w)`` ``(x, y)`` targets in cells, meaningful where ``reg_mask`` is 1.
    reg_mask : torch.Tensor
        ``(N, 1, h, w)`` 1 at object centre cells.
    num_objects : int
    """

    heatmap: torch.Tensor
    offset: torch.Tensor
    size: torch.Tensor
    reg_mask: torch.Tensor
    num_objects: int


def center_targets(
    boxes: Sequence[torch.Tensor],
    classes: Sequence[torch.Tensor],
    num_classes: int,
    grid_size: tuple[int, int],
    stride: int,
    min_sigma: float = 0.5,
) -> CenterTargets:
    """Build heatmap, offset and size targets for a batch.

    Parameters
    ----------
    boxes : sequence of torch.Tensor
        Per image, ``(M, 4)`` ``(x1, y1, x2, y2)`` boxes in image pixels.
    classes : sequence of torch.Tensor
        Per image, ``(M,)`` int64 class index in ``[0, num_classes)`` (background excluded).
    grid_size : (int, int)
        ``(h, w)`` of the head's output.
    stride : int
        Image pixels per cell.
    """
    h, w = grid_size
    n = len(boxes)
    device = boxes[0].device if n else torch.device("cpu")
    heat = torch.zeros(n, num_classes, h, w, device=device)
    offset = torch.zeros(n, 2, h, w, device=device)
    size = torch.zeros(n, 2, h, w, device=device)
    reg_mask = torch.zeros(n, 1, h, w, device=device)
    total = 0
    for b, (bx, cl) in enumerate(zip(boxes, classes)):
        if bx.shape[0] == 0:
            continue
        bx = bx.float().to(device)
        cl = cl.long().to(device)
        total += bx.shape[0]
        cx = (bx[:, 0] + bx[:, 2]) / (2 * stride)
        cy = (bx[:, 1] + bx[:, 3]) / (2 * stride)
        bw = (bx[:, 2] - bx[:, 0]) / stride
        bh = (bx[:, 3] - bx[:, 1]) / stride
        ix = cx.floor().long().clamp(0, w - 1)
        iy = cy.floor().long().clamp(0, h - 1)
        sx = (GAUSSIAN_ALPHA * bw / 6).clamp(min=min_sigma)
        sy = (GAUSSIAN_ALPHA * bh / 6).clamp(min=min_sigma)
        # Splat each Gaussian on a local window (3 sigma) and keep the per-class maximum.
        r = int(math.ceil(3 * float(torch.maximum(sx, sy).max())))
        d = torch.arange(-r, r + 1, device=device)
        gy = iy[:, None, None] + d[None, :, None]
        gx = ix[:, None, None] + d[None, None, :]
        val = torch.exp(-(d[None, None, :].float() ** 2) / (2 * sx[:, None, None] ** 2)
                        - (d[None, :, None].float() ** 2) / (2 * sy[:, None, None] ** 2))
        inside = (gy >= 0) & (gy < h) & (gx >= 0) & (gx < w)
        flat_idx = (cl[:, None, None] * h + gy.clamp(0, h - 1)) * w + gx.clamp(0, w - 1)
        flat = heat[b].view(-1)
        flat.scatter_reduce_(0, flat_idx[inside], val[inside], reduce="amax")
        offset[b, 0, iy, ix] = cx - ix.float()
        offset[b, 1, iy, ix] = cy - iy.float()
        size[b, 0, iy, ix] = bw
        size[b, 1, iy, ix] = bh
        reg_mask[b, 0, iy, ix] = 1.0
    return CenterTargets(heat, offset, size, reg_mask, total)


def center_losses(
    outputs: dict[str, torch.Tensor],
    targets: CenterTargets,
    valid: torch.Tensor | None = None,
    size_weight: float = 0.1,
    offset_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Heatmap focal loss + L1 offset + L1 size (weights 1, 1, 0.1 as CenterNet), each per object.

    Parameters
    ----------
    outputs : dict
        `CenterHead` outputs.
    valid : torch.Tensor, optional
        ``(N, 1, h, w)`` weights, 0 on unlabelled cells.
    """
    hm = heatmap_focal_loss(outputs["heatmap"], targets.heatmap, mask=valid)
    m = targets.reg_mask
    denom = m.sum().clamp(min=1.0)
    off = (F.l1_loss(outputs["offset"], targets.offset, reduction="none") * m).sum() / denom
    siz = (F.l1_loss(outputs["size"], targets.size, reduction="none") * m).sum() / denom
    total = hm + offset_weight * off + size_weight * siz
    return {"center": total, "heatmap": hm.detach(), "offset": off.detach(), "size": siz.detach()}


@dataclass
class Detections:
    """Boxes of one image, by decreasing score.

    Attributes
    ----------
    boxes : torch.Tensor
        ``(K, 4)`` ``(x1, y1, x2, y2)`` in image pixels (pixel-edge convention).
    scores : torch.Tensor
        ``(K,)`` heatmap peak value in ``(0, 1)``.
    classes : torch.Tensor
        ``(K,)`` int64 class index in ``[0, num_classes)`` (background excluded).
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    classes: torch.Tensor


@torch.no_grad()
def decode_centers(
    outputs: dict[str, torch.Tensor],
    stride: int,
    image_size: tuple[int, int] | None = None,
    max_detections: int = 1000,
    score_threshold: float = 0.3,
    nms_iou: float = 0.5,
    min_size: float = 2.0,
) -> list[Detections]:
    """Turn head outputs into boxes: peak extraction by 3x3 max-pool NMS, top-k, threshold, box NMS.

    Parameters
    ----------
    outputs : dict
        ``heatmap`` ``(N, K, h, w)`` logits, ``offset`` and ``size`` ``(N, 2, h, w)``.
    stride : int
        Image pixels per cell.
    image_size : (int, int), optional
        ``(H, W)``; boxes are clipped to it.
    max_detections : int
        Peaks kept per image before thresholding.
    score_threshold : float
        Minimum peak probability.
    nms_iou : float
        Class-wise box NMS threshold (boxes overlapping a higher-scoring box of the same class by more are
        dropped).
    min_size : float
        Smallest box side in image pixels (predicted sizes are clamped to it).
    """
    heat = torch.sigmoid(outputs["heatmap"].float())
    n, k, h, w = heat.shape
    peaks = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat)
    topk = min(max_detections, k * h * w)
    scores, idx = peaks.reshape(n, -1).topk(topk, dim=1)
    cls = idx // (h * w)
    cell = idx % (h * w)
    iy = cell // w
    ix = cell % w
    result = []
    for b in range(n):
        keep = scores[b] >= score_threshold
        s, c, y, x = scores[b][keep], cls[b][keep], iy[b][keep], ix[b][keep]
        off = outputs["offset"][b, :, y, x].float()
        siz = outputs["size"][b, :, y, x].float()
        cx = (x.float() + off[0]) * stride
        cy = (y.float() + off[1]) * stride
        bw = (siz[0] * stride).clamp(min=min_size)
        bh = (siz[1] * stride).clamp(min=min_size)
        boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=1)
        if image_size is not None:
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, image_size[1])
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, image_size[0])
        kept = batched_nms(boxes, s, c, nms_iou)
        result.append(Detections(boxes[kept], s[kept], c[kept]))
    return result
