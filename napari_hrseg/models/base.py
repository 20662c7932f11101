"""The contract every registered model keeps, so training, inference and the contract test treat them alike.

A model is a ``torch.nn.Module`` subclass of `HrsegModel` built from a `ModelConfig`:

- ``forward(image)`` takes a normalised float batch ``(N, C_in, H, W)`` of **any** size (odd sizes included:
  models pad and crop internally) and returns a dict of tensors.  Semantic models always return ``"logits"``
  of shape ``(N, num_classes, H, W)`` at the input resolution.  In training mode a forward may sample (e.g.
  MagNet picks a random crop to refine); in eval mode it is deterministic.
- ``loss(outputs, batch)`` returns a dict of scalar tensors whose ``"loss"`` entry is what to back-propagate;
  the other entries are logged.  Pixels labelled `IGNORE_INDEX` never contribute.
- ``halo`` is the context, in input pixels, that a tile needs around it for the output at its centre to equal a
  whole-image pass (used by the tiler), and ``stride`` the coarsest feature stride: tiles whose origins are
  multiples of ``stride`` see the same feature grid as a whole-image pass.

Architecture-specific inference (MagNet's stages, HMSA's scale chain, GLNet's global/local pair, instance
proposals) lives in methods documented on each class and in `napari_hrseg.inference`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from .config import IGNORE_INDEX, ModelConfig

__all__ = ["HrsegModel", "Batch", "to_input_tensor", "masked_cross_entropy", "ohem_cross_entropy"]


@dataclass
class Batch:
    """A training batch.

    Parameters
    ----------
    image : torch.Tensor
        ``(N, C_in, H, W)`` float, normalised with the model config's mean and std.
    labels : torch.Tensor
        ``(N, H, W)`` int64 semantic class per pixel; `IGNORE_INDEX` where unknown.
    instances : torch.Tensor, optional
        ``(N, H, W)`` int64 instance id per pixel (0 = no object), for instance models.
    weight : torch.Tensor, optional
        ``(N, H, W)`` float per-pixel loss weight (e.g. corrections weighted above coarse auto-labels).
    """

    image: torch.Tensor
    labels: torch.Tensor
    instances: torch.Tensor | None = None
    weight: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.image), move(self.labels), move(self.instances), move(self.weight))


class HrsegModel(nn.Module):
    """Base class of registered models; see the module docstring for the contract."""

    #: Default architecture hyper-parameters; ``ModelConfig.params`` overrides them.
    default_params: ClassVar[dict[str, Any]] = {}
    #: The task this architecture solves.
    task: ClassVar[str] = "semantic"
    #: Coarsest feature stride; tile origins aligned to it reproduce a whole-image pass's feature grid.
    stride: ClassVar[int] = 32

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config

    @property
    def params(self) -> dict[str, Any]:
        """Effective hyper-parameters: defaults overridden by the config."""
        return {**self.default_params, **self.config.params}

    @property
    def halo(self) -> int:
        """Context in input pixels a tile needs on each side (override where the receptive field is known)."""
        return 64

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def loss(self, outputs: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    @torch.no_grad()
    def predict_logits(self, image: torch.Tensor) -> torch.Tensor:
        """Single-scale logits ``(N, num_classes, H, W)`` in eval mode (the plain baseline prediction)."""
        return self(image)["logits"]


def to_input_tensor(pixels: np.ndarray, config: ModelConfig, device: torch.device | str = "cpu") -> torch.Tensor:
    """Turn slide pixels into a normalised model input.

    Parameters
    ----------
    pixels : numpy.ndarray
        ``(H, W, C)`` or ``(N, H, W, C)``; uint8 (0..255), uint16 (0..65535) or float (already 0..1).
    config : ModelConfig
        Supplies ``in_channels``, ``mean`` and ``std``.

    Returns
    -------
    torch.Tensor
        ``(N, C, H, W)`` float32 on ``device``.
    """
    arr = np.asarray(pixels)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.dtype == np.uint8:
        scale = 255.0
    elif arr.dtype == np.uint16:
        scale = 65535.0
    else:
        scale = 1.0
    t = torch.from_numpy(np.ascontiguousarray(arr)).to(device)
    # permute() of an NHWC array gives a channels-last view; make it a plain NCHW tensor, because some CPU
    # kernels of torch 2.13 corrupt the heap in backward on channels-last inputs of this FPN.
    t = t.permute(0, 3, 1, 2).float().div_(scale).contiguous()
    mean = torch.tensor(config.mean, device=t.device).view(1, -1, 1, 1)
    std = torch.tensor(config.std, device=t.device).view(1, -1, 1, 1)
    return (t - mean) / std


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy over labelled pixels (labels == IGNORE_INDEX are skipped), optionally weighted.

    Returns 0 (with a graph) when no pixel is labelled, so a batch of ignored pixels never yields NaN.
    """
    per_pixel = nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
    valid = (labels != IGNORE_INDEX).float()
    if weight is not None:
        valid = valid * weight
    return (per_pixel * valid).sum() / valid.sum().clamp_min(1.0)


def ohem_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None, *,
                       threshold: float = 0.7, min_kept: int = 100000) -> torch.Tensor:
    """Online hard example mining cross-entropy (MagNet's and HRNet's ``OhemCrossEntropy``).

    Keeps the labelled pixels whose probability for their true class is below ``max(threshold, p_k)``,
    where ``p_k`` is the probability at 0-based position ``min(min_kept, n - 1)`` of the ``n`` labelled pixels'
    probabilities sorted ascending, so about ``min_kept`` hard pixels contribute even when the model is
    confident; the loss is their (weighted) mean cross-entropy, 0 when none is kept.

    Parameters
    ----------
    logits : torch.Tensor
        ``(N, C, H, W)``.
    labels : torch.Tensor
        ``(N, H, W)`` int64, `IGNORE_INDEX` where unknown.
    weight : torch.Tensor, optional
        ``(N, H, W)`` per-pixel weight.
    """
    per_pixel = nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
    valid = labels != IGNORE_INDEX
    if not bool(valid.any()):
        return per_pixel.sum() * 0.0
    with torch.no_grad():
        prob = torch.softmax(logits, dim=1).gather(1, labels.clamp_max(logits.shape[1] - 1).unsqueeze(1))[:, 0]
        kept_probs = prob[valid]
        k = min(int(min_kept), kept_probs.numel() - 1)
        kth = kept_probs.kthvalue(k + 1).values
        cut = torch.maximum(kth, torch.tensor(threshold, dtype=prob.dtype, device=prob.device))
        hard = valid & (prob < cut)
    w = hard.float() if weight is None else hard.float() * weight
    return (per_pixel * w).sum() / w.sum().clamp_min(1.0)
