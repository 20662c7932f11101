"""Where to correct next: candidate regions ranked by the model's uncertainty, most uncertain first.

Per-pixel uncertainty, in [0, 1], from the softmax probabilities ``p`` of ``C`` classes:

- ``"margin"`` (default): ``1 - (p_top1 - p_top2)``, MagNet's uncertainty; 1 where the two best classes tie,
  0 where one class has all the probability;
- ``"entropy"``: ``-sum_c p_c ln p_c / ln C`` (normalised Shannon entropy).

A region's score is the mean uncertainty over its **tissue** pixels (glass, ``min(R, G, B) > 220`` and a low
chroma, is left out, so empty glass never ranks high because of a few odd pixels, and a region with less than
``min_tissue`` tissue is not proposed).  Regions already reviewed or corrected can be excluded: a candidate is
dropped when at least ``exclude_overlap`` of its area is covered by them.

Choosing a **batch** of regions to correct before the next fine-tuning: `sample_regions` draws them with probability
proportional to ``score ** power`` (without replacement) instead of taking the top few.  The top few of a ranking are
alike (the same failure mode, often the same class) and a model fine-tuned on a handful of regions follows their
class mix; weighted sampling still favours uncertain regions but spreads the batch over the pool (stochastic batch
acquisition: Kirsch et al., "Stochastic Batch Acquisition: A Simple Baseline for Deep Active Learning", TMLR 2023).
``power=0`` is uniform random choice, a large ``power`` the top few.

The model sees each region with its halo of context (as in tiled inference), at its own pixel size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch

from ..errors import Cancelled, TrainingError
from ..geometry import Region
from ..models.base import HrsegModel
from ..slide import Slide
from .cancel import CancelToken, is_cancelled
from .predict import PixelGrid, probabilities, tiles

__all__ = ["uncertainty_map", "tissue_mask", "RankedRegion", "rank_regions", "candidate_regions", "UNCERTAINTY_KINDS",
           "sample_regions", "covered_fraction"]

UNCERTAINTY_KINDS = ("margin", "entropy")


def uncertainty_map(probs: np.ndarray, kind: str = "margin") -> np.ndarray:
    """Per-pixel uncertainty ``(H, W)`` float32 in [0, 1] of probabilities ``(C, H, W)`` (see module docstring)."""
    p = np.asarray(probs, dtype=np.float32)
    if kind == "margin":
        if p.shape[0] < 2:
            return np.zeros(p.shape[1:], np.float32)
        top2 = np.partition(p, p.shape[0] - 2, axis=0)[-2:]
        return (1.0 - (top2[1] - top2[0])).astype(np.float32)
    if kind == "entropy":
        if p.shape[0] < 2:
            return np.zeros(p.shape[1:], np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            ent = -np.sum(np.where(p > 0, p * np.log(p), 0.0), axis=0)
        return (ent / np.log(p.shape[0])).astype(np.float32)
    raise TrainingError(f"unknown uncertainty {kind!r}", subject="ranking", hint=f"use one of {UNCERTAINTY_KINDS}")


def tissue_mask(image: np.ndarray, *, white: int = 220, chroma: int = 18) -> np.ndarray:
    """``(H, W)`` bool: not glass.  Glass is bright (``min(R, G, B) > white``) and grey (``max - min < chroma``)."""
    img = image.astype(np.int16)
    lo, hi = img.min(axis=2), img.max(axis=2)
    return ~((lo > white) & (hi - lo < chroma))


@dataclass(frozen=True)
class RankedRegion:
    """A candidate region and its score.

    Parameters
    ----------
    region : Region
        Level-0 pixels of the slide (pixels of the image for arrays).
    score : float
        Mean uncertainty over its tissue pixels, in [0, 1].
    tissue_fraction : float
        Share of the region that is tissue.
    """

    region: Region
    score: float
    tissue_fraction: float


def candidate_regions(extent: Region | tuple[int, ...], size: int) -> list[Region]:
    """Whole ``size x size`` tiles covering ``extent`` (a region, or an image's shape), row-major; a partial
    tile at the far edges is kept only when it is at least half the size on both axes."""
    extent = extent if isinstance(extent, Region) else Region.from_shape(extent)
    return [r for r in extent.grid(size) if r.height * 2 >= size and r.width * 2 >= size]


def covered_fraction(region: Region, others: Sequence[Region]) -> float:
    """Share of ``region``'s pixels that any of ``others`` covers (0 for an empty region or no others)."""
    if not others or region.is_empty:
        return 0.0
    mask = np.zeros(region.shape, bool)
    for o in others:
        inter = o.intersect(region)
        if not inter.is_empty:
            mask[inter.relative_to(region).slices] = True
    return float(mask.mean())


@torch.no_grad()
def rank_regions(model: HrsegModel, source: np.ndarray | Slide, regions: Iterable[Region], *, kind: str = "margin",
                 exclude: Sequence[Region] = (), exclude_overlap: float = 0.5, min_tissue: float = 0.1,
                 top: int | None = None, halo: int | None = None, cancel: CancelToken = None) -> list[RankedRegion]:
    """Rank candidate regions by the model's uncertainty, most uncertain first.

    Parameters
    ----------
    model : HrsegModel
        The current model (eval mode is used; not modified).
    source : numpy.ndarray or Slide
        ``(H, W, 3)`` uint8 image at the model's pixel size, or a slide (read at ``model.config.mpp``).
    regions : iterable of Region
        Candidates, in level-0 pixels of the slide (pixels of the image), e.g. `candidate_regions`.
    kind : {"margin", "entropy"}
        Uncertainty measure.
    exclude : sequence of Region
        Reviewed or corrected regions (same coordinates); candidates covered by them for at least
        ``exclude_overlap`` of their area are skipped.
    min_tissue : float
        Candidates with a smaller share of tissue are skipped.
    top : int, optional
        Return only the best ``top``.
    halo : int, optional
        Context read around each region, in model pixels (default ``model.halo``).
    cancel : threading.Event or callable, optional
        Checked between regions; raises `Cancelled`.

    Returns
    -------
    list of RankedRegion
        Sorted by decreasing score (ties: row-major order of the candidates).
    """
    if kind not in UNCERTAINTY_KINDS:
        raise TrainingError(f"unknown uncertainty {kind!r}", subject="ranking", hint=f"use one of {UNCERTAINTY_KINDS}")
    exclude = list(exclude)
    was_training = model.training
    model.eval()
    ranked: list[tuple[float, int, RankedRegion]] = []
    try:
        for order, region in enumerate(regions):
            if is_cancelled(cancel):
                raise Cancelled("ranking was cancelled", subject=model.config.label)
            if exclude and covered_fraction(region, exclude) >= exclude_overlap:
                continue
            grid = PixelGrid.of(source, region, model.config.mpp)
            h, w = grid.shape
            unc = np.empty((h, w), np.float32)
            tissue = np.empty((h, w), bool)
            for core, window in tiles((h, w), 512, model.halo if halo is None else halo, model.stride):
                pixels = grid.read(window)
                p = probabilities(model, pixels)
                inner = core.relative_to(window).slices
                unc[core.slices] = uncertainty_map(p[(slice(None),) + inner], kind)
                tissue[core.slices] = tissue_mask(pixels[inner])
            frac = float(tissue.mean())
            if frac < min_tissue:
                continue
            score = float(unc[tissue].mean())
            ranked.append((-score, order, RankedRegion(region, score, frac)))
    finally:
        model.train(was_training)
    ranked.sort(key=lambda t: (t[0], t[1]))
    out = [r for _, _, r in ranked]
    return out[:top] if top is not None else out


def sample_regions(ranked: Sequence[RankedRegion], k: int | None = None, *, power: float = 1.0,
                   rng: np.random.Generator | int | None = None) -> list[RankedRegion]:
    """Draw ``k`` regions without replacement, each draw with probability proportional to ``score ** power``.

    Parameters
    ----------
    ranked : sequence of RankedRegion
        Scored candidates, e.g. from `rank_regions` (any order; scores must be >= 0).
    k : int, optional
        How many to draw (default: all, i.e. a random order weighted by uncertainty).
    power : float
        Sharpness: 0 draws uniformly, 1 in proportion to the score, a large power is the ``k`` most uncertain.
    rng : numpy.random.Generator or int, optional
        Source of randomness (or its seed).

    Returns
    -------
    list of RankedRegion
        In the order drawn.  Regions of score 0 come only after every region with a positive score.
    """
    if power < 0:
        raise TrainingError(f"power={power} is negative", subject="ranking",
                            hint="use 0 (uniform) or more (1: in proportion to the uncertainty)")
    ranked = list(ranked)
    scores = np.array([r.score for r in ranked], dtype=np.float64)
    if np.any(scores < 0) or not np.all(np.isfinite(scores)):
        raise TrainingError("scores must be finite and >= 0 to be sampled", subject="ranking")
    rng = np.random.default_rng(rng)
    # Gumbel-top-k: sorting log-weights plus Gumbel noise draws without replacement in proportion to the weights
    # (Plackett-Luce), in one pass.  A zero score has weight 0: it comes after all others, in uniform order.
    zero = (scores == 0) & (power > 0)
    log_w = power * np.log(np.where(zero, 1.0, scores)) if power > 0 else np.zeros_like(scores)
    keys = np.where(zero, 0.0, log_w) + rng.gumbel(size=len(ranked))
    order = np.lexsort((-keys, zero))  # last key is primary: positive scores first, then by decreasing key
    out = [ranked[int(i)] for i in order]
    return out[:k] if k is not None else out
