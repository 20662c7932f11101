"""MagNet: multi-scale progressive refinement (Huynh, Tran, Nguyen, Hua; CVPR 2021), registered as ``"magnet"``.

A base segmenter (the ``"fpn"`` trunk) predicts the whole image at the coarsest scale; each finer stage cuts
the image at that scale into patches, segments them, and a small refinement module merges each patch's
prediction ``O`` with the crop of the running prediction ``Y``.  Only the pixels where ``Y`` was unsure and the
refinement is sure are replaced.  The per-step tensor functions live in `napari_hrseg.models.magnet_ops`.

Input order of the refinement module: **O first, then Y** (``refiner(O, Y_crop)``), as MagNet's test.py and
released weights; it is used the same way in training and inference (MagNet's train.py had it swapped).

Training happens in two phases, set with ``model.train_phase``:

``"segmenter"`` (default for a fresh model)
    The base segmenter is trained like the ``"fpn"`` baseline on whole crops; the refiners are frozen.
``"refiner"``
    The segmenter is frozen (``requires_grad=False`` and kept in eval mode, so its batch-norm statistics do not
    drift).  A training forward takes the coarse prediction ``Y`` of the whole training crop resized to the
    coarsest scale, and for every refinement stage a random fine sub-crop of ``patch_size`` at that stage's
    scale; the refiner learns ``Refine(O, Y_crop)`` against the sub-crop's labels.  ``Y`` is always the
    segmenter's whole-image prediction, never the accumulated multi-stage ``Y`` (MagNet's train.py, issue #8).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ModelError
from .backbones import FPNSegmenter
from .base import Batch, HrsegModel, masked_cross_entropy, ohem_cross_entropy
from .blocks import Bottleneck, resize, scaled_size
from .magnet_ops import StageResult, refine_stage
from .registry import register_model

__all__ = ["MagNet", "RefinementModule", "MagNetResult", "TRAIN_PHASES"]

log = logging.getLogger(__name__)

TRAIN_PHASES = ("segmenter", "refiner")


class RefinementModule(nn.Module):
    """MagNet's refinement module [MagNet: magnet/model/refinement.py].

    ``concat(O, Y)`` (2C channels) -> BN -> 3x3 conv to ``width`` + BN + ReLU -> 3x3 conv + BN + ReLU -> two
    Bottlenecks of ``planes`` (output ``4 * planes``; the first projects) -> 1x1 conv to C without bias.
    Every batch norm has momentum 0.01.  About 0.1 M parameters for C = 19 at the paper's widths (64, 32).

    Parameters
    ----------
    num_classes : int
        ``C``.
    width : int
        Channels of the two 3x3 convolutions (paper: 64).
    planes : int
        Bottleneck planes (paper: 32, so 128 output channels).
    bn_momentum : float
        Batch-norm momentum (paper: 0.01).
    """

    def __init__(self, num_classes: int, width: int = 64, planes: int = 32, bn_momentum: float = 0.01):
        super().__init__()
        c2 = 2 * num_classes
        self.bn_in = nn.BatchNorm2d(c2, momentum=bn_momentum)
        self.conv1 = nn.Conv2d(c2, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width, momentum=bn_momentum)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width, momentum=bn_momentum)
        self.residual = nn.Sequential(
            Bottleneck(width, planes, bn_momentum=bn_momentum),
            Bottleneck(planes * Bottleneck.expansion, planes, bn_momentum=bn_momentum),
        )
        self.classifier = nn.Conv2d(planes * Bottleneck.expansion, num_classes, 1, bias=False)
        # The module runs at full resolution on few channels, where oneDNN's channels-last convolutions are
        # markedly faster on a CPU than NCHW ones; weights are stored channels-last too (saved contiguous).
        self.to(memory_format=torch.channels_last)

    def forward(self, fine_probs: torch.Tensor, coarse_probs: torch.Tensor) -> torch.Tensor:
        """Refined logits ``(N, C, h, w)`` from ``O`` (the patch's own softmax) and ``Y`` (coarse crop), O first."""
        x = torch.cat([fine_probs, coarse_probs], dim=1).contiguous(memory_format=torch.channels_last)
        x = self.bn_in(x)
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.classifier(self.residual(x))


@dataclass
class MagNetResult:
    """Output of a progressive pass.

    Attributes
    ----------
    probs : torch.Tensor
        ``(N, C, H, W)`` final probabilities at the input size.
    coarse_probs : torch.Tensor
        ``(N, C, h1, w1)`` stage-1 prediction (the segmenter on the whole coarsest image).
    stages : list of list of StageResult
        ``stages[n][i]`` is stage ``i + 2`` of image ``n`` (uncertainty map, chosen patches and points).
    """

    probs: torch.Tensor
    coarse_probs: torch.Tensor
    stages: list[list[StageResult]] = field(default_factory=list)


@register_model("magnet")
class MagNet(HrsegModel):
    """MagNet with an FPN base segmenter; see the module docstring for the two training phases.

    Hyper-parameters (``config.params``) are the ``"fpn"`` trunk's plus:

    patch_size : int or (int, int)
        Patch (MagNet's crop = input size) each stage canvas is cut into, in pixels of that stage.
    n_points : float
        Points replaced per stage: a count (> 1) or a fraction of the canvas (<= 1; DeepGlobe 0.75).
    n_patches : int
        MagNet-Fast when > 0: refine only that many patches per stage, the most uncertain ones.
    kernel_size : int
        Odd median window for the score map (Cityscapes 5, DeepGlobe 11), applied at ``patch_size``.
    shared_refiner : bool
        One refinement module for every stage (DeepGlobe) or one per stage (Cityscapes).
    refiner_width, refiner_planes : int
        Refinement module widths.  The paper's are 64 and 32; the defaults (32 and 16) cost a quarter as much,
        which matters because the module runs at full resolution on every refined pixel (at the paper's
        widths it alone takes about 2 s per 512 x 512 tile on 2 CPU cores).
    ohem : bool
        OHEM cross-entropy (MagNet's loss: pixels with p(true) < max(0.7, k-th smallest), k = 100000)
        instead of the plain cross-entropy.

    ``config.scales`` are the stage scales relative to the model's pixel size, ascending, ending at 1.0
    (default ``(0.25, 0.5, 1.0)``: three stages, the coarsest seeing 4x the field of view per pixel).
    """

    default_params: dict[str, Any] = {
        **FPNSegmenter.default_params,
        "patch_size": 256,
        "n_points": 0.75,
        "n_patches": 0,
        "kernel_size": 5,
        "shared_refiner": True,
        "refiner_width": 32,
        "refiner_planes": 16,
        "ohem": False,
        "ohem_threshold": 0.7,
        "ohem_min_kept": 100000,
    }
    default_scales = (0.25, 0.5, 1.0)
    train_phases = TRAIN_PHASES

    def __init__(self, config):
        if tuple(config.scales) == (1.0,):
            config = config.evolve(scales=self.default_scales)
        super().__init__(config)
        scales = tuple(float(s) for s in config.scales)
        if len(scales) < 2 or list(scales) != sorted(set(scales)) or scales[-1] != 1.0 or scales[0] <= 0:
            raise ModelError(
                f"MagNet needs at least two ascending positive scales ending at 1.0, got {scales}",
                subject="magnet", hint="e.g. scales=(0.25, 0.5, 1.0)",
            )
        if config.num_classes < 2:
            raise ModelError("MagNet's uncertainty needs at least 2 classes", subject="magnet")
        p = self.params
        if int(p["kernel_size"]) % 2 == 0:
            raise ModelError(f"kernel_size={p['kernel_size']} must be odd", subject="magnet",
                             hint="an even median window shifts the score map by half a pixel; use e.g. 11")
        self.scales = scales
        fpn_keys = FPNSegmenter.default_params.keys()
        self.segmenter = FPNSegmenter(config.evolve(arch="fpn", params={k: p[k] for k in fpn_keys}))
        n_refiners = 1 if p["shared_refiner"] else len(scales) - 1
        self.refiners = nn.ModuleList(
            RefinementModule(config.num_classes, p["refiner_width"], p["refiner_planes"]) for _ in range(n_refiners)
        )
        self._train_phase = "segmenter"
        self.train_phase = "segmenter"

    # ------------------------------------------------------------------ configuration
    @property
    def patch_size(self) -> tuple[int, int]:
        ps = self.params["patch_size"]
        return (int(ps), int(ps)) if isinstance(ps, (int, float)) else (int(ps[0]), int(ps[1]))

    @property
    def halo(self) -> int:
        return int(round(self.segmenter.halo / self.scales[0]))

    @property
    def train_phase(self) -> str:
        """``"segmenter"`` or ``"refiner"``: which part a training forward and backward train."""
        return self._train_phase

    @train_phase.setter
    def train_phase(self, phase: str) -> None:
        if phase not in TRAIN_PHASES:
            raise ModelError(f"unknown training phase {phase!r}", subject="magnet", hint=f"use one of {TRAIN_PHASES}")
        self._train_phase = phase
        self.segmenter.requires_grad_(phase == "segmenter")
        self.refiners.requires_grad_(phase == "refiner")
        self.train(self.training)

    def train(self, mode: bool = True) -> "MagNet":
        super().train(mode)
        if mode and self._train_phase == "refiner":
            self.segmenter.eval()  # frozen: keep its batch-norm statistics
        return self

    def refiner_for_stage(self, stage: int) -> RefinementModule:
        """The refinement module of stage ``stage`` (2 = the first refinement stage), MagNet's indexing."""
        return self.refiners[min(len(self.refiners), stage - 1) - 1]

    def stage_sizes(self, size: tuple[int, int]) -> list[tuple[int, int]]:
        """Canvas ``(H, W)`` of each stage for an input of ``size`` at scale 1.0."""
        return [scaled_size(size, s) for s in self.scales]

    # ------------------------------------------------------------------ inference
    def segment(self, image: torch.Tensor) -> torch.Tensor:
        """Base segmenter logits ``(N, C, H, W)`` at the input size."""
        return self.segmenter(image)["logits"]

    def refine_stage(self, coarse_probs: torch.Tensor, image: torch.Tensor, stage: int,
                     **overrides: Any) -> StageResult:
        """Run refinement stage ``stage`` (>= 2) on one image with this model's segmenter and refiner.

        Parameters
        ----------
        coarse_probs : torch.Tensor
            ``(1, C, h, w)`` probabilities of the previous stage (any size; upsampled to the image).
        image : torch.Tensor
            ``(1, C_in, H, W)`` normalised image at this stage's resolution, e.g. read from a pyramid level.
        stage : int
            Stage number, 2 for the first refinement; picks the refinement module.
        **overrides
            ``n_points``, ``n_patches``, ``kernel_size``, ``patch_size``, ``working_size``, ``batch_size``.
        """
        p = self.params
        kwargs: dict[str, Any] = {
            "patch_size": self.patch_size,
            "n_points": float(p["n_points"]),
            "n_patches": int(p["n_patches"]) or None,
            "kernel_size": int(p["kernel_size"]),
        }
        kwargs.update(overrides)
        return refine_stage(coarse_probs, image, self.segment, self.refiner_for_stage(stage), **kwargs)

    def progressive(self, image: torch.Tensor, **overrides: Any) -> MagNetResult:
        """MagNet's coarse-to-fine pass over resizes of ``image`` (``(N, C_in, H, W)`` at scale 1.0).

        Stage 1 segments the whole image resized to the coarsest scale; stages 2.. call `refine_stage` on the
        image resized (anti-aliased) to each finer scale.  ``overrides`` go to `refine_stage`.
        """
        sizes = self.stage_sizes(tuple(image.shape[-2:]))
        coarse = torch.softmax(self.segment(resize(image, sizes[0], antialias=True)), dim=1)
        finals, stages = [], []
        for n in range(image.shape[0]):
            y = coarse[n:n + 1]
            per_image = []
            for i, size in enumerate(sizes[1:], start=2):
                result = self.refine_stage(y, resize(image[n:n + 1], size, antialias=True), i, **overrides)
                per_image.append(result)
                y = result.probs
            finals.append(resize(y, sizes[-1]))
            stages.append(per_image)
        return MagNetResult(probs=torch.cat(finals), coarse_probs=coarse, stages=stages)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Train mode: the current phase's training forward.  Eval mode: ``{"logits", "coarse_logits"}``.

        In eval mode ``"logits"`` are the log-probabilities of the progressive result ``(N, C, H, W)``
        (softmax of them gives MagNet's ``Y``), ``"coarse_logits"`` those of stage 1 upsampled to the input.
        """
        if self.training:
            return self._segmenter_forward(image) if self._train_phase == "segmenter" else self._refiner_forward(image)
        result = self.progressive(image)
        eps = torch.finfo(result.probs.dtype).tiny
        return {
            "logits": result.probs.clamp_min(eps).log(),
            "coarse_logits": resize(result.coarse_probs, tuple(image.shape[-2:])).clamp_min(eps).log(),
        }

    # ------------------------------------------------------------------ training
    def _segmenter_forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.segment(image)}

    def _refiner_forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """For each refinement stage: a random ``patch_size`` sub-crop at that scale, refined against ``Y``.

        Returns ``logits_stage{i}`` ``(N, C, h, w)`` and ``crop_stage{i}`` = ``[H_i, W_i, y0, x0, y1, x1]`` (the
        stage canvas and the crop box in it, int64) for ``i = 2 .. len(scales)``; ``"logits"`` is the last.
        """
        sizes = self.stage_sizes(tuple(image.shape[-2:]))
        with torch.no_grad():
            coarse = torch.softmax(self.segment(resize(image, sizes[0], antialias=True)), dim=1)
        out: dict[str, torch.Tensor] = {}
        ph, pw = self.patch_size
        for i, (h, w) in enumerate(sizes[1:], start=2):
            ch, cw = min(ph, h), min(pw, w)
            y0 = int(torch.randint(0, h - ch + 1, ()))
            x0 = int(torch.randint(0, w - cw + 1, ()))
            fine_image = resize(image, (h, w), antialias=True)[:, :, y0:y0 + ch, x0:x0 + cw]
            with torch.no_grad():
                fine = torch.softmax(self.segment(fine_image), dim=1)
                coarse_crop = resize(coarse, (h, w))[:, :, y0:y0 + ch, x0:x0 + cw]
            out[f"logits_stage{i}"] = self.refiner_for_stage(i)(fine, coarse_crop)
            out[f"crop_stage{i}"] = torch.tensor([h, w, y0, x0, y0 + ch, x0 + cw], device=image.device)
        out["logits"] = out[f"logits_stage{len(sizes)}"]
        return out

    def _pixel_loss(self, logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        p = self.params
        if p["ohem"]:
            return ohem_cross_entropy(logits, labels, weight, threshold=p["ohem_threshold"],
                                      min_kept=p["ohem_min_kept"])
        return masked_cross_entropy(logits, labels, weight)

    def loss(self, outputs: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        """Cross-entropy (or OHEM) ignoring `IGNORE_INDEX`; in the refiner phase, the mean over stages of the
        loss against each sub-crop's labels (labels resized nearest to the stage canvas, then cropped)."""
        crops = sorted(k for k in outputs if k.startswith("crop_stage"))
        if not crops:
            ce = self._pixel_loss(outputs["logits"], batch.labels, batch.weight)
            return {"loss": ce, "ce": ce.detach()}
        terms = {}
        for key in crops:
            stage = key[len("crop_stage"):]
            h, w, y0, x0, y1, x1 = (int(v) for v in outputs[key])
            labels = _crop_map(batch.labels, (h, w), (y0, x0, y1, x1))
            weight = None if batch.weight is None else _crop_map(batch.weight, (h, w), (y0, x0, y1, x1))
            terms[f"ce_stage{stage}"] = self._pixel_loss(outputs[f"logits_stage{stage}"], labels, weight)
        total = torch.stack(list(terms.values())).mean()
        return {"loss": total, **{k: v.detach() for k, v in terms.items()}}


def _crop_map(values: torch.Tensor, size: tuple[int, int], box: tuple[int, int, int, int]) -> torch.Tensor:
    """Nearest-resize a per-pixel ``(N, H, W)`` map (labels or weights) to ``size`` and crop ``box``."""
    y0, x0, y1, x1 = box
    if tuple(values.shape[-2:]) != tuple(size):
        values = resize(values[:, None].float(), size, "nearest")[:, 0].to(values.dtype)
    return values[:, y0:y1, x0:x1]
