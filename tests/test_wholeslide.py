"""Whole-slide segmentation in one process on the real CMU-1 slide: labels equal to the region pipeline, exports,
resume after a cancel, and refusing bad outputs and foreign working stores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from napari_hrseg.errors import Cancelled, ExportError, IncompatibleModelError, LabelStoreError, RegionError
from napari_hrseg.geometry import Region
from napari_hrseg.inference import (
    CancelToken,
    InferenceOptions,
    InferenceRequest,
    PixelGrid,
    TileDone,
    run_request,
    run_to_completion,
)
from napari_hrseg.inference.wholeslide import SegmentOptions, SlideDone, segment_slide, work_path_for
from napari_hrseg.models import create_model
from napari_hrseg.slide import open_slide

from test_inference_support import CMU1, MODEL_MPP, SMALL_FPN, one_torch_thread, trained_tissue_model  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TILE = 128


def read_ome_zarr_labels(path: Path) -> np.ndarray:
    """Level 0 of the (single) label image of an OME-Zarr written by the exporter."""
    labels_dir = Path(path) / "labels"
    names = [p for p in labels_dir.iterdir() if p.is_dir()]
    assert len(names) == 1
    return np.asarray(zarr.open_array(str(names[0] / "0"), mode="r")[...])


@pytest.fixture(scope="module")
def model():
    return trained_tissue_model()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, model):
    """An uninterrupted run: its events, result and exported labels."""
    out = tmp_path_factory.mktemp("ref") / "cmu1.ome.zarr"
    events = []
    result = run_to_completion(segment_slide(CMU1, model, out, options=SegmentOptions(tile_size=TILE)), events.append)
    return events, result, read_ome_zarr_labels(out)


def test_whole_slide_equals_the_region_pipeline(reference, model):
    events, result, labels = reference
    slide = open_slide(CMU1)
    grid = PixelGrid.for_mpp(slide, MODEL_MPP)
    assert labels.shape == grid.shape and result.grid == grid
    assert result.tiles_total > result.tiles_tissue > 0  # glass tiles were skipped
    assert result.tiles_computed == result.tiles_tissue and result.tiles_resumed == 0
    assert sum(isinstance(e, TileDone) for e in events) == result.tiles_tissue
    assert isinstance(events[-1], SlideDone) and events[-1].result is result
    assert not result.kept_work and not result.work_path.exists()  # cleaned up after the export
    # the same tiles through the viewer's pipeline give the same labels
    request = InferenceRequest(slide, Region.from_shape(slide.shape), model, InferenceOptions(tile_size=TILE, skip_glass=True))
    prediction = run_to_completion(run_request(request))
    np.testing.assert_array_equal(labels, prediction.labels)
    assert 0.2 < (labels == 1).mean() < 0.6


def test_resume_after_cancel_computes_only_the_rest(tmp_path, model, reference):
    _, ref_result, ref_labels = reference
    out = tmp_path / "cmu1.ome.zarr"
    token = CancelToken()
    first = []

    def stop_after_three(event):
        first.append(event)
        if isinstance(event, TileDone) and event.done == 3:
            token.cancel("interrupted by the test")

    with pytest.raises(Cancelled):
        run_to_completion(segment_slide(CMU1, model, out, options=SegmentOptions(tile_size=TILE), cancel=token), stop_after_three)
    assert not out.exists()  # nothing half-written looks complete
    work = work_path_for(out)
    assert len(list((work / "done").iterdir())) == 3
    second = []
    result = run_to_completion(segment_slide(CMU1, model, out, options=SegmentOptions(tile_size=TILE)), second.append)
    assert result.tiles_resumed == 3
    assert result.tiles_computed == ref_result.tiles_tissue - 3
    assert sum(isinstance(e, TileDone) for e in second) == ref_result.tiles_tissue - 3
    np.testing.assert_array_equal(read_ome_zarr_labels(out), ref_labels)


def test_a_store_of_another_job_is_refused_then_restarted(tmp_path, model):
    out = tmp_path / "r.ome.zarr"
    region = Region(1200, 800, 600, 600)
    token = CancelToken()
    with pytest.raises(Cancelled):  # stop as soon as the run is planned (its store exists)
        run_to_completion(
            segment_slide(CMU1, model, out, region=region, options=SegmentOptions(tile_size=TILE), cancel=token),
            lambda event: token.cancel(),
        )
    assert work_path_for(out).exists()
    with pytest.raises(LabelStoreError, match="tile_size") as info:
        run_to_completion(segment_slide(CMU1, model, out, region=region, options=SegmentOptions(tile_size=2 * TILE)))
    assert "--restart" in str(info.value)
    result = run_to_completion(segment_slide(CMU1, model, out, region=region, options=SegmentOptions(tile_size=2 * TILE, restart=True)))
    assert result.tiles_resumed == 0 and out.exists()


def test_region_probabilities_and_other_formats(tmp_path, model):
    region = Region(1600, 600, 900, 1000)
    slide = open_slide(CMU1)
    grid = PixelGrid.for_mpp(slide, MODEL_MPP)
    g = grid.from_level0(region).clip(grid.shape)
    tif = tmp_path / "cmu1.ome.tif"
    res = run_to_completion(segment_slide(CMU1, model, tif, region=region, options=SegmentOptions(tile_size=TILE, keep_probs=True)))
    labels = tifffile.imread(tif, level=0) if tifffile.TiffFile(tif).series[0].levels else tifffile.imread(tif)
    labels = np.squeeze(labels)
    assert labels.shape == grid.shape
    outside = np.ones(grid.shape, bool)
    outside[g.slices] = False
    assert (labels[outside] == 0).all() and (labels[g.slices] == 1).any()
    # with --probs the working store stays, holding float16 probabilities of the computed tiles
    assert res.kept_work
    store = zarr.open_group(str(res.work_path), mode="r")
    probs = np.asarray(store["probs"][...]).astype(np.float32)
    assert probs.shape == (2,) + g.shape
    computed = probs.sum(0) > 0
    np.testing.assert_allclose(probs.sum(0)[computed], 1.0, atol=2e-3)
    # labels come from float32 probabilities, the store keeps float16: where rounding made the two classes equal
    # (or swapped them within one float16 step) the stored argmax cannot decide, so compare where it can
    decided = computed & (np.abs(probs[1] - probs[0]) > 2e-3)
    assert decided.sum() > 0.9 * computed.sum()
    np.testing.assert_array_equal(probs.argmax(0)[decided], labels[g.slices][decided])
    gj = tmp_path / "cmu1.geojson"
    run_to_completion(segment_slide(CMU1, model, gj, region=region, options=SegmentOptions(tile_size=TILE)))
    features = json.loads(gj.read_text())["features"]
    assert features and all(f["properties"]["classification"]["name"] == "tissue" for f in features)


def test_bad_outputs_and_inputs(tmp_path, model, reference):
    existing = tmp_path / "done.ome.zarr"
    existing.mkdir()
    with pytest.raises(ExportError, match="already exists") as info:
        run_to_completion(segment_slide(CMU1, model, existing))
    assert "--overwrite" in str(info.value)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ExportError):
        run_to_completion(segment_slide(CMU1, model, blocker / "out.ome.zarr"))
    with pytest.raises(ExportError, match="cannot tell the export format"):
        run_to_completion(segment_slide(CMU1, model, tmp_path / "out.bmp"))
    with pytest.raises(RegionError, match="outside the slide"):
        run_to_completion(segment_slide(CMU1, model, tmp_path / "o.ome.zarr", region=Region(9000, 0, 10, 10)))
    fine = create_model("fpn", num_classes=2, mpp=0.1, **SMALL_FPN)
    with pytest.raises(IncompatibleModelError):
        run_to_completion(segment_slide(CMU1, fine, tmp_path / "o.ome.zarr"))
    # none of these left a working store or an output behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "done.ome.zarr"]
