"""GLNet over slide regions (`napari_hrseg.inference.glnet`) on the real CMU-1 pyramid and the virtual slide: the
global branch reads a coarser level with context around the region, the local branch the model's level, patch
logits are summed, blocks agree with one pass, the global view matters, cancellation and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_hrseg.errors import Cancelled, HrsegError, IncompatibleModelError
from napari_hrseg.geometry import Region
from napari_hrseg.inference import CancelToken, InferenceOptions, InferenceRequest, PixelGrid, TileDone, run_request, run_to_completion
from napari_hrseg.models.glnet import patch_starts

from test_inference_support import iou, tissue_targets, trained_tissue_model
from test_pipeline_support import cmu1, one_torch_thread, tissue_model, virtual_case, watched  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WHOLE = Region(0, 0, 2967, 2220)


@pytest.fixture(scope="module")
def model():
    return tissue_model("glnet")


def _run(slide, region, model, **options):
    events = []
    request = InferenceRequest(slide, region, model, InferenceOptions(method="glnet", **options))
    return run_to_completion(run_request(request), events.append), events


@pytest.fixture
def grid_reads(monkeypatch):
    """Every `PixelGrid.read` as ``(level, downsample, region)``."""
    calls = []
    original = PixelGrid.read

    def spy(self, slide, region, **kw):
        calls.append((self.level, self.downsample, region))
        return original(self, slide, region, **kw)

    monkeypatch.setattr(PixelGrid, "read", spy)
    return calls


def test_global_view_from_a_coarser_level_with_context_and_patches_from_the_model_level(model, grid_reads):
    slide, reads = watched(cmu1(), forbid={0, 1, 3})
    region = Region(900, 700, 1200, 1000)  # level 0; 300 x 250 at the model's 2 µm
    pred, events = _run(slide, region, model)
    assert set(reads.levels) == {2, 4}  # model at 2 µm, global branch at scale 0.25: 8 µm
    local = [r for lvl, _, r in grid_reads if lvl == 2]
    glob = [(ds, r) for lvl, ds, r in grid_reads if lvl == 4]
    assert len(glob) == 1
    # GLNet's patch grid (128 px, >= 16 px overlap, the last at the end) over the region on the model's grid
    g = pred.grid_region
    rows, cols = patch_starts(g.height, 128, 16), patch_starts(g.width, 128, 16)
    assert sorted((r.row - g.row, r.col - g.col) for r in local) == sorted((a, b) for a in rows for b in cols)
    # the global view covers the region's footprint and reaches beyond it on every side (context)
    ds, view = glob[0]
    footprint = region.to_level(ds)
    assert view.row < footprint.row and view.col < footprint.col
    assert view.end_row > footprint.end_row and view.end_col > footprint.end_col
    assert pred.labels.shape == g.shape
    assert pred.maps["labels"]["global"].shape == pred.grids["global"][1].shape
    assert pred.grids["global"][0].level == 4
    assert [type(e).__name__ for e in events] == ["Started", "TileDone", "Finished"]


def test_glnet_segments_tissue_and_blocks_agree(model):
    whole, events = _run(cmu1(), WHOLE, model)
    target = tissue_targets(cmu1(), whole.grid)
    assert iou(whole.labels == 1, target == 1) > 0.6
    np.testing.assert_allclose(whole.probs.astype(np.float32).sum(0), 1.0, atol=2e-3)
    # 741 x 555 in blocks of 384: 2 x 2, each with its own global view; patches overlap across blocks
    blocked, events = _run(cmu1(), WHOLE, model, params={"block_size": 384})
    assert sum(isinstance(e, TileDone) for e in events) == 4
    # A briefly trained GLNet leans on its global view, whose extent differs per block: the answers agree on most
    # pixels and are as good as each other.
    assert (blocked.labels == whole.labels).mean() > 0.93
    assert iou(blocked.labels == 1, target == 1) > iou(whole.labels == 1, target == 1) - 0.03


def test_the_global_view_changes_the_answer(model):
    """Far context reaches the local prediction: with no context the global branch sees only the region."""
    region = Region(1200, 600, 800, 800)
    with_context, _ = _run(cmu1(), region, model, params={"context": 1.0})
    without, _ = _run(cmu1(), region, model, params={"context": 0.0})
    assert not np.array_equal(with_context.probs, without.probs)


def test_glnet_trained_on_cmu1_finds_the_virtual_tissue(model):
    """The tissue/glass GLNet of the real slide, on a region of the virtual slide, against its exact ground truth."""
    case = virtual_case()
    region = Region(1024, 0, 2048, 2048)
    pred, _ = _run(case.slide, region, model)
    assert pred.grid.level == 1 and pred.grids["global"][0].level == 3  # 2 µm and 8 µm levels of a 1 µm slide
    truth = case.classes_on(pred.grid)[pred.grid_region.slices] > 0
    assert iou(pred.labels == 1, truth) > 0.75


def test_cancel_between_blocks(model):
    token = CancelToken()
    seen = []
    with pytest.raises(Cancelled):
        for event in run_request(InferenceRequest(cmu1(), WHOLE, model, InferenceOptions(method="glnet", params={"block_size": 384})), token):
            seen.append(event)
            if isinstance(event, TileDone):
                token.cancel()
    assert sum(isinstance(e, TileDone) for e in seen) == 1


def test_errors():
    with pytest.raises(IncompatibleModelError, match="glnet"):
        _run(cmu1(), WHOLE, trained_tissue_model())
    with pytest.raises(HrsegError, match="global_scale"):
        _run(cmu1(), WHOLE, tissue_model("glnet"), params={"global_scale": 2.0})
