"""``napari-hrseg view``: bad input ends in one line before any window opens; in a real viewer it shows the slide
(default: the virtual 100,000 x 100,000 slide, nothing rendered at full resolution) with the four panels docked and
the keyboard shortcuts bound."""

from __future__ import annotations

import pytest

from napari_hrseg.cli import main

from test_app_support import SAMPLE_SLIDE, app_dirs, tissue_model_dir  # noqa: F401


def test_view_refuses_bad_input_in_one_line(tmp_path, capsys):
    assert main(["view", str(tmp_path / "missing.svs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.svs" in err[0]
    assert main(["view", str(SAMPLE_SLIDE), "--model", "no-such-model"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no-such-model" in err[0] and "Load model directory" in err[0]


def test_view_help_names_the_shortcuts(capsys):
    with pytest.raises(SystemExit):
        main(["view", "--help"])
    out = capsys.readouterr().out
    assert "Shift-S" in out and "--labels" in out and "--model" in out


def test_open_view_docks_the_panels_on_the_virtual_slide(make_napari_viewer, app_dirs, tissue_model_dir):
    from app_model.types import KeyBinding

    from napari_hrseg.cli.view import open_view
    from napari_hrseg.virtual import RENDER_COUNTS

    def fine_chunks():
        return sum(n for (kind, level), n in RENDER_COUNTS.by_level().items() if kind == "rgb" and level <= 3)

    before = fine_chunks()
    viewer = make_napari_viewer()
    panels = open_view(viewer, model=str(tissue_model_dir), method="sliding_window")
    assert list(panels) == ["Segment", "Review", "Improve model", "Export"]
    slide_layer = viewer.layers[0]
    assert slide_layer.metadata["hrseg_slide"].shape[:2] == (100_000, 100_000)
    assert [lay.visible for lay in viewer.layers] == [True, False, False]  # ground truth hidden
    session = panels["Segment"].session
    assert session.controller.active.label == "tissue-test@1" and session.controller.method == "sliding_window"
    assert fine_chunks() == before  # opening and docking rendered nothing at full resolution
    bound = {str(k) for k in viewer.keymap}
    for key in ("Shift+S", "Shift+R", "Shift+N"):
        assert str(KeyBinding.from_str(key)) in bound
