"""Shared pieces of the app tests (panels in real napari viewers): a small tissue model trained in the tests, label
stores and model versions kept in the test's folders, waiting for jobs, collecting notifications, painting.

The model is the tissue/glass FPN of `test_inference_support` (trained once per test process on the real CMU-1
slide at 2 µm/px, a few seconds), saved as a model folder the way a user would load it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import REPO

SAMPLE_SLIDE = REPO / "sample_data" / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="session")
def tissue_model_dir(tmp_path_factory, realdata) -> Path:
    """A model folder (config.json + model.safetensors) of the test tissue model, saved once per session."""
    from test_inference_support import single_thread, trained_tissue_model

    from napari_hrseg.models import save_model

    with single_thread():
        model = trained_tissue_model()
    directory = tmp_path_factory.mktemp("tissue-model")
    save_model(model, directory)
    return directory


@pytest.fixture
def app_dirs(tmp_path, monkeypatch) -> Path:
    """Label stores and fine-tuned versions in the test's folder (never beside sample_data/ or in ~)."""
    monkeypatch.setenv("HRSEG_LABELS_DIR", str(tmp_path / "labels"))
    monkeypatch.setenv("HRSEG_DATA_DIR", str(tmp_path / "data"))
    return tmp_path


@pytest.fixture
def notifications():
    """Every napari notification shown during the test (message strings, with their severity)."""
    from napari.utils.notifications import notification_manager

    seen: list[tuple[str, str]] = []

    def collect(notification):
        seen.append((str(getattr(notification, "severity", "")), str(notification.message)))

    notification_manager.notification_ready.connect(collect)
    yield seen
    notification_manager.notification_ready.disconnect(collect)


def wait_job(qtbot, session, kind: str, timeout: int = 60000):
    """Wait for the session's latest ``kind`` job to end; returns it (asserting it succeeded)."""
    qtbot.waitUntil(lambda: kind in session.jobs and not session.jobs[kind].running, timeout=timeout)
    job = session.jobs[kind]
    assert job.ok, f"{kind} job failed: {job.error!r}"
    return job


def drag(layer, MouseEvent, points, button=1):
    """A real brush stroke through napari's mouse callbacks; ``points`` in world (level-0 pixel) coordinates."""
    from napari.utils._proxies import ReadOnlyWrapper
    from napari.utils.interactions import mouse_move_callbacks, mouse_press_callbacks, mouse_release_callbacks

    def ev(kind, pos, dragging):
        return ReadOnlyWrapper(MouseEvent(type=kind, is_dragging=dragging, position=pos, button=button,
                                          view_direction=None, dims_displayed=(0, 1), dims_point=(0, 0)))

    mouse_press_callbacks(layer, ev("mouse_press", points[0], False))
    for p in points[1:]:
        mouse_move_callbacks(layer, ev("mouse_move", p, True))
    mouse_release_callbacks(layer, ev("mouse_release", points[-1], False))


def world_of_pixel(layer, index) -> np.ndarray:
    """World coordinates of a layer's data index (to check that layers align with the slide)."""
    return np.asarray(layer.data_to_world(np.asarray(index, dtype=float)))


def test_support_model_folder_loads(tissue_model_dir):
    from napari_hrseg.models import load_model

    model = load_model(tissue_model_dir)
    assert model.config.class_names == ("glass", "tissue") and model.config.mpp == 2.0
