"""``napari-hrseg segment`` end to end: one slide, a folder of slides, clear errors, and resuming a run whose
process was killed mid-way (SIGKILL, not a polite cancel)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from napari_hrseg.cli import main
from napari_hrseg.geometry import Region
from napari_hrseg.inference import InferenceOptions, InferenceRequest, run_request, run_to_completion
from napari_hrseg.models import load_model, save_model
from napari_hrseg.slide import open_slide

from test_inference_support import CMU1, CMU1_PYRAMID, one_torch_thread, trained_tissue_model  # noqa: F401
from test_wholeslide import read_ome_zarr_labels

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model(trained_tissue_model(), tmp_path_factory.mktemp("models") / "tissue-test")


def _segment(*args: str) -> int:
    return main(["segment", *map(str, args), "--no-progress"])


def test_segment_one_slide(tmp_path, model_dir, caplog):
    out = tmp_path / "cmu1.ome.zarr"
    with caplog.at_level(logging.INFO):
        assert _segment(CMU1, "--model", model_dir, "--out", out, "--tile-size", 256) == 0
    labels = read_ome_zarr_labels(out)
    assert labels.shape == (741, 555) and 0.2 < (labels == 1).mean() < 0.6
    assert any("tiles computed" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / "cmu1.ome.zarr.hrseg-work").exists()


def test_segment_a_folder_of_slides(tmp_path, model_dir):
    folder = tmp_path / "slides"
    folder.mkdir()
    (folder / "a.svs").symlink_to(CMU1)
    (folder / "b.tif").symlink_to(CMU1_PYRAMID)
    (folder / "notes.txt").write_text("not a slide")
    out = tmp_path / "results"
    assert _segment(folder, "--model", model_dir, "--out", out, "--tile-size", 256, "--format", "geojson",
                    "--region", "1000,500,1200,1200") == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.labels.geojson", "b.labels.geojson"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "no-such-model"], "no-such-model"),
        (["--region", "9000,9000,10,10"], "outside the slide"),
        (["--region", "1,2,3"], "row,col,height,width"),
        (["--device", "tpu"], "device"),
    ],
)
def test_errors_are_one_line_with_status_2(tmp_path, model_dir, capsys, args, message):
    base = {"--model": str(model_dir), "--out": str(tmp_path / "o.ome.zarr")}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    argv = [CMU1] + [x for kv in base.items() for x in kv]
    assert _segment(*argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("napari-hrseg segment: error:") and message in err and "\n" not in err
    assert not (tmp_path / "o.ome.zarr").exists()


def test_a_file_without_pixel_size_needs_mpp(tmp_path, model_dir, realdata, capsys):
    jpg = realdata / "stardist-wheel" / "histo.jpg"
    assert _segment(jpg, "--model", model_dir, "--out", tmp_path / "h.ome.zarr") == 2
    assert "--mpp" in capsys.readouterr().err
    assert _segment(jpg, "--model", model_dir, "--out", tmp_path / "h.ome.zarr", "--mpp", "2", "--tile-size", 128) == 0
    assert read_ome_zarr_labels(tmp_path / "h.ome.zarr").shape == (300, 500)


@pytest.mark.slow
def test_resume_after_the_process_is_killed(tmp_path, model_dir, caplog):
    out = tmp_path / "killed.ome.zarr"
    done_dir = tmp_path / "killed.ome.zarr.hrseg-work" / "done"
    argv = [sys.executable, "-m", "napari_hrseg", "segment", str(CMU1), "--model", str(model_dir), "--out", str(out),
            "--tile-size", "64", "--batch-size", "1", "--all-tiles", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    total = 12 * 9  # 741 x 555 px at 2 µm in 64-px tiles
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if done_dir.is_dir() and len(os.listdir(done_dir)) >= 8:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    killed_at = len(os.listdir(done_dir))
    assert 8 <= killed_at < total
    assert not out.exists()  # nothing half-written presented as done
    with caplog.at_level(logging.INFO):
        assert _segment(CMU1, "--model", model_dir, "--out", out, "--tile-size", 64, "--batch-size", 1, "--all-tiles") == 0
    messages = " | ".join(r.getMessage() for r in caplog.records)
    assert f"resuming, {killed_at} of {total} tiles already done" in messages
    assert f"{total - killed_at} tiles computed, {killed_at} resumed" in messages
    # the same labels as an uninterrupted pass over the same tiles
    slide = open_slide(CMU1)
    request = InferenceRequest(slide, Region.from_shape(slide.shape), load_model(model_dir), InferenceOptions(tile_size=64))
    np.testing.assert_array_equal(read_ome_zarr_labels(out), run_to_completion(run_request(request)).labels)


def test_a_failing_slide_does_not_stop_the_others(tmp_path, model_dir, capsys):
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"")
    out = tmp_path / "results"
    assert _segment(CMU1, bad, "--model", model_dir, "--out", out, "--tile-size", 256) == 2
    err = capsys.readouterr().err
    assert "broken.svs" in err and "1 of 2 slides failed" in err
    assert [p.name for p in out.iterdir()] == ["CMU-1-Small-Region.labels.ome.zarr"]
    assert _segment(CMU1, bad, "--model", model_dir, "--out", tmp_path / "r2", "--fail-fast") == 2
