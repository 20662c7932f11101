"""The Segment panel in a real viewer: what it says without weights, bad model folders, methods that are not
installed, stale results dropped, the live toggle's debounce, cancel, and a view too large to segment."""

from __future__ import annotations

import time

import numpy as np
import pytest

from napari_hrseg.geometry import Region

from test_app_support import app_dirs, notifications, tissue_model_dir, wait_job  # noqa: F401
from test_inference_support import one_torch_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def app(make_napari_viewer, app_dirs, tissue_model_dir):
    """A viewer with the small real slide, the Segment panel and the test model loaded."""
    from napari_hrseg._widgets import SegmentPanel

    viewer = make_napari_viewer()
    viewer.open_sample("napari-hrseg", "small-real-slide")
    panel = SegmentPanel(viewer)
    viewer.window.add_dock_widget(panel, name="Segment")
    assert panel.session.load_model_directory(str(tissue_model_dir))
    return viewer, panel, panel.session


def test_without_weights_the_panel_says_what_to_do(make_napari_viewer, tmp_path, notifications, monkeypatch):
    from napari_hrseg._widgets import SegmentPanel
    from napari_hrseg.models import weights

    # an installation whose package ships no weights yet (an empty weights folder)
    monkeypatch.setattr(weights, "_shipped_root", lambda: tmp_path / "no-weights")
    assert weights.shipped_models() == []
    viewer = make_napari_viewer()
    panel = SegmentPanel(viewer)
    assert "no shipped weights" in panel.info.text() and not panel.segment_button.isEnabled()
    texts = [panel.model_combo.itemText(i) for i in range(panel.model_combo.count())]
    assert texts[:3] == ["tissue (not shipped yet)", "glands (not shipped yet)", "nuclei (not shipped yet)"]
    assert texts[-1] == "Load model directory..."
    assert not panel.model_combo.model().item(0).isEnabled()
    # a folder that is not a model: one clear notification, nothing else changes
    (tmp_path / "config.json").write_text("{not json")
    assert not panel.session.load_model_directory(str(tmp_path))
    assert panel.session.controller.active is None
    errors = [m for sev, m in notifications if sev == "error"]
    assert len(errors) == 1 and "config.json is not valid JSON" in errors[0]
    assert not panel.session.load_model_directory(str(tmp_path / "missing"))
    assert "not a folder" in [m for sev, m in notifications if sev == "error"][-1]


def test_methods_follow_the_installed_pipelines_and_global_shows_its_scale(app, qtbot):
    from napari_hrseg._widgets._catalog import METHODS
    from napari_hrseg.inference import list_pipelines

    viewer, panel, session = app
    registered = list_pipelines()
    for i, method in enumerate(METHODS):
        enabled = panel.method_combo.model().item(i).isEnabled()
        expected = method.key == "auto" or any(p in registered for p, _ in method.pipelines)
        assert enabled == expected, method.key
    panel.method_combo.setCurrentIndex(panel.method_combo.findData("global"))
    assert session.controller.method == "global" and "runs as global" in panel.info.text()
    session.go_to(Region(600, 300, 1600, 1600))
    session.segment_view()
    job = wait_job(qtbot, session, "segment")
    qtbot.waitUntil(lambda: not session.results.busy, timeout=10000)
    names = sorted(layer.name for layer in viewer.layers if layer.name.startswith("hrseg: "))
    assert job.result.method == "global"
    coarse = [n for n in names if n.startswith("hrseg: uncertainty (global, ")]
    assert len(coarse) == 1 and "hrseg: uncertainty (final, 2 µm/px)" in names
    # the global pass's map lies on its own, coarser grid but over the same level-0 pixels
    layer = next(lay for lay in viewer.layers if lay.name == coarse[0])
    grid, extent = job.result.grids["global"]
    assert layer.scale[0] == pytest.approx(grid.downsample[0], rel=1e-6) and grid.downsample[0] >= 4.0


def test_a_newer_request_drops_the_older_one(app, qtbot, notifications):
    viewer, panel, session = app
    session.controller.tile_size = 64  # slow enough to be overtaken
    first = session.segment_view(Region(0, 0, 1500, 1500))
    second = session.segment_view(Region(1500, 800, 1400, 1400))
    qtbot.waitUntil(lambda: not first.running and not second.running, timeout=60000)
    assert not first.ok and second.ok  # the first was cancelled, quietly
    assert not [m for sev, m in notifications if sev in ("error", "info") and "cancel" in m.lower()]
    qtbot.waitUntil(lambda: not session.results.busy, timeout=10000)
    conf = next(lay for lay in viewer.layers if lay.name.startswith("hrseg: confidence"))
    g, (dy, dx) = second.result.grid_region, second.result.grid.downsample
    np.testing.assert_allclose(conf.translate, (g.row * dy + (dy - 1) / 2, g.col * dx + (dx - 1) / 2))


