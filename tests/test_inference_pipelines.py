"""The single-scale region pipelines (global downsampled pass, full-resolution sliding window) on the real CMU-1
slide with a model trained in the tests, what they read from the pyramid, and their errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_hrseg.errors import IncompatibleModelError, RegionError, SlideError
from napari_hrseg.geometry import Region
from napari_hrseg.inference import (
    InferenceOptions,
    InferenceRequest,
    PixelGrid,
    StageDone,
    TileDone,
    run_request,
    run_to_completion,
)
from napari_hrseg.inference.checks import check_classes
from napari_hrseg.models import create_model
from napari_hrseg.slide import Slide, open_slide

from test_inference_support import one_torch_thread, CMU1_PYRAMID, MODEL_MPP, SMALL_FPN, iou, tissue_targets, trained_tissue_model  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return trained_tissue_model()


@pytest.fixture(scope="module")
def slide():
    return open_slide(CMU1_PYRAMID)


@pytest.fixture(scope="module")
def target(slide):
    return tissue_targets(slide, PixelGrid.for_mpp(slide, MODEL_MPP))


def _run(slide, region, model, **options):
    events = []
    pred = run_to_completion(run_request(InferenceRequest(slide, region, model, InferenceOptions(**options))), events.append)
    return pred, events


def _poisoned(slide: Slide, levels: set[int]) -> Slide:
    """The slide with some levels replaced by arrays that fail when read (same shape and chunks)."""

    def boom(block):
        raise AssertionError("a level the pipeline should not need was read")

    new = tuple(lev.map_blocks(boom, dtype=lev.dtype) if i in levels else lev for i, lev in enumerate(slide.levels))
    return Slide(new, path=slide.path, format=slide.format, mpp_yx=slide.mpp_yx, name=slide.name)


@pytest.mark.parametrize("method", ["sliding_window", "global"])
def test_region_pipelines_segment_tissue(slide, model, target, method):
    region = Region(400, 200, 2000, 1600)  # level 0
    pred, events = _run(slide, region, model, method=method, tile_size=128, global_size=128)
    grid = PixelGrid.for_mpp(slide, MODEL_MPP)
    assert pred.grid == grid and pred.level == 2
    assert pred.grid_region == grid.from_level0(region)
    assert pred.labels.shape == pred.grid_region.shape and pred.labels.dtype == np.uint8
    assert pred.probs is not None and pred.probs.dtype == np.float16 and pred.probs.shape == (2,) + pred.labels.shape
    np.testing.assert_allclose(pred.probs.astype(np.float32).sum(0), 1.0, atol=2e-3)
    assert (pred.labels == pred.probs.argmax(0)).mean() > 0.999
    want = target[pred.grid_region.slices]
    assert iou(pred.labels == 1, want == 1) > 0.6
    unc = pred.maps["uncertainty"]
    for key, arr in unc.items():
        g, r = pred.grids[key]
        assert arr.shape == r.shape and 0 <= arr.min() and arr.max() <= 1
    if method == "global":
        coarse_grid, coarse_region = pred.grids["global"]
        assert coarse_grid.downsample[0] > grid.downsample[0]
        assert max(coarse_region.shape) <= 128 + 1
        stage = [e for e in events if isinstance(e, StageDone)]
        assert len(stage) == 1 and stage[0].prediction is pred
    else:
        assert sum(isinstance(e, TileDone) for e in events) > 4


def test_pipelines_read_only_the_levels_they_need(slide, model):
    """Sliding window reads the 2 µm level; the global pass a coarser one; level 0 is never touched."""
    region = Region(0, 0, 2967, 2220)
    sw, _ = _run(_poisoned(slide, {0, 1, 3, 4}), region, model, method="sliding_window", tile_size=256)
    gp, _ = _run(_poisoned(slide, {0, 1, 2}), region, model, method="global", global_size=160)
    assert sw.labels.shape == gp.labels.shape
    # both baselines agree on most of the slide (same model, different context and resolution)
    assert (sw.labels == gp.labels).mean() > 0.8


def test_tile_size_and_blending_do_not_change_the_answer(slide, model):
    region = Region(500, 300, 1400, 1300)
    a, _ = _run(slide, region, model, tile_size=64)
    b, _ = _run(slide, region, model, tile_size=512)
    c, _ = _run(slide, region, model, tile_size=96, blend="cosine", overlap=32)
    assert (a.labels == b.labels).mean() > 0.995
    assert (a.labels == c.labels).mean() > 0.995


def test_skip_glass_leaves_glass_tiles_background(slide, model):
    pred, events = _run(slide, Region.from_shape(slide.shape), model, tile_size=64, skip_glass=True)
    skipped = [e for e in events if isinstance(e, TileDone) and e.skipped]
    assert skipped and len(skipped) < len([e for e in events if isinstance(e, TileDone)])
    for e in skipped:
        g = pred.grid.from_level0(e.tile_region).relative_to(pred.grid_region)
        assert (pred.labels[g.slices] == 0).all()


def test_region_partly_outside_is_clipped_and_edges_padded_white(slide, model):
    pred, _ = _run(slide, Region(-300, 2000, 800, 900), model, tile_size=128)
    assert pred.region == Region(0, 2000, 500, 220)
    assert pred.labels.shape == pred.grid_region.shape
    # the slide's right edge is glass: padding with white keeps it glass (no border artefact)
    assert (pred.labels[:, -5:] == 0).mean() > 0.9


def test_resampled_grid_when_no_level_matches(slide, model):
    """A 3 µm model on levels of 2 and 4 µm reads the 2 µm level and area-resamples it."""
    torch.manual_seed(0)
    m3 = create_model("fpn", num_classes=2, mpp=3.0, **SMALL_FPN)
    pred, _ = _run(_poisoned(slide, {0, 1, 3, 4}), Region(0, 0, 1200, 1200), m3, tile_size=128)
    assert not pred.grid.native and pred.grid.level == 2
    assert pred.labels.shape == (200, 200)  # 1200 px x 0.499 µm / 3 µm


# ---------------------------------------------------------------------- errors
def test_region_outside_the_slide(slide, model):
    with pytest.raises(RegionError, match="outside the slide") as info:
        _run(slide, Region(5000, 5000, 100, 100), model)
    assert "2967 rows" in str(info.value)


def test_model_with_other_channels(slide):
    m = create_model("fpn", num_classes=2, in_channels=4, mean=(0.5,) * 4, std=(0.2,) * 4, mpp=2.0, **SMALL_FPN)
    with pytest.raises(IncompatibleModelError, match="4 input channels but the slide has 3"):
        _run(slide, Region(0, 0, 500, 500), m)


def test_model_finer_than_the_slide(slide):
    m = create_model("fpn", num_classes=2, mpp=0.25, **SMALL_FPN)
    with pytest.raises(IncompatibleModelError, match="0.25 µm/px") as info:
        _run(slide, Region(0, 0, 500, 500), m)
    assert "--mpp" in str(info.value)


def test_unknown_pixel_size_asks_for_mpp(realdata, model):
    jpg = open_slide(realdata / "stardist-wheel" / "histo.jpg")
    assert jpg.mpp_yx is None
    with pytest.raises(SlideError, match="pixel size is unknown") as info:
        _run(jpg, Region(0, 0, 100, 100), model)
    assert "--mpp" in str(info.value)
    pred, _ = _run(jpg.with_mpp(2.0), Region(0, 0, 300, 500), model, tile_size=64)
    assert pred.labels.shape == (300, 500)


def test_instance_model_refused_by_semantic_pipelines(slide, model):
    config = model.config.evolve(task="instance")
    m = create_model("fpn", num_classes=2, mpp=2.0, task="instance", **SMALL_FPN)
    assert m.config.task == "instance" and config.task == "instance"
    with pytest.raises(IncompatibleModelError, match="instance model"):
        _run(slide, Region(0, 0, 500, 500), m)


def test_label_store_classes_must_match(model):
    check_classes(model.config, ("glass", "tissue"))
    with pytest.raises(IncompatibleModelError, match="2 classes .* 3"):
        check_classes(model.config, ("background", "gland", "stroma"), subject="store.zarr")
    with pytest.raises(IncompatibleModelError, match="names its classes"):
        check_classes(model.config, ("background", "tumour"))
