"""``napari-hrseg train``: train any registered model on image/label pairs, label stores or slides.

Examples
--------
Glands on GlaS (layout detected: ``images/`` + ``labels_binary/``, 0.62 µm/px)::

    napari-hrseg train --model fpn --data ../shared/realdata/glas-test-subset --out models/glands \\
        --mpp 1.0 --steps 2000 --crop 256 --val-fraction 0.2 --patience 5

Nuclei on MICCAI 2015 (``imageNN.png`` + ``imageNN_label.png``, pixel sizes from README_training.txt)::

    napari-hrseg train --model fpn --data ../shared/realdata/miccai2015-nuclei --out models/nuclei --mpp 0.5

Any other folder: ``--pair "IMAGE_GLOB:LABEL_TEMPLATE" --label-kind semantic --data-mpp 0.5``; a slide with a
label pyramid: ``--data slide.svs --labels labels.zarr``; the virtual slide: ``--data virtual:SEED[:SIZE]``.

A shipped model, re-created exactly as it was made (data, held-out split, settings; scored on the held-out
images, weights stored in float16; see napari_hrseg/training/shipped.py and docs/models.md)::

    napari-hrseg train --preset nuclei --out napari_hrseg/weights/nuclei

The output directory gets ``model.safetensors``, ``config.json`` (with the lineage: parent, data fingerprint,
seed, validation metrics, command line, time) and ``train_log.jsonl``.  Nothing is written before training has
finished; Ctrl-C leaves no half-saved model.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from ..errors import TrainingError
from ..models.config import CONFIG_FILE, IGNORE_INDEX, WEIGHTS_FILE

__all__ = ["add_parser", "run"]

log = logging.getLogger(__name__)

LOG_FILE = "train_log.jsonl"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train",
        help="train a model on labelled images",
        description="Train any registered model on image/label pairs, label stores or slides; writes "
                    "model.safetensors, config.json (with lineage) and train_log.jsonl into --out.",
        epilog="examples:\n" + __doc__.split("--------\n", 1)[1].split("The output directory")[0].replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = p.add_argument_group("model")
    what.add_argument("--preset", metavar="NAME",
                      help="re-create a shipped model (nuclei, glands, glands-hmsa, tissue, tissue-hmsa, tissue-glnet) "
                           "with its own data, split and settings; only --out, --steps, --init, --realdata, "
                           "--threads, --device, --log and --no-progress apply")
    what.add_argument("--model", metavar="ARCH", help="registered architecture to train from scratch (e.g. fpn)")
    what.add_argument("--init", metavar="MODEL", help="start from this model directory or shipped model instead")
    what.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                      help="architecture hyper-parameter (JSON value), e.g. --param 'widths=[16,32,64,128]'")
    what.add_argument("--mpp", type=float, help="model pixel size in µm (default: the --init model's, else 0.5)")
    what.add_argument("--num-classes", type=int, help="classes, background included (default: from the data)")
    what.add_argument("--class-names", help="comma-separated class names, background first")
    what.add_argument("--name", help="model name (e.g. glands)")
    what.add_argument("--version", default=None, help="version label (default 1, or the next after --init's)")

    data = p.add_argument_group("data")
    data.add_argument("--data", action="append", metavar="SOURCE",
                      help="a folder of image/label pairs, a slide (with --labels), an OME-Zarr with labels, "
                           "or virtual:SEED[:SIZE]; repeatable")
    data.add_argument("--pair", metavar="IMAGE_GLOB:LABEL_TEMPLATE",
                      help='pairing rule for folders, e.g. "images/*.png:labels/{stem}.png" (default: detect)')
    data.add_argument("--label-kind", choices=("binary", "instance", "semantic"),
                      help="how label values are read with --pair (default semantic)")
    data.add_argument("--data-mpp", type=float, help="pixel size of the data in µm, when it does not state it")
    data.add_argument("--labels", metavar="STORE",
                      help="labels of a --data slide: a label store, an OME-Zarr labels group or a zarr pyramid")
    data.add_argument("--label-name", help="which label image of an OME-Zarr labels group")
    data.add_argument("--val-fraction", type=float, default=0.2, help="share of images held out (default 0.2)")
    data.add_argument("--realdata", type=Path, help="with --preset: the real-data folder (default ../shared/realdata "
                                                    "beside the repository, or $HRSEG_REALDATA)")

    run_ = p.add_argument_group("training")
    run_.add_argument("--steps", type=int, help="optimiser steps")
    run_.add_argument("--epochs", type=float, help="epochs (one = the training area once, in expectation)")
    run_.add_argument("--batch-size", type=int, default=4)
    run_.add_argument("--crop", type=int, default=256, help="crop side in pixels at the model's pixel size")
    run_.add_argument("--lr", type=float, default=1e-3)
    run_.add_argument("--weight-decay", type=float, default=1e-4)
    run_.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    run_.add_argument("--schedule", choices=("cosine", "poly", "constant"), default="cosine")
    run_.add_argument("--warmup", type=int, default=0, help="linear warm-up steps")
    run_.add_argument("--val-every", type=int, default=0, help="validate every N steps (default: 10 times)")
    run_.add_argument("--patience", type=int, help="stop after N validations without improvement")
    run_.add_argument("--monitor", default="auto", help="validation metric for best/early stop (miou, dice, aji, loss)")
    run_.add_argument("--no-augment", action="store_true", help="no flips, rotations or stain jitter")
    run_.add_argument("--freeze-norm", action="store_true", help="keep batch-norm statistics frozen (tiny batches)")
    run_.add_argument("--seed", type=int, default=0)
    run_.add_argument("--device", default="auto", help="auto, cpu or cuda")
    run_.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; presets: 1, which was "
                                                  "fastest on a shared two-core machine)")

    out = p.add_argument_group("output")
    out.add_argument("--out", required=True, type=Path, help="model directory to write")
    out.add_argument("--log", type=Path, help=f"JSON-lines log (default OUT/{LOG_FILE})")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)
    return p


# ---------------------------------------------------------------------------------------------- data
def _virtual_source(spec: str):
    from ..training.datasets import SlideSource

    parts = spec.split(":")
    try:
        seed = int(parts[1]) if len(parts) > 1 and parts[1] else 0
        size = int(parts[2]) if len(parts) > 2 else None
    except ValueError as exc:
        raise TrainingError(f"{spec!r} is not virtual:SEED[:SIZE]", subject="--data") from exc
    try:
        from ..virtual import virtual_slide
    except ImportError as exc:
        raise TrainingError("the virtual slide is not available in this installation", subject="--data") from exc
    vs = virtual_slide(seed, size=size) if size else virtual_slide(seed)
    return SlideSource(vs.slide, vs.semantic, vs.instances, key=f"virtual-{seed}"), tuple(vs.class_names)


def _is_zarr(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists() for f in ("zarr.json", ".zgroup", ".zarray"))


def load_sources(args) -> tuple[list, tuple[str, ...] | None]:
    """The labelled sources named by ``--data`` (and the class names when the data states them)."""
    from ..training.datasets import (PairingRule, SlideSource, detect_layout, is_label_store, label_store_source,
                                     open_label_pyramid, pair_files)

    sources, class_names = [], None
    for spec in args.data:
        if spec.startswith("virtual"):
            src, class_names = _virtual_source(spec)
            sources.append(src)
            continue
        path = Path(spec)
        if not path.exists():
            raise TrainingError("data not found", subject=path)
        if path.is_dir() and not _is_zarr(path) and args.labels is None:
            if args.pair:
                rule = PairingRule.parse(args.pair, kind=args.label_kind or "semantic", mpp=args.data_mpp)
            else:
                rule = detect_layout(path)
                if args.label_kind:
                    rule = PairingRule(rule.images, rule.labels, args.label_kind, rule.mpp, rule.exclude, rule.name)
            log.info("%s: %s layout (%s -> %s, %s labels)", path, rule.name, rule.images, rule.labels, rule.kind)
            sources.extend(pair_files(path, rule, mpp=args.data_mpp))
            continue
        # A slide (or OME-Zarr image) with a label pyramid.
        from ..slide import open_slide

        slide = open_slide(path)
        if args.data_mpp:
            slide = slide.with_mpp(args.data_mpp)
        if args.labels and is_label_store(args.labels):
            sources.append(label_store_source(args.labels, slide, key=path.name))
            continue
        labels = open_label_pyramid(Path(args.labels) if args.labels else path, args.label_name)
        sources.append(SlideSource(slide, labels, key=path.name))
    return sources, class_names


def _infer_num_classes(sources) -> int:
    from ..training.datasets import FileSource, SlideSource

    top = 1
    for s in sources:
        if isinstance(s, FileSource):
            if s.kind in ("binary", "instance") and not s.label_map:
                top = max(top, 1)
                continue
            labels = s.load().base.labels
        elif isinstance(s, SlideSource):
            lev = s.semantic[-1]
            labels = np.asarray(lev.compute() if hasattr(lev, "compute") else lev)
        else:
            labels = s.base.labels
        known = labels[labels != IGNORE_INDEX]
        if known.size:
            top = max(top, int(known.max()))
    return top + 1


def _parse_params(items: list[str]) -> dict:
    params = {}
    for item in items:
        if "=" not in item:
            raise TrainingError(f"{item!r} is not KEY=VALUE", subject="--param")
        key, value = item.split("=", 1)
        try:
            params[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            params[key.strip()] = value
    return params


def _check_out(out: Path) -> None:
    """Refuse to replace a directory that is not a model directory (saving replaces the whole directory)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise TrainingError("exists and is not a directory", subject=out, hint="choose another --out")
    extra = {p.name for p in out.iterdir()} - {CONFIG_FILE, WEIGHTS_FILE, LOG_FILE}
    if extra:
        raise TrainingError(f"exists and holds other files ({', '.join(sorted(extra)[:3])})", subject=out,
                            hint="choose an empty or new --out; a model directory is replaced as a whole")


