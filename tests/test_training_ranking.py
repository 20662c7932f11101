"""Choosing where to correct: regions ranked by uncertainty, the ambiguous one first, reviewed ones excluded."""

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
from napari_hrseg.training.ranking import candidate_regions, rank_regions, tissue_mask, uncertainty_map


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
