"""``napari-hrseg train`` end to end on a tiny real dataset, continuing from a model, and its clear refusals."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from napari_hrseg.cli import main
from napari_hrseg.models import load_model

pytestmark = pytest.mark.realdata

SMALL = ["--param", "widths=[16,32,64,128]", "--param", "fpn_width=32", "--param", "head_width=32"]


@pytest.fixture(scope="module")
def tiny_glas(realdata, tmp_path_factory):
    """Three real GlaS images with their masks, in GlaS's own layout (so the layout is detected)."""
    root = tmp_path_factory.mktemp("tiny-glas")
    for sub in ("images", "labels_binary"):
        (root / sub).mkdir()
        for name in ("testA_1.png", "testA_2.png", "testB_3.png"):
            shutil.copy(realdata / "glas-test-subset" / sub / name, root / sub / name)
    return root


def test_train_command_writes_a_loadable_model_with_lineage(tiny_glas, tmp_path):
    out = tmp_path / "glands"
    cmd = [sys.executable, "-m", "napari_hrseg", "train", "--model", "fpn", "--data", str(tiny_glas), "--out", str(out),
           "--steps", "6", "--crop", "96", "--batch-size", "2", "--mpp", "2.0", "--val-fraction", "0.34",
           "--val-every", "3", "--seed", "1", "--name", "glands", *SMALL]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "saved glands@1" in proc.stderr and "val miou=" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "train_log.jsonl"]
    model = load_model(out)
    cfg = model.config
    assert cfg.arch == "fpn" and cfg.name == "glands" and cfg.mpp == 2.0 and cfg.num_classes == 2
    assert cfg.params["widths"] == [16, 32, 64, 128]
    lin = cfg.lineage
    assert lin["parent"] is None and lin["seed"] == 1 and lin["kind"] == "train"
    assert len(lin["data"]["train"]) == 2 and len(lin["data"]["val"]) == 1
    assert set(lin["data"]["train"]).isdisjoint(lin["data"]["val"])
    assert len(lin["data"]["fingerprint"]) == 16 and "miou" in lin["metrics"] and "dice" in lin["metrics"]
    assert lin["command"].startswith("napari-hrseg train --model fpn") and lin["created"].endswith("Z")
    assert lin["training"]["steps"] == 6
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["event"] for r in records].count("step") == 6 and records[-1]["event"] == "done"
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 45, 67))["logits"].shape == (1, 2, 45, 67)
    # The same data and seed give the same fingerprint; continuing from the model makes version 2.
    out2 = tmp_path / "glands-2"
    rc = main(["train", "--init", str(out), "--data", str(tiny_glas), "--out", str(out2), "--steps", "2",
               "--crop", "64", "--batch-size", "1", "--val-fraction", "0", "--no-progress"])
    assert rc == 0
    child = load_model(out2).config
    assert child.version == "2" and child.name == "glands" and child.mpp == 2.0
    assert child.lineage["parent"]["label"] == "glands@1"
    assert child.lineage["data"]["fingerprint"] == lin["data"]["fingerprint"]


def test_train_command_refuses_bad_requests(tiny_glas, tmp_path, capsys):
    base = ["train", "--data", str(tiny_glas), "--steps", "1", "--no-progress"]
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep")
    cases = [
        (["--model", "fpn", "--out", str(precious)], "holds other files"),
        (["--model", "fpn", "--init", "x", "--out", str(tmp_path / "a")], "exactly one of --model"),
        (["--model", "nonesuch", "--out", str(tmp_path / "b")], "unknown model 'nonesuch'"),
        (["--model", "fpn", "--out", str(tmp_path / "c"), "--val-fraction", "0.99", "--pair", "x"], "IMAGE_GLOB"),
        (["--model", "fpn", "--out", str(tmp_path / "d"), "--optimizer", "sgd", "--param", "depth=3"],
         "unknown hyper-parameters"),
    ]
    for extra, message in cases:
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert (precious / "notes.txt").read_text() == "keep"
    assert main(["train", "--model", "fpn", "--data", str(tiny_glas), "--out", str(tmp_path / "e")]) == 2
    assert "--steps N or --epochs E" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_train_command_on_a_slide_with_a_label_store(realdata, tmp_path):
    """A real GlaS image written as a tiled TIFF slide, its ground truth painted into a label store: train on it,
    split into blocks of the slide."""
    import numpy as np
    import tifffile
    from PIL import Image

    from napari_hrseg.geometry import Region
    from napari_hrseg.labels import LabelStore
    from napari_hrseg.slide import open_slide

    image = np.asarray(Image.open(realdata / "glas-test-subset" / "images" / "testA_1.png"))
    mask_png = realdata / "glas-test-subset" / "labels_binary" / "testA_1.png"
    mask = (np.asarray(Image.open(mask_png)) > 0).astype(np.uint8)
    slide_path = tmp_path / "glas.tif"
    tifffile.imwrite(slide_path, image, tile=(256, 256), photometric="rgb",
                     resolution=(1e4 / 0.62005, 1e4 / 0.62005), resolutionunit="CENTIMETER")
    slide = open_slide(slide_path)
    store_path = tmp_path / "glas.hrseg-labels"
    with LabelStore.create(store_path, slide, level=0, class_names=("background", "gland")) as store:
        store.write(Region(0, 0, *mask.shape), mask)
    out = tmp_path / "model"
    rc = main(["train", "--model", "fpn", "--data", str(slide_path), "--labels", str(tmp_path / "glas.hrseg-labels"),
               "--out", str(out), "--steps", "2", "--crop", "64", "--batch-size", "1", "--mpp", "1.0",
               "--val-fraction", "0.25", "--no-progress", *SMALL])
    assert rc == 0
    cfg = load_model(out).config
    assert cfg.num_classes == 2 and len(cfg.lineage["data"]["train"]) == 3 and len(cfg.lineage["data"]["val"]) == 1
