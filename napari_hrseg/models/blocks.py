"""Small building blocks shared by the architectures (what torchvision would have given)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConvBNReLU", "BasicBlock", "Bottleneck", "resize", "scaled_size", "norm_layer"]


def norm_layer(channels: int, kind: str = "bn") -> nn.Module:
    """Batch norm (default) or group norm (for batch sizes of 1-2, e.g. fine-tuning on a CPU)."""
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "gn":
        groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    raise ValueError(f"unknown norm {kind!r}; use 'bn' or 'gn'")


class ConvBNReLU(nn.Sequential):
    """``k x k`` conv (no bias) -> norm -> ReLU, 'same' padding for odd ``k``."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, dilation: int = 1, norm: str = "bn"):
        super().__init__(
            nn.Conv2d(cin, cout, k, stride=stride, padding=dilation * (k // 2), dilation=dilation, bias=False),
            norm_layer(cout, norm),
            nn.ReLU(inplace=True),
        )


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs) with a projection shortcut when the shape changes."""

    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1, norm: str = "bn"):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm_layer(cout, norm)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm_layer(cout, norm)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm_layer(cout, norm))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x), inplace=True)


class Bottleneck(nn.Module):
    """ResNet bottleneck: 1x1 (planes) -> 3x3 (planes) -> 1x1 (planes * 4), projection when needed."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, norm: str = "bn", bn_momentum: float = 0.1):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = norm_layer(planes, norm)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = norm_layer(planes, norm)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = norm_layer(cout, norm)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm_layer(cout, norm))
        for m in self.modules():  # the projection's norm too, so one momentum holds for the whole block
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = bn_momentum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        y = F.relu(self.bn2(self.conv2(y)), inplace=True)
        y = self.bn3(self.conv3(y))
        return F.relu(y + self.shortcut(x), inplace=True)


def resize(x: torch.Tensor, size: tuple[int, int], mode: str = "bilinear", antialias: bool = False) -> torch.Tensor:
    """Resize to an explicit ``(H, W)`` (never a scale factor: odd sizes must round-trip exactly).

    ``antialias=True`` low-pass filters when shrinking (bilinear only), so a resized image resembles a
    pyramid level of the slide (area-averaged) rather than a sparse sample of it.
    """
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    shrinking = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    antialias = antialias and shrinking and mode == "bilinear"
    return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=antialias)


def scaled_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """``(H, W)`` multiplied by ``scale`` and rounded, at least 1 pixel per axis."""
    return max(1, int(round(size[0] * scale))), max(1, int(round(size[1] * scale)))
