"""The shipped models: exactly how each one was made, so that one command re-creates it.

Each entry of `SHIPPED` names the architecture and its hyper-parameters, the training data and the images held
out from it, the training settings and, for models that start from another shipped model, which one.  One
command trains a model from it, scores it on the held-out images and writes it (weights stored in float16)::

    napari-hrseg train --preset nuclei --out napari_hrseg/weights/nuclei

and ``python -m napari_hrseg.training.shipped evaluate [NAME ...]`` re-scores shipped weights on their held-out
images (``--predictions DIR`` also writes the nucleus predictions as TIFFs next to their ground truth, for
``shared/tools/eval_instances.py``).  The held-out metrics go into the model's lineage (``config.json``).

The models
----------
``nuclei``
    RefineMask with its centre-heatmap proposals, H&E nuclei at 0.5 µm/px, trained on 12 of the 15 MICCAI 2015
    tiles (the 40x ones resampled to 0.5 µm/px) with strong stain jitter; tiles 03, 07 (20x) and 14 (40x) held
    out (the split the architecture was first measured on).
``glands`` / ``glands-hmsa``
    Colon glands (GlaS) at 1 µm/px: MagNet (stages at 2 and 1 µm: the segmenter on crops at both, then the
    refiner) and the hierarchical multi-scale attention model (scales 2 and 1 µm) whose trunk starts from the
    MagNet segmenter; 15 images train, testA_2, testA_4, testA_6, testB_3 and testB_9 are held out.
``tissue`` / ``tissue-hmsa`` / ``tissue-glnet``
    The virtual slide's five classes at 1 µm/px, stages or scales at 4, 2 and 1 µm: MagNet (the demo's and the
    benchmarks' default; its segmenter is the single-scale baseline), multi-scale attention and GLNet (both
    starting from the MagNet segmenter's weights).  Trained on windows of virtual slides 1, 2 and 3 (the tumour's
    border and the tissue's edge), held out: the same two kinds of window of virtual slide 0, which
    ``benchmarks/bench_inference.py`` segments.

Threads: training runs torch on one thread by default (`DEFAULT_THREADS`): on a shared two-core machine two
threads were up to three times slower per step than one.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generator, Mapping, Sequence

import numpy as np
import torch

from ..errors import TrainingError
from ..geometry import Region
from ..models.base import HrsegModel, to_input_tensor
from ..models.config import IGNORE_INDEX
from .augment import Augment
from .cancel import CancelToken
from .datasets import PRESETS, LabelledSource, dataset_fingerprint, pair_files, read_label_file
from .lineage import make_lineage
from .metrics import ConfusionMatrix, instance_scores, mean_instance_scores
from .recipes import Recipe, recipe_for
from .trainer import TrainConfig, TrainingFinished, TrainStep, PhaseStarted, Validated, train

__all__ = [
    "SHIPPED",
    "ShippedSpec",
    "ShippedData",
    "ShippedResult",
    "shipped_names",
    "get_spec",
    "load_data",
    "build_model",
    "train_shipped",
    "evaluate_shipped",
    "evaluate_semantic",
    "evaluate_nuclei",
    "default_realdata",
    "WEIGHTS_DTYPE",
]

log = logging.getLogger(__name__)

#: Shipped weights are stored in half precision (loading casts them back to float32).
WEIGHTS_DTYPE = torch.float16
#: Torch threads while training a preset (see the module docstring).
DEFAULT_THREADS = 1

NUCLEI_HELD_OUT = ("image03.png", "image07.png", "image14.png")
GLANDS_HELD_OUT = ("images/testA_2.png", "images/testA_4.png", "images/testA_6.png", "images/testB_3.png",
                   "images/testB_9.png")
#: Virtual slides (seed, window) the tissue models train on and are tested on; slides are 16,384 px at 1 µm/px.
TISSUE_TRAIN = ((1, "border", 3072), (1, "edge", 2048), (2, "border", 3072), (2, "edge", 2048),
                (3, "border", 3072), (3, "edge", 2048))
TISSUE_HELD_OUT = ((0, "border", 2048), (0, "edge", 2048))
VIRTUAL_SIZE = 16384

TISSUE_CLASSES = ("background", "stroma", "normal epithelium", "lumen", "tumour epithelium")
#: The tissue models' trunk: small enough for interactive CPU inference over a 2 mm field (as
#: ``benchmarks/bench_inference.py``'s ``TRUNK``, so its single-scale baseline can reuse the segmenter).
TISSUE_TRUNK = dict(widths=[16, 32, 48, 64], depths=[1, 1, 2, 1], stem_width=16, fpn_width=32, head_width=32)
#: The gland models' trunk: the FPN baseline's default widths (1.2 M parameters).
GLANDS_TRUNK = dict(widths=[24, 48, 96, 192], depths=[1, 1, 2, 1], stem_width=16, fpn_width=64, head_width=64)
SCALES = (0.25, 0.5, 1.0)
#: `tissue`'s two MagNet phases, in steps.  The segmenter phase is the first, has its own optimiser and learning
#: rate schedule and draws its crops before the refiner's, so it does not depend on the refiner phase: 720 steps
#: make the same segmenter as version 1 (whose 900 steps were 80 % segmenter), which `tissue-hmsa` and
#: `tissue-glnet` start from.  The refiner (version 2) is narrower than the library's default (widths 16 and 8
#: instead of 32 and 16: a quarter of the cost per refined pixel; a step of two 1,024-px crops took 1.0-1.6 s on the
#: shared machine instead of 2.8 s) and trains 800 steps instead of 180: with 180 it had not learnt to keep the
#: coarse stage's lumen where a 256-px patch without context looks like glass.  The trainer splits the steps by the
#: phases' fractions (largest remainders): exactly 720 and 800.
TISSUE_SEGMENTER_STEPS = 720
TISSUE_REFINER_STEPS = 800
#: GlaS images are 0.5 x 0.3 mm: at 2 µm/px one 256-px patch holds a whole image, MagNet's coarse view; a
#: 4 µm/px stage would see 120 x 80 px (measured: its segmenter scored 0.38 mIoU there, 0.72 at 2 and 1 µm/px).
GLANDS_SCALES = (0.5, 1.0)

#: Stain jitter for real H&E from several labs (MICCAI's 20x TCGA tiles are much pinker than its 40x ones).
STRONG_STAIN = Augment(hed_alpha=0.15, hed_beta=0.03, brightness=0.08, contrast=0.15)


@dataclass(frozen=True)
class ShippedSpec:
    """How one shipped model is made.

    Parameters
    ----------
    name : str
        Model name and directory (``napari_hrseg/weights/<name>``).
    summary : str
        One line for listings.
    arch : str
        Registered architecture.
    model : mapping
        `napari_hrseg.models.create_model` keywords (classes, pixel size, scales, hyper-parameters).
    train : mapping
        `TrainConfig` keywords.
    data : str
        ``"miccai2015"``, ``"glas"`` or ``"virtual"`` (see `load_data`).
    recipe : mapping
        Keywords of the architecture's recipe class (e.g. MagNet's ``refiner_crop``).
    init : str, optional
        Shipped model whose trunk initialises this one (`initialise_from`).
    version : str
    shipped : bool
        Whether the package ships weights made by this preset (False: the preset trains the model on request, but
        no weights of it are in ``napari_hrseg/weights``).
    """

    name: str
    summary: str
    arch: str
    model: Mapping[str, Any]
    train: Mapping[str, Any]
    data: str
    recipe: Mapping[str, Any] = field(default_factory=dict)
    init: str | None = None
    version: str = "1"
    shipped: bool = True

    @property
    def command(self) -> str:
        return f"napari-hrseg train --preset {self.name} --out napari_hrseg/weights/{self.name}"


SHIPPED: dict[str, ShippedSpec] = {
    spec.name: spec
    for spec in (
        ShippedSpec(
            "nuclei", "H&E nuclei, instances (RefineMask with centre proposals), 0.5 µm/px, MICCAI 2015",
            "refinemask",
            model=dict(num_classes=2, class_names=("background", "nucleus"), mpp=0.5,
                       max_train_rois=32),  # RoIs per crop: the mask head dominates a CPU step
            train=dict(steps=500, batch_size=4, crop=192, lr=1e-3, warmup_steps=20, augment=STRONG_STAIN, seed=0),
            data="miccai2015",
        ),
        ShippedSpec(
            "glands", "colon glands (GlaS), MagNet 2-1 µm, 1 µm/px", "magnet",
            model=dict(num_classes=2, class_names=("background", "gland"), mpp=1.0, scales=GLANDS_SCALES,
                       patch_size=256, **GLANDS_TRUNK),
            train=dict(steps=1100, batch_size=4, crop=256, lr=2e-3, warmup_steps=20, augment=STRONG_STAIN, seed=0),
            recipe=dict(segmenter_fraction=0.85, refiner_crop=512, refiner_batch_size=2),
            data="glas",
        ),
        ShippedSpec(
            "glands-hmsa", "colon glands (GlaS), multi-scale attention 2-1 µm, 1 µm/px", "hmsa",
            model=dict(num_classes=2, class_names=("background", "gland"), mpp=1.0, scales=GLANDS_SCALES,
                       attention_width=32, **GLANDS_TRUNK),
            train=dict(steps=300, batch_size=4, crop=320, lr=5e-4, warmup_steps=10, augment=STRONG_STAIN, seed=0),
            data="glas", init="glands",
        ),
        ShippedSpec(
            "tissue", "virtual-slide tissue classes, MagNet 4-2-1 µm, 1 µm/px (demo and benchmark default)",
            "magnet",
            model=dict(num_classes=5, class_names=TISSUE_CLASSES, mpp=1.0, scales=SCALES, patch_size=256,
                       kernel_size=5, n_points=0.75, refiner_width=16, refiner_planes=8, **TISSUE_TRUNK),
            train=dict(steps=TISSUE_SEGMENTER_STEPS + TISSUE_REFINER_STEPS, batch_size=4, crop=256, lr=3e-3,
                       warmup_steps=20, seed=0),
            recipe=dict(segmenter_fraction=TISSUE_SEGMENTER_STEPS / (TISSUE_SEGMENTER_STEPS + TISSUE_REFINER_STEPS),
                        refiner_crop=1024, refiner_batch_size=2),
            data="virtual", version="2",
        ),
        ShippedSpec(
            "tissue-hmsa", "virtual-slide tissue classes, multi-scale attention 4-2-1 µm, 1 µm/px", "hmsa",
            model=dict(num_classes=5, class_names=TISSUE_CLASSES, mpp=1.0, scales=SCALES, attention_width=32,
                       **TISSUE_TRUNK),
            train=dict(steps=300, batch_size=2, crop=512, lr=1e-3, warmup_steps=10, seed=0),
            data="virtual", init="tissue",
        ),
        ShippedSpec(
            "tissue-glnet", "virtual-slide tissue classes, GLNet (global 4 µm, local 1 µm), 1 µm/px", "glnet",
            model=dict(num_classes=5, class_names=TISSUE_CLASSES, mpp=1.0, scales=(0.25, 1.0),
                       widths=TISSUE_TRUNK["widths"], depths=TISSUE_TRUNK["depths"], stem_width=16, fpn_width=32,
                       head_width=16, size_g=192, size_p=256, min_overlap=50, patch_batch=8),
            train=dict(steps=300, batch_size=1, crop=768, lr=1e-3, warmup_steps=10, seed=0),
            # the global branch starts from the MagNet segmenter's encoder; the local branch and the aggregation
            # (modes 2 and 3) need the steps
            recipe=dict(fractions=(0.25, 0.35, 0.4)),
            data="virtual", init="tissue",
        ),
    )
}


def shipped_names(*, with_weights: bool = False) -> list[str]:
    """Names of the shipped-model presets, in the order they must be trained (initialisers first); with
    ``with_weights``, only those whose weights the package ships."""
    return [name for name, spec in SHIPPED.items() if spec.shipped or not with_weights]


def get_spec(name: str) -> ShippedSpec:
    try:
        return SHIPPED[name]
    except KeyError:
        raise TrainingError(f"no shipped-model preset {name!r}", subject="--preset",
                            hint=f"known: {', '.join(SHIPPED)}") from None


def default_realdata() -> Path:
    """``$HRSEG_REALDATA``, else ``shared/realdata`` beside the repository."""
    env = os.environ.get("HRSEG_REALDATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "shared" / "realdata"


def default_cache() -> Path:
    """Where rendered virtual-slide windows are cached: ``$HRSEG_CACHE``, else ``~/.cache/napari-hrseg``."""
    env = os.environ.get("HRSEG_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "napari-hrseg"


# ---------------------------------------------------------------------------------------------- data
@dataclass
class ShippedData:
    """Training and held-out sources of a preset, and what to record about them."""

    train: list[LabelledSource]
    test: list[LabelledSource]
    description: dict[str, Any]


def _split_by_keys(sources: Sequence[LabelledSource], held_out: Sequence[str], root: Path) -> tuple[list, list]:
    keys = {s.key for s in sources}
    missing = [k for k in held_out if k not in keys]
    if missing:
        raise TrainingError(f"held-out images {missing} are not in the data", subject=root,
                            hint="is this the right copy of the data set?")
    return [s for s in sources if s.key not in held_out], [s for s in sources if s.key in held_out]


def load_data(kind: str, realdata: str | Path | None = None) -> ShippedData:
    """The training and held-out sources of a preset's data set.

    Parameters
    ----------
    kind : {"miccai2015", "glas", "virtual"}
    realdata : path, optional
        The real-data folder (default `default_realdata`).
    """
    root = Path(realdata) if realdata is not None else default_realdata()
    if kind == "miccai2015":
        folder = root / "miccai2015-nuclei"
        train_s, test_s = _split_by_keys(pair_files(folder, PRESETS["miccai2015"]), NUCLEI_HELD_OUT, folder)
        return ShippedData(train_s, test_s, {"dataset": "MICCAI 2015 nuclei (TCGA H&E)", "root": str(folder)})
    if kind == "glas":
        folder = root / "glas-test-subset"
        train_s, test_s = _split_by_keys(pair_files(folder, PRESETS["glas"]), GLANDS_HELD_OUT, folder)
        return ShippedData(train_s, test_s, {"dataset": "GlaS@MICCAI 2015 test images (binary gland masks)",
                                             "root": str(folder)})
    if kind == "virtual":
        from .windows import virtual_window

        t0 = time.perf_counter()
        cache = default_cache()
        train_s = [virtual_window(seed, where, window=w, size=VIRTUAL_SIZE, mpp=1.0, cache=cache)
                   for seed, where, w in TISSUE_TRAIN]
        test_s = [virtual_window(seed, where, window=w, size=VIRTUAL_SIZE, mpp=1.0, cache=cache)
                  for seed, where, w in TISSUE_HELD_OUT]
        log.info("virtual windows rendered in %.0f s", time.perf_counter() - t0)
        return ShippedData(train_s, test_s, {"dataset": f"virtual slides ({VIRTUAL_SIZE} px at 1 µm/px, stain 'he')",
                                             "windows": [list(t) for t in TISSUE_TRAIN],
                                             "held_out_windows": [list(t) for t in TISSUE_HELD_OUT]})
    raise TrainingError(f"unknown data set {kind!r}", subject="preset", hint="miccai2015, glas or virtual")


# ---------------------------------------------------------------------------------------------- models
def build_model(spec: ShippedSpec, init: HrsegModel | None = None) -> HrsegModel:
    """A fresh model of ``spec`` (seeded), its trunk copied from ``init`` when the spec names one."""
    from ..models import create_model

    torch.manual_seed(int(spec.train.get("seed", 0)))
    model = create_model(spec.arch, name=spec.name, version=spec.version, **dict(spec.model))
    if init is not None:
        initialise_from(model, init)
    return model


def _segmenter(parent: HrsegModel) -> torch.nn.Module:
    if parent.config.arch == "magnet":
        return parent.segmenter  # type: ignore[return-value]
    if parent.config.arch == "fpn":
        return parent
    if parent.config.arch == "hmsa":
        return parent.trunk  # type: ignore[return-value]
    raise TrainingError(f"cannot take a trunk from a {parent.config.arch!r} model", subject=parent.config.label)


def initialise_from(model: HrsegModel, parent: HrsegModel) -> None:
    """Copy ``parent``'s single-scale trunk into ``model``: the attention model's trunk, or both GLNet encoders.

    Multi-scale models share what a single-scale segmenter learns: the MagNet segmenter, trained on every scale,
    is a good start for an attention trunk (same FPN) and for GLNet's global (coarse) and local (fine) encoders.
    """
    seg = _segmenter(parent)
    try:
        if model.config.arch == "hmsa":
            model.trunk.load_state_dict(seg.state_dict())  # type: ignore[union-attr]
        elif model.config.arch == "glnet":
            for enc in (model.global_encoder, model.local_encoder):  # type: ignore[union-attr]
                enc.load_state_dict(seg.encoder.state_dict())  # type: ignore[union-attr]
        elif model.config.arch == "magnet":
            model.segmenter.load_state_dict(seg.state_dict())  # type: ignore[union-attr]
        else:
            raise TrainingError(f"no trunk initialisation for {model.config.arch!r}", subject=model.config.label)
    except RuntimeError as exc:  # shapes differ
        raise TrainingError(f"the trunk of {parent.config.label} does not fit {model.config.label} ({exc})",
                            subject=model.config.label, hint="give both the same widths and depths") from exc


def make_recipe(spec: ShippedSpec) -> Recipe:
    recipe = recipe_for(spec.arch)
    return type(recipe)(**dict(spec.recipe)) if spec.recipe else recipe


# ---------------------------------------------------------------------------------------------- evaluation
def _labels_native(source) -> np.ndarray:
    """Ground-truth classes of a file source at its own resolution."""
    return source.load().base.labels


@torch.no_grad()
def _logits_whole(model: HrsegModel, image: np.ndarray) -> torch.Tensor:
    """Evaluation logits ``(1, C, H, W)`` of one whole image (the architecture's own eval forward)."""
    x = to_input_tensor(image[None], model.config, model.device).contiguous()
    return model(x)["logits"].float()


#: The region pipeline each architecture runs in the app and the benchmarks (`napari_hrseg.inference`).
PIPELINES = {"magnet": "magnet", "hmsa": "hmsa", "glnet": "glnet", "fpn": "sliding_window"}


def _labels_by_pipeline(model: HrsegModel, source) -> np.ndarray:
    """Labels ``(H, W)`` of a whole in-memory slide window on the model's grid, by the architecture's region
    pipeline: every scale read from its own pyramid level, as the app and ``bench_inference.py`` run it."""
    from ..inference import InferenceOptions, InferenceRequest, run_request, run_to_completion

    method = PIPELINES.get(model.config.arch, "sliding_window")
    region = Region.from_shape(source.slide.shape)
    options = InferenceOptions(method=method, device="cpu", skip_glass=False)
    prediction = run_to_completion(run_request(InferenceRequest(source.slide, region, model, options)))
    return np.asarray(prediction.labels)


@torch.no_grad()
def evaluate_semantic(model: HrsegModel, sources: Sequence[LabelledSource], *,
                      native: bool = True) -> dict[str, Any]:
    """Held-out semantic scores: confusion accumulated over every image, whole images at the model's pixel size.

    Parameters
    ----------
    model : HrsegModel
        In eval mode.  Image files are segmented by the architecture's own eval forward on the whole image
        (MagNet: the progressive pass; attention: the multi-scale chain); slide windows (the virtual slide's) by
        its region pipeline (`PIPELINES`), which reads every scale from its pyramid level.  The pipeline matters
        for GLNet: its eval forward would shrink a whole 2 mm window to ``size_g`` pixels (10 µm/px), where the
        pipeline reads the global view at the scale it was trained at.
    sources : sequence
        Held-out images.
    native : bool
        Score file sources at their own resolution (logits upsampled bilinearly before the argmax); slide
        windows are scored on the model's grid.

    Returns
    -------
    dict
        ``miou``, ``dice`` (mean over foreground classes), ``acc``, ``iou_<k>``, ``dice_<k>``, per-image
        ``images`` (key, miou, dice), ``n``.
    """
    from ..models.blocks import resize
    from .datasets import FileSource, SlideSource

    model.eval()
    mpp = model.config.mpp
    total = ConfusionMatrix(model.config.num_classes)
    per_image = []
    for s in sources:
        h, w = s.size_at(mpp)
        if isinstance(s, SlideSource):
            truth = s.read(Region(0, 0, h, w), mpp).labels
            pred = _labels_by_pipeline(model, s)
            if pred.shape != truth.shape:
                raise TrainingError(f"the pipeline's grid {pred.shape} is not the window's {truth.shape}",
                                    subject=s.key, hint="slide windows must be at the model's pixel size")
        else:
            sample = s.read(Region(0, 0, h, w), mpp)
            logits = _logits_whole(model, sample.image)
            truth = sample.labels
            if native and isinstance(s, FileSource):
                truth = _labels_native(s)
                logits = resize(logits, truth.shape)
            pred = logits.argmax(1)[0].cpu().numpy()
        cm = ConfusionMatrix(model.config.num_classes).update(pred, truth)
        total.matrix += cm.matrix
        sc = cm.scores()
        per_image.append({"image": s.key, "miou": round(sc["miou"], 4), "dice": round(sc["dice"], 4)})
    out: dict[str, Any] = total.scores()
    out.update({f"dice_{k}": float(v) for k, v in enumerate(total.dice())})
    out["images"] = per_image
    out["n"] = len(per_image)
    return out


@torch.no_grad()
def predict_nuclei(model: HrsegModel, source) -> tuple[np.ndarray, np.ndarray]:
    """Instance labels of one held-out tile at its native resolution, and its ground truth.

    The tile is read at the model's pixel size, ``model.predict_instances`` finds and segments the nuclei, and
    the label image is resized (nearest) back to the tile's own pixels, where ``eval_instances.py`` scores it.
    """
    from PIL import Image

    mpp = model.config.mpp
    h, w = source.size_at(mpp)
    sample = source.read(Region(0, 0, h, w), mpp)
    x = to_input_tensor(sample.image[None], model.config, model.device).contiguous()
    labels = np.asarray(model.predict_instances(x).labels, dtype=np.int32)  # type: ignore[attr-defined]
    gt = read_label_file(source.label_path).astype(np.int32)
    if labels.shape != gt.shape:
        labels = np.asarray(Image.fromarray(labels).resize((gt.shape[1], gt.shape[0]), Image.NEAREST), np.int32)
    return labels, gt


def evaluate_nuclei(model: HrsegModel, sources: Sequence, *, predictions: str | Path | None = None
                    ) -> dict[str, Any]:
    """Held-out instance scores (pixel Dice, AJI, PQ per tile at native resolution, mean over tiles), computed
    as ``shared/tools/eval_instances.py`` does.

    Parameters
    ----------
    predictions : path, optional
        Folder to write ``pred/<stem>.tif`` (uint16 instance labels) and ``gt/<stem>_label.png`` (copies of the
        ground truth), so that ``python eval_instances.py DIR/gt DIR/pred`` scores exactly these tiles.
    """
    import tifffile

    model.eval()
    rows, per_image = [], []
    out_dir = Path(predictions) if predictions is not None else None
    if out_dir is not None:
        (out_dir / "pred").mkdir(parents=True, exist_ok=True)
        (out_dir / "gt").mkdir(parents=True, exist_ok=True)
    for s in sources:
        labels, gt = predict_nuclei(model, s)
        sc = instance_scores(gt, labels)
        rows.append(sc)
        stem = Path(s.key).stem
        per_image.append({"image": s.key, "dice": round(sc.dice, 4), "aji": round(sc.aji, 4), "pq": round(sc.pq, 4),
                          "gt": sc.n_gt, "pred": sc.n_pred})
        if out_dir is not None:
            if labels.max() > np.iinfo(np.uint16).max:
                raise TrainingError("more instances than a uint16 TIFF holds", subject=s.key)
            tifffile.imwrite(out_dir / "pred" / f"{stem}.tif", labels.astype(np.uint16))
            shutil.copyfile(s.label_path, out_dir / "gt" / f"{stem}_label.png")
    mean = mean_instance_scores(rows)
    return {"dice": mean["dice"], "aji": mean["aji"], "pq": mean["pq"], "n": mean["n"], "images": per_image}


def evaluate_shipped(name: str, model: HrsegModel | None = None, *, data: ShippedData | None = None,
                     realdata: str | Path | None = None, predictions: str | Path | None = None) -> dict[str, Any]:
    """Score a preset's model (default: the shipped weights) on its held-out images."""
    from ..models import load_model

    spec = get_spec(name)
    model = model if model is not None else load_model(name)
    data = data if data is not None else load_data(spec.data, realdata)
    if spec.arch == "refinemask":
        return evaluate_nuclei(model, data.test, predictions=predictions)
    return evaluate_semantic(model, data.test)


# ---------------------------------------------------------------------------------------------- training
@dataclass(frozen=True)
class ShippedResult:
    """A trained preset: the model (lineage set), its held-out metrics, where it was saved."""

    model: HrsegModel
    metrics: dict[str, Any]
    path: Path | None
    finished: TrainingFinished


def _headline(metrics: Mapping[str, Any]) -> dict[str, float]:
    keys = ("dice", "aji", "pq", "miou", "acc") + tuple(k for k in metrics if k.startswith(("iou_", "dice_")))
    return {f"heldout_{k}": round(float(metrics[k]), 4) for k in keys if k in metrics
            and isinstance(metrics[k], (int, float)) and np.isfinite(metrics[k])}


def train_shipped(name: str, out: str | Path | None = None, *, realdata: str | Path | None = None,
                  steps: int | None = None, init: str | Path | HrsegModel | None = None, device: str = "cpu",
                  threads: int | None = DEFAULT_THREADS, log_path: str | Path | None = None,
                  cancel: CancelToken = None, command: str | None = None,
                  ) -> Generator[PhaseStarted | TrainStep | Validated | TrainingFinished, None, ShippedResult]:
    """Train a shipped model from its preset, score it on the held-out images and save it; a generator.

    Parameters
    ----------
    name : str
        Preset (`shipped_names`).
    out : path, optional
        Model directory to write (weights in float16); nothing is written before the end.
    realdata : path, optional
        The real-data folder (default `default_realdata`).
    steps : int, optional
        Override the preset's steps (smoke tests; the lineage records it).
    init : str, path or HrsegModel, optional
        The model the preset's ``init`` names (default: the shipped one of that name).
    device : str
        Training device; the presets were made on the CPU.
    threads : int, optional
        Torch threads during training (restored after); None leaves torch's setting.
    log_path : path, optional
        JSON-lines log of the run.
    cancel : threading.Event or callable, optional
    command : str, optional
        Command line recorded in the lineage (default: this process's).

    Yields
    ------
    The trainer's events.

    Returns
    -------
    ShippedResult
    """
    from ..models import load_model, save_model

    spec = get_spec(name)
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        parent = None
        if spec.init is not None:
            parent = init if isinstance(init, HrsegModel) else load_model(init if init is not None else spec.init)
        data = load_data(spec.data, realdata)
        model = build_model(spec, parent)
        settings = dict(spec.train)
        if steps is not None:
            settings["steps"] = int(steps)
        config = TrainConfig(device=device, log_path=None if log_path is None else Path(log_path), **settings)
        finished = None
        gen = train(model, data.train, (), config, cancel=cancel, recipe=make_recipe(spec))
        for event in gen:
            if isinstance(event, TrainingFinished):
                finished = event
            yield event
        assert finished is not None
        model.to("cpu").eval()
        t0 = time.perf_counter()
        metrics = evaluate_shipped(name, model, data=data)
        log.info("%s held-out: %s (%.0f s)", name, _headline(metrics), time.perf_counter() - t0)
    finally:
        torch.set_num_threads(previous_threads)
    lineage = make_lineage(
        parent=parent,
        data={
            **data.description,
            "fingerprint": dataset_fingerprint(data.train),
            "train": [s.key for s in data.train],
            "held_out": [s.key for s in data.test],
            "held_out_fingerprint": dataset_fingerprint(data.test),
            "mpp": model.config.mpp,
        },
        seed=int(spec.train.get("seed", 0)),
        metrics={**_headline(metrics), "heldout_images": metrics["images"]},
        training={"preset": spec.name, "steps": finished.steps, "seconds": round(finished.seconds, 1),
                  "device": finished.device, "threads": threads, "recipe": dict(spec.recipe),
                  "config": config.to_dict()},
        command=command or spec.command,
    )
    model.config = model.config.evolve(lineage=lineage)
    path = save_model(model, out, dtype=WEIGHTS_DTYPE) if out is not None else None
    if path is not None:
        _make_readable(Path(path))
    return ShippedResult(model, metrics, path, finished)


def _make_readable(directory: Path) -> None:
    """Weights are written through a private temporary file (mode 0600); a shipped package must be readable by
    every user who installs it."""
    directory.chmod(0o755)
    for p in directory.iterdir():
        if p.is_file():
            p.chmod(0o644)


# ---------------------------------------------------------------------------------------------- command line
def format_metrics(name: str, metrics: Mapping[str, Any]) -> str:
    """One table row of held-out metrics."""
    if "aji" in metrics:
        return f"{name:<14} dice={metrics['dice']:.3f} aji={metrics['aji']:.3f} pq={metrics['pq']:.3f} n={metrics['n']}"
    ious = " ".join(f"{k}={metrics[k]:.3f}" for k in sorted(metrics) if k.startswith("iou_")
                    and np.isfinite(metrics[k]))
    return f"{name:<14} miou={metrics['miou']:.3f} dice={metrics['dice']:.3f} acc={metrics['acc']:.3f} {ious}"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m napari_hrseg.training.shipped evaluate [NAME ...] [--predictions DIR]``."""
    p = argparse.ArgumentParser(prog="python -m napari_hrseg.training.shipped",
                                description="Score shipped models on their held-out images.")
    sub = p.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("evaluate", help="held-out metrics of shipped weights")
    ev.add_argument("names", nargs="*", help=f"presets (default every shipped one: "
                                             f"{', '.join(shipped_names(with_weights=True))})")
    ev.add_argument("--model", type=Path, help="score this model directory instead of the shipped weights (one name)")
    ev.add_argument("--predictions", type=Path, help="write the nucleus predictions and ground truth here")
    ev.add_argument("--realdata", type=Path, help="the real-data folder")
    ev.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    ev.add_argument("--write-lineage", action="store_true",
                    help="store the new held-out scores in the shipped model's config.json (after a change to the "
                         "evaluation; the lineage records when and by which command)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    from ..models import load_model
    from ..models.weights import shipped_models

    names = args.names or [n for n in SHIPPED if n in shipped_models()]
    for name in names:
        model = load_model(args.model) if args.model else None
        metrics = evaluate_shipped(name, model, realdata=args.realdata,
                                   predictions=args.predictions if name == "nuclei" else None)
        print(format_metrics(name, metrics))
        for row in metrics["images"]:
            print("    " + " ".join(f"{k}={v}" for k, v in row.items()))
        if args.write_lineage:
            words = list(sys.argv[1:] if argv is None else argv)
            rescore_lineage(name, metrics, command=" ".join(["python -m napari_hrseg.training.shipped", *words]))
    return 0


def rescore_lineage(name: str, metrics: Mapping[str, Any], *, command: str) -> Path:
    """Replace the held-out metrics in a shipped model's ``config.json`` (weights untouched), recording when and
    by which command they were computed."""
    from ..models.config import ModelConfig
    from ..models.weights import shipped_model_dir

    directory = shipped_model_dir(name)
    if directory is None:
        raise TrainingError("no shipped weights of that name", subject=name)
    config = ModelConfig.load(directory)
    lineage = dict(config.lineage)
    lineage["metrics"] = {**_headline(metrics), "heldout_images": list(metrics["images"])}
    lineage["metrics_rescored"] = {"command": command, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    config.evolve(lineage=lineage).save(directory)
    return directory


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
