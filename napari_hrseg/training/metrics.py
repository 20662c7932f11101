"""Segmentation metrics: mIoU and Dice for classes, pixel Dice / AJI / PQ for instances.

Semantic metrics accumulate a confusion matrix over any number of images; pixels labelled `IGNORE_INDEX` in the
ground truth are skipped.

Instance metrics reproduce ``shared/tools/eval_instances.py`` (the script the project is judged by) exactly,
vectorised:

- pixel Dice of the foregrounds, ``2 |G ∩ P| / max(1, |G| + |P|)`` (0 when both are empty);
- AJI (Kumar et al. 2017): every ground-truth object is matched to the prediction of highest IoU (ties: the
  lowest prediction id); the sums of their intersections over the sums of their unions, plus the areas of
  unmatched ground truth and of predictions matched to nothing; 1 when both are empty;
- PQ: (ground truth, prediction) pairs with IoU > 0.5 are true positives; ``PQ = mean IoU of TPs x
  TP / (TP + FP/2 + FN/2)``; 1 when both are empty.

Per-image scores are averaged over images (not pooled), as the script does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..models.config import IGNORE_INDEX

__all__ = [
    "ConfusionMatrix",
    "semantic_scores",
    "InstanceScores",
    "instance_scores",
    "mean_instance_scores",
    "instances_from_semantic",
]


class ConfusionMatrix:
    """Accumulated ``(num_classes, num_classes)`` counts, rows = truth, columns = prediction.

    Parameters
    ----------
    num_classes : int
        Number of classes (background included).
    """

    def __init__(self, num_classes: int):
        self.num_classes = int(num_classes)
        self.matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def update(self, pred: np.ndarray, target: np.ndarray) -> "ConfusionMatrix":
        """Add one prediction ``(..., H, W)`` against its target; target pixels equal to `IGNORE_INDEX` are skipped."""
        pred = np.asarray(pred).ravel().astype(np.int64)
        target = np.asarray(target).ravel().astype(np.int64)
        keep = (target != IGNORE_INDEX) & (target < self.num_classes) & (target >= 0)
        idx = target[keep] * self.num_classes + np.clip(pred[keep], 0, self.num_classes - 1)
        self.matrix += np.bincount(idx, minlength=self.num_classes ** 2).reshape(self.num_classes, self.num_classes)
        return self

    @property
    def total(self) -> int:
        return int(self.matrix.sum())

    def iou(self) -> np.ndarray:
        """Per-class IoU ``TP / (TP + FP + FN)``; NaN for a class absent from both truth and prediction."""
        tp = np.diag(self.matrix).astype(float)
        union = self.matrix.sum(0) + self.matrix.sum(1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, tp / union, np.nan)

    def dice(self) -> np.ndarray:
        """Per-class Dice ``2 TP / (2 TP + FP + FN)``; NaN for a class absent from both."""
        tp = np.diag(self.matrix).astype(float)
        denom = self.matrix.sum(0) + self.matrix.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denom > 0, 2 * tp / denom, np.nan)

    def scores(self) -> dict[str, float]:
        """``miou`` (mean IoU over classes present in truth or prediction, background included), ``dice``
        (mean Dice over the foreground classes 1.. present; the class's Dice for a binary problem), ``acc``
        (pixel accuracy) and ``iou_<k>`` per class."""
        iou, dice = self.iou(), self.dice()
        fg_dice = dice[1:]
        out = {
            "miou": float(np.nanmean(iou)) if np.any(~np.isnan(iou)) else float("nan"),
            "dice": float(np.nanmean(fg_dice)) if fg_dice.size and np.any(~np.isnan(fg_dice)) else float("nan"),
            "acc": float(np.trace(self.matrix) / self.total) if self.total else float("nan"),
        }
        out.update({f"iou_{k}": float(v) for k, v in enumerate(iou)})
        return out


def semantic_scores(pred: np.ndarray, target: np.ndarray, num_classes: int) -> dict[str, float]:
    """`ConfusionMatrix.scores` of one prediction (see there)."""
    return ConfusionMatrix(num_classes).update(pred, target).scores()


@dataclass(frozen=True)
class InstanceScores:
    """Scores of one instance label image, as ``eval_instances.py`` prints them."""

    dice: float
    aji: float
    pq: float
    n_gt: int
    n_pred: int

    def as_tuple(self) -> tuple[float, float, float, int, int]:
        return (self.dice, self.aji, self.pq, self.n_gt, self.n_pred)


def instance_scores(gt: np.ndarray, pred: np.ndarray) -> InstanceScores:
    """Pixel Dice, AJI and PQ of a predicted instance map against the ground truth.

    Parameters
    ----------
    gt, pred : numpy.ndarray
        ``(H, W)`` integer instance ids, 0 = background.

    Returns
    -------
    InstanceScores
        Identical to ``eval_instances.scores(gt, pred)`` (same matching, same tie-breaking, same summation order).
    """
    gt = np.asarray(gt).astype(np.int64)
    pred = np.asarray(pred).astype(np.int64)
    if gt.shape != pred.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    gfg, pfg = gt > 0, pred > 0
    g_ids, g_area = np.unique(gt[gfg], return_counts=True)
    p_ids, p_area = np.unique(pred[pfg], return_counts=True)
    dice = 2 * np.sum(gfg & pfg) / max(1, np.sum(gfg) + np.sum(pfg))

    both = gfg & pfg
    pairs, inter = np.unique(np.stack([gt[both], pred[both]]), axis=1, return_counts=True)
    pg, pp = pairs[0], pairs[1]
    ga = g_area[np.searchsorted(g_ids, pg)]
    pa = p_area[np.searchsorted(p_ids, pp)]
    union = ga + pa - inter
    iou = inter / union  # float64, the same divisions as the script

    # AJI: best prediction per ground-truth object (highest IoU, first = lowest id on ties).
    if pg.size:
        order = np.lexsort((pp, -iou, pg))  # by gt, then IoU descending, then prediction id
        first = np.ones(order.size, bool)
        first[1:] = pg[order][1:] != pg[order][:-1]
        best = order[first]
    else:
        best = np.zeros(0, np.int64)
    matched_g = pg[best]
    c_sum = int(inter[best].sum())
    u_sum = int(union[best].sum()) + int(g_area[~np.isin(g_ids, matched_g)].sum())
    used = np.unique(pp[best])
    u_sum += int(p_area[~np.isin(p_ids, used)].sum())
    aji = c_sum / u_sum if u_sum else 1.0

    # PQ: pairs with IoU > 0.5 are unique matches; sum their IoUs in the script's (gt, pred) order.
    tp_iou = [float(v) for v in iou[iou > 0.5]]
    tp = len(tp_iou)
    fp = len(p_ids) - tp
    fn = len(g_ids) - tp
    pq = (sum(tp_iou) / max(tp, 1)) * (tp / max(tp + 0.5 * fp + 0.5 * fn, 1e-9)) if (tp + fp + fn) else 1.0
    return InstanceScores(float(dice), float(aji), float(pq), int(len(g_ids)), int(len(p_ids)))


def mean_instance_scores(scores: list[InstanceScores]) -> dict[str, float]:
    """Mean Dice, AJI and PQ over images (the script's last line), plus the image count."""
    if not scores:
        return {"dice": 0.0, "aji": 0.0, "pq": 0.0, "n": 0}
    m = np.mean([(s.dice, s.aji, s.pq) for s in scores], axis=0)
    return {"dice": float(m[0]), "aji": float(m[1]), "pq": float(m[2]), "n": len(scores)}


def instances_from_semantic(labels: np.ndarray, foreground: tuple[int, ...] = (1,), *, min_size: int = 0) -> np.ndarray:
    """Instance ids from a semantic prediction: 8-connected components of the foreground classes.

    Parameters
    ----------
    labels : numpy.ndarray
        ``(H, W)`` predicted classes.
    foreground : tuple of int
        Classes that are objects.
    min_size : int
        Components smaller than this many pixels are dropped (specks).

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` int32, ids 1..N in raster order of first pixel.
    """
    fg = np.isin(labels, foreground)
    inst, n = ndimage.label(fg, structure=np.ones((3, 3), bool))
    if min_size > 0 and n:
        sizes = np.bincount(inst.ravel())
        small = sizes < min_size
        small[0] = False
        inst[small[inst]] = 0
        inst, _ = ndimage.label(inst > 0, structure=np.ones((3, 3), bool))
    return inst.astype(np.int32)
