"""``napari-hrseg info``: succeeds on every slide and image in realdata, fails cleanly on broken input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from _slide_files import truncated_copy
from napari_hrseg.cli import main

SLIDES = [
    "aperio-svs/CMU-1-Small-Region.svs",
    "derived-from-cmu1/CMU-1-Small-Region.vips-pyramid.tif",
    "derived-from-cmu1/CMU-1-Small-Region.ome.tif",
    "derived-from-cmu1/CMU-1-Small-Region.ome.zarr",
    "derived-from-cmu1/CMU-1-Small-Region.ome-v05.zarr",
    "derived-from-cmu1/dicom",
    "vectra-qptiff/pathml_small_vectra.qptiff",
]


def _every_image(root: Path) -> list[Path]:
    images = [p for ext in ("*.png", "*.jpg", "*.tif") for p in root.glob(f"**/{ext}") if "derived" not in p.parts]
    return sorted(images)


def test_info_succeeds_on_every_slide_and_image(realdata, capsys):
    paths = [realdata / s for s in SLIDES] + _every_image(realdata)
    assert len(paths) > 70  # GlaS and MICCAI PNGs with their labels, stardist TIFFs and JPEG
    for path in paths:
        assert main(["info", str(path)]) == 0, path
        out = capsys.readouterr().out
        assert "levels:" in out and "dtype:" in out and "chunks" in out and "vendor:" in out, path
        assert "pixel size:" in out


def test_info_prints_slide_facts(realdata, capsys):
    assert main(["info", str(realdata / SLIDES[0])]) == 0
    out = capsys.readouterr().out
    assert "aperio" in out and "0.4990 x 0.4990 µm" in out and "20x" in out and "chunks 240x240" in out
    assert main(["info", "--json", "--metadata", str(realdata / SLIDES[6])]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["channels"] == ["DAPI", "FITC", "Cy3"] and info["vendor"] == "perkinelmer"
    assert info["levels"][0]["shape"] == [1440, 1920, 3] and info["metadata"]["qptiff.SlideID"] == "RTM61_1"
    assert main(["info", "--mpp", "0.25", str(realdata / "glas-test-subset/images/testA_1.png")]) == 0
    assert "0.2500 x 0.2500 µm" in capsys.readouterr().out


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "napari_hrseg", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("case", ["nonconforming dicom", "truncated file"])
def test_info_fails_cleanly(realdata, tmp_path, case):
    if case == "nonconforming dicom":
        path = realdata / "dicom-wsi/pathml_small_dicom.dcm"
    else:
        path = truncated_copy(realdata / SLIDES[0], tmp_path / "half.svs", keep=0.5)
    result = _run_cli("info", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("napari-hrseg info: error: ") and str(path) in lines[0]
