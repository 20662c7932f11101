"""The whole app, scripted, in real napari viewers under Xvfb: open the sample slide (File > Open Sample), dock the
panels from the npe2 manifest, zoom in, segment the view (Shift-S), paint a correction, mark the view reviewed
(Shift-R), improve the model for a few steps, see the view re-segmented by the new version, export GeoJSON and
OME-Zarr, close the viewer, open a new one: the correction, the review and the new version are all still there.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_hrseg.geometry import Region

from test_app_support import app_dirs, drag, notifications, tissue_model_dir, wait_job, world_of_pixel  # noqa: F401
from test_inference_support import one_torch_thread  # noqa: F401

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]

VIEW = Region(1100, 500, 1000, 1000)  # level-0 pixels of the CMU-1 sample: tissue with glass on its left


def press(viewer, qtbot, key: str) -> None:
    """Type a Shift+key on the canvas, as a user would (the panels' shortcuts are bound on the viewer)."""
    from qtpy.QtCore import Qt

    native = viewer.window._qt_viewer.canvas.native
    qtbot.keyClick(native, getattr(Qt.Key, f"Key_{key}"), Qt.KeyboardModifier.ShiftModifier)


def dock_from_manifest(viewer) -> dict:
    panels = {}
    for name in ("Segment", "Review", "Improve model", "Export"):
        _dock, widget = viewer.window.add_plugin_dock_widget("napari-hrseg", name)
        panels[name] = widget
    return panels


def test_segment_correct_review_improve_export_and_reopen(make_napari_viewer, qtbot, tissue_model_dir, app_dirs,
                                                          MouseEvent, notifications, tmp_path):
    from napari_hrseg.labels import LabelStore
    from napari_hrseg.training.ranking import tissue_mask

    viewer = make_napari_viewer()
    viewer.open_sample("napari-hrseg", "small-real-slide")
    panels = dock_from_manifest(viewer)
    segment, review, improve, export = (panels[k] for k in ("Segment", "Review", "Improve model", "Export"))
    session = segment.session
    assert all(p.session is session for p in panels.values())  # one session per viewer
    slide = session.controller.slide
    assert slide is not None and slide.name == "CMU-1-Small-Region"
    from napari_hrseg.models import shipped_models

    if not shipped_models():  # no model yet: the panel says what to do
        assert not segment.segment_button.isEnabled() and "Load model directory" in segment.info.text()
    elif "tissue" in shipped_models():  # the shipped tissue model is the default
        assert session.controller.active.name == "tissue" and segment.segment_button.isEnabled()

    assert session.load_model_directory(str(tissue_model_dir))
    assert segment.segment_button.isEnabled() and segment.model_combo.currentText() == "tissue-test"
    assert [review.classes.item(i).text() for i in range(review.classes.count())] == ["0  glass", "1  tissue"]

    # ---- zoom somewhere and segment the view with the keyboard shortcut
    session.go_to(VIEW)
    view = session.view()
    assert view.contains(VIEW.expand(-50)) and view.area < 3 * VIEW.area
    with qtbot.waitSignal(session.segmented, timeout=60000) as got:
        press(viewer, qtbot, "S")
    update = got.args[0]
    prediction = update.prediction
    store = session.controller.store
    layers = session.store_layers
    assert layers is not None and layers.editor.name == "hrseg: labels (tissue-test)"
    assert store.path.is_relative_to(app_dirs / "labels")
    # the labels (store working level = the slide's 2 µm level) follow the slide's tissue: the layers align
    labels = store.read_region(view)
    image = slide.read(view, level=store.level)
    assert labels.shape == image.shape[:2]
    agree = float(np.mean(labels == tissue_mask(image)))
    assert agree > 0.85, agree
    # map layers, named with their pixel size, over the same pixels as the slide (level-0 units)
    qtbot.waitUntil(lambda: not session.results.busy, timeout=10000)  # new layers are set up one per turn
    maps = {layer.name: layer for layer in viewer.layers if layer.name.startswith("hrseg: ")}
    conf = maps["hrseg: confidence (final, 2 µm/px)"]
    unc = maps["hrseg: uncertainty (final, 2 µm/px)"]
    dy, dx = prediction.grid.downsample
    g = prediction.grid_region
    for layer in (conf, unc):
        np.testing.assert_allclose(world_of_pixel(layer, (0, 0)), (g.row * dy + (dy - 1) / 2, g.col * dx + (dx - 1) / 2))
        np.testing.assert_allclose(layer.scale, (dy, dx))
    assert not conf.visible and layers.editor.visible
    n_layers = len(viewer.layers)

    # ---- paint a correction: "glass" drawn across tissue, with the Review panel's class list and a brush stroke
    review.classes.itemClicked.emit(review.classes.item(0))
    editor = layers.editor
    assert editor.mode == "paint" and editor.selected_label == 0
    editor.brush_size = 12
    row = VIEW.row + 600
    tissue_cols = [c for c in range(VIEW.col + 400, VIEW.end_col - 40, 8)
                   if store.read_region(Region(row, c, 1, 1))[0, 0] == 1]
    assert len(tissue_cols) > 20
    stroke = [(float(row), float(c)) for c in tissue_cols[:40]]
    drag(editor, MouseEvent, stroke)
    groups = store.history("user")
    assert len(groups) == 1 and groups[0].author == session.controller.user
    painted = store.to_working(Region(row, stroke[0][1], 1, int(stroke[-1][1] - stroke[0][1])))
    assert not store.read(painted).any()  # glass where the stroke went
    assert "1 strokes" in review.counts.text()

    # ---- mark the view reviewed with the shortcut
    press(viewer, qtbot, "R")
    wait_job(qtbot, session, "review")  # journalled and fsynced in a worker
    reviewed = store.reviews()[0]
    assert reviewed.model_version == "tissue-test@1" and reviewed.region == session.view()
    qtbot.waitUntil(lambda: not session.results.busy, timeout=10000)
    overlay = session.results.reviews
    assert overlay is not None and len(overlay.data) == 1 and "1 regions" in review.counts.text()

    # ---- improve the model (a few steps), which then re-segments the view with the new version
    improve.steps.setValue(4)
    with qtbot.waitSignal(session.improved, timeout=90000) as got:
        improve.improve_button.click()
    finished = got.args[0]
    assert finished.version == "2" and finished.path.is_relative_to(app_dirs / "data" / "models")
    assert session.controller.active.label == "tissue-test@2"
    assert [improve.version_combo.itemData(i) for i in range(improve.version_combo.count())] == [
        "tissue-test@1", "tissue-test@2"]
    job = wait_job(qtbot, session, "segment")
    qtbot.waitUntil(lambda: not session.results.busy, timeout=10000)
    assert job.result.model_version == "tissue-test@2"
    assert not store.read(painted).any()  # the new prediction did not overwrite the correction
    assert len(viewer.layers) == n_layers + 1  # maps updated in place; only the review overlay was added

    # ---- export GeoJSON (the view) and OME-Zarr (the whole slide) from the Export panel
    geojson = tmp_path / "view.geojson"
    export.format_combo.setCurrentIndex(export.format_combo.findData("geojson"))
    export.view_radio.setChecked(True)
    export.path_edit.setText(str(geojson))
    with qtbot.waitSignal(session.exported, timeout=60000):
        export.export_button.click()
    collection = json.loads(geojson.read_text())
    assert collection["type"] == "FeatureCollection" and collection["features"]
    names = {f["properties"]["classification"]["name"] for f in collection["features"]}
    assert names <= {"glass", "tissue"} and "tissue" in names
    xs = [x for f in collection["features"] for ring in f["geometry"]["coordinates"][:1] for x, _ in ring
          if f["geometry"]["type"] == "Polygon"]
    assert xs and min(xs) >= view.col - 4 and max(xs) <= view.end_col + 4  # slide coordinates, cut at the view

    zarr_path = tmp_path / "slide.ome.zarr"
    export.format_combo.setCurrentIndex(export.format_combo.findData("ome-zarr"))
    export.slide_radio.setChecked(True)
    export.path_edit.setText(str(zarr_path))
    with qtbot.waitSignal(session.exported, timeout=60000) as got:
        export.export_button.click()
    import zarr

    group = zarr.open_group(str(got.args[0]), mode="r")
    level0 = np.asarray(group["0"])
    np.testing.assert_array_equal(np.squeeze(level0), store.read(Region(0, 0, *store.shape)))
    assert not [m for sev, m in notifications if sev == "error"]

    # ---- close, reopen: the correction, the review and version 2 are there
    store_path = store.path
    viewer.close()
    assert session.closed and session.controller.store is None
    with LabelStore.open(store_path, slide) as again:  # the lock was released
        assert not again.read(painted).any()

    viewer2 = make_napari_viewer()
    viewer2.open_sample("napari-hrseg", "small-real-slide")
    from napari_hrseg._widgets import dock_panels

    panels2 = dock_panels(viewer2)
    session2 = panels2["Segment"].session
    assert session2 is not session
    assert session2.load_model_directory(str(tissue_model_dir))
    labels2 = [panels2["Improve model"].version_combo.itemData(i)
               for i in range(panels2["Improve model"].version_combo.count())]
    assert labels2 == ["tissue-test@1", "tissue-test@2"]  # the improved version was kept for this user
    session2.go_to(VIEW)
    session2.ensure_store(lambda: None)
    wait_job(qtbot, session2, "store")
    assert session2.controller.store.path == store_path
    editor2 = session2.store_layers.editor
    shown = np.asarray(editor2.data)
    win = session2.store_layers.window
    assert not shown[painted.relative_to(win).slices].any()  # the correction, in the reopened viewer's layer
    qtbot.waitUntil(lambda: session2.results.reviews is not None, timeout=10000)
    assert len(session2.results.reviews.data) == 1
    assert session2.controller.stats()["corrections"] == 1
