"""The trainer: real training on GlaS crops lowers the loss and logs, runs repeat exactly, cancel works at every
step, early stopping and best-weight restoring, the CUDA path, and the architecture recipes."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

from napari_hrseg.errors import Cancelled, TrainingError
from napari_hrseg.models import create_model, list_models
from napari_hrseg.training.augment import Augment
from napari_hrseg.training.datasets import PRESETS, pair_files, split_by_image
from napari_hrseg.training.recipes import Phase, Recipe, recipe_for, set_model_mode
from napari_hrseg.training.trainer import (
    PhaseStarted,
    TrainConfig,
    TrainingFinished,
    TrainStep,
    Validated,
    evaluate,
    train,
)

pytestmark = pytest.mark.realdata

#: A small FPN (0.47 M parameters) so tests train in seconds on two cores.
SMALL = dict(widths=(16, 32, 64, 128), fpn_width=32, head_width=32)
MPP = 1.0  # GlaS is 0.62 µm/px; 1.0 µm/px keeps images ~480 x 320 and glands ~40-200 px across


@pytest.fixture(scope="module")
def glas_split(realdata):
    sources = pair_files(realdata / "glas-test-subset", PRESETS["glas"])
    return split_by_image(sources, 0.2, seed=0)


def _model(arch: str = "fpn", **kwargs):
    torch.manual_seed(0)
    return create_model(arch, num_classes=2, mpp=MPP, **{**SMALL, **kwargs})


def _run(gen):
    events = []
    while True:
        try:
            events.append(next(gen))
        except StopIteration as stop:
            return events, stop.value


def test_training_fpn_on_real_crops_lowers_the_loss_and_logs(glas_split, tmp_path):
    train_src, val_src = glas_split
    model = _model()
    log = tmp_path / "log.jsonl"
    config = TrainConfig(steps=40, batch_size=4, crop=96, lr=3e-3, val_every=20, seed=0, log_path=log,
                         augment=Augment(hed_alpha=0.05, hed_beta=0.01))
    events, result = _run(train(model, train_src, val_src[:2], config))
    steps = [e for e in events if isinstance(e, TrainStep)]
    vals = [e for e in events if isinstance(e, Validated)]
    assert isinstance(events[0], PhaseStarted) and isinstance(events[-1], TrainingFinished) and events[-1] is result
    assert [e.step for e in steps] == list(range(1, 41)) and len(vals) == 2
    assert all(e.lr > 0 and e.seconds > 0 and "acc" in e.metrics for e in steps)
    assert steps[0].lr > steps[-1].lr  # cosine schedule
    first, last = np.mean([e.loss for e in steps[:10]]), np.mean([e.loss for e in steps[-10:]])
    assert last < first * 0.85, (first, last)
    assert result.steps == 40 and result.best_step in (20, 40) and "miou" in result.best_metrics
    # The restored best weights give the best validation metrics again.
    again = evaluate(model, __import__("napari_hrseg.training.datasets", fromlist=["x"]).tile_samples(val_src[:2], MPP))
    assert again["miou"] == pytest.approx(result.best_metrics["miou"])
    records = [json.loads(line) for line in log.read_text().splitlines()]
    kinds = [r["event"] for r in records]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("step") == 40 and kinds.count("val") == 2
    assert records[0]["train"] == [s.key for s in train_src] and records[0]["config"]["lr"] == 3e-3
    assert all(np.isfinite(r["loss"]) for r in records if r["event"] == "step")


def test_runs_repeat_exactly_given_a_seed(glas_split):
    train_src, _ = glas_split
    config = TrainConfig(steps=4, batch_size=2, crop=64, seed=5, device="cpu")
    runs = []
    for _ in range(2):
        model = _model()
        events, _ = _run(train(model, train_src, (), config))
        runs.append(([e.loss for e in events if isinstance(e, TrainStep)], model.state_dict()))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])
    model = _model()
    other, _ = _run(train(model, train_src, (), TrainConfig(steps=4, batch_size=2, crop=64, seed=6)))
    assert [e.loss for e in other if isinstance(e, TrainStep)] != runs[0][0]


def test_cancel_at_any_step_by_event_or_by_closing(glas_split, tmp_path):
    train_src, _ = glas_split
    cancel = threading.Event()
    log = tmp_path / "c.jsonl"
    gen = train(_model(), train_src, (), TrainConfig(steps=50, batch_size=2, crop=64, log_path=log), cancel=cancel)
    seen = 0
    with pytest.raises(Cancelled, match="cancelled at step 3"):
        for event in gen:
            if isinstance(event, TrainStep):
                seen += 1
                if event.step == 3:
                    cancel.set()
    assert seen == 3
    assert json.loads(log.read_text().splitlines()[-1])["event"] == "cancelled"
    # Closing the generator (what napari's worker.quit() does) stops it too, and is logged.
    gen = train(_model(), train_src, (), TrainConfig(steps=50, batch_size=2, crop=64, log_path=log))
    for event in gen:
        if isinstance(event, TrainStep) and event.step == 2:
            break
    gen.close()
    last = json.loads(log.read_text().splitlines()[-1])
    assert last["event"] == "cancelled" and last["step"] == 2


def test_early_stopping_on_a_validation_metric(glas_split):
    train_src, val_src = glas_split
    # A learning rate too small to change any prediction, batch-norm statistics frozen: the validation mIoU
    # cannot improve after the first validation, so patience 1 stops the run at the third validation.
    config = TrainConfig(steps=30, batch_size=2, crop=64, lr=1e-12, val_every=1, patience=1, monitor="miou",
                         freeze_norm=True)
    events, result = _run(train(_model(), train_src, val_src[:1], config))
    vals = [e for e in events if isinstance(e, Validated)]
    assert [v.improved for v in vals] == [True, False, False]
    assert result.stopped_early and result.steps == 3 and result.best_step == 1


def test_bad_settings_are_refused_clearly(glas_split):
    train_src, _ = glas_split
    with pytest.raises(TrainingError, match="unknown optimizer"):
        TrainConfig(steps=1, optimizer="adam")
    with pytest.raises(TrainingError, match="unknown validation metric 'f1'"):
        TrainConfig(steps=1, monitor="f1")
    assert TrainConfig(steps=1, monitor="iou_3").monitor == "iou_3"
    with pytest.raises(TrainingError, match="neither steps nor epochs"):
        next(train(_model(), train_src, (), TrainConfig()))
    with pytest.raises(TrainingError, match="no training images"):
        next(train(_model(), [], (), TrainConfig(steps=1)))
    with pytest.raises(TrainingError, match="not in"):
        split_by_image(train_src, -0.1, 0)
    # Epochs are turned into steps from the training area: one epoch covers it once in expectation.
    events, result = _run(train(_model(), train_src[:2], (), TrainConfig(epochs=0.5, batch_size=4, crop=128)))
    area = sum(h * w for h, w in (s.size_at(MPP) for s in train_src[:2]))
    assert result.steps == int(np.ceil(0.5 * np.ceil(area / (128 * 128 * 4))))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_training_with_autocast(glas_split):  # pragma: no cover - no GPU in CI
    train_src, val_src = glas_split
    model = _model()
    config = TrainConfig(steps=4, batch_size=2, crop=64, device="cuda")
    events, result = _run(train(model, train_src, val_src[:1], config))
    assert result.device.startswith("cuda") and model.device.type == "cuda"
    assert all(np.isfinite(e.loss) for e in events if isinstance(e, TrainStep))


def test_cuda_asked_for_without_a_gpu_is_an_error(glas_split):
    if torch.cuda.is_available():  # pragma: no cover
        pytest.skip("a GPU is present")
    with pytest.raises(TrainingError, match="no CUDA GPU"):
        next(train(_model(), glas_split[0], (), TrainConfig(steps=1, device="cuda")))


# ---------------------------------------------------------------------------------------------- recipes
def test_phases_run_in_order_with_their_own_optimiser(glas_split):
    """A custom recipe with two phases: the second freezes the encoder, which then does not change."""
    entered = []

    class TwoPhase(Recipe):
        def phases(self, model):
            def freeze(m):
                entered.append("head")
                m.encoder.requires_grad_(False)

            return [Phase("all", 0.5, lambda m: entered.append("all")), Phase("head", 0.5, freeze, lr_scale=0.5)]

    model = _model()
    config = TrainConfig(steps=4, batch_size=2, crop=64, freeze_norm=True)
    gen = train(model, glas_split[0], (), config, recipe=TwoPhase())
    snapshot = None
    phases = []
    for event in gen:
        if isinstance(event, PhaseStarted):
            phases.append((event.phase, event.steps))
            if event.phase == "head":
                snapshot = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    assert phases == [("all", 2), ("head", 2)] and entered[:2] == ["all", "head"]
    assert all(torch.equal(snapshot[k], v) for k, v in model.encoder.state_dict().items())


def test_set_model_mode_accepts_methods_and_properties():
    class WithMethod:
        def __init__(self):
            self.mode = None

        def train_mode(self, m):
            self.mode = m

    class WithProperty:
        _p = None
        train_phase = property(lambda self: self._p, lambda self, v: setattr(self, "_p", v))

    a, b = WithMethod(), WithProperty()
    set_model_mode(a, "train_mode", 2)
    set_model_mode(b, "train_phase", "refiner")
    assert a.mode == 2 and b.train_phase == "refiner"


def _needs(arch):
    return pytest.mark.skipif(arch not in list_models(), reason=f"architecture {arch!r} is not registered yet")


@_needs("magnet")
def test_magnet_recipe_trains_the_segmenter_then_the_refiner(glas_split):
    model = _model("magnet", patch_size=64)
    gen = train(model, glas_split[0], (), TrainConfig(steps=4, batch_size=2, crop=96))
    seen, frozen = [], None
    for event in gen:
        if isinstance(event, PhaseStarted):
            seen.append(event.phase)
            if event.phase == "refiner":
                frozen = {k: v.clone() for k, v in model.segmenter.state_dict().items()}
    assert seen == ["segmenter", "refiner"]
    # The refiner phase leaves the segmenter (weights and batch-norm statistics) untouched.
    assert all(torch.equal(frozen[k], v) for k, v in model.segmenter.state_dict().items())


@_needs("glnet")
def test_glnet_recipe_runs_its_three_modes(glas_split):
    model = _model("glnet", size_p=64, size_g=64, min_overlap=16)
    events = list(train(model, glas_split[0], (), TrainConfig(steps=3, batch_size=1, crop=96)))
    seen = [e.phase for e in events if isinstance(e, PhaseStarted)]
    assert seen == ["global", "global-to-local", "local-to-global"]
    assert model.train_mode == 3  # the last phase's mode is left set


@_needs("dupsampling")
def test_dupsampling_recipe_fits_the_basis_before_training(glas_split):
    torch.manual_seed(0)
    model = create_model("dupsampling", num_classes=2, mpp=MPP, widths=(16, 32, 64, 128))
    before = model.basis.clone()
    gen = train(model, glas_split[0], (), TrainConfig(steps=1, batch_size=2, crop=64, lr=1e-12))
    next(gen)  # PhaseStarted: prepare() has run
    fitted = model.basis.clone()
    assert not torch.equal(before, fitted)
    # The fitted basis is orthonormal and reconstructs label blocks (what PCA on one-hot blocks gives).
    eye = fitted.T @ fitted
    assert torch.allclose(eye, torch.eye(eye.shape[0]), atol=1e-4)
    list(gen)


@_needs("refinemask")
def test_refinemask_recipe_feeds_instance_targets(realdata):
    sources = pair_files(realdata / "miccai2015-nuclei", PRESETS["miccai2015"])[:3]
    torch.manual_seed(0)
    model = create_model("refinemask", num_classes=2, mpp=0.5, widths=(16, 32, 64, 128))
    assert recipe_for(model).needs_instances
    events = train(model, sources, (), TrainConfig(steps=2, batch_size=1, crop=96))
    steps = [e for e in events if isinstance(e, TrainStep)]
    assert len(steps) == 2 and all("mask" in e.losses and e.losses["rois"] > 0 for e in steps)