# ---------------------------------------------------------------------------------------------- run
def run(args) -> int:
    from ..models import create_model, load_model, save_model
    from ..training.augment import Augment
    from ..training.datasets import dataset_fingerprint, split_by_image
    from ..training.lineage import make_lineage, next_version
    from ..training.trainer import (PhaseStarted, TrainConfig, TrainingFinished, TrainStep, Validated,
                                    seed_everything, train)

    if args.preset:
        return run_preset(args)
    if not args.data:
        raise TrainingError("no training data given", subject="train",
                            hint="pass --data SOURCE (repeatable), or --preset NAME for a shipped model")
    if bool(args.model) == bool(args.init):
        raise TrainingError("give exactly one of --model ARCH (from scratch) or --init MODEL (continue)",
                            subject="train")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.steps is None and args.epochs is None:
        raise TrainingError("how long to train is not given", subject="train", hint="pass --steps N or --epochs E")
    out: Path = args.out
    _check_out(out)

    sources, data_class_names = load_sources(args)
    seed_everything(args.seed)
    parent = None
    if args.init:
        parent = load_model(args.init)
        model = copy.deepcopy(parent).train()
        if args.param or args.num_classes or args.class_names:
            raise TrainingError("--param, --num-classes and --class-names cannot change a model given with --init",
                                subject="train")
        if args.mpp and not np.isclose(args.mpp, model.config.mpp):
            model.config = model.config.evolve(mpp=args.mpp)
    else:
        class_names = tuple(n.strip() for n in args.class_names.split(",")) if args.class_names else data_class_names
        num_classes = args.num_classes or (len(class_names) if class_names else _infer_num_classes(sources))
        kwargs = dict(num_classes=num_classes, mpp=args.mpp or 0.5, **_parse_params(args.param))
        if class_names:
            kwargs["class_names"] = class_names
        model = create_model(args.model, **kwargs)  # the name is set below (create_model's first argument is the arch)

    train_sources, val_sources = split_by_image(sources, args.val_fraction, args.seed)
    log.info("training %s (%s) at %.3f µm/px on %d image(s), validating on %d", model.config.arch,
             model.config.label, model.config.mpp, len(train_sources), len(val_sources))

    out.parent.mkdir(parents=True, exist_ok=True)
    if args.log:
        log_path, move_log = args.log, False
    else:  # the model directory is written atomically at the end, so the log waits beside it until then
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".jsonl", dir=out.parent)
        os.close(fd)
        log_path, move_log = Path(tmp), True
    config = TrainConfig(
        steps=args.steps, epochs=args.epochs, batch_size=args.batch_size, crop=args.crop, lr=args.lr,
        weight_decay=args.weight_decay, optimizer=args.optimizer, schedule=args.schedule, warmup_steps=args.warmup,
        val_every=args.val_every, patience=args.patience, monitor=args.monitor, seed=args.seed, device=args.device,
        freeze_norm=args.freeze_norm, augment=Augment.identity() if args.no_augment else Augment(), log_path=log_path,
    )
    finished = None
    bar = None
    try:
        from tqdm import tqdm

        for event in train(model, train_sources, val_sources, config):
            if isinstance(event, PhaseStarted):
                if bar is None:
                    bar = tqdm(total=None, unit="step", disable=args.no_progress, dynamic_ncols=True)
                if event.count > 1:
                    bar.write(f"phase {event.index + 1}/{event.count}: {event.phase} ({event.steps} steps)",
                              file=sys.stderr)
            elif isinstance(event, TrainStep):
                if bar is not None:
                    bar.total = event.total_steps
                    bar.update(1)
                    bar.set_postfix(loss=f"{event.loss:.4f}", lr=f"{event.lr:.2e}", refresh=False)
            elif isinstance(event, Validated):
                line = (f"step {event.step}: val {event.monitor}={event.value:.4f}"
                        + (" (best)" if event.improved else "")
                        + "  " + " ".join(f"{k}={v:.4f}" for k, v in event.metrics.items()
                                         if k in ("miou", "dice", "aji", "pq", "loss")))
                if bar is not None and not args.no_progress:
                    bar.write(line, file=sys.stderr)  # above the bar, on the bar's stream
                else:
                    log.info(line)
            elif isinstance(event, TrainingFinished):
                finished = event
    except BaseException:
        if move_log:
            log.info("training log kept at %s", log_path)
        raise
    finally:
        if bar is not None:
            bar.close()
    assert finished is not None

    lineage = make_lineage(
        parent=parent,
        data={
            "fingerprint": dataset_fingerprint(sources),
            "sources": [str(d) for d in args.data],
            "train": [s.key for s in train_sources],
            "val": [s.key for s in val_sources],
            "val_fraction": args.val_fraction,
            "mpp": model.config.mpp,
        },
        seed=args.seed,
        metrics=finished.best_metrics,
        training={"steps": finished.steps, "best_step": finished.best_step, "stopped_early": finished.stopped_early,
                  "seconds": round(finished.seconds, 3), "device": finished.device, "config": config.to_dict()},
    )
    version = args.version or (next_version(parent.config.version) if parent is not None else model.config.version)
    model.config = model.config.evolve(lineage=lineage, version=version,
                                       name=args.name or model.config.name)
    model.to("cpu")
    save_model(model, out)
    if move_log:
        shutil.move(str(log_path), out / LOG_FILE)
    metrics = ", ".join(f"{k}={v:.4f}" for k, v in finished.best_metrics.items() if k in ("miou", "dice", "aji", "pq"))
    log.info("saved %s to %s (%d steps%s)", model.config.label, out, finished.steps,
             f"; validation {metrics}" if metrics else "")
    return 0


