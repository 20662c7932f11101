"""Fine-tuning from corrections: it moves the prediction toward the correction, cancels without saving, and
saves a new version with its lineage."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

from napari_hrseg.errors import Cancelled, TrainingError
from napari_hrseg.models import create_model, load_model, save_model
from napari_hrseg.models.config import IGNORE_INDEX
from napari_hrseg.models.weights import state_fingerprint
from napari_hrseg.training import Sample, TrainConfig, TrainStep, train
from napari_hrseg.training.datasets import PRESETS, pair_files, split_by_image, tile_samples
from napari_hrseg.training.finetune import FineTuneFinished, corrected_accuracy, fine_tune, merge_corrections
from napari_hrseg.training.predict import PixelGrid, predict_probabilities

pytestmark = pytest.mark.realdata
MPP = 1.0
BOX = 96


def glas_teacher(tmp_path_factory, realdata):
    """A small FPN trained for 30 steps on GlaS (trained once per test session, then loaded from disk)."""
    cache = tmp_path_factory.getbasetemp() / "glas-teacher"
    sources = pair_files(realdata / "glas-test-subset", PRESETS["glas"])
    train_src, val_src = split_by_image(sources, 0.2, seed=0)
    if not (cache / "config.json").is_file():
        torch.manual_seed(0)
        model = create_model("fpn", num_classes=2, mpp=MPP, widths=(16, 32, 64, 128), fpn_width=32, head_width=32)
        model.config = model.config.evolve(name="glands")
        for _ in train(model, train_src, (), TrainConfig(steps=30, batch_size=4, crop=96, lr=3e-3, seed=0)):
            pass
        save_model(model, cache)
    return load_model(cache), val_src


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, realdata):
    return glas_teacher(tmp_path_factory, realdata)[0]


@pytest.fixture(scope="module")
def correction(teacher, tmp_path_factory, realdata):
    """The oracle correction of a held-out GlaS image: ground truth in the 96 x 96 box the teacher gets most
    wrong, unknown elsewhere."""
    _, val_src = glas_teacher(tmp_path_factory, realdata)
    s = tile_samples(val_src[:1], MPP)[0]
    pred = predict_probabilities(teacher, PixelGrid.of(s.image)).argmax(0)
    boxes = [(r, c) for r in range(0, s.shape[0] - BOX + 1, 32) for c in range(0, s.shape[1] - BOX + 1, 32)]
    r, c = min(boxes, key=lambda rc: np.mean(pred[rc[0]:rc[0] + BOX, rc[1]:rc[1] + BOX]
                                             == s.labels[rc[0]:rc[0] + BOX, rc[1]:rc[1] + BOX]))
    labels = np.full(s.shape, IGNORE_INDEX, np.uint8)
    labels[r:r + BOX, c:c + BOX] = s.labels[r:r + BOX, c:c + BOX]
    return Sample(s.image, labels, key=s.key)


def _drain(gen):
    events = []
    while True:
        try:
            events.append(next(gen))
        except StopIteration as stop:
            return events, stop.value


#: Fine-tuning budget of these tests: enough to move a 96 x 96 box on a small model, small enough for CI.
FT = dict(steps=30, crop=96, batch_size=4, lr=1e-3, seed=0)


@pytest.fixture(scope="module")
def tuned(teacher, correction, tmp_path_factory):
    """One fine-tuning run (corrections + the teacher's coarse labels elsewhere), saved as a new version."""
    tmp = tmp_path_factory.mktemp("tuned")
    before_weights = state_fingerprint(teacher)
    before = corrected_accuracy(teacher, [correction])
    out = tmp / "glands-v2"
    events, student = _drain(fine_tune(teacher, [correction], "teacher", out=out, log_path=tmp / "ft.jsonl", **FT))
    return events, student, out, before, before_weights


def test_fine_tune_moves_the_prediction_toward_the_correction_and_saves_a_version(teacher, correction, tuned):
    events, student, out, before, before_weights = tuned
    assert before < 0.6  # the teacher gets this box mostly wrong
    steps = [e for e in events if isinstance(e, TrainStep)]
    done = events[-1]
    assert isinstance(done, FineTuneFinished) and done.model is student and len(steps) == FT["steps"]
    assert all(np.isfinite(e.loss) and e.seconds > 0 for e in steps)
    after = corrected_accuracy(student, [correction])
    assert after > before + 0.3 and done.after == pytest.approx(after) and done.before == pytest.approx(before)
    assert state_fingerprint(teacher) == before_weights  # the teacher is not modified
    # The new version on disk: version bumped, lineage naming the parent, the data and the result.
    saved = load_model(out)
    assert saved.config.version == "2" and saved.config.name == "glands"
    lin = saved.config.lineage
    assert lin["kind"] == "fine-tune" and lin["parent"]["label"] == "glands@1"
    assert lin["parent"]["weights"] == before_weights and lin["seed"] == 0
    assert lin["data"]["corrected_pixels"] == BOX * BOX and lin["data"]["coarse_pixels"] > 0
    assert lin["data"]["correction_weight"] == "balanced" and lin["data"]["correction_share"] == 0.5
    assert len(lin["data"]["fingerprint"]) == 16 and lin["training"]["steps"] == FT["steps"]
    assert lin["metrics"]["corrected_acc_after"] == pytest.approx(after, abs=1e-6)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(saved(x)["logits"], student(x)["logits"], atol=1e-5)
    records = [json.loads(line) for line in (out.parent / "ft.jsonl").read_text().splitlines()]
    assert records[-1]["event"] == "done"


def test_coarse_labels_keep_the_rest_of_the_image_in_place(teacher, correction, tuned):
    """With coarse labels elsewhere, the student changes less outside the correction than with corrections alone."""
    with_coarse = tuned[1]
    _, alone = _drain(fine_tune(teacher, [correction], None, **FT))
    pred0 = predict_probabilities(teacher, PixelGrid.of(correction.image)).argmax(0)
    outside = correction.labels == IGNORE_INDEX
    kept = {}
    for name, student in (("coarse", with_coarse), ("alone", alone)):
        pred = predict_probabilities(student, PixelGrid.of(correction.image)).argmax(0)
        kept[name] = np.mean(pred[outside] == pred0[outside])
    assert kept["coarse"] > kept["alone"]


def test_cancel_mid_way_saves_nothing(teacher, correction, tmp_path):
    before_weights = state_fingerprint(teacher)
    cancel = threading.Event()
    out = tmp_path / "never"
    gen = fine_tune(teacher, [correction], "teacher", out=out, steps=100, crop=96, cancel=cancel)
    with pytest.raises(Cancelled):
        for event in gen:
            if isinstance(event, TrainStep) and event.step == 3:
                cancel.set()
    assert not out.exists() and not any(tmp_path.iterdir())
    # Closing the generator (napari's quit) saves nothing either.
    gen = fine_tune(teacher, [correction], "teacher", out=out, steps=100, crop=96)
    for event in gen:
        if isinstance(event, TrainStep) and event.step == 2:
            break
    gen.close()
    assert not out.exists()
    assert state_fingerprint(teacher) == before_weights


def test_merge_and_input_errors(teacher):
    image = np.full((8, 8, 3), 128, np.uint8)
    coarse = Sample(image, np.array([[0, 1, IGNORE_INDEX, 1] * 2] * 8, np.uint8), key="r")
    fine = np.full((8, 8), IGNORE_INDEX, np.uint8)
    fine[:, :2] = 1
    merged = merge_corrections([Sample(image, fine, key="r")], [coarse], correction_weight=3, coarse_weight=1)
    assert len(merged) == 1
    m = merged[0]
    assert m.labels[0].tolist() == [1, 1, IGNORE_INDEX, 1, 0, 1, IGNORE_INDEX, 1]
    assert m.weight[0].tolist() == [3, 3, 0, 1, 1, 1, 0, 1]
    # Balanced (default): the 16 corrected pixels carry half the weight of the image against 32 coarse ones.
    m = merge_corrections([Sample(image, fine, key="r")], [coarse])[0]
    assert m.weight[:, :2].sum() == pytest.approx(m.weight[:, 2:].sum()) and m.weight[0, 0] == pytest.approx(2.0)
    with pytest.raises(TrainingError, match="correction_share"):
        merge_corrections([Sample(image, fine, key="r")], [coarse], correction_share=1.0)
    with pytest.raises(TrainingError, match="no corrected pixels"):
        next(fine_tune(teacher, [Sample(image, np.full((8, 8), IGNORE_INDEX, np.uint8))]))
    with pytest.raises(TrainingError, match="class 5"):
        next(fine_tune(teacher, [Sample(image, np.full((8, 8), 5, np.uint8))]))


def test_corrections_from_a_label_store_feed_fine_tuning(tmp_path):
    """Corrections painted into a real label store of the virtual slide become aligned samples at the model's
    pixel size, with unknown context around them, and fine-tune a model."""
    from napari_hrseg.geometry import Region
    from napari_hrseg.labels import LabelStore
    from napari_hrseg.training.finetune import corrections_from_store
    from napari_hrseg.virtual import virtual_slide

    vs = virtual_slide(0, size=2048)
    store = LabelStore.create(tmp_path / "s.hrseg-labels", vs.slide, mpp=1.0, class_names=vs.class_names,
                              class_colors=vs.class_colors)
    try:
        values = np.full((40, 50), 3, np.uint8)
        values[:10] = 1
        store.write(Region(100, 200, 40, 50), values)  # working level = 1 µm/px
        samples, cursor = corrections_from_store(store, vs.slide, 1.0, context=16)
        assert len(samples) == 1 and cursor >= 1
        s = samples[0]
        assert s.shape == (72, 82) and np.array_equal(s.labels[16:56, 16:66], values)
        assert np.count_nonzero(s.labels != IGNORE_INDEX) == values.size
        expected = vs.slide.read(Region(168, 368, 144, 164), level=1)
        assert np.abs(s.image.astype(int) - expected.astype(int)).max() <= 1
        assert corrections_from_store(store, vs.slide, 1.0, after=cursor)[0] == []
    finally:
        store.close()
    torch.manual_seed(0)
    model = create_model("fpn", num_classes=len(vs.class_names), mpp=1.0, widths=(16, 32, 64, 128), fpn_width=32,
                         head_width=32).eval()
    events, student = _drain(fine_tune(model, samples, "teacher", steps=3, crop=64, batch_size=2))
    assert isinstance(events[-1], FineTuneFinished) and student.config.version == "2"
