"""Instances over regions (`napari_hrseg.inference.instances`) with a RefineMask trained briefly on real MICCAI 2015
nuclei: tiled equals untiled with no object cut or duplicated at tile borders (where a naive stitch cuts them),
the object table, the virtual slide's nuclei against their exact ground truth, cancellation and errors."""

from __future__ import annotations

import dataclasses
import sys

import dask.array as da
import numpy as np
import pytest

from napari_hrseg.errors import Cancelled, IncompatibleModelError
from napari_hrseg.geometry import Region
from napari_hrseg.inference import CancelToken, InferenceOptions, InferenceRequest, TileDone, run_request, run_to_completion
from napari_hrseg.inference.instances import TileObject, compose_objects
from napari_hrseg.models import to_input_tensor
from napari_hrseg.slide import open_slide
from napari_hrseg.tiling import Tiler
from napari_hrseg.virtual import virtual_slide

from conftest import REALDATA
from test_inference_support import trained_tissue_model
from test_pipeline_support import miccai, nuclei_model, one_torch_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TILE = 192
REGION = Region(64, 96, 448, 448)  # level 0 = the model's grid (0.5 µm); tile borders at 192 and 384 cross it


def _scores(truth: np.ndarray, pred: np.ndarray):
    sys.path.insert(0, str(REALDATA.parent / "tools"))  # the project's judge: shared/tools/eval_instances.py
    from eval_instances import scores

    return scores(truth, pred)


@pytest.fixture(scope="module")
def model():
    return nuclei_model()


@pytest.fixture(scope="module")
def slide(realdata):
    return open_slide(realdata / "miccai2015-nuclei" / "image05.png").with_mpp(0.5)


def _run(slide, region, model, **options):
    events = []
    request = InferenceRequest(slide, region, model, InferenceOptions(method="instances", **options))
    return run_to_completion(run_request(request), events.append), events


@pytest.fixture(scope="module")
def runs(slide, model):
    tiled, events = _run(slide, REGION, model, tile_size=TILE)
    whole, _ = _run(slide, REGION, model, tile_size=1024)
    return tiled, whole, events


def _best_iou(objects: np.ndarray, others: np.ndarray) -> dict[int, tuple[int, float]]:
    """For every id of ``objects``: the id of ``others`` it overlaps most and their IoU."""
    out = {}
    area_o = np.bincount(others.ravel())
    for i in np.unique(objects[objects > 0]):
        m = objects == i
        hits = np.bincount(others[m], minlength=area_o.size)
        hits[0] = 0
        j = int(hits.argmax())
        out[int(i)] = (j, 0.0 if j == 0 else hits[j] / (m.sum() + area_o[j] - hits[j]))
    return out


