"""The multi-scale methods in the app, on the real CMU-1 sample: MagNet paints its coarse stage first and shows one
uncertainty layer per stage and its refined points; multi-scale attention shows one attention layer per scale (and
MagNet's layers go); the instance model's objects land in an instance label store and as outlines.  Every layer
sits over the slide's pixels at its own pixel size."""

from __future__ import annotations

import numpy as np
import pytest

from napari_hrseg.geometry import Region

from test_app_support import app_dirs, notifications, world_of_pixel  # noqa: F401
from test_inference_support import one_torch_thread  # noqa: F401

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]


def saved(model, tmp_path, name):
    from napari_hrseg.models import save_model

    model.config = model.config.evolve(name=name)
    return save_model(model, tmp_path / name)


def test_magnet_attention_and_instances_layers(make_napari_viewer, qtbot, app_dirs, tmp_path, realdata, notifications):
    from test_pipeline_support import nuclei_model, tissue_model

    from napari_hrseg._widgets import SegmentPanel
    from napari_hrseg._widgets._layers import OUTLINE_PX

    viewer = make_napari_viewer()
    viewer.open_sample("napari-hrseg", "small-real-slide")
    panel = SegmentPanel(viewer)
    session = panel.session
    assert session.load_model_directory(str(saved(tissue_model("magnet"), tmp_path, "tissue-magnet")))
    assert "runs as magnet" in panel.info.text()  # "automatic" picks MagNet for a MagNet model
    session.go_to(Region(1000, 600, 1200, 1200))  # 600 x 600 px at the model's 2 µm: stages and points still show

    updates = []
    session.segmented.connect(updates.append)
    stages = []
    original = session._segment_event

    def spy(event):
        from napari_hrseg._widgets._jobs import ViewUpdate

        if isinstance(event, ViewUpdate):
            stages.append((event.stage, event.prediction.grid.downsample[0], event.final))
        original(event)

    session._segment_event = spy
    session.segment_view()
    qtbot.waitUntil(lambda: len(updates) == 1, timeout=90000)
    qtbot.waitUntil(lambda: not session.results.busy, timeout=20000)
    # the coarse stage was painted first, on a coarser grid, then the refinements
    finals = [s for s in stages if s[2]]
    assert stages[0][0] == 1 and not stages[0][2] and finals, stages
    assert stages[0][1] > finals[0][1] * 3
    prediction = updates[0].prediction
    names = {lay.name for lay in viewer.layers}
    for key, (grid, extent) in prediction.grids.items():
        if key in prediction.maps.get("uncertainty", {}):
            title = next(n for n in names if n.startswith("hrseg: uncertainty (") and f"{grid.mpp:.2g} µm/px" in n
                         and (key.replace("stage", "stage ") in n or (key == "output" and "final" in n)))
            layer = next(lay for lay in viewer.layers if lay.name == title)
            dy = grid.downsample[0]
            np.testing.assert_allclose(world_of_pixel(layer, (0, 0))[0], extent.row * dy + (dy - 1) / 2, atol=1e-6)
    assert {"hrseg: uncertainty (stage 1, 8 µm/px)", "hrseg: uncertainty (stage 2, 4 µm/px)"} <= names
    points = session.results.points
    n = len(prediction.points)
    assert n > 0 and points is not None and len(points.data) == min(n, 20000)
    shown = np.asarray(points.data)
    assert np.isin(shown.view([("", shown.dtype)] * 2), prediction.points.view([("", shown.dtype)] * 2)).all()
    assert points.name.startswith("hrseg: refined points (MagNet")

    # multi-scale attention: attention per scale; MagNet's stage layers are gone, the final maps updated in place
    assert session.load_model_directory(str(saved(tissue_model("hmsa"), tmp_path, "tissue-hmsa")))
    session.segment_view()
    qtbot.waitUntil(lambda: len(updates) == 2, timeout=90000)
    qtbot.waitUntil(lambda: not session.results.busy, timeout=20000)
    assert updates[1].prediction.method == "hmsa"
    names = {lay.name for lay in viewer.layers}
    attention = sorted(n for n in names if n.startswith("hrseg: attention ("))
    assert len(attention) == len(updates[1].prediction.maps["attention"]) >= 2
    assert "hrseg: uncertainty (stage 1, 8 µm/px)" not in names
    assert sum(n.startswith("hrseg: labels (") and not n.endswith("(overview)") for n in names) == 1  # new store

    # instances: object ids in an instance store, outlines over them
    assert session.load_model_directory(str(saved(nuclei_model(), tmp_path, "nuclei-test")))
    assert "runs as instances" in panel.info.text()
    session.go_to(Region(1500, 900, 400, 400))
    session.segment_view()
    qtbot.waitUntil(lambda: len(updates) == 3, timeout=90000)
    qtbot.waitUntil(lambda: not session.results.busy, timeout=20000)
    prediction = updates[2].prediction
    store = session.controller.store
    assert store.kind == "instance" and prediction.instances.max() > 3
    outlines = session.results.instances
    assert outlines is not None and outlines.contour == OUTLINE_PX  # drawn as outlines, not filled
    colors = outlines.colormap.map(np.array([0, 1, 2, int(prediction.instances.max())]))
    assert colors[0][3] == 0 and (colors[1:] == colors[1]).all() and colors[1][3] == 1  # one colour for all objects
    np.testing.assert_array_equal(np.asarray(outlines.data), prediction.instances)
    ids = store.read_region(prediction.region)
    assert len(np.unique(ids[ids > 0])) >= prediction.instances.max() * 0.8  # objects in the store, renumbered
    assert set(store.instance_classes.values()) <= {1}
    assert not [m for sev, m in notifications if sev == "error"]
