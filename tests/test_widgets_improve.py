"""The Improve-model panel in a real viewer: improving without corrections explains itself, cancelling saves no
version, the version picker, and the A/B comparison of two versions on the view."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_hrseg.geometry import Region

from test_app_support import app_dirs, notifications, tissue_model_dir, wait_job  # noqa: F401
from test_inference_support import one_torch_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def app(make_napari_viewer, app_dirs, tissue_model_dir):
    from napari_hrseg._widgets import ImprovePanel, SegmentPanel

    viewer = make_napari_viewer()
    viewer.open_sample("napari-hrseg", "small-real-slide")
    SegmentPanel(viewer)
    panel = ImprovePanel(viewer)
    assert panel.session.load_model_directory(str(tissue_model_dir))
    panel.session.go_to(Region(900, 400, 1400, 1400))
    return viewer, panel, panel.session


def test_improving_without_corrections_says_what_to_do(app, qtbot, notifications, app_dirs):
    viewer, panel, session = app
    panel.steps.setValue(3)
    panel.improve_button.click()
    qtbot.waitUntil(lambda: "improve" in session.jobs and not session.jobs["improve"].running, timeout=30000)
    assert not session.jobs["improve"].ok
    errors = [m for sev, m in notifications if sev == "error"]
    assert errors and "no corrections to learn from" in errors[-1] and "paint over" in errors[-1]
    assert session.controller.active.label == "tissue-test@1"
    assert not (app_dirs / "data" / "models").exists()


def test_cancelled_fine_tuning_saves_no_version(app, qtbot, app_dirs, notifications):
    viewer, panel, session = app
    store = session.controller.open_store()  # empty (never segmented): paint "tissue" as the correction
    box = store.to_working(Region(1200, 700, 300, 300))
    store.write(box, np.ones(box.shape, np.uint8), source="user", author="test")
    panel.steps.setValue(5000)
    panel.improve_button.click()
    job = session.jobs["improve"]
    qtbot.waitUntil(lambda: job.pbar is not None and job.pbar.n >= 1 or not job.running, timeout=60000)
    panel.job_bar.cancel_button.click()
    qtbot.waitUntil(lambda: not job.running, timeout=30000)
    assert not job.ok and session.controller.active.label == "tissue-test@1"
    assert not any((app_dirs / "data" / "models").glob("*/*/model.safetensors"))
    assert any("cancel" in m.lower() for sev, m in notifications if sev == "info")


def test_versions_and_the_comparison_on_the_view(app, qtbot, app_dirs):
    from napari_hrseg._widgets._workspace import models_dir
    from napari_hrseg.models import load_model, save_model

    viewer, panel, session = app
    # a second version as fine-tuning would leave it in the user's model folder (here: the tissue logit biased)
    model = load_model(session.controller.active.path)
    with torch.no_grad():
        last = [p for n, p in model.named_parameters() if n.endswith("bias")][-1]
        last[1] += 1.5
    model.config = model.config.evolve(version="2")
    save_model(model, models_dir("tissue-test") / "2")
    panel.refresh()
    assert [panel.version_combo.itemData(i) for i in range(panel.version_combo.count())] == [
        "tissue-test@1", "tissue-test@2"]
    assert panel.a_combo.currentData() == "tissue-test@1" and panel.b_combo.currentData() == "tissue-test@2"
    assert panel.compare_button.isEnabled()

    with qtbot.waitSignal(session.compared, timeout=60000) as got:
        panel.compare_button.click()
    result = got.args[0]
    qtbot.waitUntil(lambda: not session.results.busy, timeout=10000)
    a, b, diff = (session.results.compare[k] for k in ("compare-a", "compare-b", "compare-diff"))
    assert a.name == "hrseg: compare A (tissue-test@1)" and b.name == "hrseg: compare B (tissue-test@2)"
    assert a.visible and not b.visible
    assert 0.0 < result.agreement < 1.0 and f"{100 * result.agreement:.1f}%" in panel.agreement.text()
    np.testing.assert_array_equal(np.asarray(diff.data), (result.labels_a != result.labels_b).astype(np.uint8))
    assert (result.labels_b == 1).sum() > (result.labels_a == 1).sum()  # the biased version sees more tissue
    assert session.controller.store is None  # comparing writes no labels
    panel.swap_button.click()
    assert b.visible and not a.visible

    # pick version 2: it becomes active and segments the view
    panel.version_combo.setCurrentIndex(1)
    panel.use_button.click()
    assert session.controller.active.label == "tissue-test@2"
    job = wait_job(qtbot, session, "segment")
    assert job.result.model_version == "tissue-test@2"
