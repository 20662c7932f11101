"""RefineMask's mask head and boundary-aware refinement (Zhang et al., CVPR 2021), in plain PyTorch.

Follows ``zhanggang001/RefineMask`` (``refine_mask_head.py``, ``cross_entropy_loss.py``,
``refine_roi_head.py``); ALGORITHMS.md section 4 is the spec.  Shapes: K RoIs, S_k the side of stage k's
square output (14, 28, 56, 112 by default), C_k its channels (``C_0 / 2^k``).

- `SemanticHead`: four 3x3 convs on P2 and a 1x1 to one channel (foreground of any instance).
- `SFMStage`: the semantic fusion module of one stage: instance features, instance-wise semantic features
  (RoIAlign of the transformed semantic map), the stage's instance mask (sigmoid of its logits) and the
  RoIAlign'ed semantic mask are concatenated, fused (1x1, then the multi-branch fusion of dilated 3x3 convs,
  dilations 1/3/5, summed and merged), reduced to ``C_k / 2 - 2`` channels, upsampled x2, and the two masks
  are concatenated again.
- `RefineMaskHead`: two instance convs, the stages, and the final 1x1 classifier at the last size.
- `boundary_map` (B(M, d), exactly ``generate_block_target``), `refine_blend` (inference),
  `refine_mask_loss` (training), `instance_mask_targets` (crop-and-resize of GT masks), `paste_masks`.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .roi_ops import roi_align

__all__ = [
    "SemanticHead",
    "MultiBranchFusion",
    "SFMStage",
    "RefineMaskHead",
    "boundary_map",
    "refine_blend",
    "refine_mask_loss",
    "instance_mask_targets",
    "paste_masks",
]


def _conv_relu(cin: int, cout: int, k: int = 3, dilation: int = 1) -> nn.Sequential:
    # RefineMask's ConvModule without norm: conv (bias) + ReLU.
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation), nn.ReLU(inplace=True))


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    # Per-RoI maps are thin (4-32 channels) and wide (up to 112 x 112): oneDNN convolutions run 3-30x faster
    # on them in channels-last layout than in NCHW (measured on a 2-core CPU), so the mask head keeps it.
    return x.contiguous(memory_format=torch.channels_last)


def _init_kaiming(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _init_logits(conv: nn.Conv2d) -> None:
    # Logit layers start near 0 (std 0.01).  The official kaiming fan_out init gives a 1-output 1x1 conv
    # std 1.4, i.e. initial logits of +-10 and a first BCE above 5, which slows CPU training from scratch.
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.zeros_(conv.bias)


class SemanticHead(nn.Module):
    """``num_convs`` 3x3 conv+ReLU on P2, then a 1x1 to the binary 'any instance' logit.

    With ``fine_channels`` the head ends at stride 2 instead of 4: its P2 features are upsampled x2, added to a
    1x1 projection of the encoder's stride-2 stem features and passed through one more 3x3 conv+ReLU before
    the logit (see `RefineMask`, ``semantic_stride``).

    ``forward(p2, fine=None)`` returns ``(features (N, width, h, w), logits (N, 1, h, w))``.
    """

    def __init__(self, in_channels: int, width: int, num_convs: int = 4, fine_channels: int | None = None):
        super().__init__()
        self.convs = nn.Sequential(*[_conv_relu(in_channels if i == 0 else width, width) for i in range(num_convs)])
        self.fine_lateral = nn.Conv2d(fine_channels, width, 1) if fine_channels else None
        self.fine_conv = _conv_relu(width, width) if fine_channels else None
        self.logits = nn.Conv2d(width, 1, 1)
        _init_kaiming(self)
        _init_logits(self.logits)

    def forward(self, p2: torch.Tensor, fine: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        feat = self.convs(p2)
        if self.fine_lateral is not None:
            if fine is None:
                raise ValueError("this semantic head ends at stride 2 and needs the stride-2 features")
            up = F.interpolate(feat, size=fine.shape[-2:], mode="bilinear", align_corners=False)
            feat = self.fine_conv(up + self.fine_lateral(fine))
        return feat, self.logits(feat)


class MultiBranchFusion(nn.Module):
    """Parallel 3x3 conv+ReLU branches with dilations (1, 3, 5), summed, merged by a 1x1 (no activation)."""

    def __init__(self, channels: int, dilations: Sequence[int] = (1, 3, 5)):
        super().__init__()
        self.branches = nn.ModuleList(_conv_relu(channels, channels, 3, d) for d in dilations)
        self.merge = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.merge(sum(branch(x) for branch in self.branches))


class SFMStage(nn.Module):
    """One semantic fusion stage: ``(K, C_in, S, S)`` instance features -> stage logits ``(K, 1, S, S)`` and
    fused features ``(K, C_out, 2S, 2S)`` with ``C_out = C_in / 2``.

    Parameters
    ----------
    semantic_channels : int
        Channels of the semantic head's features.
    channels : int
        ``C_in``.
    out_size : int
        ``S``.
    num_classes : int
        Object classes (class-specific mask logits; the RoI's class channel is taken).
    semantic_stride : int
        Stride of the semantic map (4).
    """

    def __init__(self, semantic_channels: int, channels: int, out_size: int, num_classes: int,
                 dilations: Sequence[int] = (1, 3, 5), semantic_stride: int = 4):
        super().__init__()
        if channels % 2 or channels // 2 < 3:
            raise ValueError(f"SFM stage width {channels} must be even and >= 6")
        self.out_size = out_size
        self.semantic_stride = semantic_stride
        self.semantic_in = nn.Conv2d(semantic_channels, channels, 1)
        self.semantic_out = nn.Conv2d(channels, channels, 1)
        self.instance_logits = nn.Conv2d(channels, num_classes, 1)
        self.fuse_in = nn.Conv2d(2 * channels + 2, channels, 1)
        self.fusion = MultiBranchFusion(channels, dilations)
        self.fuse_out = nn.Conv2d(channels, channels // 2 - 2, 1)
        _init_kaiming(self)
        _init_logits(self.instance_logits)

    def forward(self, instance_feats: torch.Tensor, semantic_feat: torch.Tensor, semantic_pred: torch.Tensor,
                rois: torch.Tensor, roi_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.out_size
        sem = F.relu(self.semantic_in(semantic_feat))
        ins_sem = _channels_last(roi_align(sem, rois, s, 1.0 / self.semantic_stride, 0, aligned=True))
        ins_sem = F.relu(self.semantic_out(ins_sem))
        k = rois.shape[0]
        logits = self.instance_logits(instance_feats)[torch.arange(k, device=rois.device), roi_labels][:, None]
        ins_mask = logits.sigmoid()  # mask_use_sigmoid=True in the released configs
        sem_mask = roi_align(semantic_pred.sigmoid(), rois, s, 1.0 / self.semantic_stride, 0, aligned=True)
        fused = _channels_last(torch.cat([instance_feats, ins_sem, ins_mask, sem_mask], dim=1))
        fused = F.relu(self.fuse_in(fused))
        fused = F.relu(self.fusion(fused))
        fused = F.relu(self.fuse_out(fused))
        up = (2 * s, 2 * s)
        fused = F.relu(F.interpolate(fused, size=up, mode="bilinear", align_corners=False))
        ins_mask_up = F.interpolate(ins_mask, size=up, mode="bilinear", align_corners=True)
        sem_mask_up = F.interpolate(sem_mask, size=up, mode="bilinear", align_corners=True)
        return logits, _channels_last(torch.cat([fused, ins_mask_up, sem_mask_up], dim=1))


class RefineMaskHead(nn.Module):
    """Instance convs, the SFM stages and the final classifier.

    Parameters
    ----------
    in_channels : int
        Channels of the RoI features (FPN width).
    semantic_channels : int
        Channels of the semantic features.
    width : int
        ``C_0``: channels of the instance convs and of stage 0; stage k has ``C_0 / 2^k``.
    num_classes : int
        Object classes (background excluded).
    stage_sizes : sequence of int
        Output side of each stage then of the final classifier, each twice the previous (14, 28, 56, 112).
    """

    def __init__(self, in_channels: int, semantic_channels: int, width: int, num_classes: int,
                 stage_sizes: Sequence[int] = (14, 28, 56, 112), dilations: Sequence[int] = (1, 3, 5),
                 semantic_stride: int = 4, num_instance_convs: int = 2):
        super().__init__()
        sizes = tuple(int(s) for s in stage_sizes)
        if len(sizes) < 2 or any(b != 2 * a for a, b in zip(sizes, sizes[1:])):
            raise ValueError(f"stage_sizes {sizes} must double at each stage, e.g. (14, 28, 56, 112)")
        self.stage_sizes = sizes
        self.instance_convs = nn.Sequential(
            *[_conv_relu(in_channels if i == 0 else width, width) for i in range(num_instance_convs)])
        stages = []
        c = width
        for s in sizes[:-1]:
            stages.append(SFMStage(semantic_channels, c, s, num_classes, dilations, semantic_stride))
            c //= 2
        self.stages = nn.ModuleList(stages)
        self.final_logits = nn.Conv2d(c, num_classes, 1)
        _init_kaiming(self.instance_convs)
        _init_logits(self.final_logits)

    def forward(self, roi_feats: torch.Tensor, semantic_feat: torch.Tensor, semantic_pred: torch.Tensor,
                rois: torch.Tensor, roi_labels: torch.Tensor) -> list[torch.Tensor]:
        """Stage logits ``[(K, 1, S_k, S_k)]`` for every size in ``stage_sizes`` (the RoI's class channel)."""
        x = self.instance_convs(_channels_last(roi_feats))
        outs = []
        for stage in self.stages:
            logits, x = stage(x, semantic_feat, semantic_pred, rois, roi_labels)
            outs.append(logits)
        k = rois.shape[0]
        outs.append(self.final_logits(x)[torch.arange(k, device=rois.device), roi_labels][:, None])
        return outs


# ------------------------------------------------------------------------------------------ boundary refinement
def boundary_map(mask: torch.Tensor, d: int) -> torch.Tensor:
    """B(M, d): pixels within about ``d`` of the mask contour, exactly RefineMask's ``generate_block_target == 1``.

    A pixel is boundary when more than 10 % of its ``(2d+1)^2`` window holds the other value.  The mask is
    zero-padded, so the RoI edge counts as background: a foreground pixel touching the edge is boundary, a
    background one is not.  d = 1: "has a differing 8-neighbour"; d = 2: ">= 3 differing pixels in 5 x 5".

    Parameters
    ----------
    mask : torch.Tensor
        ``(K, S, S)`` (or ``(K, 1, S, S)``) binary mask (bool or 0/1 float).
    d : int
        Boundary width.

    Returns
    -------
    torch.Tensor
        Bool, same shape as ``mask``.
    """
    m = mask.float().reshape(-1, 1, *mask.shape[-2:])
    k = 2 * d + 1
    kernel = -torch.ones(1, 1, k, k, dtype=m.dtype, device=m.device)
    kernel[0, 0, d, d] = k * k - 1
    pad = F.pad(m, (d, d, d, d), mode="constant", value=0.0)
    pos = (F.conv2d(pad, kernel).clamp(min=0) / float(k * k)) > 0.1
    neg = (F.conv2d(1 - pad, kernel).clamp(min=0) / float(k * k)) > 0.1
    boundary = pos | neg
    interior = (m - pos.float()) > 0  # foreground that is not boundary: block target 2
    out = boundary & ~interior
    return out.reshape(mask.shape)


def refine_blend(stage_logits: Sequence[torch.Tensor], start: int = 1, d: int = 1) -> torch.Tensor:
    """RefineMask inference: blend the stage logits from ``stage_logits[start]`` (28 x 28) upwards.

    ``M'_start = M_start``; for each next stage ``b = up(B(sigmoid(M'_{k-1}) >= 0.5, d))`` and
    ``M'_k = b * M_k + (1 - b) * up(M'_{k-1})``, on **logits** with a hard ``b``.  Upsampling is bilinear with
    ``align_corners=True``; following ``refine_roi_head.simple_test_mask``, the previous prediction is kept where
    the upsampled *non*-boundary map is ``>= 0.5``.

    Parameters
    ----------
    stage_logits : sequence of torch.Tensor
        ``[(K, 1, S_k, S_k)]``, sizes doubling.

    Returns
    -------
    torch.Tensor
        ``(K, 1, S_last, S_last)`` refined logits.
    """
    prev = stage_logits[start]
    for cur in stage_logits[start + 1:]:
        size = cur.shape[-2:]
        non_boundary = (~boundary_map(prev[:, 0].sigmoid() >= 0.5, d)).float()[:, None]
        keep_prev = F.interpolate(non_boundary, size=size, mode="bilinear", align_corners=True) >= 0.5
        prev_up = F.interpolate(prev, size=size, mode="bilinear", align_corners=True)
        prev = torch.where(keep_prev, prev_up, cur)
    return prev


def refine_mask_loss(
    stage_logits: Sequence[torch.Tensor],
    stage_targets: Sequence[torch.Tensor],
    stage_weights: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
    boundary_width: int = 2,
    start_stage: int = 1,
    roi_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """RefineMask's boundary-aware instance loss (``RefineCrossEntropyLoss``).

    Stages ``<= start_stage`` (14, 28): BCE over the whole RoI.  Later stages (56, 112): BCE summed over
    ``R_k = up(B(P'_{k-1}, 2) | B(G_{k-1}, 2)) >= 0.5`` and divided by ``|R_k|``, where ``P'_{k-1}`` is the
    previous combined prediction and ``G_{k-1}`` the previous stage's target.  As in the official code, the
    combined prediction at stage k is ``up(M_{k-1})`` with the pixels of ``up(B(P'_{k-1}, 1)) >= 0.5`` taken
    from ``M_k`` (built from the raw previous-stage logits, where inference chains the blended ones).
    Weighted sum over stages with ``stage_weights``.

    Parameters
    ----------
    stage_logits, stage_targets : sequences of torch.Tensor
        ``[(K, 1, S_k, S_k)]`` logits and ``[(K, S_k, S_k)]`` 0/1 targets.
    roi_weights : torch.Tensor, optional
        ``(K,)`` per-RoI weights (e.g. correction strokes weighted above auto-labels).

    Returns
    -------
    (torch.Tensor, list of torch.Tensor)
        The weighted total and the per-stage losses.
    """
    if len(stage_weights) != len(stage_logits):
        raise ValueError(f"{len(stage_weights)} stage weights for {len(stage_logits)} stages")
    w = None if roi_weights is None else roi_weights.view(-1, 1, 1)
    losses = []
    pre_pred = None
    for idx, (logits, target) in enumerate(zip(stage_logits, stage_targets)):
        pred = logits[:, 0]
        bce = F.binary_cross_entropy_with_logits(pred, target, reduction="none")
        if w is not None:
            bce = bce * w
        if idx <= start_stage:
            losses.append(bce.mean())
            pre_pred = pred.detach().sigmoid() >= 0.5
            continue
        size = pred.shape[-2:]
        region = boundary_map(pre_pred, boundary_width) | boundary_map(stage_targets[idx - 1] >= 0.5, boundary_width)
        region = F.interpolate(region.float()[:, None], size=size, mode="bilinear", align_corners=True)[:, 0] >= 0.5
        losses.append((bce * region).sum() / region.sum().clamp(min=1))
        # the previous combined prediction at this size, as at inference (d = 1)
        b = boundary_map(pre_pred, 1).float()[:, None]
        b = F.interpolate(b, size=size, mode="bilinear", align_corners=True) >= 0.5
        prev_up = F.interpolate(stage_logits[idx - 1].detach(), size=size, mode="bilinear", align_corners=True)
        pre_pred = torch.where(b, logits.detach(), prev_up)[:, 0].sigmoid() >= 0.5
    total = sum(sw * l for sw, l in zip(stage_weights, losses))
    return total, losses


# ------------------------------------------------------------------------------------------ targets and pasting
def instance_mask_targets(instances: torch.Tensor, rois: torch.Tensor, instance_ids: torch.Tensor,
                          size: int) -> torch.Tensor:
    """Crop-and-resize each RoI's ground-truth mask to ``size x size`` and threshold at 0.5.

    Equivalent to ``grid_sample(mask_k, grid, bilinear, align_corners=False, padding zeros) >= 0.5`` with the
    grid at the centres of the ``size x size`` bins of the RoI (pixel-edge convention, i.e. the sample points
    of an ``aligned=True`` RoIAlign), where ``mask_k = (instances[b] == id_k)``; computed from the id map by
    comparing the four bilinear neighbours' ids, so no per-instance full-image mask is ever built.

    Parameters
    ----------
    instances : torch.Tensor
        ``(N, H, W)`` int64 instance ids.
    rois : torch.Tensor
        ``(K, 5)`` ``(batch_index, x1, y1, x2, y2)`` in pixels.
    instance_ids : torch.Tensor
        ``(K,)`` the id each RoI is matched to.

    Returns
    -------
    torch.Tensor
        ``(K, size, size)`` float 0/1.
    """
    n, h, w = instances.shape
    k = rois.shape[0]
    if k == 0:
        return instances.new_zeros((0, size, size), dtype=torch.float32)
    t = (torch.arange(size, device=rois.device, dtype=torch.float32) + 0.5) / size
    x = rois[:, 1, None] + t[None] * (rois[:, 3] - rois[:, 1])[:, None] - 0.5  # (K, S) index coordinates
    y = rois[:, 2, None] + t[None] * (rois[:, 4] - rois[:, 2])[:, None] - 0.5
    x0 = x.floor()
    y0 = y.floor()
    lx = (x - x0)[:, None, :]
    ly = (y - y0)[:, :, None]
    x0 = x0.long()[:, None, :]
    y0 = y0.long()[:, :, None]
    b = rois[:, 0].long()[:, None, None]
    ids = instance_ids.view(-1, 1, 1)

    def corner(yy: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
        inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        v = instances[b, yy.clamp(0, h - 1), xx.clamp(0, w - 1)] == ids
        return (v & inside).float()

    val = ((1 - ly) * (1 - lx) * corner(y0, x0) + (1 - ly) * lx * corner(y0, x0 + 1)
           + ly * (1 - lx) * corner(y0 + 1, x0) + ly * lx * corner(y0 + 1, x0 + 1))
    return (val >= 0.5).float()


def paste_masks(mask_probs: torch.Tensor, boxes: torch.Tensor, image_size: tuple[int, int],
                threshold: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Paste ``(K, 1, S, S)`` mask probabilities into the image inside their boxes (mmdet's ``_do_paste_mask``).

    Each image pixel ``(r, c)`` inside a box samples the mask at its centre ``(c + 0.5, r + 0.5)`` mapped into
    the box, with ``grid_sample(align_corners=False)``; the result is thresholded.  Only a window around each
    box is evaluated (one batched ``grid_sample`` over windows of the largest box size), so the cost is
    ``K x box area``, not ``K x image area``.

    Returns
    -------
    (torch.Tensor, torch.Tensor, torch.Tensor)
        ``masks`` ``(K, wh, ww)`` bool, and the windows' top-left ``rows``, ``cols`` ``(K,)`` int64 in the image.
        Window pixels outside the image are False.
    """
    k = mask_probs.shape[0]
    height, width = image_size
    dev = mask_probs.device
    if k == 0:
        z = torch.zeros(0, dtype=torch.long, device=dev)
        return torch.zeros(0, 1, 1, dtype=torch.bool, device=dev), z, z
    x0 = boxes[:, 0].floor().clamp(0, width).long()
    y0 = boxes[:, 1].floor().clamp(0, height).long()
    x1 = boxes[:, 2].ceil().clamp(0, width).long()
    y1 = boxes[:, 3].ceil().clamp(0, height).long()
    ww = int((x1 - x0).max().clamp(min=1))
    wh = int((y1 - y0).max().clamp(min=1))
    cols = x0[:, None] + torch.arange(ww, device=dev)[None]  # (K, ww)
    rows = y0[:, None] + torch.arange(wh, device=dev)[None]
    bw = (boxes[:, 2] - boxes[:, 0]).clamp(min=1e-6)
    bh = (boxes[:, 3] - boxes[:, 1]).clamp(min=1e-6)
    gx = ((cols.float() + 0.5) - boxes[:, 0, None]) / bw[:, None] * 2 - 1
    gy = ((rows.float() + 0.5) - boxes[:, 1, None]) / bh[:, None] * 2 - 1
    grid = torch.stack([gx[:, None, :].expand(k, wh, ww), gy[:, :, None].expand(k, wh, ww)], dim=-1)
    probs = F.grid_sample(mask_probs.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0]
    inside = (rows < y1[:, None])[:, :, None] & (cols < x1[:, None])[:, None, :]
    return (probs >= threshold) & inside, y0, x0
