"""Losses shared by the architectures: multi-class focal loss (GLNet) and the penalty-reduced focal loss of
CenterNet heatmaps (instance proposals).  Pixels labelled `IGNORE_INDEX` never contribute."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import IGNORE_INDEX

__all__ = ["focal_loss", "heatmap_focal_loss"]


def focal_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    gamma: float = 3.0,
    weight: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Multi-class focal loss ``mean(-(1 - p_t)^gamma * log p_t)`` over labelled pixels (Lin et al. 2017).

    GLNet's official code uses this form with ``gamma = 3`` and no class balancing (alpha); the GLNet paper
    reports ``gamma = 6`` (ALGORITHMS.md, disagreement table).  ``log p_t`` comes from ``log_softmax`` (no
    clamping), so ``gamma = 0`` is exactly the masked cross-entropy.

    Parameters
    ----------
    logits : torch.Tensor
        ``(N, C, H, W)``.
    labels : torch.Tensor
        ``(N, H, W)`` int64 class per pixel; ``ignore_index`` where unknown.
    gamma : float
        Focusing parameter.
    weight : torch.Tensor, optional
        ``(N, H, W)`` per-pixel weight; the mean is weighted.

    Returns
    -------
    torch.Tensor
        Scalar; 0 (with a graph) when no pixel is labelled.
    """
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    log_p = F.log_softmax(logits, dim=1).gather(1, safe[:, None]).squeeze(1)
    if gamma:
        per_pixel = -((1.0 - log_p.exp()).clamp(min=0.0) ** gamma) * log_p
    else:
        per_pixel = -log_p
    w = valid.to(logits.dtype)
    if weight is not None:
        w = w * weight
    return (per_pixel * w).sum() / w.sum().clamp(min=1.0)


def heatmap_focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 2.0,
    beta: float = 4.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """CenterNet's penalty-reduced pixel-wise focal loss on a Gaussian-splatted heatmap (Zhou et al. 2019).

    ``-1/N_pos * sum[ (1 - p)^alpha log p  where target == 1;  (1 - target)^beta p^alpha log(1 - p) elsewhere ]``.

    Parameters
    ----------
    logits : torch.Tensor
        ``(N, K, h, w)`` heatmap logits (one channel per object class).
    target : torch.Tensor
        ``(N, K, h, w)`` in ``[0, 1]``, exactly 1 at object centres.
    mask : torch.Tensor, optional
        ``(N, 1, h, w)`` or broadcastable weights; 0 where the image is unlabelled.
    """
    log_p = F.logsigmoid(logits)
    log_1mp = F.logsigmoid(-logits)
    p = log_p.exp()
    pos = (target >= 1.0).to(logits.dtype)
    neg = 1.0 - pos
    pos_term = ((1.0 - p) ** alpha) * log_p * pos
    neg_term = ((1.0 - target) ** beta) * (p**alpha) * log_1mp * neg
    if mask is not None:
        pos_term = pos_term * mask
        neg_term = neg_term * mask
        pos = pos * mask
    num_pos = pos.sum().clamp(min=1.0)
    return -(pos_term.sum() + neg_term.sum()) / num_pos
