"""RefineMask with its own instance proposals (registered ``"refinemask"``, task ``"instance"``).

RefineMask (Zhang et al., CVPR 2021) refines Mask R-CNN masks from 14 x 14 to 112 x 112 with a semantic branch
and boundary-aware refinement (see `refinemask_heads`).  A full two-stage detector (RPN, box head) is heavy for
a CPU annotation tool, so the RoIs come from a CenterNet-style centre heatmap with box sizes on P2
(`proposals`); the model then runs on its own, or on user boxes (``predict_instances(image, boxes=...)``).

Pipeline: ResNet-style encoder -> FPN (P2..P5) -> on P2 (+ upsampled P3..P5): semantic head (4 convs -> 1
channel) and centre head -> proposals -> RoIAlign 14 x 14 from the FPN level each RoI's size selects ->
RefineMask head (two convs, three SFM stages 14 -> 28 -> 56 -> 112) -> inference blend on logits from 28
(d = 1) -> sigmoid -> pasted with ``grid_sample`` -> threshold 0.5 -> overlaps resolved, higher score wins.

Training (``loss``): instances come from ``Batch.instances`` (or, when absent, the connected components of each
foreground class in ``Batch.labels``); boxes, centres, classes and per-RoI mask targets are derived here.
RoIs are the ground-truth boxes with random jitter (so the head learns to cope with imprecise proposals).
Loss = semantic BCE + centre losses + RefineMask's stage losses (weights 0.25, 0.5, 0.75, 1.0; boundary-only
BCE at 56 and 112 with d = 2).

Choices for small dense objects (H&E nuclei of 8-40 px at ~0.5 µm/px, judged by Dice/AJI/PQ):

- RoIs are the boxes grown by ``roi_scale`` (1.25) and at least ``roi_margin`` (2 px) a side, in training and
  inference alike: a proposal box a few pixels off would otherwise clip the mask, and RefineMask's boundary
  map treats the RoI edge as background, which would mark a tight box's whole rim as boundary.
- Every nucleus-sized RoI reads P2 (stride 4): the mmdet level rule sends boxes under 112 px there.
- ``semantic_stride = 2`` (the paper: 4): the semantic head's P2 features are upsampled x2 and fused with the
  encoder's stride-2 stem before the semantic logit.  The semantic features and mask are the only
  sub-RoI-resolution input of RefineMask's stages; at stride 4 a 10 px nucleus spans 2.5 cells, at stride 2
  five.  Costs one 3x3 conv at stride 2 (about +10 % of the dense forward).
- Proposals: see `proposals` (stride-4 heatmap with sub-cell offsets, 3 x 3 peak NMS, box NMS at IoU 0.5,
  up to 1000 detections).
- Overlaps: each pixel goes to the highest-scoring mask covering it; an instance then keeps only its largest
  4-connected piece and instances under ``min_area`` px are dropped, because AJI and PQ punish fragments and
  slivers as false positives.
- Widths are scaled down for a 2-core CPU (stage channels 32 -> 16 -> 8 -> 4 instead of 256 -> ... -> 32,
  ``mask_width``); the 112 x 112 output is kept (it oversamples a 40 px nucleus, so the saving is in width).
  The per-RoI maps run in channels-last layout, where oneDNN's thin convolutions are several times faster.
- Logit layers start near zero (std 0.01) instead of the official kaiming init (see `refinemask_heads`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ModelError
from .backbones import FPN, ResNetEncoder
from .base import Batch, HrsegModel
from .blocks import resize
from .config import IGNORE_INDEX
from .proposals import CenterHead, center_losses, center_targets, decode_centers
from .refinemask_heads import (
    RefineMaskHead,
    SemanticHead,
    instance_mask_targets,
    paste_masks,
    refine_blend,
    refine_mask_loss,
)
from .registry import register_model
from .roi_ops import boxes_from_rowcol, multilevel_roi_align, scale_boxes

__all__ = ["RefineMask", "InstancePrediction", "instances_from_labels", "ground_truth_from_instances"]

log = logging.getLogger(__name__)

STRIDES = (4, 8, 16, 32)


@dataclass
class InstancePrediction:
    """Instances found in one image.

    Attributes
    ----------
    labels : numpy.ndarray
        ``(H, W)`` int32 instance label image, 0 = background, instance ``i`` (1-based) is row ``i - 1`` below.
        Labels are in order of decreasing score.
    boxes : numpy.ndarray
        ``(K, 4)`` float32 ``(row0, col0, row1, col1)``: the tight box of each final mask, half-open, in input
        pixels (row1 = last row + 1).
    scores : numpy.ndarray
        ``(K,)`` float32 detection score (centre heatmap peak, or 1 for given boxes).
    classes : numpy.ndarray
        ``(K,)`` int32 class id, 1-based (an index into ``config.class_names``).
    """

    labels: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray

    def __len__(self) -> int:
        return int(self.scores.shape[0])


@register_model("refinemask")
class RefineMask(HrsegModel):
    """RefineMask instance segmenter with centre-heatmap proposals; see the module docstring.

    ``forward(image)`` returns the dense outputs (``"logits"`` ``(N, num_classes, H, W)``: background 0 and the
    class-agnostic foreground logit in every object channel; ``"semantic_logits"`` ``(N, 1, h_s, w_s)`` at
    ``semantic_stride``;
    ``"heatmap"`` ``(N, num_classes - 1, h, w)``, ``"offset"``, ``"size"`` ``(N, 2, h, w)``; the pyramid
    ``"p2"``..``"p5"`` and ``"semantic_features"``), with ``h, w = ceil(H / 4), ceil(W / 4)``.  The mask head
    runs on RoIs in `loss` (ground-truth boxes) and in `predict_instances` (proposals or given boxes).
    """

    task = "instance"
    default_params: dict[str, Any] = {
        # trunk
        "widths": (24, 48, 96, 192),
        "depths": (1, 1, 2, 1),
        "stem_width": 16,
        "fpn_width": 64,
        "norm": "bn",
        # heads
        "semantic_width": 32,
        "semantic_stride": 2,
        "center_width": 32,
        "mask_width": 32,
        "stage_sizes": (14, 28, 56, 112),
        "dilations": (1, 3, 5),
        # RoIs
        "roi_scale": 1.25,
        "roi_margin": 2.0,
        "roi_jitter": 0.1,
        "max_train_rois": 96,
        "roi_chunk": 100,
        # losses
        "stage_weights": (0.25, 0.5, 0.75, 1.0),
        "boundary_width": 2,
        "semantic_loss_weight": 1.0,
        "center_loss_weight": 1.0,
        # inference
        "score_threshold": 0.3,
        "nms_iou": 0.5,
        "max_detections": 1000,
        "mask_threshold": 0.5,
        "min_area": 6,
    }

    def __init__(self, config):
        super().__init__(config)
        p = self.params
        if config.num_classes < 2:
            raise ModelError("an instance model needs num_classes >= 2 (background and at least one object class)",
                             subject=config.arch)
        if len(p["stage_weights"]) != len(p["stage_sizes"]):
            raise ModelError(f"{len(p['stage_weights'])} stage_weights for {len(p['stage_sizes'])} stage_sizes",
                             subject=config.arch)
        self.num_objects = config.num_classes - 1
        self.encoder = ResNetEncoder(config.in_channels, p["widths"], p["depths"], p["stem_width"], p["norm"])
        self.neck = FPN(self.encoder.out_channels, p["fpn_width"], p["norm"])
        if p["semantic_stride"] not in (2, 4):
            raise ModelError(f"semantic_stride={p['semantic_stride']} must be 4 (the paper) or 2", subject=config.arch)
        self.semantic_stride = int(p["semantic_stride"])
        fine = p["stem_width"] if self.semantic_stride == 2 else None
        self.semantic = SemanticHead(p["fpn_width"], p["semantic_width"], fine_channels=fine)
        self.center = CenterHead(p["fpn_width"], p["center_width"], self.num_objects, p["norm"])
        self.mask_head = RefineMaskHead(p["fpn_width"], p["semantic_width"], p["mask_width"], self.num_objects,
                                        p["stage_sizes"], p["dilations"], semantic_stride=self.semantic_stride)

    @property
    def halo(self) -> int:
        # The trunk's reach (as the FPN baseline, 96 px) plus room for a whole nucleus (~40 px) to be seen.
        return 128

    # ------------------------------------------------------------------------------------------ dense part
    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        # channels-last: oneDNN runs this trunk ~25 % faster on a 2-core CPU; outputs keep their shapes.
        x = self.encoder.stem(image.contiguous(memory_format=torch.channels_last))
        stem = x
        feats = []
        for stage in self.encoder.stages:
            x = stage(x)
            feats.append(x)
        pyramid = self.neck(feats)
        # The dense heads read P2 plus the upsampled coarser levels: nuclei need the context of their
        # neighbourhood (crowding, gland lumen, stroma), and every FPN level is then trained even when all
        # RoIs are nucleus-sized and read P2 only.
        dense = pyramid[0] + sum(resize(p, pyramid[0].shape[-2:]) for p in pyramid[1:])
        sem_feat, sem_logits = self.semantic(dense, stem if self.semantic_stride == 2 else None)
        out = self.center(dense)
        fg = resize(sem_logits, image.shape[-2:]).contiguous()
        out["logits"] = torch.cat([torch.zeros_like(fg), fg.expand(-1, self.num_objects, -1, -1)], dim=1)
        out["semantic_logits"] = sem_logits
        out["semantic_features"] = sem_feat
        for i, p in enumerate(pyramid):
            out[f"p{i + 2}"] = p
        return out

    def _pyramid(self, outputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return [outputs[f"p{i + 2}"] for i in range(len(STRIDES))]

    def _roi_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """Grow detection boxes ``(K, 4)`` xyxy into mask RoIs (see the module docstring)."""
        return scale_boxes(boxes, float(self.params["roi_scale"]), float(self.params["roi_margin"]))

    def mask_logits(self, outputs: dict[str, torch.Tensor], rois: torch.Tensor,
                    roi_classes: torch.Tensor) -> list[torch.Tensor]:
        """Run the RefineMask head on RoIs.

        Parameters
        ----------
        outputs : dict
            ``forward`` outputs of the batch the RoIs refer to.
        rois : torch.Tensor
            ``(K, 5)`` ``(batch_index, x1, y1, x2, y2)`` in input pixels (already grown).
        roi_classes : torch.Tensor
            ``(K,)`` int64 object class index, 0-based (background excluded).

        Returns
        -------
        list of torch.Tensor
            Stage logits ``[(K, 1, S, S)]`` for S in ``stage_sizes``.
        """
        feats = multilevel_roi_align(self._pyramid(outputs), rois, self.mask_head.stage_sizes[0], STRIDES,
                                     sampling_ratio=0, aligned=True)
        return self.mask_head(feats, outputs["semantic_features"], outputs["semantic_logits"], rois, roi_classes)

    # ------------------------------------------------------------------------------------------ training
    def loss(self, outputs: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        p = self.params
        labels = batch.labels
        instances = batch.instances if batch.instances is not None else instances_from_labels(labels)
        n, height, width = labels.shape
        gt = ground_truth_from_instances(instances, labels, self.num_objects, batch.weight)
        grid = outputs["heatmap"].shape[-2:]

        # where the image is labelled, per output grid (a cell counts if any of its pixels is labelled)
        labelled = (labels != IGNORE_INDEX).float()[:, None]
        if batch.weight is not None:
            labelled = labelled * batch.weight[:, None]

        def cells(size) -> torch.Tensor:
            return F.adaptive_max_pool2d(labelled, size) if tuple(size) != (height, width) else labelled

        cell_weight = cells(grid)
        # semantic head: union of instances, resized to its grid and thresholded at 0.5 (as refine_roi_head)
        sem_grid = outputs["semantic_logits"].shape[-2:]
        sem_weight = cells(sem_grid)
        sem_target = (resize((instances > 0).float()[:, None], sem_grid) >= 0.5).float()
        sem_bce = F.binary_cross_entropy_with_logits(outputs["semantic_logits"], sem_target, reduction="none")
        sem_loss = (sem_bce * sem_weight).sum() / sem_weight.sum().clamp(min=1.0)

        targets = center_targets(gt["boxes"], gt["classes"], self.num_objects, tuple(grid), STRIDES[0])
        centre = center_losses({k: outputs[k] for k in ("heatmap", "offset", "size")}, targets, valid=cell_weight)

        rois, ids, classes, roi_w = self._training_rois(gt)
        if rois.shape[0]:
            stage_logits = self.mask_logits(outputs, rois, classes)
            stage_targets = [instance_mask_targets(instances, rois, ids, s) for s in self.mask_head.stage_sizes]
            mask_loss, stage_losses = refine_mask_loss(stage_logits, stage_targets, p["stage_weights"],
                                                       p["boundary_width"], start_stage=1, roi_weights=roi_w)
        else:
            # No object in the batch: keep every mask-head parameter in the graph with a zero gradient.
            mask_loss = sum(q.sum() for q in self.mask_head.parameters()) * 0.0
            stage_losses = [mask_loss.detach()] * len(self.mask_head.stage_sizes)
        total = p["semantic_loss_weight"] * sem_loss + p["center_loss_weight"] * centre["center"] + mask_loss
        result = {"loss": total, "semantic": sem_loss.detach(), "mask": mask_loss.detach(),
                  "rois": torch.tensor(float(rois.shape[0]))}
        result.update({k: v for k, v in centre.items() if k != "center"})
        for s, l in zip(self.mask_head.stage_sizes, stage_losses):
            result[f"mask_{s}"] = l.detach()
        return result

    def _training_rois(self, gt: dict[str, list[torch.Tensor]]):
        """Jittered, grown ground-truth boxes (a random subset of ``max_train_rois`` per image in training)."""
        p = self.params
        rois, ids, classes, weights = [], [], [], []
        for b, (bx, idv, cl, w) in enumerate(zip(gt["boxes"], gt["ids"], gt["classes"], gt["weights"])):
            m = bx.shape[0]
            if m == 0:
                continue
            if m > p["max_train_rois"]:
                keep = int(p["max_train_rois"])
                pick = (torch.randperm(m, device=bx.device)[:keep] if self.training
                        else torch.arange(keep, device=bx.device))
                bx, idv, cl, w = bx[pick], idv[pick], cl[pick], w[pick]
            if self.training and p["roi_jitter"] > 0:
                j = float(p["roi_jitter"])
                size = (bx[:, 2:] - bx[:, :2]).clamp(min=1.0)
                centre = (bx[:, 2:] + bx[:, :2]) / 2 + (torch.rand_like(size) * 2 - 1) * j * size
                size = size * (1 + (torch.rand_like(size) * 2 - 1) * j)
                bx = torch.cat([centre - size / 2, centre + size / 2], dim=1)
            rb = self._roi_boxes(bx)
            rois.append(torch.cat([torch.full((rb.shape[0], 1), float(b), device=rb.device), rb], dim=1))
            ids.append(idv)
            classes.append(cl)
            weights.append(w)
        if not rois:
            z = torch.zeros(0, dtype=torch.long)
            return torch.zeros(0, 5), z, z, torch.zeros(0)
        return torch.cat(rois), torch.cat(ids), torch.cat(classes), torch.cat(weights)

    # ------------------------------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict_instances(self, image: torch.Tensor, boxes: np.ndarray | torch.Tensor | None = None,
                          **overrides: Any) -> InstancePrediction:
        """Instances of one image.

        Parameters
        ----------
        image : torch.Tensor
            ``(C, H, W)`` or ``(1, C, H, W)`` normalised input (`to_input_tensor`).
        boxes : array-like, optional
            ``(K, 4)`` ``(row0, col0, row1, col1)`` boxes in input pixels (e.g. drawn by a user): segment these
            instead of the proposals (score 1, class of the strongest heatmap channel at the box centre).
        **overrides
            Inference parameters for this call: ``score_threshold``, ``nms_iou``, ``max_detections``,
            ``mask_threshold``, ``min_area``.

        Returns
        -------
        InstancePrediction
        """
        unknown = set(overrides) - {"score_threshold", "nms_iou", "max_detections", "mask_threshold", "min_area"}
        if unknown:
            raise ModelError(f"unknown inference parameters {sorted(unknown)}", subject=self.config.arch)
        p = {**self.params, **overrides}
        if image.dim() == 3:
            image = image[None]
        if image.dim() != 4 or image.shape[0] != 1:
            raise ModelError(f"predict_instances takes one image (C, H, W), got shape {tuple(image.shape)}",
                             subject=self.config.arch, hint="call it once per tile")
        was_training = self.training
        self.eval()
        try:
            height, width = image.shape[-2:]
            out = self(image.to(self.device))
            if boxes is None:
                det = decode_centers(out, STRIDES[0], (height, width), int(p["max_detections"]),
                                     float(p["score_threshold"]), float(p["nms_iou"]))[0]
                det_boxes, scores, classes = det.boxes, det.scores, det.classes
            else:
                det_boxes = boxes_from_rowcol(torch.as_tensor(np.asarray(boxes), dtype=torch.float32).reshape(-1, 4))
                det_boxes = det_boxes.to(self.device)
                scores = torch.ones(det_boxes.shape[0], device=self.device)
                classes = self._classes_at_centres(out, det_boxes)
            probs = self._mask_probabilities(out, det_boxes, classes)
            result = self._compose(probs, self._roi_boxes(det_boxes), scores, classes, (height, width),
                                   float(p["mask_threshold"]), int(p["min_area"]))
            log.debug("refinemask: %d boxes -> %d instances on %dx%d", det_boxes.shape[0], len(result), height, width)
            return result
        finally:
            self.train(was_training)

    def _classes_at_centres(self, out: dict[str, torch.Tensor], boxes: torch.Tensor) -> torch.Tensor:
        heat = out["heatmap"][0]
        h, w = heat.shape[-2:]
        cx = ((boxes[:, 0] + boxes[:, 2]) / (2 * STRIDES[0])).long().clamp(0, w - 1)
        cy = ((boxes[:, 1] + boxes[:, 3]) / (2 * STRIDES[0])).long().clamp(0, h - 1)
        return heat[:, cy, cx].argmax(0)

    def _mask_probabilities(self, out, det_boxes: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Refined ``(K, 1, S, S)`` mask probabilities, RoIs in chunks of ``roi_chunk``."""
        k = det_boxes.shape[0]
        s = self.mask_head.stage_sizes[-1]
        probs = torch.zeros(k, 1, s, s, device=det_boxes.device)
        rois = torch.cat([torch.zeros(k, 1, device=det_boxes.device), self._roi_boxes(det_boxes)], dim=1)
        chunk = int(self.params["roi_chunk"])
        for i in range(0, k, chunk):
            stage_logits = self.mask_logits(out, rois[i:i + chunk], classes[i:i + chunk])
            probs[i:i + chunk] = refine_blend(stage_logits, start=1, d=1).sigmoid()
        return probs

    @staticmethod
    def _compose(probs: torch.Tensor, roi_boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor,
                 image_size: tuple[int, int], threshold: float, min_area: int) -> InstancePrediction:
        """Paste masks, resolve overlaps (higher score wins), keep each instance's largest piece, relabel."""
        from skimage.measure import label as connected

        height, width = image_size
        order = torch.sort(scores, descending=True, stable=True).indices
        probs, roi_boxes, scores, classes = probs[order], roi_boxes[order], scores[order], classes[order]
        k = scores.shape[0]
        canvas = torch.zeros(height * width, dtype=torch.long, device=probs.device)
        if k:
            masks, r0, c0 = paste_masks(probs, roi_boxes, image_size, threshold)
            kk, rr, cc = torch.nonzero(masks, as_tuple=True)
            rank = (k - kk).long()  # the best-scoring instance has the largest rank
            canvas.scatter_reduce_(0, (r0[kk] + rr) * width + (c0[kk] + cc), rank, reduce="amax")
        labels = torch.where(canvas > 0, k - canvas + 1, torch.zeros_like(canvas)).view(height, width).cpu().numpy()
        # keep each instance's largest 4-connected piece
        pieces = connected(labels, background=0, connectivity=1)
        n_pieces = int(pieces.max())
        if n_pieces:
            piece_size = np.bincount(pieces.ravel(), minlength=n_pieces + 1)
            piece_label = np.zeros(n_pieces + 1, dtype=np.int64)
            piece_label[pieces.ravel()] = labels.ravel()
            best = np.zeros(k + 1, dtype=np.int64)  # largest piece of each label
            best_size = np.zeros(k + 1, dtype=np.int64)
            for pc in np.argsort(piece_size[1:], kind="stable")[::-1] + 1:
                lab = piece_label[pc]
                if best[lab] == 0:
                    best[lab], best_size[lab] = pc, piece_size[pc]
            keep_piece = np.zeros(n_pieces + 1, dtype=bool)
            keep_piece[best[best > 0]] = True
            labels = np.where(keep_piece[pieces], labels, 0)
        area = np.bincount(labels.ravel(), minlength=k + 1)
        kept = np.flatnonzero(area[1:] >= max(min_area, 1)) + 1  # old labels, still in score order
        remap = np.zeros(k + 1, dtype=np.int32)
        remap[kept] = np.arange(1, kept.size + 1, dtype=np.int32)
        labels = remap[labels]
        idx = kept - 1
        return InstancePrediction(
            labels=labels.astype(np.int32),
            boxes=_tight_boxes(labels, kept.size),
            scores=scores.cpu().numpy()[idx].astype(np.float32),
            classes=(classes.cpu().numpy()[idx] + 1).astype(np.int32),
        )


