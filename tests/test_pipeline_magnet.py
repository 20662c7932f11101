"""MagNet and MagNet-Fast over slide regions (`napari_hrseg.inference.magnet`) on the real CMU-1 pyramid and the
virtual slide: which levels each stage reads, the order of events, the per-stage maps and points, MagNet-Fast's
restriction to its patches, agreement with `magnet_ops.refine_stage`, blocks, cancellation and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_hrseg.errors import Cancelled, HrsegError, IncompatibleModelError
from napari_hrseg.geometry import Region
from napari_hrseg.inference import (
    CancelToken,
    InferenceOptions,
    InferenceRequest,
    PixelGrid,
    StageDone,
    Started,
    TileDone,
    run_request,
    run_to_completion,
)
from napari_hrseg.inference.resample import warp_to_grid
from napari_hrseg.models import to_input_tensor
from napari_hrseg.models.magnet_ops import patch_grid, patch_scores, refine_stage

from test_inference_support import MODEL_MPP, iou, tissue_targets, trained_tissue_model
from test_pipeline_support import PATCH, cmu1, miou, one_torch_thread, tissue_model, virtual_case, virtual_model, watched  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WHOLE = Region(0, 0, 2967, 2220)  # the CMU-1 slide, level 0


@pytest.fixture(scope="module")
def model():
    return tissue_model("magnet")


def _run(slide, region, model, method="magnet", **options):
    events = []
    pred = run_to_completion(run_request(InferenceRequest(slide, region, model, InferenceOptions(method=method, **options))), events.append)
    return pred, events


@pytest.fixture(scope="module")
def plain(model):
    """MagNet on the whole CMU-1 slide with levels 0 and 1 (0.5 and 1 µm) forbidden; reads recorded."""
    slide, reads = watched(cmu1(), forbid={0, 1})
    pred, events = _run(slide, WHOLE, model, probs_dtype="float32", tile_size=256)
    return pred, events, dict(reads.levels)


def test_each_stage_reads_its_level_and_stage_one_comes_first(plain):
    pred, events, reads = plain
    slide = cmu1()
    # model at 2 µm, scales (0.25, 0.5, 1): stages at 8, 4 and 2 µm = levels 4, 3, 2 of the pyramid
    assert set(reads) == {2, 3, 4}
    stages = [e for e in events if isinstance(e, StageDone)]
    assert [e.stage for e in stages] == [1, 2, 3]
    assert [e.prediction.level for e in stages] == [4, 3, 2]
    assert isinstance(events[0], Started) and events[-1].prediction is pred is stages[-1].prediction
    first_refinement = next(i for i, e in enumerate(events) if isinstance(e, TileDone) and e.stage > 1)
    assert events.index(stages[0]) < first_refinement  # the coarse result is out before refinement starts
    # stage 1 is a usable (coarse) answer on its own grid; the final one is on the model's grid
    s1 = stages[0].prediction
    assert s1.grid == PixelGrid.of_level(slide, 4) and s1.labels.shape == s1.grid_region.shape
    assert pred.grid == PixelGrid.for_mpp(slide, MODEL_MPP) and pred.labels.shape == (741, 555)
    target = tissue_targets(slide, pred.grid)
    assert iou(pred.labels == 1, target == 1) > 0.7
    coarse = tissue_targets(slide, s1.grid)
    assert iou(s1.labels == 1, coarse == 1) > 0.6


def test_per_stage_maps_and_points(plain):
    pred, events, _ = plain
    assert set(pred.maps) >= {"uncertainty", "labels", "refined", "patches"}
    assert set(pred.maps["labels"]) == {"stage1", "stage2", "stage3"}
    assert set(pred.maps["refined"]) == {"stage2", "stage3"}
    for kind, per_scale in pred.maps.items():
        for key, arr in per_scale.items():
            grid, region = pred.grids[key]
            assert arr.shape == region.shape, (kind, key)
            if kind == "uncertainty":
                assert 0 <= arr.min() and arr.max() <= 1
    stage_done = {e.stage: e.prediction for e in events if isinstance(e, StageDone)}
    for i in (2, 3):
        key = f"stage{i}"
        grid, region = pred.grids[key]
        refined = pred.maps["refined"][key]
        # n_points = 0.75 of the canvas (every patch refined), one point per replaced pixel
        assert refined.sum() == int(0.75 * region.area)
        mine = pred.points[pred.point_stages == i]
        assert len(mine) == refined.sum()
        # points are level-0 centres of the refined grid pixels (napari: level-0 pixel j centred at j)
        dy, dx = grid.downsample
        rows = np.round((mine[:, 0] + 0.5) / dy - 0.5).astype(int) - region.row
        cols = np.round((mine[:, 1] + 0.5) / dx - 0.5).astype(int) - region.col
        assert refined[rows, cols].all()
        assert np.array_equal(pred.maps["labels"][key], stage_done[i].labels)
    assert pred.points.shape[1] == 2 and pred.points.dtype == np.float64
    assert pred.points[:, 0].min() >= 0 and pred.points[:, 0].max() < 2967
    # refinement changes the answer, and keeps what the coarse stage was sure of
    up = warp_to_grid(torch.from_numpy(stage_done[1].probs), (stage_done[1].grid, stage_done[1].grid_region), (pred.grid, pred.grid_region))
    changed = up.argmax(0).numpy() != pred.labels
    assert 0.001 < changed.mean() < 0.2


def test_a_single_block_stage_equals_refine_stage(plain, model):
    """Stage 2 of the pipeline is `magnet_ops.refine_stage` on the stage-2 level, given the upsampled stage 1."""
    pred, events, _ = plain
    slide = cmu1()
    stage = {e.stage: e.prediction for e in events if isinstance(e, StageDone)}
    grid, region = pred.grids["stage2"]
    y = warp_to_grid(torch.from_numpy(stage[1].probs), (stage[1].grid, stage[1].grid_region), (grid, region))[None]
    image = to_input_tensor(grid.read(slide, region)[None], model.config).contiguous()
    with torch.inference_mode():
        ref = refine_stage(y, image, model.segment, model.refiner_for_stage(2), patch_size=(PATCH, PATCH), n_points=0.75,
                           kernel_size=5)
    torch.testing.assert_close(torch.from_numpy(stage[2].probs), ref.probs[0], atol=2e-5, rtol=1e-4)
    assert pred.maps["refined"]["stage2"].sum() == len(ref.points)


def test_magnet_fast_refines_only_its_most_uncertain_patches(plain, model):
    _, _, plain_reads = plain
    slide, reads = watched(cmu1(), forbid={0, 1})
    pred, events = _run(slide, WHOLE, model, method="magnet_fast", probs_dtype="float32", params={"n_patches": 2})
    assert pred.method == "magnet_fast"
    assert sum(isinstance(e, TileDone) and e.stage > 1 for e in events) == 4  # 2 patches at each of 2 stages
    _, per_stage = _run(cmu1(), WHOLE, model, method="magnet_fast", params={"n_patches": (1, 3)})
    assert [sum(isinstance(e, TileDone) and e.stage == i for e in per_stage) for i in (2, 3)] == [1, 3]
    stage = {e.stage: e.prediction for e in events if isinstance(e, StageDone)}
    for i in (2, 3):
        key = f"stage{i}"
        grid, region = pred.grids[key]
        patches = pred.maps["patches"][key].astype(bool)
        boxes = patch_grid(region.height, region.width, PATCH, PATCH)
        # the two chosen patches are the two with the highest mean uncertainty Y_u
        u = torch.from_numpy(pred.maps["uncertainty"][key])[None, None]
        best = torch.topk(patch_scores(u, boxes)[0], 2).indices.tolist()
        expected = np.zeros(region.shape, bool)
        for b in best:
            y0, x0, y1, x1 = boxes[b]
            expected[y0:y1, x0:x1] = True
        assert np.array_equal(patches, expected)
        # points only inside them (0.9 of their pixels), and outside nothing changed from the upsampled stage i-1
        refined = pred.maps["refined"][key].astype(bool)
        assert not (refined & ~patches).any() and refined.sum() == int(0.9 * region.area * 2 / len(boxes))
        up = warp_to_grid(torch.from_numpy(stage[i - 1].probs), (stage[i - 1].grid, stage[i - 1].grid_region), (grid, region))
        torch.testing.assert_close(torch.from_numpy(stage[i].probs)[:, ~patches], up[:, ~patches])
    # MagNet-Fast reads a fraction of the fine level that MagNet reads
    assert 0 < reads.count(2) < len(plain_reads[2])


def test_blocks_bound_memory_and_agree_with_one_block(plain, model):
    pred, _, _ = plain
    blocked, events = _run(cmu1(), WHOLE, model, params={"block_size": 256})
    # stage 3's canvas (741 x 555) is cut into 3 x 3 blocks of 256; the answer barely moves
    assert (blocked.labels == pred.labels).mean() > 0.97
    assert abs(len(blocked.points) - len(pred.points)) < 0.02 * len(pred.points)
    assert blocked.maps["patches"]["stage3"].all()


def test_cancel_after_the_first_stage_leaves_nothing(model):
    token = CancelToken()
    gen = run_request(InferenceRequest(cmu1(), WHOLE, model, InferenceOptions(method="magnet")), token)
    seen = []
    with pytest.raises(Cancelled):
        for event in gen:
            seen.append(event)
            if isinstance(event, StageDone):
                token.cancel()
    assert isinstance(seen[-1], StageDone) and seen[-1].stage == 1
    assert not any(isinstance(e, TileDone) and e.stage > 1 for e in seen)
    # closing the generator (a napari worker's quit) stops it too
    gen = run_request(InferenceRequest(cmu1(), WHOLE, model, InferenceOptions(method="magnet")))
    next(gen)
    gen.close()
    with pytest.raises(StopIteration):
        next(gen)


@pytest.mark.slow  # renders the virtual slide's coarse levels and trains an FPN and a refiner on them (~20 s)
def test_magnet_on_the_virtual_slide_beats_its_coarse_stage():
    case = virtual_case()
    model = virtual_model("magnet")
    region = Region(0, 0, 4096, 4096)
    pred, events = _run(case.slide, region, model, tile_size=256)
    assert pred.labels.shape == case.truth.shape
    stage1 = next(e.prediction for e in events if isinstance(e, StageDone))
    up = warp_to_grid(torch.from_numpy(stage1.probs.astype(np.float32)), (stage1.grid, stage1.grid_region), (pred.grid, pred.grid_region))
    m_final, m_coarse = miou(pred.labels, case.truth, 3), miou(up.argmax(0).numpy(), case.truth, 3)
    # A refiner trained for 15 steps: refinement must already recover detail the 16 µm stage cannot see.
    # (Trained for 60 steps it reaches the sliding window's 0.72; benchmarks/bench_inference.py measures properly.)
    assert m_final > 0.47
    assert m_final > m_coarse + 0.03


# ---------------------------------------------------------------------------------------------- errors
def test_a_model_of_another_architecture_is_refused():
    with pytest.raises(IncompatibleModelError, match="needs a magnet model") as info:
        _run(cmu1(), WHOLE, trained_tissue_model())
    assert "sliding_window" in str(info.value)


def test_unknown_and_bad_parameters_are_refused(model):
    with pytest.raises(HrsegError, match="unknown magnet parameter"):
        _run(cmu1(), WHOLE, model, params={"npoints": 3})
    with pytest.raises(HrsegError, match="odd kernel_size"):
        _run(cmu1(), WHOLE, model, params={"kernel_size": 4})
    with pytest.raises(HrsegError, match="one per refinement stage"):
        _run(cmu1(), WHOLE, model, method="magnet_fast", params={"n_patches": (1, 2, 3)})
