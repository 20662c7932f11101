"""Choosing where to correct: regions ranked by uncertainty, the ambiguous one first, reviewed ones excluded; batches
drawn in proportion to uncertainty."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_hrseg.errors import Cancelled, TrainingError
from napari_hrseg.geometry import Region
from napari_hrseg.models import create_model
from napari_hrseg.models.base import HrsegModel
from napari_hrseg.models.config import ModelConfig
from napari_hrseg.training.datasets import PRESETS, pair_files, split_by_image, tile_samples
from napari_hrseg.training.predict import PixelGrid, predict_probabilities
from napari_hrseg.training.ranking import (
    RankedRegion,
    candidate_regions,
    rank_regions,
    sample_regions,
    tissue_mask,
    uncertainty_map,
)


class GreyLevelClassifier(HrsegModel):
    """A model whose certainty is known by construction: p(dark) = sigmoid(k (0.5 - grey)), so a region of mid
    grey is maximally ambiguous, and the further from mid grey, the surer the model."""

    stride = 1

    def __init__(self):
        super().__init__(ModelConfig(arch="grey-level", num_classes=2, mpp=1.0, mean=(0, 0, 0), std=(1, 1, 1)))
        self.k = torch.nn.Parameter(torch.tensor(12.0))

    @property
    def halo(self) -> int:
        return 0

    def forward(self, image):
        grey = image.mean(1, keepdim=True)
        dark = self.k * (0.5 - grey)
        return {"logits": torch.cat([-dark / 2, dark / 2], 1)}


def test_uncertainty_measures():
    p = np.array([[1.0, 0.5, 0.7, 0.4], [0.0, 0.5, 0.2, 0.3], [0.0, 0.0, 0.1, 0.3]])[:, None, :]
    assert uncertainty_map(p, "margin")[0].tolist() == pytest.approx([0.0, 1.0, 0.5, 0.9])
    ent = uncertainty_map(p, "entropy")[0]
    assert ent[0] == 0 and ent[1] == pytest.approx(np.log(2) / np.log(3)) and 0 < ent[2] < ent[3] < 1
    with pytest.raises(TrainingError, match="unknown uncertainty"):
        uncertainty_map(p, "variance")


def test_the_deliberately_ambiguous_region_comes_first():
    # Four 64 x 64 tissue regions of different greys, one exactly ambiguous (mid grey), and one of glass.
    image = np.zeros((128, 192, 3), np.uint8)
    greys = {(0, 0): 40, (0, 64): 128, (0, 128): 200, (64, 0): 90, (64, 64): 160, (64, 128): 250}
    for (r, c), g in greys.items():
        image[r:r + 64, c:c + 64] = g
    image[64:, 128:] = 250  # glass: bright and grey, not tissue
    model = GreyLevelClassifier().eval()
    regions = candidate_regions(image.shape, 64)
    assert len(regions) == 6
    for kind in ("margin", "entropy"):
        ranked = rank_regions(model, image, regions, kind=kind)
        order = [greys[(r.region.row, r.region.col)] for r in ranked]
        assert order == [128, 160, 90, 200, 40]  # by distance from mid grey (127.5); glass left out
        assert ranked[0].score == pytest.approx(1.0, abs=0.05) and ranked[0].tissue_fraction == 1.0
    # Regions already reviewed are not proposed again; `top` keeps the best few.
    ranked = rank_regions(model, image, regions, exclude=[Region(0, 60, 64, 70)], top=2)
    assert [greys[(r.region.row, r.region.col)] for r in ranked] == [160, 90]


@pytest.mark.realdata
def test_ranking_a_real_model_on_real_tissue(realdata):
    sources = pair_files(realdata / "glas-test-subset", PRESETS["glas"])
    _, val = split_by_image(sources, 0.2, seed=0)
    image = tile_samples(val[:1], 1.0)[0].image
    torch.manual_seed(0)
    model = create_model("fpn", num_classes=2, mpp=1.0, widths=(16, 32, 64, 128), fpn_width=32, head_width=32).eval()
    regions = candidate_regions(image.shape, 96)
    ranked = rank_regions(model, image, regions, halo=0)
    scores = [r.score for r in ranked]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    # Each region's score is the mean margin uncertainty of the model over its tissue pixels.
    best = ranked[0].region
    crop = image[best.slices]
    probs = predict_probabilities(model, PixelGrid.of(crop), halo=0)
    expected = uncertainty_map(probs)[tissue_mask(crop)].mean()
    assert ranked[0].score == pytest.approx(expected, rel=1e-5)
    # Cancelable between regions.
    with pytest.raises(Cancelled):
        rank_regions(model, image, regions, cancel=lambda: True)


def test_batches_are_drawn_in_proportion_to_uncertainty():
    scored = [RankedRegion(Region(i * 64, 0, 64, 64), score, 1.0) for i, score in enumerate([0.6, 0.3, 0.1, 0.0])]
    rows = {r.region.row // 64: i for i, r in enumerate(scored)}

    def first_draws(power: float, n: int = 4000) -> np.ndarray:
        counts = np.zeros(len(scored))
        rng = np.random.default_rng(7)
        for _ in range(n):
            counts[rows[sample_regions(scored, 1, power=power, rng=rng)[0].region.row // 64]] += 1
        return counts / n

    # power 1: each draw in proportion to the score (a top-k choice would give 1, 0, 0, 0); a zero score never first
    assert first_draws(1.0) == pytest.approx([0.6, 0.3, 0.1, 0.0], abs=0.03)
    assert first_draws(2.0) == pytest.approx(np.array([36, 9, 1, 0]) / 46, abs=0.03)
    assert first_draws(0.0) == pytest.approx([0.25] * 4, abs=0.03)  # power 0: uniform random choice
    # Without replacement: every region once, the zero score last; a steep power is the ranking itself.
    for seed in range(20):
        batch = sample_regions(scored, rng=seed)
        assert sorted(r.score for r in batch) == [0.0, 0.1, 0.3, 0.6] and batch[-1].score == 0.0
    assert sample_regions(scored, 2, power=200, rng=0) == scored[:2]
    assert sample_regions(scored, 3, rng=5) == sample_regions(scored, 3, rng=5)  # reproducible from a seed
    with pytest.raises(TrainingError, match="negative"):
        sample_regions(scored, 2, power=-1)
    with pytest.raises(TrainingError, match=">= 0"):
        sample_regions([RankedRegion(Region(0, 0, 1, 1), -0.1, 1.0)], 1)


def test_sampling_a_real_ranking_spreads_the_batch():
    # Greys at every distance from mid grey: the top 3 of the ranking are the 3 most ambiguous; batches drawn in
    # proportion to uncertainty still favour them but reach further, over many draws every tissue region.
    image = np.zeros((64, 64 * 8, 3), np.uint8)
    greys = [128, 135, 142, 150, 165, 185, 205, 40]
    for i, g in enumerate(greys):
        image[:, i * 64:(i + 1) * 64] = g
    ranked = rank_regions(GreyLevelClassifier().eval(), image, candidate_regions(image.shape, 64))
    top3 = {r.region.col for r in ranked[:3]}
    assert top3 == {0, 64, 128}
    seen, top_hits = set(), 0
    rng = np.random.default_rng(0)
    for _ in range(200):
        batch = {r.region.col for r in sample_regions(ranked, 3, rng=rng)}
        seen |= batch
        top_hits += len(batch & top3)
    assert seen == {r.region.col for r in ranked}
    assert 3 * 200 * 3 / 8 < top_hits < 3 * 200  # more of the top 3 than uniform choice (3/8 per pick), not only
