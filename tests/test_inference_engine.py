"""Engine building blocks: devices, pixel grids (level choice, area resampling), warping between grids, events,
cancellation."""

from __future__ import annotations

import threading

import dask.array as da
import numpy as np
import pytest
import torch

from napari_hrseg.errors import Cancelled, HrsegError, IncompatibleModelError, ModelError, SlideError
from napari_hrseg.geometry import Region
from napari_hrseg.inference import (
    CancelToken,
    Finished,
    InferenceOptions,
    InferenceRequest,
    PixelGrid,
    Started,
    TileDone,
    list_pipelines,
    resolve_device,
    run_request,
    run_to_completion,
)
from napari_hrseg.inference.resample import softmax_summary, warp_to_grid
from napari_hrseg.models import create_model
from napari_hrseg.slide import Slide, open_slide

from test_inference_support import one_torch_thread, CMU1, CMU1_PYRAMID, SMALL_FPN  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------- devices
def test_auto_device_is_usable_and_cpu_keeps_float32():
    dev = resolve_device("auto")
    assert dev.type in ("cuda", "mps", "cpu")
    cpu = resolve_device("cpu")
    assert cpu.autocast_dtype is None
    with cpu.autocast():
        assert torch.ones(1).dtype == torch.float32
    assert resolve_device("cpu", "bfloat16").autocast_dtype is torch.bfloat16
    assert resolve_device("cpu", "off").autocast_dtype is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_unavailable_cuda_is_a_clear_error():
    with pytest.raises(ModelError, match="CUDA is not available") as info:
        resolve_device("cuda")
    assert "--device" in str(info.value)


@pytest.mark.parametrize("name, message", [("tpu", "unknown device|not supported"), ("gpu0", "unknown device")])
def test_unknown_device_names(name, message):
    with pytest.raises(ModelError, match=message):
        resolve_device(name)


def test_float16_autocast_on_cpu_is_refused():
    with pytest.raises(ModelError, match="float16"):
        resolve_device("cpu", "float16")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_autocast_runs_a_model_in_reduced_precision():
    dev = resolve_device("cuda")
    assert dev.autocast_dtype in (torch.bfloat16, torch.float16)
    model = create_model("fpn", num_classes=2, **SMALL_FPN).eval().to(dev.device)
    with torch.inference_mode(), dev.autocast():
        out = model(torch.randn(1, 3, 64, 64, device=dev.device))["logits"]
    assert out.dtype == dev.autocast_dtype


# ---------------------------------------------------------------------- grids
@pytest.fixture(scope="module")
def pyramid():
    return open_slide(CMU1_PYRAMID)  # 5 real levels, 0.499 µm


@pytest.mark.parametrize("mpp, level, native", [(0.5, 0, True), (1.0, 1, True), (2.0, 2, True), (8.0, 4, True), (3.0, 2, False)])
def test_grid_uses_the_level_of_the_models_pixel_size(pyramid, mpp, level, native):
    grid = PixelGrid.for_mpp(pyramid, mpp)
    assert grid.level == level and grid.native is native
    assert grid.mpp == pytest.approx(mpp, rel=0.1)
    if not native:  # resampled from the next finer level, never from level 0
        assert grid.scale_from_level[0] == pytest.approx(mpp / pyramid.level_mpp(level), rel=1e-3)


def test_grid_errors_say_what_to_do(pyramid):
    with pytest.raises(IncompatibleModelError, match="finest level") as info:
        PixelGrid.for_mpp(pyramid, 0.2)
    assert "--mpp" in str(info.value)
    unknown = Slide(pyramid.levels, name="no-mpp")
    with pytest.raises(SlideError, match="pixel size is unknown") as info:
        PixelGrid.for_mpp(unknown, 0.5)
    assert "--mpp" in str(info.value)


def test_resampled_reads_are_exact_tile_by_tile(pyramid):
    grid = PixelGrid.for_mpp(pyramid, 3.0)  # area-resampled 1.5x from level 2
    whole = grid.read(pyramid, Region(0, 0, 301, 257))
    for r0, c0, h, w in [(0, 0, 100, 100), (37, 91, 64, 77), (200, 180, 101, 77)]:
        tile = grid.read(pyramid, Region(r0, c0, h, w))
        np.testing.assert_array_equal(tile, whole[r0 : r0 + h, c0 : c0 + w])


def test_area_resampling_averages_what_each_pixel_covers():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (64, 96, 3)).astype(np.uint8)
    slide = Slide((da.from_array(img, chunks=32),), mpp_yx=(1.0, 1.0), name="rand")
    grid = PixelGrid.for_mpp(slide, 2.0)  # exactly 2x: a 2x2 mean
    assert not grid.native and grid.shape == (32, 48)
    got = grid.read(slide, grid.extent).astype(float)
    want = img.reshape(32, 2, 48, 2, 3).astype(float).mean(axis=(1, 3))
    assert np.abs(got - want).max() <= 0.5 + 1e-6  # rounding to uint8 only
    # 1.5x: every output pixel is a weighted mean of the 1.5 x 1.5 input pixels under it
    g15 = PixelGrid.for_mpp(slide, 1.5)
    out = g15.read(slide, Region(0, 0, 2, 2)).astype(float)
    w = np.array([1.0, 0.5]) / 1.5
    expect00 = (w[:, None, None] * w[None, :, None] * img[:2, :2].astype(float)).sum(axis=(0, 1))
    np.testing.assert_allclose(out[0, 0], expect00, atol=0.5 + 1e-6)
    # outside the slide: white glass for RGB
    edge = grid.read(slide, Region(30, 46, 4, 4))
    assert (edge[2:, :] == 255).all() and (edge[:, 2:] == 255).all()


