"""The training loop: a generator of typed events, cancelable at every step.

``train(model, train_sources, val_sources, config)`` yields a `PhaseStarted` at the start of every recipe
phase, a `TrainStep` after every optimiser step (loss terms, batch accuracy, learning rate, seconds), a
`Validated` after every validation (metrics on the held-out images, whether they improved), and finally a
`TrainingFinished`, which is also the generator's return value.  A consumer drives it:

>>> for event in train(model, train_sources, val_sources, TrainConfig(steps=200)):   # doctest: +SKIP
...     progress.update(event)

Cancel by closing the generator (``gen.close()``, what napari's generator workers do on ``quit()``) or by
setting the ``cancel`` event, which raises `Cancelled` at the next step.  Either way nothing is saved: saving
is the caller's job after a finished run.  The model is trained in place; at the end of each phase with a
validation split, the weights of its best validation are restored.

Determinism: with the same seed, data, config and device the run repeats exactly on the CPU (crop positions
and augmentation come from one seeded numpy generator, initialisation and model-internal sampling from the
seeded torch generator).  On CUDA, autocast (bfloat16 where supported, else float16 with gradient scaling)
and cuDNN autotuning trade exact repeatability for speed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Generator, Sequence

import numpy as np
import torch

from ..errors import Cancelled, TrainingError
from ..models.base import HrsegModel, masked_cross_entropy
from ..models.config import IGNORE_INDEX
from .augment import Augment
from .cancel import CancelToken, is_cancelled
from .datasets import CropSampler, LabelledSource, tile_samples
from .metrics import ConfusionMatrix, instance_scores, mean_instance_scores
from .recipes import Phase, Recipe, recipe_for
from .samples import Sample

__all__ = [
    "TrainConfig",
    "PhaseStarted",
    "TrainStep",
    "Validated",
    "TrainingFinished",
    "TrainingEvent",
    "train",
    "evaluate",
    "seed_everything",
    "resolve_training_device",
    "CancelToken",
]

log = logging.getLogger(__name__)



#: Validation metrics that can decide "best" and early stopping (``iou_<k>`` too).
MONITORS = ("auto", "miou", "dice", "acc", "loss", "aji", "pq", "inst_dice")


@dataclass
class TrainConfig:
    """Settings of a training run.

    Parameters
    ----------
    steps : int, optional
        Optimiser steps in total (over all phases).
    epochs : float, optional
        Alternative to ``steps``: one epoch is ``ceil(training pixels / (crop² x batch_size))`` steps, i.e. one
        pass over the training area in expectation.
    batch_size : int
        Crops per step.
    crop : int
        Crop side in pixels at the model's pixel size.
    lr : float
        Peak learning rate.
    weight_decay : float
        Decoupled (AdamW) or L2 (SGD) weight decay.
    optimizer : {"adamw", "sgd"}
        AdamW, or SGD with Nesterov momentum ``momentum``.
    schedule : {"cosine", "poly", "constant"}
        Decay after the warm-up: cosine to 0, polynomial (power 0.9, DeepLab's), or none.
    warmup_steps : int
        Linear warm-up steps at the start of every phase.
    val_every : int
        Validate every this many steps (and at the end of each phase); 0 = ten times per phase.
    val_tile : int
        Validation images up to this size are evaluated whole; larger ones in tiles of this size.
    val_max_tiles : int
        At most this many validation tiles (a fixed, seeded subset of a slide's tiles), to bound memory and time.
    patience : int, optional
        Stop a phase after this many validations without improvement (early stopping); None = never.
    monitor : str
        Validation metric that decides "best": ``"miou"``, ``"dice"``, ``"aji"``, ``"pq"``, ``"acc"`` (higher is
        better) or ``"loss"`` (lower is better); ``"auto"`` = ``"aji"`` for instance models with instance
        ground truth, else ``"miou"``.
    seed : int
        Seeds crops, augmentation, initialisation-time randomness and model-internal sampling.
    device : str
        ``"auto"`` (CUDA when present, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    amp : bool or "auto"
        Mixed precision (autocast) on CUDA; "auto" = on when the device is CUDA.  Never on the CPU.
    grad_clip : float, optional
        Clip the gradient norm to this value.
    freeze_norm : bool
        Keep batch-norm layers in eval mode (running statistics frozen, affine parameters still trained): the
        right choice for batches of 1-4 crops, whose statistics are too noisy to update the running ones.
    min_labelled : float
        Crops with a smaller fraction of labelled pixels are redrawn.
    focus : float
        Share of crops centred on sources' focus pixels (see `CropSampler`); fine-tuning uses it for corrections.
    augment : Augment
        Augmentation of training crops (`Augment.identity()` for none).
    log_path : Path, optional
        JSON-lines log of every event (one object per line, flushed as written).
    """

    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 4
    crop: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    momentum: float = 0.9
    schedule: str = "cosine"
    warmup_steps: int = 0
    val_every: int = 0
    val_tile: int = 1024
    val_max_tiles: int = 64
    patience: int | None = None
    monitor: str = "auto"
    seed: int = 0
    device: str = "auto"
    amp: bool | str = "auto"
    grad_clip: float | None = 10.0
    freeze_norm: bool = False
    min_labelled: float = 0.01
    focus: float = 0.0
    augment: Augment = field(default_factory=Augment)
    log_path: Path | None = None

    def __post_init__(self):
        if self.optimizer not in ("adamw", "sgd"):
            raise TrainingError(f"unknown optimizer {self.optimizer!r}", subject="--optimizer", hint="use adamw or sgd")
        if self.schedule not in ("cosine", "poly", "constant"):
            raise TrainingError(f"unknown schedule {self.schedule!r}", subject="--schedule",
                                hint="use cosine, poly or constant")
        if self.batch_size < 1:
            raise TrainingError(f"batch size {self.batch_size} must be >= 1", subject="--batch-size")
        if self.steps is not None and self.steps < 1:
            raise TrainingError(f"steps={self.steps} must be >= 1", subject="--steps")
        if self.epochs is not None and not self.epochs > 0:
            raise TrainingError(f"epochs={self.epochs} must be > 0", subject="--epochs")
        if not self.lr > 0:
            raise TrainingError(f"learning rate {self.lr} must be > 0", subject="--lr")
        if self.monitor not in MONITORS and not re.fullmatch(r"iou_\d+", self.monitor):
            raise TrainingError(f"unknown validation metric {self.monitor!r}", subject="--monitor",
                                hint=f"use one of {', '.join(MONITORS)} or iou_<class>")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["log_path"] = None if self.log_path is None else str(self.log_path)
        return d


# ---------------------------------------------------------------------------------------------- events
@dataclass(frozen=True)
class PhaseStarted:
    """A recipe phase begins (``index`` of ``count``), with ``steps`` optimiser steps planned."""

    phase: str
    index: int
    count: int
    steps: int


@dataclass(frozen=True)
class TrainStep:
    """One optimiser step.

    Parameters
    ----------
    phase : str
        Current phase.
    step, total_steps : int
        1-based global step and the planned total.
    epoch : float
        Steps done in units of epochs (see `TrainConfig.epochs`).
    losses : dict
        ``"loss"`` (what was back-propagated) and the model's other loss terms, as floats.
    metrics : dict
        ``"acc"``: pixel accuracy of this batch on its labelled pixels (when the model returns ``"logits"``
        at the label size).
    lr : float
        Learning rate used for the step.
    seconds : float
        Wall time of the step (data, forward, backward, update).
    elapsed : float
        Seconds since the run started.
    """

    phase: str
    step: int
    total_steps: int
    epoch: float
    losses: dict[str, float]
    metrics: dict[str, float]
    lr: float
    seconds: float
    elapsed: float

    @property
    def loss(self) -> float:
        return self.losses["loss"]


@dataclass(frozen=True)
class Validated:
    """Metrics on the validation split after ``step``; ``improved`` when ``monitor`` beat the phase's best."""

    phase: str
    step: int
    metrics: dict[str, float]
    monitor: str
    value: float
    improved: bool
    best: float
    seconds: float


@dataclass(frozen=True)
class TrainingFinished:
    """The end of a run (also the generator's return value).

    ``best_metrics`` are the validation metrics of the restored weights (the last phase's best), or the last
    validation's when nothing improved; empty without a validation split.
    """

    steps: int
    best_step: int | None
    best_metrics: dict[str, float]
    stopped_early: bool
    seconds: float
    device: str


TrainingEvent = PhaseStarted | TrainStep | Validated | TrainingFinished


# ---------------------------------------------------------------------------------------------- helpers
def seed_everything(seed: int) -> None:
    """Seed Python, numpy's legacy global generator and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_training_device(name: str = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else the CPU; an explicit device that is absent is an error."""
    if name in ("auto", "", None):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise TrainingError(f"unknown device {name!r}", subject="--device", hint="use auto, cpu or cuda") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError("CUDA was asked for but no CUDA GPU is usable here", subject="--device",
                            hint="use --device cpu (or auto)")
    if device.type not in ("cpu", "cuda"):
        raise TrainingError(f"training on {device.type} is not supported", subject="--device", hint="use cpu or cuda")
    return device


def _lr_factor(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    def factor(i: int) -> float:  # i = steps already taken in the phase
        if warmup and i < warmup:
            return (i + 1) / warmup
        if schedule == "constant" or total <= warmup:
            return 1.0
        t = min(1.0, (i - warmup) / max(1, total - warmup))
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * t))
        return (1 - t) ** 0.9

    return factor


def _make_optimizer(params: list[torch.nn.Parameter], config: TrainConfig, lr: float) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=config.momentum, nesterov=config.momentum > 0,
                               weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    """Mixed precision on ``device`` with ``dtype``, or nothing (float32) when ``dtype`` is None."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _freeze_norm(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


def _state_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


class _JsonLog:
    """Append-only JSON-lines log, flushed per record so a crash or cancel still leaves a readable log."""

    def __init__(self, path: Path | None):
        self.path = None if path is None else Path(path)
        self._fh = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "w", encoding="utf-8")

    def write(self, event: str, **data: Any) -> None:
        if self._fh is None:
            return
        record = {"event": event, "time": round(time.time(), 3), **data}
        self._fh.write(json.dumps(record, default=_json_default) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (Path, torch.device)):
        return str(obj)
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _finite(d: dict[str, float]) -> dict[str, float]:
    # JSON has no NaN: an undefined metric (a class absent from the split) is written as null.
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)  # type: ignore[misc]
            for k, v in d.items()}


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: HrsegModel, samples: Sequence[Sample], *, recipe: Recipe | None = None, phase: str = "",
             device: torch.device | str | None = None, cancel: CancelToken = None,
             amp_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Metrics of ``model`` on labelled samples (whole images or tiles), in eval mode.

    Returns
    -------
    dict
        ``miou``, ``dice``, ``acc``, ``iou_<k>`` (`ConfusionMatrix.scores`), ``loss`` (mean cross-entropy of the
        evaluation logits on labelled pixels), and for samples with instance ids and models that predict
        instances, ``aji``, ``pq`` and ``inst_dice`` (means over samples, as ``eval_instances.py``).
    """
    recipe = recipe or recipe_for(model)
    device = torch.device(device) if device is not None else model.device
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(model.config.num_classes)
    inst, loss_sum, loss_px = [], 0.0, 0
    try:
        for s in samples:
            if is_cancelled(cancel):
                raise Cancelled("validation was cancelled", subject="training")
            batch = recipe.collate([s], model, device)
            with _autocast(device, amp_dtype):
                logits = recipe.predict(model, batch.image, phase=phase).float()
            pred = logits.argmax(1)
            cm.update(pred.cpu().numpy(), s.labels)
            known = int((batch.labels != IGNORE_INDEX).sum())
            if known:
                loss_sum += float(masked_cross_entropy(logits, batch.labels)) * known
                loss_px += known
            if s.instances is not None:
                ids = recipe.predict_instances(model, batch.image, logits)
                if ids is not None:
                    inst.append(instance_scores(s.instances, ids[0]))
    finally:
        model.train(was_training)
    out = cm.scores()
    out["loss"] = loss_sum / loss_px if loss_px else float("nan")
    if inst:
        m = mean_instance_scores(inst)
        out.update(aji=m["aji"], pq=m["pq"], inst_dice=m["dice"])
    return out


# ---------------------------------------------------------------------------------------------- training
def _plan_steps(config: TrainConfig, sampler: CropSampler) -> tuple[int, float]:
    per_epoch = max(1, math.ceil(sampler.total_pixels / (config.crop ** 2 * config.batch_size)))
    if config.steps is not None:
        return int(config.steps), per_epoch
    if config.epochs is not None:
        return max(1, math.ceil(config.epochs * per_epoch)), per_epoch
    raise TrainingError("neither steps nor epochs given", subject="training", hint="pass --steps or --epochs")


def _split_phases(phases: list[Phase], total: int) -> list[int]:
    weights = np.array([max(0.0, p.fraction) for p in phases], dtype=float)
    if weights.sum() <= 0:
        raise TrainingError("the recipe's phases have no steps", subject="recipe")
    raw = weights / weights.sum() * total
    steps = np.floor(raw).astype(int)
    steps[np.argsort(-(raw - steps))[: total - steps.sum()]] += 1  # largest remainders
    if total >= len(phases):
        for i in np.flatnonzero(steps == 0):  # every phase runs at least one step
            steps[i] += 1
            steps[int(np.argmax(steps))] -= 1
    return [int(s) for s in steps]


def train(model: HrsegModel, train_sources: Sequence[LabelledSource], val_sources: Sequence[LabelledSource] = (),
          config: TrainConfig | None = None, *, cancel: CancelToken = None, recipe: Recipe | None = None,
          mpp: float | None = None) -> Generator[TrainingEvent, None, TrainingFinished]:
    """Train ``model`` in place on crops of ``train_sources``, validating on ``val_sources``.

    Parameters
    ----------
    model : HrsegModel
        Any registered architecture; moved to the training device.
    train_sources, val_sources : sequences of LabelledSource
        Training and held-out images (see `napari_hrseg.training.datasets.split_by_image`).
    config : TrainConfig
        Steps, optimiser, schedule, validation, early stopping, device, log.
    cancel : threading.Event or callable, optional
        Checked before every step and every validation image; when set, `Cancelled` is raised.
    recipe : Recipe, optional
        Default: the architecture's registered recipe.
    mpp : float, optional
        Pixel size of the crops; default the model's ``config.mpp``.

    Yields
    ------
    PhaseStarted, TrainStep, Validated, TrainingFinished

    Returns
    -------
    TrainingFinished
    """
    config = config or TrainConfig()
    recipe = recipe or recipe_for(model)
    mpp = float(mpp or model.config.mpp)
    device = resolve_training_device(config.device)
    use_amp = device.type == "cuda" and (config.amp is True or config.amp == "auto")
    amp_dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if use_amp else None
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    seed_everything(config.seed)
    sampler = CropSampler(train_sources, mpp, config.crop, seed=config.seed, augment=config.augment,
                          min_labelled=config.min_labelled, focus=config.focus)
    total, per_epoch = _plan_steps(config, sampler)
    val_samples = (tile_samples(val_sources, mpp, config.val_tile, max_tiles=config.val_max_tiles, seed=config.seed)
                   if val_sources else [])
    monitor = config.monitor
    if monitor == "auto":
        has_inst = model.config.task == "instance" and any(s.instances is not None for s in val_samples)
        monitor = "aji" if has_inst else "miou"
    lower_is_better = monitor == "loss"

    log_file = _JsonLog(config.log_path)
    log_file.write("start", arch=model.config.arch, model=model.config.label, mpp=mpp, device=str(device),
                   amp=str(amp_dtype) if amp_dtype else None, total_steps=total, steps_per_epoch=per_epoch,
                   train=[s.key for s in train_sources], val=[s.key for s in val_sources], monitor=monitor,
                   config=config.to_dict(), pid=os.getpid())
    model.to(device)
    start = time.perf_counter()
    step = 0
    best_step: int | None = None
    best_metrics: dict[str, float] = {}
    last_metrics: dict[str, float] = {}
    stopped_early = False
    try:
        info = recipe.prepare(model, sampler.batch)
        if info:
            log_file.write("prepare", **info)
        phases = recipe.phases(model)
        plan = _split_phases(phases, total)
        for index, (phase, n_steps) in enumerate(zip(phases, plan)):
            if n_steps == 0:
                continue

            def enter(phase=phase):
                model.train()
                if phase.enter is not None:
                    phase.enter(model)
                if config.freeze_norm:
                    _freeze_norm(model)

            enter()
            sampler.reconfigure(crop=max(config.crop, phase.min_crop or 0), scales=phase.scales or (1.0,))
            batch_size = phase.batch_size or config.batch_size
            params = [p for p in model.parameters() if p.requires_grad]
            if not params:
                raise TrainingError(f"phase {phase.name!r} leaves no parameter to train", subject=model.config.arch)
            lr0 = config.lr * phase.lr_scale
            optimizer = _make_optimizer(params, config, lr0)
            factor = _lr_factor(config.schedule, config.warmup_steps, n_steps)
            scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
            val_every = config.val_every or max(1, n_steps // 10)
            phase_best = math.inf if lower_is_better else -math.inf
            phase_best_state: dict[str, torch.Tensor] | None = None
            phase_best_step: int | None = None
            phase_best_metrics: dict[str, float] = {}
            bad = 0
            log_file.write("phase", phase=phase.name, index=index, steps=n_steps, lr=lr0, crop=sampler.crop,
                           scales=list(sampler.scales), batch_size=batch_size)
            yield PhaseStarted(phase.name, index, len(phases), n_steps)
            for i in range(n_steps):
                if is_cancelled(cancel):
                    raise Cancelled(f"training was cancelled at step {step}", subject=model.config.label)
                t0 = time.perf_counter()
                lr = lr0 * factor(i)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                batch = recipe.collate(sampler.batch(batch_size), model, device)
                with _autocast(device, amp_dtype):
                    outputs = model(batch.image)
                    losses = model.loss(outputs, batch)
                loss = losses["loss"]
                if not torch.isfinite(loss):
                    raise TrainingError(f"the loss became {float(loss)} at step {step + 1}", subject=model.config.label,
                                        hint="lower the learning rate (--lr) or check the labels")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if config.grad_clip:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                step += 1
                metrics = _batch_metrics(outputs, batch.labels)
                loss_terms = {k: float(v.detach()) for k, v in losses.items() if torch.is_tensor(v) and v.numel() == 1}
                ev = TrainStep(phase.name, step, total, step / per_epoch, loss_terms, metrics, lr,
                               time.perf_counter() - t0, time.perf_counter() - start)
                log_file.write("step", phase=phase.name, step=step, epoch=round(ev.epoch, 4), lr=lr,
                               seconds=round(ev.seconds, 4), **_finite({**loss_terms, **metrics}))
                yield ev

                last = i == n_steps - 1
                if val_samples and ((i + 1) % val_every == 0 or last):
                    t1 = time.perf_counter()
                    vm = evaluate(model, val_samples, recipe=recipe, phase=phase.name, device=device, cancel=cancel,
                                  amp_dtype=amp_dtype)
                    enter()  # evaluate() left eval mode; re-enter the phase (frozen parts stay frozen)
                    value = vm.get(monitor, float("nan"))
                    if not math.isfinite(value):
                        raise TrainingError(f"validation metric {monitor!r} is not available", subject="--monitor",
                                            hint=f"available: {', '.join(sorted(vm))}")
                    improved = value < phase_best if lower_is_better else value > phase_best
                    if improved:
                        phase_best, phase_best_step, phase_best_metrics = value, step, vm
                        phase_best_state = _state_copy(model)
                        bad = 0
                    else:
                        bad += 1
                    last_metrics = vm
                    log_file.write("val", phase=phase.name, step=step, improved=improved, monitor=monitor,
                                   seconds=round(time.perf_counter() - t1, 3), **_finite(vm))
                    yield Validated(phase.name, step, vm, monitor, value, improved, phase_best,
                                    time.perf_counter() - t1)
                    if config.patience is not None and bad > config.patience:
                        stopped_early = True
                        log_file.write("early_stop", phase=phase.name, step=step, best_step=phase_best_step)
                        break
            if phase_best_state is not None:
                model.load_state_dict(phase_best_state)
                best_step, best_metrics = phase_best_step, phase_best_metrics
            elif last_metrics:
                best_metrics = last_metrics
        model.eval()
        done = TrainingFinished(step, best_step, best_metrics, stopped_early, time.perf_counter() - start, str(device))
        log_file.write("done", steps=step, best_step=best_step, stopped_early=stopped_early,
                       seconds=round(done.seconds, 3), best_metrics=_finite(best_metrics))
        yield done
        return done
    except GeneratorExit:
        log_file.write("cancelled", step=step, reason="generator closed")
        raise
    except Cancelled:
        log_file.write("cancelled", step=step, reason="cancel requested")
        raise
    except Exception as exc:
        log_file.write("error", step=step, error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        log_file.close()


def _batch_metrics(outputs: dict[str, torch.Tensor], labels: torch.Tensor) -> dict[str, float]:
    logits = outputs.get("logits")
    if logits is None or logits.dim() != 4 or logits.shape[-2:] != labels.shape[-2:]:
        return {}
    with torch.no_grad():
        known = labels != IGNORE_INDEX
        n = int(known.sum())
        if not n:
            return {}
        return {"acc": float((logits.argmax(1) == labels)[known].float().mean())}
