"""Hierarchical multi-scale attention over slide regions (`napari_hrseg.inference.hms_attention`) on the real CMU-1
pyramid and the virtual slide: each scale read from its level, coarse results first, attention maps, the chain's
limits (attention 0 keeps the finest scale, 1 takes the coarser one), off-lattice regions, cancellation, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from napari_hrseg.errors import Cancelled, IncompatibleModelError
from napari_hrseg.geometry import Region
from napari_hrseg.inference import CancelToken, InferenceOptions, InferenceRequest, StageDone, TileDone, run_request, run_to_completion
from napari_hrseg.inference.hms_attention import alignment
from napari_hrseg.inference.resample import warp_to_grid

from test_inference_support import iou, tissue_targets, trained_tissue_model
from test_pipeline_support import cmu1, miou, one_torch_thread, tissue_model, virtual_case, virtual_model, watched  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WHOLE = Region(0, 0, 2967, 2220)


@pytest.fixture(scope="module")
def model():
    return tissue_model("hmsa")


def _run(slide, region, model, **options):
    events = []
    request = InferenceRequest(slide, region, model, InferenceOptions(method="hmsa", **options))
    return run_to_completion(run_request(request), events.append), events


class ConstantAttention(nn.Module):
    """An attention head that answers ``value`` everywhere (to check the chain's two limits)."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.full_like(features[:, :1], self.value)


def test_each_scale_reads_its_level_coarse_first_with_attention_maps(model):
    slide, reads = watched(cmu1(), forbid={0, 1})
    pred, events = _run(slide, WHOLE, model, tile_size=256)
    assert set(reads.levels) == {2, 3, 4}  # 2 µm model, scales 0.25, 0.5, 1 -> 8, 4, 2 µm
    stages = [e for e in events if isinstance(e, StageDone)]
    assert [e.name for e in stages] == ["scale 0.25", "scale 0.5", "chained"]
    assert [e.prediction.level for e in stages] == [4, 3, 2]
    assert events.index(stages[0]) < next(i for i, e in enumerate(events) if isinstance(e, TileDone) and e.stage == 2)
    assert stages[-1].prediction is pred
    assert set(pred.maps["attention"]) == {"scale 0.25", "scale 0.5"}  # the finest scale's is never used
    assert set(pred.maps["labels"]) == {"scale 0.25", "scale 0.5", "scale 1"}
    for kind in ("attention", "labels", "uncertainty"):
        for key, arr in pred.maps[kind].items():
            grid, region = pred.grids[key]
            assert arr.shape == region.shape, (kind, key)
            assert region.end_row <= grid.shape[0] and region.end_col <= grid.shape[1]
            if kind == "attention":
                assert arr.dtype == np.float32 and 0 <= arr.min() and arr.max() <= 1 and arr.std() > 0
    assert pred.grids["scale 0.25"][0].level == 4 and pred.grids["scale 0.5"][0].level == 3
    target = tissue_targets(cmu1(), pred.grid)
    assert pred.labels.shape == target.shape
    assert iou(pred.labels == 1, target == 1) > 0.7


def test_attention_zero_keeps_the_finest_scale_and_one_takes_the_coarser():
    region = Region(600, 400, 1500, 1200)
    model = tissue_model("hmsa")
    model.attention_head = ConstantAttention(0.0)
    zero, _ = _run(cmu1(), region, model, tile_size=256)
    assert np.array_equal(zero.labels, _crop(zero, "scale 1"))
    model.attention_head = ConstantAttention(1.0)
    one, events = _run(cmu1(), region, model, tile_size=256, probs_dtype="float32")
    # with attention 1 the chain returns the coarsest scale's logits, upsampled: compare with its own result
    coarse = next(e.prediction for e in events if isinstance(e, StageDone))
    up = warp_to_grid(torch.from_numpy(coarse.probs), (coarse.grid, coarse.grid_region), (one.grid, one.grid_region))
    assert (up.argmax(0).numpy() == one.labels).mean() > 0.97
    assert (one.labels != zero.labels).mean() > 0.01  # the two limits differ


def _crop(pred, key):
    grid, region = pred.grids[key]
    return pred.maps["labels"][key][pred.grid_region.relative_to(region).slices]


def test_off_lattice_regions_and_near_native_levels_line_up(model):
    """A region whose corners are not multiples of 4 model pixels, on levels whose downsamples are 8.019 and 4.004
    rather than 8 and 4: the chained result equals the same pixels from a larger region."""
    small, _ = _run(cmu1(), Region(1001, 603, 707, 509), model, tile_size=128)
    big, _ = _run(cmu1(), Region(0, 0, 2967, 2220), model, tile_size=128)
    crop = big.labels[small.grid_region.relative_to(big.grid_region).slices]
    assert small.labels.shape == crop.shape
    assert (small.labels == crop).mean() > 0.99
    assert alignment((0.25, 0.5, 1.0)) == 4 and alignment((0.75, 1.0)) == 4 and alignment((0.3, 1.0)) == 10


def test_hmsa_on_the_virtual_slide():
    case = virtual_case()
    pred, _ = _run(case.slide, Region(0, 0, 4096, 4096), virtual_model("hmsa"), tile_size=256)
    assert pred.labels.shape == case.truth.shape
    assert miou(pred.labels, case.truth, 3) > 0.55


def test_cancel_mid_way(model):
    token = CancelToken()
    seen = []
    with pytest.raises(Cancelled):
        for event in run_request(InferenceRequest(cmu1(), WHOLE, model, InferenceOptions(method="hmsa", tile_size=128)), token):
            seen.append(event)
            if isinstance(event, TileDone) and event.stage == 2:
                token.cancel()
    assert sum(isinstance(e, StageDone) for e in seen) == 1


def test_a_plain_fpn_is_refused():
    with pytest.raises(IncompatibleModelError, match="hmsa"):
        _run(cmu1(), WHOLE, trained_tissue_model())
