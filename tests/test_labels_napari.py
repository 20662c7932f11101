"""Painting into a label store from a real napari viewer (Xvfb): brush, fill, drag strokes, undo across sessions."""

from __future__ import annotations

import resource

import dask.array as da
import numpy as np
import pytest

from test_app_support import drag

from napari_hrseg.geometry import Region
from napari_hrseg.labels import LabelStore
from napari_hrseg.slide import Slide

pytest.importorskip("napari")


@pytest.fixture(scope="module")
def slide() -> Slide:
    level0 = da.zeros((8000, 12000, 3), dtype=np.uint8, chunks=2048)
    return Slide(levels=(level0, level0[::2, ::2], level0[::4, ::4]), mpp_yx=(0.25, 0.25), name="napari-test")


@pytest.fixture
def store(tmp_path, slide):
    s = LabelStore.create(tmp_path / "v.hrseg-labels", slide, level=1, class_names=["bg", "tumour", "stroma"],
                          chunk_size=256)
    yield s
    s.close()


def test_every_stroke_reaches_the_store_and_undo_survives_reopening(make_napari_viewer, MouseEvent, store, slide):
    from napari.layers.labels._labels_key_bindings import redo as ctrl_shift_z
    from napari.layers.labels._labels_key_bindings import undo as ctrl_z

    from napari_hrseg.labels.napari_bridge import add_label_store_layers

    viewer = make_napari_viewer()
    layers = add_label_store_layers(viewer, store, window=Region(2000, 4000, 2048, 2048), author="dr n")
    editor = layers.editor
    win = layers.window
    assert win == Region(1000, 2000, 1024, 1024)  # working level = level 1, downsample 2
    assert tuple(editor.scale) == (2, 2) and tuple(editor.translate) == (2000.5, 4000.5)
    assert layers.overview.multiscale and not layers.overview.editable

    # 1. the layer's paint API (data coordinates of the window)
    editor.brush_size = 40
    editor.paint((100, 100), 1)
    # 2. a flood fill inside that disc
    editor.fill((100, 100), 2)
    # 3. a drag stroke through napari's mouse bindings, in world (level-0) coordinates
    editor.mode = "paint"
    editor.selected_label = 1
    editor.brush_size = 20
    stroke = [(2000.5 + 2 * 400, 4000.5 + 2 * x) for x in range(300, 700, 25)]
    drag(editor, MouseEvent, stroke)
    # 4. napari's fancy-index editing
    editor.data_setitem((np.array([10, 11, 12]), np.array([20, 20, 20])), 2)

    groups = store.history("user")
    assert len(groups) == 4 and all(g.author == "dr n" for g in groups)  # one undo step per napari history item
    shown = np.asarray(editor.data)
    assert shown[100, 100] == 2 and shown[400, 300:680].all() and shown[10:13, 20].tolist() == [2, 2, 2]
    assert np.array_equal(store.read(win), shown)  # every stroke is in the store ...
    assert store.read(Region(win.row + 400, win.col + 500, 1, 1))[0, 0] == 1  # ... where the world position says
    overview = np.asarray(layers.overview.data[0][win.row + 400, win.col + 500])  # the overview sees it too
    assert overview == 1

    # Ctrl+Z is routed to the store.
    ctrl_z(editor)
    assert store.read(Region(win.row + 10, win.col + 20, 3, 1)).sum() == 0
    assert np.asarray(editor.data)[10:13, 20].sum() == 0
    layers.close()
    store.close()

    # Reopen from disk, in a new viewer: every stroke is there, and undo still undoes, stroke by stroke.
    with LabelStore.open(store.path, slide) as again:
        expected = shown.copy()
        expected[10:13, 20] = 0
        assert np.array_equal(again.read(win), expected)
        viewer2 = make_napari_viewer()
        layers2 = add_label_store_layers(viewer2, again, window=Region(2000, 4000, 2048, 2048))
        ctrl_z(layers2.editor)  # undoes the drag stroke of the previous session
        now = np.asarray(layers2.editor.data)
        assert not now[400, 300:700].any() and now[100, 100] == 2
        ctrl_z(layers2.editor)  # the fill
        assert np.asarray(layers2.editor.data)[100, 100] == 1
        ctrl_shift_z(layers2.editor)
        assert np.asarray(layers2.editor.data)[100, 100] == 2
        layers2.close()


