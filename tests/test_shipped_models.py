"""The shipped weights: they load through the registry, fit the size budget, record how they were made and how
well they did, and segment real tissue they never trained on (bars set below the held-out figures measured when
they were trained; see docs/models.md).  The preset command that re-creates them runs end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

from napari_hrseg.geometry import Region
from napari_hrseg.models import load_model
from napari_hrseg.models.weights import shipped_model_dir, shipped_models
from napari_hrseg.training.metrics import ConfusionMatrix, instance_scores
from napari_hrseg.training.shipped import (
    GLANDS_HELD_OUT,
    NUCLEI_HELD_OUT,
    SHIPPED,
    load_data,
    predict_nuclei,
    shipped_names,
)

#: Presets whose weights the package ships.
WITH_WEIGHTS = shipped_names(with_weights=True)

#: All shipped weights together stay well under this many bytes (issue: "small: all together well under 20 MB").
BUDGET_BYTES = 12_000_000


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_every_preset_is_shipped_small_and_half_precision():
    assert sorted(shipped_models()) == sorted(WITH_WEIGHTS)
    assert {"nuclei", "glands", "glands-hmsa", "tissue", "tissue-hmsa", "tissue-glnet"} <= set(WITH_WEIGHTS)
    total = 0
    for name in WITH_WEIGHTS:
        d = shipped_model_dir(name)
        assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors"]
        total += sum(p.stat().st_size for p in d.iterdir())
        with safe_open(str(d / "model.safetensors"), "pt") as f:
            assert f.metadata()["stored_dtype"] == "float16"
            assert {f.get_slice(k).get_dtype() for k in f.keys()} <= {"F16", "I64"}
    assert total < BUDGET_BYTES, f"shipped weights take {total / 1e6:.1f} MB"


@pytest.mark.parametrize("name", WITH_WEIGHTS)
def test_shipped_models_load_through_the_registry_with_their_lineage(name):
    spec = SHIPPED[name]
    model = load_model(name)
    assert not model.training and model.config.name == name and model.config.arch == spec.arch
    assert all(v.dtype == torch.float32 for v in model.state_dict().values() if v.is_floating_point())
    lineage = model.config.lineage
    assert lineage["command"].startswith(spec.command)  # the preset command, plus any log/progress flags
    assert lineage["training"]["preset"] == name
    held_out, trained = set(lineage["data"]["held_out"]), set(lineage["data"]["train"])
    assert held_out and not held_out & trained  # split by image (or slide window): nothing seen in both
    metrics = lineage["metrics"]
    assert {"heldout_dice"} <= set(metrics) and len(metrics["heldout_images"]) == len(held_out)
    if spec.init:
        assert lineage["parent"]["label"].startswith(f"{spec.init}@")


@pytest.mark.realdata
def test_nuclei_model_segments_held_out_miccai_tiles(realdata):
    """Instances on tiles 07 (20x) and 14 (40x, resampled to 0.5 µm/px and back), never trained on, scored like
    ``eval_instances.py`` at the tiles' own resolution."""
    model = load_model("nuclei")
    data = load_data("miccai2015", realdata)
    tiles = {s.key: s for s in data.test}
    assert set(tiles) == set(NUCLEI_HELD_OUT) and not set(tiles) & {s.key for s in data.train}
    got = {key: instance_scores(*reversed(predict_nuclei(model, tiles[key]))) for key in ("image07.png", "image14.png")}
    # measured when shipped: 07 Dice 0.845 AJI 0.629; 14 Dice 0.823 AJI 0.555 (all three held-out tiles: Dice
    # 0.826, AJI 0.557, PQ 0.517)
    assert got["image07.png"].dice > 0.80 and got["image07.png"].aji > 0.55
    assert got["image14.png"].dice > 0.78 and got["image14.png"].aji > 0.48
    assert 0.7 < got["image07.png"].n_pred / got["image07.png"].n_gt < 1.4


@pytest.mark.realdata
@pytest.mark.parametrize("name, bar", [("glands", 0.80), ("glands-hmsa", 0.80)])
def test_gland_models_segment_a_held_out_glas_image(realdata, name, bar):
    model = load_model(name)
    data = load_data("glas", realdata)
    source = next(s for s in data.test if s.key == GLANDS_HELD_OUT[0])  # testA_2
    h, w = source.size_at(model.config.mpp)
    sample = source.read(Region(0, 0, h, w), model.config.mpp)
    from napari_hrseg.models import to_input_tensor

    with torch.no_grad():
        pred = model(to_input_tensor(sample.image[None], model.config))["logits"].argmax(1)[0].numpy()
    scores = ConfusionMatrix(2).update(pred, sample.labels).scores()
    assert scores["dice"] > bar, scores


@pytest.mark.realdata
def test_the_preset_command_recreates_a_model_with_its_lineage(realdata, tmp_path):
    """``napari-hrseg train --preset nuclei`` end to end, cut to 2 steps: data, split, training, held-out scoring,
    float16 weights and lineage (the shipped weights were made by the same command without ``--steps``)."""
    out = tmp_path / "nuclei"
    done = subprocess.run([sys.executable, "-m", "napari_hrseg", "train", "--preset", "nuclei", "--steps", "2",
                           "--out", str(out), "--realdata", str(realdata), "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "held-out (3 images)" in done.stdout
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["lineage"]["training"]["steps"] == 2 and cfg["lineage"]["data"]["held_out"] == list(NUCLEI_HELD_OUT)
    assert set(cfg["lineage"]["metrics"]) >= {"heldout_dice", "heldout_aji", "heldout_pq"}
    assert load_model(out).config.name == "nuclei"


@pytest.mark.realdata
def test_tissue_models_segment_a_held_out_virtual_window(tmp_path):
    """The tissue models on the held-out virtual slide (seed 0), a 0.5 mm window on its tumour's border."""
    from napari_hrseg.models import to_input_tensor
    from napari_hrseg.training.windows import virtual_window

    src = virtual_window(0, "border", window=512, size=16384, mpp=1.0, cache=tmp_path)
    sample = src.read(Region(0, 0, 512, 512), 1.0)
    assert np.count_nonzero(sample.labels == 4) > 0.02 * sample.labels.size  # tumour epithelium is there
    for name, bar in (("tissue", 0.6), ("tissue-hmsa", 0.6), ("tissue-glnet", 0.5)):
        model = load_model(name)
        with torch.no_grad():
            pred = model(to_input_tensor(sample.image[None], model.config))["logits"].argmax(1)[0].numpy()
        miou = ConfusionMatrix(5).update(pred, sample.labels).scores()["miou"]
        assert miou > bar, (name, miou)
