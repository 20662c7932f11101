"""MagNet-Fast over a slide region (`napari_hrseg.inference.magnet`) is `magnet_ops.refine_stage` with ``n_patches``:
the pipeline scores only the refined patches' pixels (elsewhere the score is 0 anyway), which must not change a
single chosen point."""

from __future__ import annotations

import pytest
import torch

from napari_hrseg.geometry import Region
from napari_hrseg.inference import InferenceOptions, InferenceRequest, StageDone, run_request, run_to_completion
from napari_hrseg.inference.resample import warp_to_grid
from napari_hrseg.models import to_input_tensor
from napari_hrseg.models.magnet_ops import refine_stage

from test_pipeline_support import PATCH, cmu1, one_torch_thread, tissue_model  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WHOLE = Region(0, 0, 2967, 2220)  # the CMU-1 slide, level 0


@pytest.mark.parametrize("n_patches", [2, 5])
def test_magnet_fast_stage_equals_refine_stage_with_n_patches(n_patches):
    model = tissue_model("magnet")
    slide = cmu1()
    events = []
    options = InferenceOptions(method="magnet_fast", probs_dtype="float32", params={"n_patches": n_patches})
    pred = run_to_completion(run_request(InferenceRequest(slide, WHOLE, model, options)), events.append)
    stage = {e.stage: e.prediction for e in events if isinstance(e, StageDone)}
    grid, region = pred.grids["stage2"]
    y = warp_to_grid(torch.from_numpy(stage[1].probs), (stage[1].grid, stage[1].grid_region), (grid, region))[None]
    image = to_input_tensor(grid.read(slide, region)[None], model.config).contiguous()
    with torch.inference_mode():
        ref = refine_stage(y, image, model.segment, model.refiner_for_stage(2), patch_size=(PATCH, PATCH), n_points=0.9,
                           n_patches=n_patches, kernel_size=int(model.params["kernel_size"]))
    assert len(ref.chosen) == n_patches < len(ref.boxes)  # a MagNet-Fast stage, not every patch
    torch.testing.assert_close(torch.from_numpy(stage[2].probs), ref.probs[0], atol=2e-5, rtol=1e-4)
    assert pred.maps["refined"]["stage2"].sum() == len(ref.points) > 0
