"""Fine-tuning from corrections: fine labels where the user corrected, coarse auto-labels elsewhere.

``fine_tune(model, corrections, coarse_labels)`` is a generator: it yields the trainer's `TrainStep` events
(loss terms, batch accuracy, learning rate, seconds) and finally a `FineTuneFinished`, and *returns* the new
model (what napari's ``thread_worker`` emits as ``returned``).  The given model is the teacher and is never
modified: a copy (the student) is trained.  Only when the run finishes is a new version saved (``out``), with
``config.version`` bumped and the lineage recording the parent, the data fingerprint, the seed and the accuracy
on the corrected pixels before and after.  Cancelling (``cancel`` set, or the generator closed) saves nothing.

Inputs
------
``corrections`` and ``coarse_labels`` are iterables of `Sample` (image ``(H, W, 3)`` uint8 and labels ``(H, W)``
at the model's pixel size, or with ``Sample.mpp`` set to be resampled):

- a correction's labels hold the user's classes where they corrected and `IGNORE_INDEX` elsewhere;
- a coarse sample's labels are a teacher's hard labels (`napari_hrseg.training.autolabel`), `IGNORE_INDEX`
  where it was unsure.

A correction and a coarse sample with the same ``key`` (the same image or slide region) are merged into one
training image: the fine label where corrected, the coarse label elsewhere, ignored where neither knows.

Weighting: a correction is usually small next to the coarse labels around it, and where the teacher is wrong
it is also wrong on similar tissue nearby, so its coarse labels there contradict the correction.  By default
the corrected pixels of an image therefore carry ``correction_share`` (half) of its loss weight whatever their
area (never less than the coarse pixels' weight), and ``focus`` (half) of the crops are placed on corrected
pixels; ``correction_weight`` sets a fixed per-pixel weight instead.  ``coarse_labels="teacher"`` makes them from the
model itself on every correction's image (threshold ``coarse_threshold``), which is the usual loop: the user
fixes what is wrong in a region, and the model's confident predictions keep the rest of it in place.

CPU budget: small crops (160 px), batches of 4, a few hundred steps, batch-norm running statistics frozen
(``freeze_norm``: statistics of 4 crops are too noisy to replace those learnt on many), AdamW at a low rate:
minutes on two cores; CUDA (with autocast) when present.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Generator, Iterable, Sequence

import numpy as np

from ..errors import TrainingError
from ..geometry import Region
from ..models.base import HrsegModel
from ..models.config import IGNORE_INDEX
from ..models.weights import save_model
from .augment import Augment
from .autolabel import DEFAULT_THRESHOLD, hard_labels
from .cancel import CancelToken
from .datasets import ArraySource, dataset_fingerprint
from .lineage import make_lineage, next_version
from .predict import PixelGrid, predict_probabilities
from .recipes import Recipe
from .samples import Sample
from .trainer import PhaseStarted, TrainConfig, TrainingFinished, TrainStep, Validated, train

__all__ = [
    "fine_tune",
    "FineTuneFinished",
    "merge_corrections",
    "corrected_accuracy",
    "teacher_coarse_labels",
    "corrections_from_store",
]

log = logging.getLogger(__name__)

#: Fine-tuning augmentation: all orientations, but gentler colour changes than training from scratch (the
#: corrections come from the slide being reviewed, whose stain is what matters now).
LIGHT_AUGMENT = Augment(hed_alpha=0.05, hed_beta=0.01, brightness=0.03, contrast=0.05)


@dataclass(frozen=True)
class FineTuneFinished:
    """The end of a fine-tuning run.

    Parameters
    ----------
    model : HrsegModel
        The new version (eval mode).
    path : Path or None
        Where it was saved.
    version : str
        Its ``config.version``.
    before, after : float
        Accuracy of the teacher / the new model on the corrected pixels.
    steps : int
        Optimiser steps run.
    seconds : float
        Wall time of the training.
    """

    model: HrsegModel
    path: Path | None
    version: str
    before: float
    after: float
    steps: int
    seconds: float


def teacher_coarse_labels(model: HrsegModel, samples: Iterable[Sample],
                          threshold: float = DEFAULT_THRESHOLD) -> list[Sample]:
    """Coarse labels of ``model`` on the images of ``samples`` (same keys), for merging with corrections."""
    out = []
    for s in samples:
        image = s.image if s.mpp is None or np.isclose(s.mpp, model.config.mpp) else None
        if image is None:
            raise TrainingError("coarse labels from the teacher need samples at the model's pixel size", subject=s.key)
        probs = predict_probabilities(model, PixelGrid.of(image))
        out.append(Sample(image, hard_labels(probs, threshold), key=s.key))
    return out


def merge_corrections(corrections: Sequence[Sample], coarse: Sequence[Sample], *,
                      correction_weight: float | None = None,
                      correction_share: float = 0.5, coarse_weight: float = 1.0) -> list[Sample]:
    """Training samples from corrections and coarse labels (see the module docstring).

    Parameters
    ----------
    corrections, coarse : sequences of Sample
        Paired by ``key``.
    correction_weight : float, optional
        Fixed loss weight of a corrected pixel (coarse pixels weigh ``coarse_weight``).  Default: balanced, see
        ``correction_share``.
    correction_share : float
        With ``correction_weight=None``: the share of an image's total loss weight its corrected pixels carry
        (their per-pixel weight is at least ``coarse_weight``).
    coarse_weight : float
        Loss weight of a coarse pixel.

    Returns
    -------
    list of Sample
        One per distinct key, with a ``weight`` map (0 where the label is unknown).
    """
    if not 0 < correction_share < 1:
        raise TrainingError(f"correction_share={correction_share} is not in (0, 1)", subject="fine_tune")
    by_key: dict[str, Sample] = {}
    for s in coarse:
        if s.key in by_key:
            raise TrainingError("two coarse samples share a key", subject=s.key)
        by_key[s.key] = s.evolve(weight=np.where(s.labels != IGNORE_INDEX, coarse_weight, 0.0).astype(np.float32))
    for c in corrections:
        fine = c.labels != IGNORE_INDEX
        base = by_key.get(c.key)
        if base is None:
            w = correction_weight if correction_weight is not None else max(coarse_weight, 1.0)
            by_key[c.key] = c.evolve(weight=np.where(fine, w, 0.0).astype(np.float32))
            continue
        if base.shape != c.shape or base.mpp != c.mpp:
            raise TrainingError(f"correction {c.shape} and coarse labels {base.shape} of the same key differ in size",
                                subject=c.key, hint="give both at the same pixel size and extent")
        n_fine = int(np.count_nonzero(fine))
        n_coarse = int(np.count_nonzero((base.labels != IGNORE_INDEX) & ~fine))
        w = correction_weight
        if w is None:
            w = coarse_weight if n_fine == 0 or n_coarse == 0 else max(
                coarse_weight, correction_share / (1 - correction_share) * coarse_weight * n_coarse / n_fine)
        labels = np.where(fine, c.labels, base.labels).astype(np.uint8)
        weight = np.where(fine, w, base.weight).astype(np.float32)
        by_key[c.key] = base.evolve(labels=labels, weight=weight, image=c.image)
    return list(by_key.values())


def corrected_accuracy(model: HrsegModel, corrections: Sequence[Sample]) -> float:
    """Share of corrected pixels (labels != `IGNORE_INDEX`) that ``model`` predicts as corrected.

    Each sample is predicted in one pass over its corrected pixels' bounding box grown by the model's halo (clipped
    to the sample, starting on the model's stride lattice).  Tiling the whole sample with a full halo around every
    tile cost a multi-scale model (MagNet's halo is ~900 px) twenty times one pass over a 1024-px window.
    """
    hit = total = 0
    stride = max(1, int(model.stride))
    for c in corrections:
        fine = c.labels != IGNORE_INDEX
        if not fine.any():
            continue
        h, w = fine.shape
        rows, cols = np.flatnonzero(fine.any(axis=1)), np.flatnonzero(fine.any(axis=0))
        r0 = max(0, int(rows[0]) - model.halo) // stride * stride
        c0 = max(0, int(cols[0]) - model.halo) // stride * stride
        r1, c1 = min(h, int(rows[-1]) + 1 + model.halo), min(w, int(cols[-1]) + 1 + model.halo)
        box = (slice(r0, r1), slice(c0, c1))
        probs = predict_probabilities(model, PixelGrid.of(np.ascontiguousarray(c.image[box])),
                                      tile=max(r1 - r0, c1 - c0), halo=0)
        pred, wanted, inside = probs.argmax(0), c.labels[box], fine[box]
        hit += int(np.count_nonzero(pred[inside] == wanted[inside]))
        total += int(np.count_nonzero(inside))
    return hit / total if total else float("nan")


def fine_tune(model: HrsegModel, corrections: Iterable[Sample],
              coarse_labels: Iterable[Sample] | str | None = "teacher", *, out: str | Path | None = None,
              steps: int = 200, crop: int = 160, batch_size: int = 4,
              lr: float = 2e-4, weight_decay: float = 1e-4, correction_weight: float | None = None,
              correction_share: float = 0.5, coarse_weight: float = 1.0, focus: float = 0.5,
              coarse_threshold: float = DEFAULT_THRESHOLD, freeze_norm: bool = True, augment: Augment | None = None,
              seed: int = 0, device: str = "auto", version: str | None = None, name: str | None = None,
              val: Sequence[Sample] = (), log_path: str | Path | None = None, cancel: CancelToken = None,
              recipe: Recipe | None = None,
              ) -> Generator[TrainStep | Validated | PhaseStarted | FineTuneFinished, None, HrsegModel]:
    """Fine-tune a copy of ``model`` on corrections plus coarse labels; a generator of steps.

    Parameters
    ----------
    model : HrsegModel
        The current model (teacher); not modified.
    corrections : iterable of Sample
        User corrections (see the module docstring); at least one corrected pixel.
    coarse_labels : iterable of Sample, "teacher" or None
        Coarse auto-labels; ``"teacher"`` computes them with ``model`` on the corrections' images; None uses the
        corrections alone.
    out : path, optional
        Directory of the new version (``config.json`` + ``model.safetensors``), written only at the end.
    steps, crop, batch_size, lr, weight_decay
        Training budget (see `TrainConfig`).
    correction_weight, correction_share, coarse_weight
        Loss weights (see `merge_corrections`): by default corrected pixels carry half of each image's weight.
    focus : float
        Share of crops placed on corrected pixels.
    coarse_threshold : float
        Confidence threshold of ``coarse_labels="teacher"``.
    freeze_norm : bool
        Keep batch-norm statistics frozen (recommended for batches this small).
    augment : Augment, optional
        Default: flips and rotations with light stain jitter.
    seed : int
        Reproducibility of crops, augmentation and model-internal sampling.
    device : str
        ``"auto"``, ``"cpu"`` or ``"cuda"``.
    version, name : str, optional
        Version label (default: `next_version` of the parent's) and name (default: the parent's).
    val : sequence of Sample, optional
        Held-out labelled images to validate on (metrics go into the lineage).
    log_path : path, optional
        JSON-lines log of the run.
    cancel : threading.Event or callable, optional
        Raises `Cancelled` at the next step; nothing is saved.
    recipe : Recipe, optional
        The architecture's phases (default its registered recipe), e.g. ``MagNetRecipe(segmenter_fraction=1)`` to
        adapt only MagNet's segmenter to a new stain.

    Yields
    ------
    PhaseStarted, TrainStep, Validated, FineTuneFinished

    Returns
    -------
    HrsegModel
        The new version, in eval mode (also in `FineTuneFinished.model`).
    """
    corrections = [c for c in corrections]
    if not corrections or not any(np.any(c.labels != IGNORE_INDEX) for c in corrections):
        raise TrainingError("there are no corrected pixels to learn from", subject=model.config.label,
                            hint="paint corrections (or mark a region reviewed) first")
    n_classes = model.config.num_classes
    for c in corrections:
        bad = (c.labels != IGNORE_INDEX) & (c.labels >= n_classes)
        if np.any(bad):
            raise TrainingError(f"corrections use class {int(c.labels[bad].max())}, the model has {n_classes}",
                                subject=c.key, hint=f"classes are 0..{n_classes - 1}")
    corrections = [_at_model_mpp(c, model) for c in corrections]
    if isinstance(coarse_labels, str):
        if coarse_labels != "teacher":
            raise TrainingError(f"coarse_labels={coarse_labels!r} is not 'teacher', samples or None",
                                subject="fine_tune")
        coarse = teacher_coarse_labels(model, corrections, coarse_threshold)
    else:
        coarse = [_at_model_mpp(s, model) for s in (coarse_labels or ())]
    samples = merge_corrections(corrections, coarse, correction_weight=correction_weight,
                                correction_share=correction_share, coarse_weight=coarse_weight)
    fine_keys = {c.key: c.labels != IGNORE_INDEX for c in corrections}
    # The samples are at the model's pixel size; saying so lets recipes that draw crops at coarser scales (MagNet's
    # segmenter) resample them, where a source without a pixel size would hand back full-resolution crops.
    sources = [ArraySource(s.image, s.labels, s.instances, s.weight, mpp=model.config.mpp, key=s.key,
                           focus=fine_keys.get(s.key)) for s in samples]
    val_sources = [ArraySource.from_sample(_at_model_mpp(s, model)) for s in val]

    before = corrected_accuracy(model, corrections)
    student = copy.deepcopy(model)
    config = TrainConfig(
        steps=steps, batch_size=batch_size, crop=crop, lr=lr, weight_decay=weight_decay, optimizer="adamw",
        schedule="cosine", warmup_steps=min(10, steps // 10), val_every=max(1, steps // 4) if val_sources else 0,
        seed=seed, device=device, freeze_norm=freeze_norm, min_labelled=0.02, focus=focus,
        augment=augment if augment is not None else LIGHT_AUGMENT,
        log_path=None if log_path is None else Path(log_path),
    )
    gen = train(student, sources, val_sources, config, cancel=cancel, recipe=recipe)
    finished: TrainingFinished | None = None
    for event in gen:
        if isinstance(event, TrainingFinished):
            finished = event
            continue
        yield event
    assert finished is not None
    after = corrected_accuracy(student, corrections)

    corrected_px = int(sum(np.count_nonzero(c.labels != IGNORE_INDEX) for c in corrections))
    coarse_px = int(sum(np.count_nonzero(s.labels != IGNORE_INDEX) for s in samples)) - corrected_px
    lineage = make_lineage(
        parent=model,
        data={
            "fingerprint": dataset_fingerprint(sources),
            "corrections": sorted({c.key for c in corrections}),
            "corrected_pixels": corrected_px,
            "coarse_pixels": coarse_px,
            "coarse_source": coarse_labels if isinstance(coarse_labels, str) else ("samples" if coarse else None),
            "coarse_threshold": coarse_threshold if coarse_labels == "teacher" else None,
            "correction_weight": correction_weight if correction_weight is not None else "balanced",
            "correction_share": correction_share,
            "coarse_weight": coarse_weight,
            "focus": focus,
            "val": [s.key for s in val_sources],
        },
        seed=seed,
        metrics={"corrected_acc_before": before, "corrected_acc_after": after,
                 **{f"val_{k}": v for k, v in finished.best_metrics.items()}},
        training={"steps": finished.steps, "seconds": round(finished.seconds, 3), "device": finished.device,
                  "config": config.to_dict()},
        kind="fine-tune",
    )
    student.config = student.config.evolve(
        version=version or next_version(model.config.version), name=name or model.config.name, lineage=lineage)
    path = None
    if out is not None:
        path = save_model(student, out)
        log.info("fine-tuned %s -> %s (corrected-pixel accuracy %.3f -> %.3f), saved to %s",
                 model.config.label, student.config.label, before, after, path)
    student.eval()
    done = FineTuneFinished(student, path, student.config.version, before, after, finished.steps, finished.seconds)
    yield done
    return student


def corrections_from_store(store, slide, mpp: float, *, after: int = 0, context: int = 0,
                           sources: Sequence[str] = ("user", "import"), max_size: int = 1024,
                           ) -> tuple[list[Sample], int]:
    """User corrections of a `napari_hrseg.labels.LabelStore` as `Sample`s at the model's pixel size.

    Parameters
    ----------
    store : LabelStore
        A semantic label store of ``slide`` (its ``corrections`` journal queue is read).
    slide : Slide
        The slide the store belongs to (checked by fingerprint).
    mpp : float
        The model's pixel size in µm.
    after : int
        Cursor: only corrections newer than this journal sequence number (``store.cursor("fine-tune")``).
    context : int
        Pixels (at ``mpp``) of surrounding tissue added on each side with unknown labels, so that
        ``coarse_labels="teacher"`` can fill them with the teacher's confident predictions.
    sources, max_size
        Passed to ``store.corrections``.

    Returns
    -------
    (samples, cursor)
        The samples (labels: the corrected classes where the user's edit still holds, `IGNORE_INDEX` elsewhere)
        and the sequence number to store with ``store.set_cursor("fine-tune", cursor)`` once they are used.
    """
    from .resample import read_array_box

    if store.kind != "semantic":
        raise TrainingError("fine-tuning from an instance label store is not supported yet", subject=store.name,
                            hint="use a semantic store")
    store.check_slide(slide)
    if slide.mpp is None:
        raise TrainingError("the slide's pixel size is unknown", subject=slide.name)
    dy, dx = store.downsample
    fy, fx = mpp / slide.mpp_yx[0], mpp / slide.mpp_yx[1]
    samples, cursor = [], after
    for c in store.corrections(after, sources=sources, max_size=max_size):
        cursor = max(cursor, c.seq)
        grow = (int(np.ceil(context * fy)), int(np.ceil(context * fx)))
        region0 = c.region.expand(grow)
        grid = PixelGrid.of(slide, region0, mpp)
        masked = c.masked_labels(IGNORE_INDEX).astype(np.uint8)
        # The grid's level-0 box in the correction's working-level pixels (sub-pixel exact, nearest labels).
        box = (region0.row / dy - c.box.row, region0.col / dx - c.box.col,
               region0.end_row / dy - c.box.row, region0.end_col / dx - c.box.col)
        labels = read_array_box(lambda a, b, e, f: masked[a:b, e:f], masked.shape, box, grid.shape, nearest=True,
                                fill=IGNORE_INDEX, dtype=np.uint8)
        image = grid.read(Region.from_shape(grid.shape))
        samples.append(Sample(image, labels, key=f"{store.name}#{c.group}@{region0}"))
    return samples, cursor


def _at_model_mpp(sample: Sample, model: HrsegModel) -> Sample:
    """``sample`` resampled to the model's pixel size (unchanged when it has no ``mpp`` or already matches)."""
    if sample.mpp is None or np.isclose(sample.mpp, model.config.mpp, rtol=1e-3):
        return sample.evolve(mpp=None)
    src = ArraySource.from_sample(sample)
    h, w = src.size_at(model.config.mpp)
    return src.read(Region(0, 0, h, w), model.config.mpp).evolve(key=sample.key, mpp=None)