def run_preset(args) -> int:
    """``--preset NAME``: train, score on the held-out images and save a shipped model (float16 weights)."""
    from ..training.lineage import command_line
    from ..training.shipped import DEFAULT_THREADS, format_metrics, get_spec, train_shipped
    from ..training.trainer import PhaseStarted, TrainStep

    spec = get_spec(args.preset)
    conflicting = [flag for flag, value in (("--model", args.model), ("--data", args.data), ("--param", args.param),
                                            ("--labels", args.labels), ("--pair", args.pair))
                   if value]
    if conflicting:
        raise TrainingError(f"{', '.join(conflicting)} cannot be combined with --preset", subject="train",
                            hint="a preset fixes its data and model; drop them, or train without --preset")
    out: Path = args.out
    _check_out(out)
    device = "cpu" if args.device == "auto" else args.device
    gen = train_shipped(spec.name, out, realdata=args.realdata, steps=args.steps, init=args.init, device=device,
                        threads=args.threads or DEFAULT_THREADS, log_path=args.log, command=command_line())
    from tqdm import tqdm

    bar = tqdm(total=None, unit="step", disable=args.no_progress, dynamic_ncols=True)
    try:
        while True:
            try:
                event = next(gen)
            except StopIteration as stop:
                result = stop.value
                break
            if isinstance(event, PhaseStarted) and event.count > 1:
                bar.write(f"phase {event.index + 1}/{event.count}: {event.phase} ({event.steps} steps)",
                          file=sys.stderr)
            elif isinstance(event, TrainStep):
                bar.total = event.total_steps
                bar.update(1)
                bar.set_postfix(loss=f"{event.loss:.4f}", refresh=False)
    finally:
        bar.close()
    print(f"held-out ({len(result.metrics['images'])} images): {format_metrics(spec.name, result.metrics)}")
    log.info("saved %s to %s", result.model.config.label, out)
    return 0
