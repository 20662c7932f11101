"""Metrics: instance Dice / AJI / PQ identical to shared/tools/eval_instances.py on real MICCAI labels, and the
semantic confusion-matrix metrics on hand-computed cases."""

from __future__ import annotations

import importlib.util
import io
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy import ndimage

from napari_hrseg.models.config import IGNORE_INDEX
from napari_hrseg.training.metrics import (
    ConfusionMatrix,
    instance_scores,
    instances_from_semantic,
    mean_instance_scores,
    semantic_scores,
)

EVAL_SCRIPT = Path(__file__).resolve().parents[1].parent / "shared" / "tools" / "eval_instances.py"


@pytest.fixture(scope="module")
def reference():
    """The project's judging script, imported from its file."""
    if not EVAL_SCRIPT.is_file():
        pytest.skip(f"{EVAL_SCRIPT} not found")
    spec = importlib.util.spec_from_file_location("eval_instances", EVAL_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _perturbations(gt: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    ids = np.unique(gt[gt > 0])
    drop = rng.choice(ids, size=len(ids) // 4, replace=False)
    perm = np.zeros(gt.max() + 1, np.int64)
    perm[ids] = rng.permutation(len(ids)) + 1000
    split = gt.copy()
    cols = np.arange(gt.shape[1])[None, :].repeat(gt.shape[0], 0)
    split[(gt > 0) & (cols % 2 == 0)] += 5000  # every object cut into two interleaved halves
    noise = gt.copy()
    specks = rng.random(gt.shape) < 0.002
    noise[specks & (gt == 0)] = 9000 + np.arange(int(np.sum(specks & (gt == 0))))
    return {
        "identical": gt,
        "relabelled": np.where(gt > 0, perm[gt], 0),
        "shifted": np.roll(gt, (2, -3), axis=(0, 1)),
        "dilated": ndimage.grey_dilation(gt, size=5),
        "eroded": ndimage.grey_erosion(gt, size=5),
        "merged": np.where(gt > 0, (gt + 1) // 2, 0),
        "components": ndimage.label(gt > 0)[0],
        "dropped": np.where(np.isin(gt, drop), 0, gt),
        "split": split,
        "specks": noise,
        "empty": np.zeros_like(gt),
    }


@pytest.mark.realdata
@pytest.mark.parametrize("name", ["image02", "image09", "image12"])
def test_instance_scores_equal_the_judging_script(realdata, reference, name):
    gt = reference._read(realdata / "miccai2015-nuclei" / f"{name}_label.png")
    rng = np.random.default_rng(int(name[-2:]))
    for kind, pred in _perturbations(gt, rng).items():
        expected = tuple(float(v) for v in reference.scores(gt, pred))
        got = instance_scores(gt, pred).as_tuple()
        assert got == expected, kind  # exact: same matching, ties and summation order
    # Both empty: the script's conventions (Dice 0, AJI 1, PQ 1).
    z = np.zeros((5, 5), np.int64)
    assert instance_scores(z, z).as_tuple() == tuple(float(v) for v in reference.scores(z, z))


@pytest.mark.realdata
def test_mean_over_images_equals_the_script_output(realdata, reference, tmp_path):
    gt_dir = realdata / "miccai2015-nuclei"
    scores = []
    for i, gt_path in enumerate(sorted(gt_dir.glob("image0[1-4]_label.png"))):
        gt = reference._read(gt_path)
        pred = ndimage.grey_erosion(gt, size=3 + 2 * (i % 2))
        tifffile.imwrite(tmp_path / gt_path.name.replace("_label.png", ".tif"), pred.astype(np.uint16))
        scores.append(instance_scores(gt, pred))
    gt_subset = tmp_path / "gt"
    gt_subset.mkdir()
    for gt_path in sorted(gt_dir.glob("image0[1-4]_label.png")):
        (gt_subset / gt_path.name).write_bytes(gt_path.read_bytes())
    with redirect_stdout(io.StringIO()):
        expected = reference.main(gt_subset, tmp_path)
    m = mean_instance_scores(scores)
    assert (m["dice"], m["aji"], m["pq"]) == tuple(float(v) for v in expected)
    assert m["n"] == 4


def test_semantic_scores_by_hand():
    target = np.array([[0, 0, 1, 1], [0, 2, 2, IGNORE_INDEX]])
    pred = np.array([[0, 1, 1, 1], [0, 2, 0, 2]])
    cm = ConfusionMatrix(4).update(pred, target)
    # truth 0: 3 px (2 right, 1 as class 1); truth 1: 2 px right; truth 2: 2 px (1 right, 1 as 0); ignore skipped
    assert cm.total == 7
    iou = cm.iou()
    assert iou[0] == pytest.approx(2 / 4) and iou[1] == pytest.approx(2 / 3) and iou[2] == pytest.approx(1 / 2)
    assert np.isnan(iou[3])  # absent from truth and prediction: left out of the mean
    s = cm.scores()
    assert s["miou"] == pytest.approx((2 / 4 + 2 / 3 + 1 / 2) / 3)
    assert s["dice"] == pytest.approx((2 * 2 / (3 + 2) + 2 * 1 / (1 + 2)) / 2)  # foreground classes 1, 2
    assert s["acc"] == pytest.approx(5 / 7)
    assert semantic_scores(pred, target, 4)["miou"] == s["miou"]
    # Accumulating two images is the same as one image holding both.
    both = ConfusionMatrix(4).update(pred, target).update(pred, target)
    assert both.scores()["miou"] == pytest.approx(s["miou"]) and both.total == 14


def test_instances_from_semantic():
    labels = np.zeros((10, 10), np.uint8)
    labels[1:3, 1:3] = 1
    labels[3, 3] = 1  # diagonal neighbour: 8-connected, same object
    labels[6:9, 6:9] = 2
    labels[0, 9] = 1  # a speck
    inst = instances_from_semantic(labels, (1, 2))
    assert inst.max() == 3 and inst[1, 1] == inst[3, 3]
    assert instances_from_semantic(labels, (1, 2), min_size=2).max() == 2
    assert instances_from_semantic(labels, (2,)).max() == 1
