"""Backbones small enough to train on a 2-core CPU: a ResNet-style encoder, an FPN neck, and the plain
single-scale segmenter (``"fpn"``) that every multi-scale method is compared against.

Shapes: for an input ``(N, C_in, H, W)`` the encoder returns four maps at strides 4, 8, 16, 32 (sizes
``ceil(H / s)``); the FPN returns four maps of ``fpn_width`` channels at the same strides.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import Batch, HrsegModel, masked_cross_entropy
from .blocks import BasicBlock, ConvBNReLU, resize
from .registry import register_model

__all__ = ["ResNetEncoder", "FPN", "FPNSegmenter", "SemanticFPNHead"]


class ResNetEncoder(nn.Module):
    """ResNet-style encoder of basic blocks.

    Parameters
    ----------
    in_channels : int
        Input channels.
    widths : sequence of 4 int
        Channels of the stride-4, 8, 16 and 32 stages.
    depths : sequence of 4 int
        Basic blocks per stage.
    stem_width : int
        Channels of the stride-2 stem convolutions.
    """

    strides = (4, 8, 16, 32)

    def __init__(self, in_channels: int = 3, widths: Sequence[int] = (24, 48, 96, 192), depths: Sequence[int] = (1, 1, 2, 1),
                 stem_width: int = 16, norm: str = "bn"):
        super().__init__()
        if len(widths) != 4 or len(depths) != 4:
            raise ValueError("widths and depths need 4 entries (strides 4, 8, 16, 32)")
        self.stem = nn.Sequential(
            ConvBNReLU(in_channels, stem_width, 3, stride=2, norm=norm),
            ConvBNReLU(stem_width, stem_width, 3, norm=norm),
        )
        stages = []
        cin = stem_width
        for i, (w, d) in enumerate(zip(widths, depths)):
            blocks = [BasicBlock(cin, w, stride=2, norm=norm)]
            blocks += [BasicBlock(w, w, norm=norm) for _ in range(d - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = w
        self.stages = nn.ModuleList(stages)
        self.out_channels = tuple(widths)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


class FPN(nn.Module):
    """Feature pyramid network: lateral 1x1, top-down addition, 3x3 smoothing; returns P2..P5."""

    def __init__(self, in_channels: Sequence[int], width: int = 64, norm: str = "bn"):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in in_channels)
        self.smooth = nn.ModuleList(ConvBNReLU(width, width, 3, norm=norm) for _ in in_channels)
        self.out_channels = width

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        lat = [l(f) for l, f in zip(self.lateral, feats)]
        outs = [lat[-1]]
        for f in reversed(lat[:-1]):
            outs.insert(0, f + resize(outs[0], f.shape[-2:], "nearest"))
        return [s(o) for s, o in zip(self.smooth, outs)]


class SemanticFPNHead(nn.Module):
    """Panoptic-FPN style head: each pyramid level upsampled to stride 4, summed, classified."""

    def __init__(self, width: int, head_width: int, num_classes: int, norm: str = "bn"):
        super().__init__()
        self.level_convs = nn.ModuleList(ConvBNReLU(width, head_width, 3, norm=norm) for _ in range(4))
        self.classifier = nn.Conv2d(head_width, num_classes, 1)

    def features(self, pyramid: Sequence[torch.Tensor]) -> torch.Tensor:
        """Fused stride-4 features ``(N, head_width, H/4, W/4)``."""
        size = pyramid[0].shape[-2:]
        return sum(resize(conv(p), size) for conv, p in zip(self.level_convs, pyramid))

    def forward(self, pyramid: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.classifier(self.features(pyramid))


@register_model("fpn")
class FPNSegmenter(HrsegModel):
    """The plain single-scale baseline: ResNet-style encoder + FPN + semantic head, logits at input size.

    Also the base segmenter inside MagNet and the trunk of the multi-scale attention model.
    """

    default_params = {
        "widths": (24, 48, 96, 192),
        "depths": (1, 1, 2, 1),
        "stem_width": 16,
        "fpn_width": 64,
        "head_width": 64,
        "norm": "bn",
    }

    def __init__(self, config):
        super().__init__(config)
        p = self.params
        self.encoder = ResNetEncoder(config.in_channels, p["widths"], p["depths"], p["stem_width"], p["norm"])
        self.neck = FPN(self.encoder.out_channels, p["fpn_width"], p["norm"])
        self.head = SemanticFPNHead(p["fpn_width"], p["head_width"], config.num_classes, p["norm"])

    @property
    def halo(self) -> int:
        # How far one input pixel moves the output (inference.tiling.estimate_halo and a tiled-vs-whole check on
        # a model trained on GlaS): an untrained trunk settles within 96 px, a trained one needs 224 px for tiles
        # to agree with a whole-image pass (160 px left 0.9 % of pixels with another argmax near tile borders).
        return 224

    def forward_features(self, image: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Stride-4 head features and the FPN pyramid, for architectures built on this trunk."""
        pyramid = self.neck(self.encoder(image))
        return self.head.features(pyramid), pyramid

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        feats, _ = self.forward_features(image)
        logits = resize(self.head.classifier(feats), image.shape[-2:])
        return {"logits": logits}

    def loss(self, outputs: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        ce = masked_cross_entropy(outputs["logits"], batch.labels, batch.weight)
        return {"loss": ce, "ce": ce.detach()}
