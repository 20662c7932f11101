"""The Export panel in a real viewer: CSV measurements and OME-TIFF of the view, the suggested path, and an
export that cannot be written (a clear notification, nothing left behind)."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from napari_hrseg.geometry import Region

from test_app_support import app_dirs, notifications, tissue_model_dir, wait_job  # noqa: F401
from test_inference_support import one_torch_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VIEW = Region(1100, 500, 1000, 1000)


def test_exports_of_the_view_and_a_refused_target(make_napari_viewer, qtbot, app_dirs, tissue_model_dir, tmp_path,
                                                  notifications):
    import tifffile

    from napari_hrseg._widgets import ExportPanel, SegmentPanel
    from napari_hrseg.export import read_label_tiff_metadata

    viewer = make_napari_viewer()
    viewer.open_sample("napari-hrseg", "small-real-slide")
    SegmentPanel(viewer)
    panel = ExportPanel(viewer)
    session = panel.session
    assert panel.export_button.isEnabled() == (session.controller.active is not None)  # shipped weights or none
    assert session.load_model_directory(str(tissue_model_dir))
    session.go_to(VIEW)
    session.segment_view()
    wait_job(qtbot, session, "segment")
    store = session.controller.store
    # the suggested target: beside the store, named after the slide, the model and the scope
    assert panel.path_edit.text().endswith("CMU-1-Small-Region-tissue-test-view.ome.zarr")
    assert panel.path_edit.text().startswith(str(store.path.parent))

    view = session.view()
    panel.format_combo.setCurrentIndex(panel.format_combo.findData("csv"))
    panel.path_edit.setText(str(tmp_path / "objects.csv"))
    with qtbot.waitSignal(session.exported, timeout=60000):
        panel.export_button.click()
    rows = list(csv.DictReader(open(tmp_path / "objects.csv")))
    assert rows and {r["class"] for r in rows} <= {"glass", "tissue"}
    assert all(float(r["area_um2"]) > 0 for r in rows)

    panel.format_combo.setCurrentIndex(panel.format_combo.findData("ome-tiff"))
    panel.path_edit.setText(str(tmp_path / "view.ome.tif"))
    with qtbot.waitSignal(session.exported, timeout=60000):
        panel.export_button.click()
    pixels = tifffile.imread(tmp_path / "view.ome.tif")
    np.testing.assert_array_equal(np.squeeze(pixels), store.read(store.to_working(view).clip(store.shape)))
    assert read_label_tiff_metadata(tmp_path / "view.ome.tif") is not None

    # a target in a folder that cannot be created: one notification, no partial file
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    panel.format_combo.setCurrentIndex(panel.format_combo.findData("geojson"))
    panel.path_edit.setText(str(blocker / "out.geojson"))
    panel.export_button.click()
    qtbot.waitUntil(lambda: not session.jobs["export"].running, timeout=30000)
    assert not session.jobs["export"].ok
    errors = [m for sev, m in notifications if sev == "error"]
    assert len(errors) == 1 and "a-file" in errors[0] and "folder" in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(("labels", "data"))) == [
        "a-file", "objects.csv", "view.ome.tif"]