def test_long_stroke_is_committed_while_painting(make_napari_viewer, MouseEvent, qtbot, store):
    """A stroke longer than commit_ms is journalled part-way (durable) yet stays one undo step."""
    from napari.utils._proxies import ReadOnlyWrapper
    from napari.utils.interactions import mouse_move_callbacks, mouse_press_callbacks, mouse_release_callbacks

    from napari_hrseg.labels.napari_bridge import add_label_store_layers

    viewer = make_napari_viewer()
    layers = add_label_store_layers(viewer, store, window=Region(0, 0, 2048, 2048), commit_ms=50)
    editor = layers.editor
    editor.mode, editor.selected_label, editor.brush_size = "paint", 2, 30

    def ev(kind, pos, dragging):
        return ReadOnlyWrapper(MouseEvent(type=kind, is_dragging=dragging, position=pos, button=1,
                                          view_direction=None, dims_displayed=(0, 1), dims_point=(0, 0)))

    mouse_press_callbacks(editor, ev("mouse_press", (500.5, 500.5), False))
    mouse_move_callbacks(editor, ev("mouse_move", (500.5, 900.5), True))
    qtbot.waitUntil(lambda: store.last_seq == 1, timeout=3000)  # durable before the mouse is released
    mouse_move_callbacks(editor, ev("mouse_move", (900.5, 900.5), True))
    mouse_release_callbacks(editor, ev("mouse_release", (900.5, 900.5), False))
    assert store.last_seq == 2
    (group,) = store.history("user")
    assert group.frames == [1, 2]
    store.undo()
    assert store.read(layers.window).sum() == 0
    layers.close()


def test_moving_the_window_paints_the_right_place(make_napari_viewer, qtbot, store):
    from napari_hrseg.labels.napari_bridge import add_label_store_layers, visible_region

    viewer = make_napari_viewer()
    layers = add_label_store_layers(viewer, store, max_window=512)
    assert layers.window.shape == (512, 512)
    layers.set_window(Region(2000, 4000, 4000, 4000))  # larger than max_window: centred and capped
    assert layers.window == Region(1744, 2744, 512, 512)
    layers.editor.brush_size = 10
    layers.editor.paint((0, 0), 1)
    assert store.read(Region(1744, 2744, 1, 1))[0, 0] == 1
    viewer.camera.center = (1000, 3000)
    viewer.camera.zoom = 1.0
    region = visible_region(viewer)
    assert region.contains(Region(999, 2999, 2, 2))
    layers.follow_view(margin=0)
    assert layers.window.contains(store.to_working(Region(1000, 3000, 1, 1)))
    # Following the camera: pan elsewhere, and after the pause the window moves there.
    layers.follow(delay_ms=20)
    viewer.camera.center = (7000, 11000)
    qtbot.waitUntil(lambda: layers.window.contains(store.to_working(Region(7000, 11000, 1, 1))), timeout=3000)
    layers.close()


def test_full_disk_during_a_stroke_keeps_the_viewer_up_and_the_store_intact(make_napari_viewer, store, monkeypatch):
    """A real file-size limit makes the journal append fail: the stroke is not kept, the user sees the error."""
    import napari.utils.notifications as notifications

    from napari_hrseg.labels.napari_bridge import add_label_store_layers

    shown_errors = []
    monkeypatch.setattr(notifications, "show_error", lambda msg: shown_errors.append(msg))
    viewer = make_napari_viewer()
    layers = add_label_store_layers(viewer, store, window=Region(0, 0, 1024, 1024))
    layers.editor.brush_size = 30
    layers.editor.paint((50, 50), 1)  # fits
    before = store.read(layers.window)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (store.journal_bytes, hard))  # the journal cannot grow at all
    try:
        layers.editor.paint((200, 200), 2)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert shown_errors and "not applied" in shown_errors[0]
    assert np.array_equal(store.read(layers.window), before)  # the failed dab was rolled back ...
    assert np.array_equal(np.asarray(layers.editor.data), before)  # ... and the layer shows the store again
    layers.editor.paint((300, 300), 2)  # space again: painting goes on
    assert store.read(Region(300, 300, 1, 1))[0, 0] == 2
    layers.close()
