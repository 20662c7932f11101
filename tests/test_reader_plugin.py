"""The npe2 reader: what it claims, and a real napari viewer opening a good slide and a broken one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from _slide_files import truncated_copy
from napari_hrseg._reader import napari_get_reader
from napari_hrseg.errors import CorruptSlideError
from napari_hrseg.io._source import chunk_decode_count

SVS = "aperio-svs/CMU-1-Small-Region.svs"


def test_get_reader_declines_what_it_does_not_read(realdata, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "plain-folder").mkdir()
    (tmp_path / "plain-folder" / "a.txt").write_text("x")
    assert napari_get_reader([str(realdata / SVS)]) is None  # napari's stacking lists
    assert napari_get_reader(str(tmp_path / "notes.txt")) is None  # unknown extension, no image content
    assert napari_get_reader(str(tmp_path / "plain-folder")) is None  # neither zarr nor DICOM
    assert napari_get_reader(str(tmp_path / "missing.xyz")) is None


@pytest.mark.parametrize(
    "relpath",
    [SVS, "derived-from-cmu1/CMU-1-Small-Region.ome.zarr", "derived-from-cmu1/dicom", "stardist-wheel/histo.jpg"],
)
def test_get_reader_returns_one_lazy_multiscale_layer(realdata, relpath):
    reader = napari_get_reader(str(realdata / relpath))
    assert callable(reader)
    before = chunk_decode_count()
    [(data, kwargs, layer_type)] = reader(str(realdata / relpath))
    assert chunk_decode_count() == before, "reading for napari must not decode tiles"
    assert layer_type == "image" and kwargs["rgb"] is True
    assert isinstance(data, list) and data[0].shape[2] == 3
    assert kwargs["metadata"]["hrseg_slide"].path == realdata / relpath


def test_broken_file_with_our_extension_is_claimed_to_explain(tmp_path):
    empty = tmp_path / "empty.svs"
    empty.write_bytes(b"")
    reader = napari_get_reader(str(empty))
    assert reader is not None
    with pytest.raises(CorruptSlideError, match="empty"):
        reader(str(empty))


def test_real_viewer_opens_good_slide_and_survives_broken_one(make_napari_viewer, qtbot, realdata, tmp_path):
    viewer = make_napari_viewer(show=True)
    layers = viewer.open(str(realdata / SVS), plugin="napari-hrseg")
    assert len(layers) == 1 and layers[0].multiscale and layers[0].rgb
    assert layers[0].data[0].shape == (2967, 2220, 3)

    broken = truncated_copy(realdata / SVS, tmp_path / "interrupted-copy.svs", keep=0.5)
    # asked for our plugin explicitly, napari passes our error through
    with pytest.raises(CorruptSlideError, match="truncated"):
        viewer.open(str(broken), plugin="napari-hrseg")
    # File > Open: napari builtins also claim .svs, so as a user who chose "remember napari-hrseg for .svs" we set
    # the preference; napari then shows its reader dialog with our reason in it (a modal dialog, closed here)
    seen = _open_in_gui_and_read_dialog(viewer, broken, qtbot)
    assert str(broken) in seen and "truncated" in seen and "copy the slide again" in seen

    # the viewer is still usable: the good layer is intact, another slide opens, the canvas draws
    assert len(viewer.layers) == 1
    more = viewer.open(str(realdata / "stardist-wheel/histo.jpg"), plugin="napari-hrseg")
    assert len(more) == 1 and len(viewer.layers) == 2
    viewer.reset_view()
    qtbot.wait(100)
    shot = viewer.screenshot(canvas_only=True, flash=False)
    assert shot.ndim == 3 and np.any(shot[..., :3] > 0), "the canvas still draws"


def _open_in_gui_and_read_dialog(viewer, path: Path, qtbot) -> str:
    """Open ``path`` through the Qt viewer as File > Open does; return the text of the dialog napari shows."""
    from napari.settings import get_settings
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication, QLabel

    settings = get_settings().plugins
    saved = dict(settings.extension2reader)
    settings.extension2reader = {**saved, "*.svs": "napari-hrseg"}
    texts: list[str] = []

    def read_and_close() -> None:
        dialog = QApplication.activeModalWidget()
        if dialog is None:
            QTimer.singleShot(50, read_and_close)
            return
        texts.append("\n".join(label.text() for label in dialog.findChildren(QLabel)))
        dialog.reject()

    QTimer.singleShot(50, read_and_close)
    try:
        viewer.window._qt_viewer._qt_open([str(path)], stack=False)
    finally:
        settings.extension2reader = saved
    qtbot.waitUntil(lambda: bool(texts), timeout=5000)
    return texts[0]