def _crossing(instances: np.ndarray, region: Region, tile: int) -> list[int]:
    """Ids of objects whose pixels lie in more than one tile core (cores on the grid's lattice of ``tile``)."""
    rows = (np.arange(region.row, region.end_row) // tile)[:, None]
    cols = (np.arange(region.col, region.end_col) // tile)[None, :]
    cell = rows * 1000 + cols
    return [int(i) for i in np.unique(instances[instances > 0]) if np.unique(cell[instances == i]).size > 1]


@pytest.mark.slow  # the module's RefineMask is trained in its fixture: 80 steps, ~20 s of CPU
def test_tiled_equals_untiled_with_no_object_cut_or_duplicated(runs):
    tiled, whole, events = runs
    assert sum(isinstance(e, TileDone) for e in events) == 9  # 3 x 3 tiles of 192 over the 448-px region
    a, b = whole.instances, tiled.instances
    assert a.shape == b.shape == REGION.shape and b.dtype == np.int32
    assert len(whole.objects) > 40  # the model found nuclei
    assert abs(len(tiled.objects) - len(whole.objects)) <= 1
    match = _best_iou(a, b)
    assert np.mean([iou > 0.9 for _, iou in match.values()]) > 0.97
    # the objects that straddle a tile border are whole in the tiled result (not cut)
    crossing = _crossing(a, REGION, TILE)
    assert len(crossing) >= 5
    assert all(match[i][1] > 0.9 for i in crossing)
    # and none is duplicated: no tiled object overlaps a second one's untiled match
    partners = [j for j, iou in match.values() if iou > 0.5]
    assert len(partners) == len(set(partners))
    back = _best_iou(b, a)
    assert sum(iou < 0.5 for _, iou in back.values()) <= 1
    # both score the same against the ground truth (the project's Dice / AJI / PQ)
    truth = miccai(5)[1][REGION.slices]
    s_whole, s_tiled = _scores(truth, a), _scores(truth, b)
    assert s_whole[0] > 0.4  # pixel Dice: a model trained for 80 steps segments nuclei
    assert abs(s_whole[1] - s_tiled[1]) < 0.01 and abs(s_whole[2] - s_tiled[2]) < 0.01


def test_a_naive_stitch_would_cut_them(runs, slide, model):
    """The same tiles, each keeping what lies in its core (no ownership, no halo-sized context rule): objects on the
    tile borders come out cut, so the test above can fail."""
    tiled, whole, _ = runs
    tiler = Tiler.for_model(model, REGION, TILE)
    naive = np.zeros(REGION.shape, np.int32)
    offset = 0
    for tile in tiler:
        x = to_input_tensor(slide.read_level(0, tile.window, pad=True)[None], model.config)
        found = model.predict_instances(x)
        core = found.labels[tile.core_in_window.slices]
        naive[tile.core.relative_to(REGION).slices] = np.where(core > 0, core + offset, 0)
        offset += len(found)
    crossing = _crossing(whole.instances, REGION, TILE)
    match = _best_iou(whole.instances, naive)
    assert sum(match[i][1] < 0.9 for i in crossing) >= 3


def test_the_object_table(runs):
    tiled, _, _ = runs
    table = tiled.objects
    inst = tiled.instances
    assert table.id.tolist() == list(range(1, len(table) + 1))
    assert set(np.unique(inst[inst > 0]).tolist()) <= set(table.id.tolist())
    assert np.all(np.diff(table.score) <= 0)  # ids in order of decreasing score
    assert set(table.label.tolist()) == {1} and table.class_names == ("background", "nucleus")
    np.testing.assert_array_equal(tiled.labels, (inst > 0).astype(np.uint8))
    assert tiled.probs is None
    inside = 0
    for row in table.rows():
        rr, cc = np.nonzero(inst == row["index"])
        r0, c0, r1, c1 = row["bbox_row0"], row["bbox_col0"], row["bbox_row1"], row["bbox_col1"]
        if not (r0 > REGION.row and c0 > REGION.col and r1 < REGION.end_row and c1 < REGION.end_col):
            continue  # at the region's edge: the table describes the whole object, the image the part inside
        inside += 1
        # level-0 pixels (the grid is level 0 here), absolute slide coordinates
        assert (r0, c0, r1, c1) == (rr.min() + REGION.row, cc.min() + REGION.col, rr.max() + 1 + REGION.row, cc.max() + 1 + REGION.col)
        assert row["area_px"] == rr.size and row["area_um2"] == pytest.approx(rr.size * 0.25)
        assert row["centroid_row"] == pytest.approx(rr.mean() + REGION.row)
        assert row["centroid_col"] == pytest.approx(cc.mean() + REGION.col)
        assert row["class_name"] == "nucleus"
    assert inside > 30


def test_overlaps_and_duplicates_are_resolved_by_score():
    disc = np.add.outer((np.arange(9) - 4) ** 2, (np.arange(9) - 4) ** 2) <= 16
    a = TileObject(Region(10, 10, 9, 9), disc, 0.9, 1, tile=0)
    dup = TileObject(Region(10, 11, 9, 9), disc, 0.8, 1, tile=1)  # the same nucleus from the next tile, 1 px off
    touching = TileObject(Region(10, 16, 9, 9), disc, 0.95, 1, tile=1)
    canvas, placed = compose_objects([a, dup, touching], Region(0, 0, 40, 40))
    assert len(placed) == 2 and [p.score for p in placed] == [0.95, 0.9]
    assert canvas.max() == 2 and (canvas == 1).sum() == disc.sum()  # the higher score keeps the contested pixels
    overlap = (disc[:, 6:] & disc[:, :3]).sum()  # a's columns 16-18 are touching's first three
    assert 0 < overlap and (canvas == 2).sum() == disc.sum() - overlap


def test_virtual_nuclei_tiled_like_untiled_and_found(model):
    """On the virtual slide (TCGA-like stain, 0.5 µm) the MICCAI-trained model finds nuclei of the exact ground
    truth, and tiling changes nothing."""
    v = virtual_slide(seed=3, size=1024, mpp=0.5, stain="he-tcga")
    # the renderer keeps no cache: hold the half-millimetre slide's level 0 in memory rather than re-render windows
    slide = dataclasses.replace(v.slide, levels=(da.from_array(np.asarray(v.slide.levels[0].compute(scheduler="threads")), chunks=256),))
    region = Region(320, 320, 384, 384)
    tiled, _ = _run(slide, region, model, tile_size=128)
    whole, _ = _run(slide, region, model, tile_size=512)
    truth = np.asarray(v.instances[0][region.slices].compute())
    assert truth.max() > 0
    match = _best_iou(whole.instances, tiled.instances)
    assert np.mean([iou > 0.9 for _, iou in match.values()]) > 0.95
    dice = _scores(np.unique(truth, return_inverse=True)[1].reshape(truth.shape), tiled.instances)[0]
    assert dice > 0.3


def test_cancel_mid_way(slide, model):
    token = CancelToken()
    seen = []
    with pytest.raises(Cancelled):
        for event in run_request(InferenceRequest(slide, REGION, model, InferenceOptions(method="instances", tile_size=TILE)), token):
            seen.append(event)
            if isinstance(event, TileDone):
                token.cancel()
    assert sum(isinstance(e, TileDone) for e in seen) == 1


def test_a_semantic_model_is_refused(slide):
    with pytest.raises(IncompatibleModelError):
        _run(slide.with_mpp(2.0), Region(0, 0, 200, 200), trained_tissue_model())