# ---------------------------------------------------------------------- warping between grids
def test_warp_between_grids_keeps_geometry(pyramid):
    fine = PixelGrid.of_level(pyramid, 1)
    coarse = PixelGrid.of_level(pyramid, 3)
    fine_region = Region(40, 60, 200, 120)
    same = torch.rand(2, *fine_region.shape)
    torch.testing.assert_close(warp_to_grid(same, (fine, fine_region), (fine, fine_region)), same, atol=1e-4, rtol=0)
    # a field linear in level-0 rows survives a trip coarse -> fine exactly (bilinear is exact on linear data)
    coarse_region = coarse.from_level0(fine.to_level0(fine_region)).expand(2)
    rows0 = (np.arange(coarse_region.row, coarse_region.end_row) + 0.5) * coarse.downsample[0]
    field = torch.from_numpy(np.repeat(rows0[:, None], coarse_region.width, axis=1)).float()[None]
    warped = warp_to_grid(field, (coarse, coarse_region), (fine, fine_region))[0].numpy()
    expected = (np.arange(fine_region.row, fine_region.end_row) + 0.5) * fine.downsample[0]
    np.testing.assert_allclose(warped[:, 0], expected, rtol=1e-5)


def test_softmax_summary():
    probs = torch.tensor([[[0.7, 0.2]], [[0.2, 0.5]], [[0.1, 0.3]]])
    labels, unc = softmax_summary(probs)
    assert labels.tolist() == [[0, 1]]
    np.testing.assert_allclose(unc.numpy(), [[1 - 0.5, 1 - 0.2]], atol=1e-6)


# ---------------------------------------------------------------------- events and cancellation
@pytest.fixture(scope="module")
def small_request():
    slide = open_slide(CMU1)
    torch.manual_seed(0)
    model = create_model("fpn", num_classes=2, mpp=2.0, **SMALL_FPN)
    return InferenceRequest(slide, Region(0, 0, 1500, 1200), model, InferenceOptions(tile_size=128, batch_size=2))


def test_pipeline_events_end_in_the_returned_prediction(small_request):
    events = []
    prediction = run_to_completion(run_request(small_request), events.append)
    assert isinstance(events[0], Started) and isinstance(events[-1], Finished)
    tiles = [e for e in events if isinstance(e, TileDone)]
    assert len(tiles) == events[0].total > 1
    assert [e.done for e in tiles] == list(range(1, len(tiles) + 1))
    assert events[-1].prediction is prediction and events[-1].fraction == 1.0
    assert prediction.request_id == small_request.request_id
    assert prediction.model_version == small_request.model.config.label


def test_cancel_takes_effect_at_the_next_event(small_request):
    token = CancelToken()
    seen = []

    def on_event(event):
        seen.append(event)
        if isinstance(event, TileDone) and event.done == 2:
            token.cancel("user pressed stop")

    with pytest.raises(Cancelled, match="user pressed stop"):
        run_to_completion(run_request(small_request, token), on_event)
    assert sum(isinstance(e, TileDone) for e in seen) == 2
    assert not any(isinstance(e, Finished) for e in seen)


def test_closing_the_generator_stops_its_reader_thread(small_request):
    before = {t.name for t in threading.enumerate()}
    gen = run_request(small_request)
    next(gen), next(gen)
    gen.close()  # what napari's worker.quit() does
    leftover = [t for t in threading.enumerate() if t.name.startswith("hrseg-read") and t.name not in before]
    assert not leftover


def test_unknown_method_lists_the_known_ones(small_request):
    assert {"global", "sliding_window"} <= set(list_pipelines())
    bad = InferenceRequest(small_request.slide, small_request.region, small_request.model, InferenceOptions(method="magic"))
    with pytest.raises(HrsegError, match="sliding_window"):
        run_request(bad)


def test_options_are_validated():
    with pytest.raises(HrsegError):
        InferenceOptions(tile_size=0)
    with pytest.raises(HrsegError):
        InferenceOptions(blend="gaussian")


def test_the_engine_is_headless():
    """No Qt and no napari behind the engine, the tiler and the segment command (dask workers import them)."""
    import subprocess
    import sys

    code = (
        "import sys, napari_hrseg.inference, napari_hrseg.tiling, napari_hrseg.cli.segment\n"
        "bad = sorted(m for m in sys.modules if m == 'napari' or m.startswith(('napari.', 'qtpy', 'PyQt', 'vispy')))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