def test_cancel_keeps_nothing_and_says_so(app, qtbot, notifications):
    viewer, panel, session = app
    session.controller.tile_size = 32
    job = session.segment_view(Region(0, 0, 2967, 2220))
    qtbot.waitUntil(lambda: panel.job_bar.cancel_button.isEnabled(), timeout=5000)
    qtbot.waitUntil(lambda: job.pbar is None or job.pbar.n > 0 or not job.running, timeout=30000)
    panel.job_bar.cancel_button.click()
    qtbot.waitUntil(lambda: not job.running, timeout=30000)
    assert not job.ok
    assert any("cancel" in m.lower() for sev, m in notifications if sev == "info")
    assert not any(lay.name.startswith("hrseg: confidence") for lay in viewer.layers)
    assert panel.job_bar.status.text() == "cancelled"


def test_live_mode_segments_once_the_camera_settles(app, qtbot):
    from napari_hrseg.viewport import camera_of

    viewer, panel, session = app
    started: list[str] = []
    session.job_started.connect(lambda kind, job: started.append(kind))
    session.go_to(Region(300, 300, 1200, 1200))
    panel.live_check.setChecked(True)  # segments the current view at once
    wait_job(qtbot, session, "segment")
    assert started.count("segment") == 1
    camera = camera_of(viewer)
    moved: list[float] = []
    camera.events.center.connect(lambda event: moved.append(time.monotonic()))  # runs right after the watcher
    for i in range(8):  # a pan, its steps 30 ms apart: well within the debounce
        camera.center = (1500 + 60 * i, 1000)
        qtbot.wait(30)
    # On a loaded machine one step can take longer than the debounce (napari slices the slide on each move); the
    # camera has then legitimately settled mid-pan.  Steps closer together than the debounce never segment.
    delay_s = session.watcher.delay_ms / 1000
    long_steps = sum(b - a >= 0.9 * delay_s for a, b in zip(moved, moved[1:]))
    qtbot.waitUntil(lambda: not session.watcher.pending and started.count("segment") >= 2, timeout=10000)
    settles = started.count("segment") - 1
    assert 1 <= settles <= 1 + long_steps, (settles, np.diff(moved))
    wait_job(qtbot, session, "segment")
    assert session.jobs["segment"].result.region.contains(Region(1800, 900, 100, 100))  # the view the pan ended on
    panel.live_check.setChecked(False)
    camera.center = (600, 600)
    qtbot.wait(2 * session.watcher.delay_ms)
    assert started.count("segment") == 1 + settles


def test_a_view_too_large_is_refused_with_a_hint(make_napari_viewer, app_dirs, tissue_model_dir, notifications):
    from napari_hrseg._widgets import SegmentPanel
    from napari_hrseg.virtual import RENDER_COUNTS

    viewer = make_napari_viewer()
    viewer.open_sample("napari-hrseg", "virtual-slide")  # 100,000 x 100,000 px, lazy
    panel = SegmentPanel(viewer)
    session = panel.session
    assert session.load_model_directory(str(tissue_model_dir))
    viewer.reset_view()  # the whole slide: 25,000 x 25,000 px at the model's 2 µm

    def fine_chunks():  # chunks rendered at the model's level (2) or finer
        return sum(n for (kind, level), n in RENDER_COUNTS.by_level().items() if kind == "rgb" and 0 <= level <= 2)

    before = fine_chunks()
    assert session.segment_view() is None
    errors = [m for sev, m in notifications if sev == "error"]
    assert errors and "zoom in" in errors[-1] and "napari-hrseg segment" in errors[-1]
    assert session.controller.store is None  # nothing was opened or written
    assert fine_chunks() == before  # and nothing was read


def test_removing_the_slide_stops_the_work_and_releases_the_store(app, qtbot, notifications):
    from napari_hrseg.labels import LabelStore

    viewer, panel, session = app
    session.controller.tile_size = 64
    session.go_to(Region(600, 300, 1600, 1600))
    job = session.segment_view()
    qtbot.waitUntil(lambda: session.store_layers is not None, timeout=30000)
    path, slide = session.controller.store.path, session.controller.slide
    viewer.layers.remove(viewer.layers[0])  # the slide, while the segmentation runs
    qtbot.waitUntil(lambda: session.controller.slide is None and not job.running, timeout=30000)
    assert session.controller.store is None and session.store_layers is None
    assert not [lay.name for lay in viewer.layers if lay.name.startswith("hrseg: ")]
    assert not panel.segment_button.isEnabled()
    assert not [m for sev, m in notifications if sev == "error"]
    with LabelStore.open(path, slide):  # unlocked
        pass