def _tight_boxes(labels: np.ndarray, k: int) -> np.ndarray:
    """``(k, 4)`` ``(row0, col0, row1, col1)`` half-open boxes of labels 1..k."""
    boxes = np.zeros((k, 4), dtype=np.float32)
    if k == 0:
        return boxes
    rows, cols = np.nonzero(labels)
    lab = labels[rows, cols] - 1
    r0 = np.full(k, np.iinfo(np.int64).max)
    c0 = np.full(k, np.iinfo(np.int64).max)
    r1 = np.full(k, -1)
    c1 = np.full(k, -1)
    np.minimum.at(r0, lab, rows)
    np.minimum.at(c0, lab, cols)
    np.maximum.at(r1, lab, rows)
    np.maximum.at(c1, lab, cols)
    boxes[:] = np.stack([r0, c0, r1 + 1, c1 + 1], axis=1)
    return boxes


# ---------------------------------------------------------------------------------------------- ground truth
def instances_from_labels(labels: torch.Tensor) -> torch.Tensor:
    """Instance ids from a semantic label map: connected components (8-connected) of each object class.

    Used when a batch has no instance map.  ``(N, H, W)`` int64 -> ``(N, H, W)`` int64, 0 = background.
    """
    from scipy import ndimage

    lab = labels.cpu().numpy()
    out = np.zeros(lab.shape, dtype=np.int64)
    structure = np.ones((3, 3), dtype=bool)
    for b in range(lab.shape[0]):
        next_id = 0
        for c in np.unique(lab[b]):
            if c == 0 or c == IGNORE_INDEX:
                continue
            comp, n = ndimage.label(lab[b] == c, structure=structure)
            out[b][comp > 0] = comp[comp > 0] + next_id
            next_id += n
    return torch.from_numpy(out).to(labels.device)


