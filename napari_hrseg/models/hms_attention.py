"""Hierarchical multi-scale attention (Tao, Sapra, Catanzaro, arXiv 2005.10821), registered as ``"hmsa"``.

One network predicts, at every scale, class logits ``p_s`` and a one-channel attention ``a_s`` in ``[0, 1]``.
Scales are combined pairwise from the finest down, on **logits**: a lower scale's attention says how much of
its own prediction to use where it is better (context, large structures), the rest comes from the finer
result.  Training sees only the pair (0.5, 1.0); inference chains any list of scales that contains 1.0
(NVIDIA/semantic-segmentation ``network/ocrnet.py``: ``two_scale_forward``, ``nscale_forward``).

`attention_chain` is the chain as a plain function of per-scale ``(scale, logits, attention)``, so the
inference engine can feed it predictions made on different pyramid levels of a slide rather than resizes of
one image.  The trunk here is the ``"fpn"`` baseline (instead of HRNet-OCR); the attention head reads the
trunk's fused stride-4 head features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from ..errors import ModelError
from .backbones import FPNSegmenter
from .base import Batch, HrsegModel, masked_cross_entropy
from .blocks import ConvBNReLU, resize, scaled_size
from .registry import register_model

__all__ = ["attention_chain", "two_scale_blend", "AttentionHead", "MultiScaleAttention", "MultiScaleResult"]


def two_scale_blend(logits_lo: torch.Tensor, attention_lo: torch.Tensor, logits_hi: torch.Tensor) -> torch.Tensor:
    """``up(a_lo * p_lo) + (1 - up(a_lo)) * p_hi``, the training blend (and each downward step of the chain).

    Parameters
    ----------
    logits_lo : torch.Tensor
        ``(N, C, h, w)`` logits of the lower scale.
    attention_lo : torch.Tensor
        ``(N, 1, h, w)`` its attention in ``[0, 1]``.
    logits_hi : torch.Tensor
        ``(N, C, H, W)`` logits of the higher scale; sets the output size.
    """
    size = tuple(logits_hi.shape[-2:])
    return resize(attention_lo * logits_lo, size) + (1.0 - resize(attention_lo, size)) * logits_hi


def attention_chain(predictions: Sequence[tuple[float, torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
    """NVIDIA's n-scale chain: combine per-scale logits with their attention into logits at scale 1.0.

    Parameters
    ----------
    predictions : sequence of (scale, logits, attention)
        ``scale`` a relative scale (1.0 must be among them); ``logits`` ``(N, C, h_s, w_s)``; ``attention``
        ``(N, 1, h_s, w_s)`` in ``[0, 1]`` (ignored, and may be None, for the finest scale).  Sizes are taken
        from the tensors themselves, so maps read from pyramid levels whose sizes are not exactly
        ``scale x size`` combine correctly.

    Returns
    -------
    torch.Tensor
        ``(N, C, h_1, w_1)`` logits at the size of the scale-1.0 entry.

    Notes
    -----
    Scales are visited from the finest down.  ``P`` starts as the finest logits; for each next scale ``s``:
    if ``s >= 1``, ``P = a_s * p_s + (1 - a_s) * down(P)``; if ``s < 1``,
    ``P = up(a_s * p_s) + (1 - up(a_s)) * P``.  Resizes are bilinear, align_corners=False.
    """
    entries = sorted(predictions, key=lambda e: float(e[0]), reverse=True)
    scales = [float(s) for s, _, _ in entries]
    if not any(math.isclose(s, 1.0) for s in scales):
        raise ValueError(f"the attention chain needs scale 1.0 among its scales, got {scales}")
    if len(set(scales)) != len(scales):
        raise ValueError(f"scales repeat: {scales}")
    pred = entries[0][1]
    for scale, logits, attention in entries[1:]:
        if attention is None:
            raise ValueError(f"scale {scale} needs an attention map (only the finest scale may omit it)")
        if scale >= 1.0 or math.isclose(scale, 1.0):
            pred = resize(pred, tuple(logits.shape[-2:]))
            pred = attention * logits + (1.0 - attention) * pred
        else:
            pred = two_scale_blend(logits, attention, pred)
    return pred


class AttentionHead(nn.Module):
    """NVIDIA's ``make_attn_head``: 3x3 conv-BN-ReLU, 3x3 conv-BN-ReLU, 1x1 conv to 1 (no bias), sigmoid."""

    def __init__(self, in_channels: int, width: int, norm: str = "bn"):
        super().__init__()
        self.body = nn.Sequential(
            ConvBNReLU(in_channels, width, 3, norm=norm),
            ConvBNReLU(width, width, 3, norm=norm),
            nn.Conv2d(width, 1, 1, bias=False),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``(N, in_channels, h, w)`` features -> ``(N, 1, h, w)`` attention in ``[0, 1]``."""
        return torch.sigmoid(self.body(features))


@dataclass
class MultiScaleResult:
    """Output of `MultiScaleAttention.multiscale`.

    Attributes
    ----------
    logits : torch.Tensor
        ``(N, C, H, W)`` chained logits at the input size (scale 1.0).
    scale_logits : dict of float to torch.Tensor
        Each scale's own logits ``(N, C, h_s, w_s)`` at that scale's input size.
    attention : dict of float to torch.Tensor
        Each scale's attention ``(N, 1, h_s, w_s)``, except the finest scale's, which the chain never uses.
    """

    logits: torch.Tensor
    scale_logits: dict[float, torch.Tensor] = field(default_factory=dict)
    attention: dict[float, torch.Tensor] = field(default_factory=dict)


@register_model("hmsa")
class MultiScaleAttention(HrsegModel):
    """FPN trunk + segmentation head + attention head, trained on scale pairs and chained at inference.

    Hyper-parameters are the ``"fpn"`` trunk's plus:

    attention_width : int
        Channels of the attention head's 3x3 convs (NVIDIA: 256 on 512-channel features).
    train_scales : (float, float)
        The training pair ``(low, 1.0)``; NVIDIA uses (0.5, 1.0).
    scale_loss_weight : float
        Weight of the per-scale supervision ``CE(up(p_lo)) + CE(p_1)`` added to ``CE(joint)`` (0.05).

    ``config.scales`` are the inference scales (must contain 1.0; default ``(0.25, 0.5, 1.0)``).  Training mode
    returns ``"logits"`` (the blend), ``"logits_lo"`` (``up(p_lo)``), ``"logits_hi"`` (``p_1``) and
    ``"attention_lo"`` (``up(a_lo)``), all at the input size.  Eval mode returns the chained ``"logits"`` and
    ``"attention_<s>"`` per scale below the finest, resized to the input (for display).
    """

    default_params: dict[str, Any] = {
        **FPNSegmenter.default_params,
        "attention_width": 64,
        "train_scales": (0.5, 1.0),
        "scale_loss_weight": 0.05,
    }
    default_scales = (0.25, 0.5, 1.0)

    def __init__(self, config):
        if tuple(config.scales) == (1.0,):
            config = config.evolve(scales=self.default_scales)
        super().__init__(config)
        p = self.params
        for name, scales in (("scales", config.scales), ("train_scales", p["train_scales"])):
            if not any(math.isclose(float(s), 1.0) for s in scales) or any(float(s) <= 0 for s in scales):
                raise ModelError(f"{name}={tuple(scales)} must be positive and contain 1.0", subject="hmsa",
                                 hint="the chain ends at scale 1.0, the model's pixel size")
        if len(p["train_scales"]) != 2:
            raise ModelError(f"train_scales={tuple(p['train_scales'])} must be a pair (low, 1.0)", subject="hmsa")
        fpn_keys = FPNSegmenter.default_params.keys()
        self.trunk = FPNSegmenter(config.evolve(arch="fpn", params={k: p[k] for k in fpn_keys}))
        self.attention_head = AttentionHead(p["head_width"], p["attention_width"], p["norm"])

    @property
    def halo(self) -> int:
        return int(math.ceil(self.trunk.halo / min(float(s) for s in self.config.scales)))

    def predict_scale(self, image: torch.Tensor, with_attention: bool = True
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits ``(N, C, H, W)`` and attention ``(N, 1, H, W)`` of one image at its own size.

        Both are computed at stride 4 and upsampled bilinearly to the input size, as NVIDIA's ``_fwd``.
        """
        feats, _ = self.trunk.forward_features(image)
        size = tuple(image.shape[-2:])
        logits = resize(self.trunk.head.classifier(feats), size)
        attention = resize(self.attention_head(feats), size) if with_attention else None
        return logits, attention

    def multiscale(self, image: torch.Tensor, scales: Sequence[float] | None = None) -> MultiScaleResult:
        """Chained prediction of ``image`` (scale 1.0) over anti-aliased resizes at ``scales``.

        ``scales`` default to ``config.scales``; they must contain 1.0.
        """
        scales = tuple(float(s) for s in (scales or self.config.scales))
        size = tuple(image.shape[-2:])
        finest = max(scales)
        entries = []
        result = MultiScaleResult(logits=image.new_empty(0))
        for s in scales:
            x = image if math.isclose(s, 1.0) else resize(image, scaled_size(size, s), antialias=True)
            logits, attention = self.predict_scale(x, with_attention=s != finest)
            result.scale_logits[s] = logits
            if attention is not None:
                result.attention[s] = attention
            entries.append((s, logits, attention))
        result.logits = attention_chain(entries)
        return result

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        size = tuple(image.shape[-2:])
        if not self.training:
            result = self.multiscale(image)
            out = {"logits": result.logits}
            out.update({f"attention_{s:g}": resize(a, size) for s, a in result.attention.items()})
            return out
        lo, hi = sorted(float(s) for s in self.params["train_scales"])
        p_lo, a_lo = self.predict_scale(resize(image, scaled_size(size, lo), antialias=True))
        p_hi, _ = self.predict_scale(image, with_attention=False)
        return {
            "logits": two_scale_blend(p_lo, a_lo, p_hi),
            "logits_lo": resize(p_lo, size),
            "logits_hi": p_hi,
            "attention_lo": resize(a_lo, size),
        }

    def loss(self, outputs: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        """``CE(joint) + w * (CE(up(p_lo)) + CE(p_1))``, pixels labelled `IGNORE_INDEX` skipped."""
        joint = masked_cross_entropy(outputs["logits"], batch.labels, batch.weight)
        out = {"ce_joint": joint.detach()}
        total = joint
        if "logits_lo" in outputs:
            ce_lo = masked_cross_entropy(outputs["logits_lo"], batch.labels, batch.weight)
            ce_hi = masked_cross_entropy(outputs["logits_hi"], batch.labels, batch.weight)
            total = joint + float(self.params["scale_loss_weight"]) * (ce_lo + ce_hi)
            out.update(ce_lo=ce_lo.detach(), ce_hi=ce_hi.detach())
        return {"loss": total, **out}
