"""The engine on the procedural virtual slide, scored against its exact ground truth: tissue detection, the two
single-scale baselines with a model trained on the ground truth, and a whole-slide run of an in-memory slide."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import dask.array as da
import numpy as np
import pytest

from napari_hrseg.geometry import Region
from napari_hrseg.inference import InferenceOptions, InferenceRequest, PixelGrid, detect_tissue, run_request, run_to_completion
from napari_hrseg.inference.wholeslide import SegmentOptions, segment_slide
from napari_hrseg.slide import Slide
from napari_hrseg.virtual import virtual_slide

from test_inference_support import one_torch_thread, single_thread, train_fpn  # noqa: F401
from test_pipeline_support import miou
from test_wholeslide import read_ome_zarr_labels

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MPP = 4.0  # the model's pixel size: level 2 of a 1 µm virtual slide
CLASSES = ("glass", "stroma", "epithelium")
# virtual classes: background, stroma, normal epithelium, lumen, tumour epithelium -> glass, stroma, glands
TO_CLASSES = np.array([0, 1, 2, 2, 2], dtype=np.int64)


@dataclass
class Virtual:
    slide: Slide
    semantic: tuple


@pytest.fixture(scope="module")
def vs():
    """A 4 x 4 mm virtual slide (levels 1, 2, 4, 8 µm) whose 4 and 8 µm levels are rendered once into memory.

    The renderer keeps no chunk cache, so every tile window would re-render the chunks under it; the engine reads
    only these two levels (the finer ones stay lazy and are never rendered).
    """
    v = virtual_slide(seed=0, size=4096, mpp=1.0)
    levels = tuple(
        lev if i < 2 else da.from_array(np.asarray(lev.compute(scheduler="threads")), chunks=lev.chunks)
        for i, lev in enumerate(v.slide.levels)
    )
    return Virtual(dataclasses.replace(v.slide, levels=levels), v.semantic)


@pytest.fixture(scope="module")
def truth(vs):
    grid = PixelGrid.for_mpp(vs.slide, MPP)
    return TO_CLASSES[np.asarray(vs.semantic[grid.level].compute(scheduler="threads"))]


@pytest.fixture(scope="module")
def model(vs, truth):
    grid = PixelGrid.for_mpp(vs.slide, MPP)
    with single_thread():
        return train_fpn(grid.read(vs.slide, grid.extent), truth, CLASSES, MPP, steps=40)


def test_tissue_detection_matches_ground_truth(vs):
    mask = detect_tissue(vs.slide)
    level = max(i for i, (dy, _) in enumerate(vs.slide.downsamples) if dy <= mask.downsample[0])
    step = int(round(mask.downsample[0] / vs.slide.downsamples[level][0]))
    sem = np.asarray(vs.semantic[level].compute(scheduler="threads"))
    tissue = sem[step // 2 :: step, step // 2 :: step][: mask.mask.shape[0], : mask.mask.shape[1]] != 0
    assert tissue.shape == mask.mask.shape
    assert (tissue == mask.mask).mean() > 0.95


def test_sliding_window_beats_the_global_pass_on_ground_truth(vs, truth, model):
    region = Region(0, 0, 4096, 4096)
    sw = run_to_completion(run_request(InferenceRequest(vs.slide, region, model, InferenceOptions(tile_size=256))))
    gp = run_to_completion(run_request(InferenceRequest(vs.slide, region, model, InferenceOptions(method="global", global_size=256))))
    assert sw.labels.shape == gp.labels.shape == truth.shape
    m_sw, m_gp = miou(sw.labels, truth, 3), miou(gp.labels, truth, 3)
    assert m_sw > 0.6
    assert m_sw > m_gp + 0.05  # detail matters: the downsampled pass loses glands


def test_whole_slide_of_an_in_memory_slide(tmp_path, vs, truth, model):
    out = tmp_path / "virtual.ome.zarr"
    result = run_to_completion(segment_slide(vs.slide, model, out, options=SegmentOptions(tile_size=256)))
    labels = read_ome_zarr_labels(out)
    assert labels.shape == truth.shape
    assert 0 < result.tiles_tissue < result.tiles_total
    assert miou(labels, truth, 3) > 0.6
    request = InferenceRequest(vs.slide, Region(0, 0, 4096, 4096), model, InferenceOptions(tile_size=256, skip_glass=True))
    np.testing.assert_array_equal(labels, run_to_completion(run_request(request)).labels)