def ground_truth_from_instances(instances: torch.Tensor, labels: torch.Tensor, num_objects: int,
                                weight: torch.Tensor | None = None) -> dict[str, list[torch.Tensor]]:
    """Per image: instance ``ids`` ``(M,)``, ``boxes`` ``(M, 4)`` xyxy (pixel-edge, half-open), ``classes``
    ``(M,)`` 0-based object class (the most frequent label under the instance; 0 when unlabelled), and
    ``weights`` ``(M,)`` (the mean per-pixel weight over the instance, 1 without weights)."""
    result: dict[str, list[torch.Tensor]] = {"ids": [], "boxes": [], "classes": [], "weights": []}
    n, h, w = instances.shape
    for b in range(n):
        inst = instances[b]
        fg = inst > 0
        ids, compact = torch.unique(inst[fg], return_inverse=True)
        m = ids.shape[0]
        rows, cols = torch.nonzero(fg, as_tuple=True)
        big = torch.full((m,), h + w + 1, dtype=torch.long, device=inst.device)
        r0 = big.clone().scatter_reduce_(0, compact, rows, "amin")
        c0 = big.clone().scatter_reduce_(0, compact, cols, "amin")
        r1 = torch.full_like(big, -1).scatter_reduce_(0, compact, rows, "amax")
        c1 = torch.full_like(big, -1).scatter_reduce_(0, compact, cols, "amax")
        boxes = torch.stack([c0, r0, c1 + 1, r1 + 1], dim=1).float()
        lab = labels[b][fg].long()
        ok = (lab >= 1) & (lab <= num_objects)
        votes = torch.zeros(m, num_objects + 1, device=inst.device)
        votes.index_put_((compact[ok], lab[ok]), torch.ones_like(lab[ok], dtype=torch.float32), accumulate=True)
        classes = votes[:, 1:].argmax(1) if num_objects > 0 else torch.zeros(m, dtype=torch.long)
        if weight is not None:
            wsum = torch.zeros(m, device=inst.device).index_add_(0, compact, weight[b][fg].float())
            ones = torch.ones_like(compact, dtype=torch.float32)
            cnt = torch.zeros(m, device=inst.device).index_add_(0, compact, ones)
            wts = wsum / cnt.clamp(min=1)
        else:
            wts = torch.ones(m, device=inst.device)
        result["ids"].append(ids)
        result["boxes"].append(boxes)
        result["classes"].append(classes.long())
        result["weights"].append(wts)
    return result
