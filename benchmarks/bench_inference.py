"""The inference engine measured in one run: region methods on the virtual slide's ground truth, whole-slide memory
and throughput, and dask's speed-up.

Part 1, region methods.  A 2048 x 2048 level-0 region of the virtual slide (seed 0, 16,384 px at 1 µm/px, the
square on the tumour's border: stroma, normal crypts with lumens and tumour glands, so it holds both micrometre
boundaries and a class, tumour vs normal epithelium, that only a millimetre of context tells apart) is segmented by

- the global downsampled single pass (the region read at 4 µm, longest side 512 px, one pass, upsampled),
- the full-resolution sliding window (1 µm, 512-px tiles with the model's halo),
- MagNet (stages at 4, 2 and 1 µm, each read from its pyramid level) and MagNet-Fast (the most uncertain patches
  only: the paper's 4 per stage, and the setting chosen on a validation slide with ``--tune``),
- hierarchical multi-scale attention (scales 0.25, 0.5, 1 = 4, 2, 1 µm, each from its level),
- GLNet (global branch at 4 µm with context around the region, 256-px local patches at 1 µm),

each scored by mIoU against the exact ground truth (over the classes in the ground truth or the prediction: a class
predicted but absent scores 0; the mIoU over the ground truth's classes alone is printed too), with its wall time
and CPU time and peak memory (the process's resident-set high-water mark during the run above what it held before:
Linux's VmHWM, reset per run).  After one untimed warm-up run of every method, ``--repeat`` rounds run every method
once each, round-robin; times are the medians, and each ratio to the sliding window is the median of the per-round
ratios (the CPU is shared: a busy spell slows one round of every method alike, not one method).  The
single-scale baselines use MagNet's segmenter, as in the MagNet paper.

Models: the shipped ``tissue`` (MagNet), ``tissue-hmsa`` and ``tissue-glnet`` models (trained on virtual slides 1-3,
with this region held out), or ``--model DIR`` (subdirectories with config.json, one per architecture).  A model
that is not shipped is trained here as a stand-in (the attention model or GLNet from the MagNet segmenter, for a
fraction of a shipped model's steps, on virtual slide 1's tumour border, cached under ``--cache``) and its row is
marked "(trained here)"; ``--no-train`` skips it instead, ``--train`` trains all three here.  MagNet's and
MagNet-Fast's settings were chosen with ``--tune`` on virtual slide 4 (see `MAGNET_POINTS`).

Part 2, whole slides.  `segment_slide` on a virtual slide and on one with four times its tissue area (twice the
side), each in a fresh process (a model at 4 µm/px, the segmenter's weights): peak resident memory of the process,
its ratio (aim <= 1.2) and throughput in model-grid megapixels per second.  The virtual slide renders its pixels as
they are read, which is what bounds that throughput.

Part 3, dask.  Two real slide files (CMU-1 as SVS and as a pyramidal TIFF, the model at 0.5 µm/px) through
`segment_slides` in this process, then on a `LocalCluster` of 1 and of 2 single-threaded worker processes: seconds,
megapixels per second and the speed-up of 2 workers over 1.

Torch runs on ``--threads`` threads (default 1) in every part, so methods compare on equal terms on a shared CPU.

Run:  python benchmarks/bench_inference.py [--quick] [--repeat 3] [--parts 1,2,3] [--no-train | --train] [--train-steps 240]
      [--cache DIR] [--model DIR] [--tune] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import ctypes
import dataclasses
import gc
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

# dask.distributed's workers log every connection at INFO; the tables go to stdout, but keep stderr readable too
os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import dask.array as da  # noqa: E402
import torch  # noqa: E402

from napari_hrseg.geometry import Region  # noqa: E402
from napari_hrseg.inference import (  # noqa: E402
    InferenceOptions,
    InferenceRequest,
    run_request,
    run_to_completion,
)
from napari_hrseg.models import Batch, create_model, to_input_tensor  # noqa: E402
from napari_hrseg.models.config import ModelConfig  # noqa: E402
from napari_hrseg.models.weights import load_model, save_model, shipped_model_dir, shipped_models, state_fingerprint  # noqa: E402
from napari_hrseg.slide import Slide  # noqa: E402
from napari_hrseg.virtual import CLASS_NAMES, virtual_slide  # noqa: E402

REALDATA = Path(os.environ.get("HRSEG_REALDATA", REPO.parent / "shared" / "realdata"))
log = logging.getLogger("bench_inference")

MODEL_MPP = 1.0  # the models' finest pixel size; the virtual slides are rendered at 1 µm/px
SCALES = (0.25, 0.5, 1.0)
TRUNK = dict(widths=(16, 32, 48, 64), depths=(1, 1, 2, 1), stem_width=16, fpn_width=32, head_width=32)
# MagNet's refiner at a quarter of the library default's widths (32, 16): it runs at full resolution on every refined
# pixel, and at (32, 16) a 256-px patch cost a CPU as much as a 960-px sliding-window tile of the segmenter.
MAGNET = dict(patch_size=256, kernel_size=5, n_points=0.75, refiner_width=16, refiner_planes=8)
GLNET = dict(widths=(16, 32, 48, 64), depths=(1, 1, 2, 1), stem_width=16, fpn_width=32, head_width=16,
             size_g=192, size_p=256, min_overlap=50, patch_batch=8)
ARCHS = ("magnet", "hmsa", "glnet")
MODEL_SOURCES: dict[str, str] = {}  # architecture -> where its weights came from (printed with the tables)


# ============================================================================================== memory and time
def _status_mib(field: str) -> float:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", text).group(1)) / 1024


class PeakMemory:
    """Peak resident memory during a block above the resident memory before it, in MiB.

    Linux: freed heap is returned to the system (``malloc_trim``), the high-water mark reset (``clear_refs`` 5) and
    read back (VmHWM) afterwards.  Elsewhere: RSS sampled every 5 ms by a thread (psutil).
    """

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        self._sampler = None
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.before = _status_mib("VmRSS")
        except OSError:
            import psutil

            proc = psutil.Process()
            self.before = proc.memory_info().rss / 2**20
            self._peak = self.before
            self._stop = threading.Event()

            def sample():
                while not self._stop.wait(0.005):
                    self._peak = max(self._peak, proc.memory_info().rss / 2**20)

            self._sampler = threading.Thread(target=sample, daemon=True)
            self._sampler.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._sampler is None:
            peak = _status_mib("VmHWM")
        else:
            self._stop.set()
            self._sampler.join()
            peak = self._peak
        self.mib = max(0.0, peak - self.before)


# ============================================================================================== slides
class CachedLevels:
    """A slide whose chunks are rendered once and then served from memory (the virtual slide renders every read).

    ``prefetch`` reads regions ahead of the timed runs, so timings measure inference rather than rendering; the
    chunks can be saved to and loaded from an ``.npz`` file.
    """

    def __init__(self, slide: Slide):
        self.source = slide
        self.chunks: dict[tuple[int, int, int], np.ndarray] = {}
        self.lock = threading.Lock()

        def level(i: int, lev: da.Array) -> da.Array:
            def fetch(block_info=None):
                r, c = block_info[None]["chunk-location"][:2]
                key = (i, r, c)
                with self.lock:
                    hit = self.chunks.get(key)
                if hit is None:
                    hit = np.asarray(lev.blocks[r, c].compute(scheduler="sync"))
                    with self.lock:
                        self.chunks[key] = hit
                return hit

            return da.map_blocks(fetch, chunks=lev.chunks, dtype=lev.dtype)

        self.slide = dataclasses.replace(slide, levels=tuple(level(i, lev) for i, lev in enumerate(slide.levels)))

    def prefetch(self, region: Region, levels: range, margin: int) -> None:
        for lv in levels:
            self.slide.read(region.expand(margin), lv, pad=True)

    def save(self, path: Path) -> None:
        np.savez(path, **{f"{i}_{r}_{c}": a for (i, r, c), a in self.chunks.items()})

    def load(self, path: Path) -> None:
        with np.load(path) as data:
            for name in data.files:
                i, r, c = (int(v) for v in name.split("_"))
                self.chunks[(i, r, c)] = data[name]


def miou(pred: np.ndarray, truth: np.ndarray, n: int) -> tuple[float, np.ndarray]:
    """Mean IoU over the classes present in either map, and the per-class IoU (NaN for absent classes)."""
    ious = np.full(n, np.nan)
    for k in range(n):
        union = ((pred == k) | (truth == k)).sum()
        if union:
            ious[k] = ((pred == k) & (truth == k)).sum() / union
    return float(np.nanmean(ious)), ious


# ============================================================================================== training
@dataclass
class TrainingData:
    """Image and labels of the training window at levels 0, 1, 2 (1, 2, 4 µm/px)."""

    images: list[np.ndarray]
    labels: list[np.ndarray]

    @classmethod
    def render(cls, seed: int, size: int, window: int) -> "TrainingData":
        v = virtual_slide(seed=seed, size=size, mpp=MODEL_MPP)
        region = v.border_region(window)
        images, labels = [], []
        for lv in range(3):
            lr = region.to_level(v.slide.downsamples[lv])
            images.append(v.slide.read_level(lv, lr))
            labels.append(np.asarray(v.semantic[lv][lr.slices].compute(scheduler="threads")).astype(np.int64))
        log.info("training window %s of virtual slide seed %d: classes %s", region, seed,
                 np.round(np.bincount(labels[0].ravel(), minlength=5) / labels[0].size, 2).tolist())
        return cls(images, labels)

    def save(self, path: Path) -> None:
        np.savez(path, **{f"image{i}": a for i, a in enumerate(self.images)}, **{f"labels{i}": a for i, a in enumerate(self.labels)})

    @classmethod
    def load(cls, path: Path) -> "TrainingData":
        with np.load(path) as d:
            return cls([d[f"image{i}"] for i in range(3)], [d[f"labels{i}"] for i in range(3)])

    def crops(self, rng: np.random.Generator, level: int, size: int, n: int) -> tuple[np.ndarray, torch.Tensor]:
        """``n`` random ``size`` crops of a level with random flips: pixels ``(n, size, size, 3)``, labels."""
        image, labels = self.images[level], self.labels[level]
        pix, lab = [], []
        for _ in range(n):
            r = rng.integers(0, image.shape[0] - size + 1)
            c = rng.integers(0, image.shape[1] - size + 1)
            p, l = image[r : r + size, c : c + size], labels[r : r + size, c : c + size]
            if rng.random() < 0.5:
                p, l = p[:, ::-1], l[:, ::-1]
            if rng.random() < 0.5:
                p, l = p[::-1], l[::-1]
            pix.append(p)
            lab.append(l)
        return np.ascontiguousarray(np.stack(pix)), torch.from_numpy(np.ascontiguousarray(np.stack(lab)))


def fit(model, params, sample: Callable[[np.random.Generator], tuple[np.ndarray, torch.Tensor]], steps: int, *,
        lr: float, name: str, seed: int = 0) -> None:
    """Adam with cosine decay over ``steps``; ``sample(rng)`` gives a batch of pixels and labels."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + np.cos(np.pi * min(i, steps) / max(1, steps))))
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        pix, lab = sample(rng)
        x = to_input_tensor(pix, model.config).contiguous()
        loss = model.loss(model(x), Batch(x, lab))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 20 == 0 or step == steps - 1:
            log.info("%s step %d/%d loss %.3f (%.0f s)", name, step + 1, steps, float(loss.detach()), time.perf_counter() - start)
    model.eval()


def train_models(data: TrainingData, steps: int) -> dict[str, Any]:
    """MagNet (segmenter on 1, 2 and 4 µm crops, then its refiner), the attention model (trunk from the segmenter,
    trained on (0.25, 1) pairs) and GLNet (jointly, global view at 4 µm) on the training window."""
    n = len(CLASS_NAMES)
    common = dict(num_classes=n, class_names=CLASS_NAMES, mpp=MODEL_MPP)
    magnet = create_model("magnet", scales=SCALES, **MAGNET, **common, **TRUNK)
    magnet.train_phase = "segmenter"
    fit(magnet, magnet.parameters(), lambda rng: data.crops(rng, int(rng.integers(0, 3)), 256, 4), 2 * steps, lr=3e-3,
        name="magnet segmenter")
    magnet.train_phase = "refiner"
    fit(magnet, magnet.parameters(), lambda rng: data.crops(rng, 0, 1024, 2), max(1, steps // 2), lr=3e-3,
        name="magnet refiner", seed=1)

    # The attention model and GLNet start from the segmenter (the attention model blends 4 µm with 1 µm: the
    # context that tells tumour from normal is a millimetre, what a 768-px crop holds at 4 µm).
    return {"magnet": magnet, **train_on_magnet(data, steps, magnet, ["hmsa", "glnet"])}


def segmenter_as_fpn(magnet, mpp: float = MODEL_MPP):
    """MagNet's segmenter as a stand-alone ``"fpn"`` model (the single-scale baselines' network) at ``mpp``."""
    cfg = magnet.config
    fpn = create_model("fpn", num_classes=cfg.num_classes, class_names=cfg.class_names, mpp=mpp, **TRUNK)
    fpn.load_state_dict(magnet.segmenter.state_dict())
    return fpn.eval()


def find_models(model_dir: Path | None, shipped: bool = True) -> dict[str, Any]:
    """Saved models for the benchmark's architectures: ``model_dir``'s subdirectories, else (``shipped``) shipped
    models, that predict the virtual slide's classes."""
    candidates: list[Path] = []
    if model_dir is None and not shipped:
        return {}
    if model_dir is not None:
        candidates = [p for p in sorted(Path(model_dir).iterdir()) if (p / "config.json").is_file()]
        if (Path(model_dir) / "config.json").is_file():
            candidates.append(Path(model_dir))
    else:
        candidates = [shipped_model_dir(name) for name in shipped_models()]
    found: dict[str, Any] = {}
    for path in candidates:
        cfg = ModelConfig.load(path)
        if cfg.arch in ARCHS and cfg.arch not in found and tuple(cfg.class_names) == tuple(CLASS_NAMES):
            found[cfg.arch] = load_model(path)
            MODEL_SOURCES[cfg.arch] = f"{cfg.label} from {path}"
            log.info("using %s model %s from %s", cfg.arch, cfg.label, path)
    return found


def load_training_data(args) -> TrainingData:
    data_path = Path(args.cache) / f"train-seed{args.train_seed}.npz"
    if data_path.is_file():
        return TrainingData.load(data_path)
    t0 = time.perf_counter()
    data = TrainingData.render(args.train_seed, 16384, 3072)
    data.save(data_path)
    log.info("training data rendered in %.0f s", time.perf_counter() - t0)
    return data


def train_on_magnet(data: TrainingData, steps: int, magnet, archs: list[str]) -> dict[str, Any]:
    """The attention model and/or GLNet trained here, starting from ``magnet``'s segmenter (as their shipped
    recipes start from the shipped MagNet's), on the training window: what stands in for a model not shipped."""
    common = dict(num_classes=len(CLASS_NAMES), class_names=CLASS_NAMES, mpp=MODEL_MPP)
    out: dict[str, Any] = {}
    if "hmsa" in archs:
        hmsa = create_model("hmsa", scales=SCALES, attention_width=32, train_scales=(0.25, 1.0), **common, **TRUNK)
        hmsa.trunk.load_state_dict(magnet.segmenter.state_dict())
        fit(hmsa, hmsa.parameters(), lambda rng: data.crops(rng, 0, 768, 2), max(1, steps // 3), lr=1e-3, name="hmsa", seed=2)
        out["hmsa"] = hmsa
    if "glnet" in archs:
        glnet = create_model("glnet", scales=(0.25, 1.0), **common, **GLNET)
        glnet.global_encoder.load_state_dict(magnet.segmenter.encoder.state_dict())
        glnet.local_encoder.load_state_dict(magnet.segmenter.encoder.state_dict())
        glnet.train_mode = 0
        fit(glnet, glnet.trainable_parameters(), lambda rng: data.crops(rng, 0, 768, 1), max(1, steps // 2), lr=2e-3,
            name="glnet", seed=3)
        out["glnet"] = glnet
    return out


def get_models(args) -> dict[str, Any]:
    """The models the methods run: ``--model DIR``'s, else the shipped ones; what is missing is trained here.

    With ``--train`` every model is trained here.  Without it, a missing MagNet means training all three; a
    missing attention model or GLNet is trained from the shipped MagNet's segmenter for ``--train-steps``
    (``N/3``, ``N/2`` steps), far fewer than a shipped model gets, and its table row says so.  ``--no-train``
    skips a missing model instead (its row says "not shipped: skipped").
    """
    found = find_models(args.model, shipped=not args.train)
    missing = [a for a in ARCHS if a not in found]
    if not missing:
        return found
    if args.no_train:
        for a in missing:
            MODEL_SOURCES[a] = "not shipped: skipped (--no-train)"
            log.info("no %s model: its method is skipped", a)
        return found
    if args.model is not None:
        log.info("--model %s lacks %s: training them", args.model, missing)
    base = state_fingerprint(found["magnet"]) if "magnet" in found else "all"
    key = hashlib.sha1(json.dumps([args.train_steps, args.train_seed, TRUNK, MAGNET, GLNET, SCALES, 3, base, missing]).encode()).hexdigest()[:10]
    cache = Path(args.cache) / f"models-{key}"
    if all((cache / a / "config.json").is_file() for a in missing):
        trained = {a: load_model(cache / a) for a in missing}
        log.info("trained models loaded from %s", cache)
    else:
        data = load_training_data(args)
        t0 = time.perf_counter()
        if "magnet" in found:
            trained = train_on_magnet(data, args.train_steps, found["magnet"], missing)
        else:
            trained = train_models(data, args.train_steps)
        log.info("models trained in %.0f s", time.perf_counter() - t0)
        for a in missing:
            save_model(trained[a], cache / a)
    found.update({a: trained[a] for a in missing})
    steps = {"magnet": f"segmenter {2 * args.train_steps}, refiner {max(1, args.train_steps // 2)}",
             "hmsa": str(max(1, args.train_steps // 3)), "glnet": str(max(1, args.train_steps // 2))}
    start = f", from the shipped MagNet's segmenter" if "magnet" in found and "magnet" not in missing else ""
    for a in missing:
        MODEL_SOURCES[a] = (f"NOT SHIPPED - trained here for this benchmark ({steps[a]} steps on virtual slide "
                            f"{args.train_seed}'s tumour border{start}; a shipped model trains far longer), cached in {cache}")
    return found


# ============================================================================================== part 1: regions
#: Settings chosen with ``--tune`` on a validation region (the tumour border of virtual slide 4, which no model
#: trained on), never on the benchmark's region, for the shipped ``tissue`` model.  There (2048 px, 1 CPU thread):
#: MagNet n_points 0.25 / 0.5 / 0.75 scored mIoU 0.668 / 0.689 / 0.700, so MagNet replaces 0.75 of each canvas
#: (DeepGlobe's value and the model's default).  MagNet-Fast: n_patches 4, 8, (8, 4), (16, 2), (16, 4), (16, 8),
#: (16, 16) scored 0.654, 0.664, 0.662, 0.680, 0.681, 0.683, 0.683 at 1.8, 2.6, 2.7, 3.0, 3.5, 4.0, 5.5 CPU s
#: (sliding window 8.0 s, unwarmed; docs/benchmarks.md); the cheapest within 0.5 points of the best is (16, 2):
#: every stage-2 patch (2 µm, 16 of them) and the 2 most uncertain of the 64 stage-3 patches, with 0.9 of their
#: pixels as points (the paper's value).
MAGNET_POINTS = 0.75
FAST_PATCHES = (16, 2)


@dataclass
class MethodRow:
    """One method's scores and costs; times are medians of the round-robin runs, ratios medians of the per-round
    ratios to the sliding window's run of the same round (so slow rounds, when the CPU is shared, cancel out)."""

    name: str
    miou: float
    ious: np.ndarray
    seconds: float
    cpu_seconds: float
    peak_mib: float
    note: str = ""
    wall_ratio: float = float("nan")
    cpu_ratio: float = float("nan")
    skipped: str = ""


def region_methods(models: dict[str, Any], size: int, batch_size: int = 4) -> list[tuple[str, Any, InferenceOptions, str]]:
    """``(name, model or None, options, note)`` per method; a None model (not shipped, not trained) is skipped.
    ``batch_size``: tiles or patches per forward pass, the same for every method."""
    fpn = segmenter_as_fpn(models["magnet"])
    opts = functools.partial(InferenceOptions, batch_size=batch_size)
    magnet = models["magnet"]

    def trained_here(arch: str, name: str) -> str:
        return f"{name} (trained here)" if MODEL_SOURCES.get(arch, "").startswith("NOT SHIPPED") else name

    return [
        ("global", fpn, opts(method="global", global_size=size // 4), "one pass at 4 µm"),
        ("sliding window", fpn, opts(method="sliding_window", tile_size=512), f"1 µm, 512-px tiles, halo {fpn.halo}"),
        ("MagNet", magnet, opts(method="magnet", params={"n_points": MAGNET_POINTS}),
         f"stages 4, 2, 1 µm, every patch, {MAGNET_POINTS} of pixels"),
        ("MagNet-Fast (paper)", magnet, opts(method="magnet_fast"), "4 patches/stage, 0.9"),
        ("MagNet-Fast", magnet, opts(method="magnet_fast", params={"n_patches": FAST_PATCHES}),
         f"{'+'.join(map(str, FAST_PATCHES))} patches at stages 2+3, 0.9"),
        (trained_here("hmsa", "multi-scale attention"), models.get("hmsa"), opts(method="hmsa", tile_size=512),
         "scales 0.25, 0.5, 1"),
        (trained_here("glnet", "GLNet"), models.get("glnet"), opts(method="glnet"),
         "global at 4 µm + context, 256-px patches"),
    ]


def region_case(args, seed: int, size: int) -> tuple[Slide, Region, np.ndarray]:
    """The tumour-border square of virtual slide ``seed``, its pixels cached (on disk too), and its ground truth."""
    v = virtual_slide(seed=seed, size=16384, mpp=MODEL_MPP)
    region = v.border_region(size)
    cached = CachedLevels(v.slide)
    chunk_file = Path(args.cache) / f"region-seed{seed}-{region.row}-{region.col}-{size}.npz"
    if chunk_file.is_file():
        cached.load(chunk_file)
    t0 = time.perf_counter()
    cached.prefetch(region, range(0, 1), 256)  # the sliding window's halo
    cached.prefetch(region, range(1, 5), 1024)  # coarse stages' and the global view's context
    if not chunk_file.is_file():
        cached.save(chunk_file)
    log.info("region %s of seed %d: pixels ready in %.0f s", region, seed, time.perf_counter() - t0)
    truth = np.asarray(v.semantic[0][region.slices].compute(scheduler="threads"))
    return cached.slide, region, truth


def run_region_methods(args, models: dict[str, Any]) -> tuple[list[MethodRow], Region, np.ndarray]:
    size = 1024 if args.quick else 2048
    slide, region, truth = region_case(args, 0, size)
    methods = [m for m in region_methods(models, size, args.batch_size) if m[1] is not None]
    skipped = [m for m in region_methods(models, size, args.batch_size) if m[1] is None]
    # One untimed run of each first: oneDNN picks and caches kernels per input shape, once per process.  Then the
    # timed runs go round-robin over the methods, so that load from elsewhere on a shared CPU hits all alike.
    labels = {}
    for name, model, options, _ in methods:
        labels[name] = run_to_completion(run_request(InferenceRequest(slide, region, model, options))).labels
    wall = {name: [] for name, *_ in methods}
    cpu = {name: [] for name, *_ in methods}
    peak = {name: 0.0 for name, *_ in methods}
    for r in range(args.repeat):
        for name, model, options, _ in methods:
            with PeakMemory() as mem:
                t0, c0 = time.perf_counter(), time.process_time()
                pred = run_to_completion(run_request(InferenceRequest(slide, region, model, options)))
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
            peak[name] = max(peak[name], mem.mib)
            assert np.array_equal(pred.labels, labels[name]), f"{name} is not deterministic"
            pred = None  # the next run's baseline must not hold this one's probabilities
        log.info("round %d/%d: %s", r + 1, args.repeat, ", ".join(f"{n} {wall[n][-1]:.1f} s" for n in wall))
    rows = []
    sw_wall, sw_cpu = np.array(wall["sliding window"]), np.array(cpu["sliding window"])
    for name, _, _, note in methods:
        m, ious = miou(labels[name], truth, len(CLASS_NAMES))
        rows.append(MethodRow(name, m, ious, float(np.median(wall[name])), float(np.median(cpu[name])), peak[name], note,
                              wall_ratio=float(np.median(np.array(wall[name]) / sw_wall)),
                              cpu_ratio=float(np.median(np.array(cpu[name]) / sw_cpu))))
        log.info("%s: mIoU %.3f, %.1f s (cpu %.1f s), %.0f MiB", name, m, rows[-1].seconds, rows[-1].cpu_seconds, peak[name])
    for name, _, _, note in skipped:
        arch = "glnet" if "GLNet" in name else "hmsa"
        rows.append(MethodRow(name, float("nan"), np.full(len(CLASS_NAMES), np.nan), float("nan"), float("nan"),
                              float("nan"), note, skipped=MODEL_SOURCES.get(arch, "no model")))
    return rows, region, truth


def print_region_table(rows: list[MethodRow], region: Region, truth: np.ndarray, args) -> None:
    in_truth = [k for k in range(len(CLASS_NAMES)) if (truth == k).any()]
    share = ", ".join(f"{CLASS_NAMES[k]} {100 * (truth == k).mean():.0f}%" for k in in_truth)
    present = [k for k in range(len(CLASS_NAMES)) if (truth == k).any() or any(not np.isnan(r.ious[k]) for r in rows)]
    sw = next(r for r in rows if r.name == "sliding window")
    print(f"\nPart 1: region methods on a {region.height} x {region.width} level-0 region ({region}) of the virtual slide "
          f"(seed 0, 1 µm/px, held out from every shipped model's training); ground truth: {share}")
    print("mIoU: over the classes in the ground truth or the prediction (a class predicted but absent scores IoU 0); "
          "mIoU gt: over the ground truth's classes only")
    print(f"time: median of {args.repeat} round-robin runs after one warm-up run (wall clock, and this process's CPU time); "
          f"'/ SW' = median over rounds of the time / the sliding window's in the same round")
    print(f"peak = resident memory above the process before the run (max over runs); torch threads = {torch.get_num_threads()}; "
          f"batch size {args.batch_size} (tiles or patches per forward pass, every method)")
    for arch in ARCHS:
        print(f"  {arch} model: {MODEL_SOURCES.get(arch, '?')}")
    short = {"stroma": "stroma", "normal epithelium": "normal", "lumen": "lumen", "tumour epithelium": "tumour",
             "background": "glass"}
    head = f"{'method':<28}{'mIoU':>7}{'mIoU gt':>8}" + "".join(f"{short[CLASS_NAMES[k]]:>8}" for k in present)
    head += f"{'wall s':>8}{'/ SW':>6}{'cpu s':>7}{'/ SW':>6}{'peak MiB':>10}  notes"
    print(head)
    print("-" * len(head))
    for r in rows:
        if r.skipped:
            print(f"{r.name:<28}{'-':>7}{'-':>8}" + "".join(f"{'-':>8}" for _ in present) + f"  {r.skipped}")
            continue
        gt_miou = float(np.nanmean(r.ious[in_truth]))
        line = f"{r.name:<28}{r.miou:>7.3f}{gt_miou:>8.3f}"
        line += "".join(f"{r.ious[k]:>8.3f}" if not np.isnan(r.ious[k]) else f"{'-':>8}" for k in present)
        line += f"{r.seconds:>8.2f}{r.wall_ratio:>6.2f}{r.cpu_seconds:>7.2f}{r.cpu_ratio:>6.2f}"
        line += f"{r.peak_mib:>10.0f}  {r.note}"
        print(line)
    by = {r.name: r for r in rows}
    mag = by["MagNet"]
    for base in ("global", "sliding window"):
        diff = mag.miou - by[base].miou
        print(f"MagNet - {base}: {100 * diff:+.1f} mIoU points (aim > 0: {'met' if diff > 0 else 'NOT met'})")
    for name in [n for n in by if n.startswith("MagNet-Fast")]:
        fast = by[name]
        speed, cpu_speed = 1 / fast.wall_ratio, 1 / fast.cpu_ratio
        print(f"{name}: time / sliding window's = {fast.wall_ratio:.2f} wall, {fast.cpu_ratio:.2f} cpu "
              f"({speed:.1f}x / {cpu_speed:.1f}x faster; aim >= 2.5x: {'met' if min(speed, cpu_speed) >= 2.5 else 'NOT met'}); "
              f"vs MagNet {100 * (fast.miou - mag.miou):+.1f} mIoU points (aim within 1: {'met' if mag.miou - fast.miou <= 0.01 else 'NOT met'})")


VALIDATION_SEED = 4  # no model, shipped or trained here, saw virtual slide 4 (shipped: 1, 2, 3; here: --train-seed 1)


def run_tuning(args, models: dict[str, Any]) -> None:
    """mIoU and CPU time of MagNet's and MagNet-Fast's settings on a validation region (the tumour border of a
    virtual slide no model trained on), to choose them: never the benchmark's region."""
    slide, region, truth = region_case(args, VALIDATION_SEED, 2048)
    magnet = models["magnet"]
    fpn = segmenter_as_fpn(magnet)
    trials = [("sliding window", fpn, InferenceOptions(method="sliding_window"))]
    trials += [(f"MagNet n_points={p}", magnet, InferenceOptions(method="magnet", params={"n_points": p})) for p in (0.25, 0.5, 0.75)]
    trials += [(f"MagNet-Fast n_patches={n}", magnet, InferenceOptions(method="magnet_fast", params={"n_patches": n}))
               for n in (4, 8, (8, 4), (16, 2), (16, 4), (16, 8), (16, 16))]
    print(f"\nValidation (settings are chosen here): region {region} of virtual slide seed {VALIDATION_SEED}")
    print(f"{'setting':<34}{'mIoU':>7}{'cpu s':>8}{'/ SW':>6}")
    sw_cpu = None
    for name, model, options in trials:
        c0 = time.process_time()
        pred = run_to_completion(run_request(InferenceRequest(slide, region, model, options)))
        cpu = time.process_time() - c0
        sw_cpu = sw_cpu or cpu
        print(f"{name:<34}{miou(pred.labels, truth, len(CLASS_NAMES))[0]:>7.3f}{cpu:>8.2f}{cpu / sw_cpu:>6.2f}", flush=True)


# ============================================================================================== part 2: whole slides
def probe_wholeslide(side: int, model_dir: str, threads: int) -> None:
    """Subprocess: segment a whole virtual slide of ``side`` px and print one JSON line."""
    from napari_hrseg.inference.wholeslide import SegmentOptions, segment_slide

    torch.set_num_threads(threads)
    model = load_model(model_dir)
    slide = virtual_slide(seed=0, size=side, mpp=MODEL_MPP).slide
    with torch.inference_mode():
        model(torch.zeros(1, 3, 832, 832))  # first-call allocations
    before = _status_mib("VmRSS")
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        result = run_to_completion(segment_slide(slide, model, Path(d) / "out.ome.zarr", options=SegmentOptions(tile_size=512)))
        seconds = time.perf_counter() - t0
    print(json.dumps({
        "side": side, "grid": list(result.grid_region.shape), "tiles": result.tiles_total, "tissue_tiles": result.tiles_tissue,
        "peak_mib": _status_mib("VmHWM"), "before_mib": before, "seconds": seconds, "mpx": result.megapixels,
    }))


def run_wholeslide(args, fpn_dir: Path) -> list[dict]:
    sides = (2048, 4096) if args.quick else (8192, 16384)
    out = []
    for side in sides:
        cmd = [sys.executable, __file__, "--probe-wholeslide", str(side), "--probe-model", str(fpn_dir), "--threads", str(args.threads)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"whole-slide probe failed:\n{proc.stderr[-3000:]}")
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        log.info("whole slide %d: %s (%.0f s with start-up)", side, out[-1], time.perf_counter() - t0)
    return out


def print_wholeslide_table(rows: list[dict]) -> None:
    print("\nPart 2: whole-slide segmentation (segment_slide, tissue tiles only, model at 4 µm/px, 512-px tiles), each "
          "slide in a fresh process")
    head = f"{'slide':<26}{'grid':>12}{'tissue/tiles':>14}{'peak RSS MiB':>14}{'above start':>13}{'seconds':>9}{'Mpx/s':>8}"
    print(head)
    print("-" * len(head))
    for r, label in zip(rows, ("virtual, 1x tissue area", "virtual, 4x tissue area")):
        grid = f"{r['grid'][0]}x{r['grid'][1]}"
        print(f"{label:<26}{grid:>12}{r['tissue_tiles']:>7}/{r['tiles']:<6}{r['peak_mib']:>14.0f}"
              f"{r['peak_mib'] - r['before_mib']:>13.0f}{r['seconds']:>9.1f}{r['mpx'] / r['seconds']:>8.2f}")
    ratio = rows[1]["peak_mib"] / rows[0]["peak_mib"]
    print(f"peak memory, 4x / 1x tissue area: {ratio:.2f} (aim <= 1.2: {'met' if ratio <= 1.2 else 'NOT met'}); "
          f"tissue tiles {rows[1]['tissue_tiles'] / max(1, rows[0]['tissue_tiles']):.1f}x")


# ============================================================================================== part 3: dask
def _process_cpu() -> float:
    return time.process_time()


def run_dask(args, fpn_dir: Path) -> list[tuple[str, float, float, float, float]]:
    """``(label, seconds, megapixels, CPU seconds the computing processes got, speed-up over 1 worker)`` per
    setting, medians over the rounds.

    Both clusters stay up and their runs alternate, ``--repeat`` times, so that load from elsewhere on the
    machine hits both alike; the CPU seconds say how much of the machine the workers actually got.
    """
    from napari_hrseg.inference.distributed import make_client
    from napari_hrseg.inference.wholeslide import SegmentOptions, segment_slides

    model = load_model(fpn_dir)
    sources = [REALDATA / "aperio-svs" / "CMU-1-Small-Region.svs", REALDATA / "derived-from-cmu1" / "CMU-1-Small-Region.vips-pyramid.tif"]
    options = SegmentOptions(tile_size=256 if args.quick else 512)

    def run(client, region: Region | None = None) -> tuple[float, float, float]:
        cpu0 = client.run(_process_cpu) if client is not None else {"local": time.process_time()}
        with tempfile.TemporaryDirectory() as d:
            outs = [Path(d) / f"s{i}.ome.zarr" for i in range(len(sources))]
            t0 = time.perf_counter()
            results = run_to_completion(segment_slides(sources, model, outs, region=region, options=options, client=client))
            seconds = time.perf_counter() - t0
        cpu1 = client.run(_process_cpu) if client is not None else {"local": time.process_time()}
        return seconds, sum(r.megapixels for r in results), sum(cpu1[k] - cpu0[k] for k in cpu1)

    settings: list[tuple[str, Any]] = [("this process (no dask)", None)]
    clusters = []
    try:
        for workers in (1, 2):
            client, cluster = make_client(workers)
            clusters.append((client, cluster))
            settings.append((f"LocalCluster, {workers} worker{'s' if workers > 1 else ''}", client))
        for _, client in settings:  # warm-up: workers import torch and build the model before the clock starts
            run(client, Region(0, 0, 600, 600))
        runs: dict[str, list[tuple[float, float, float]]] = {label: [] for label, _ in settings}
        for r in range(dask_repeat(args)):
            for label, client in settings:
                seconds, mpx, cpu = run(client)
                log.info("%s: %.1f s, %.1f Mpx, %.1f CPU s", label, seconds, mpx, cpu)
                runs[label].append((seconds, mpx, cpu))
    finally:
        for client, cluster in clusters:
            client.close()
            cluster.close()
    one = np.array([t[0] for t in runs[settings[1][0]]])
    out = []
    for label, _ in settings:
        arr = np.array(runs[label])
        # speed-up over 1 worker: the median over rounds of (1 worker's seconds / this setting's) in the same round
        out.append((label, float(np.median(arr[:, 0])), float(np.median(arr[:, 1])), float(np.median(arr[:, 2])),
                    float(np.median(one / arr[:, 0]))))
    return out


def dask_repeat(args) -> int:
    """Rounds of the dask part: each round segments two slides three times, so at most 3 (``--repeat``)."""
    return max(1, min(args.repeat, 3))


def print_dask_table(rows: list[tuple[str, float, float, float, float]], args) -> None:
    print(f"\nPart 3: two real slide files (CMU-1 SVS + pyramidal TIFF), segment_slides, model at 0.5 µm/px, "
          f"single-threaded workers; medians of {dask_repeat(args)} alternating rounds (after a warm-up round)")
    head = f"{'run':<28}{'seconds':>9}{'Mpx/s':>8}{'speed-up vs 1 worker':>22}{'CPU s used':>12}{'cores used':>12}"
    print(head)
    print("-" * len(head))
    for label, seconds, mpx, cpu, speedup in rows:
        print(f"{label:<28}{seconds:>9.1f}{mpx / seconds:>8.2f}{speedup:>22.2f}{cpu:>12.1f}{cpu / seconds:>12.2f}")
    two = rows[2][4]
    print(f"2 workers over 1: {two:.2f}x (median of the per-round ratios)")
    print("(the in-process run reads the next tiles in a thread while the model computes; a worker reads and computes in "
          "turn. 'cores used' = CPU time of the computing processes / wall time: below the worker count when the machine "
          "is shared)")


# ============================================================================================== main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1024-px region, few training steps, small slides")
    parser.add_argument("--train-steps", type=int, default=None,
                        help="training budget N: segmenter 2N steps, refiner and GLNet N/2, attention N/3; default 240, 12 with --quick")
    parser.add_argument("--train-seed", type=int, default=1, help="virtual slide the models are trained on")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "napari-hrseg-bench-inference"),
                        help="where trained weights, training pixels and the region's pixels are cached")
    parser.add_argument("--model", type=Path, default=None, help="directory of saved models (one subdirectory per architecture)")
    parser.add_argument("--train", action="store_true",
                        help="train (or take from --cache) the models even when shipped ones with these classes exist")
    parser.add_argument("--no-train", action="store_true",
                        help="skip the methods whose model is not shipped rather than train a stand-in here")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per method, round-robin (the median counts)")
    parser.add_argument("--tune", action="store_true", help="first print the validation runs the MagNet settings were chosen on")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--batch-size", type=int, default=4,
                        help="part 1: tiles or patches per forward pass for every method (the engine's default: 4)")
    parser.add_argument("--parts", default="1,2,3", help="which parts to run, e.g. 1 or 2,3")
    parser.add_argument("--probe-wholeslide", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--probe-model", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.probe_wholeslide is not None:
        probe_wholeslide(args.probe_wholeslide, args.probe_model, args.threads)
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    if args.train_steps is None:
        args.train_steps = 12 if args.quick else 240
    Path(args.cache).mkdir(parents=True, exist_ok=True)
    parts = {int(p) for p in args.parts.split(",")}
    started = time.perf_counter()
    models = get_models(args)
    fpn_dirs = {}
    for name, mpp in (("wholeslide", 4.0), ("dask", 0.5)):
        fpn_dirs[name] = Path(args.cache) / f"fpn-{name}-{state_fingerprint(models['magnet'])}"
        if not (fpn_dirs[name] / "config.json").is_file():
            save_model(segmenter_as_fpn(models["magnet"], mpp), fpn_dirs[name])
    tables = []
    if args.tune:
        run_tuning(args, models)
    if 1 in parts:
        rows, region, truth = run_region_methods(args, models)
        tables.append(lambda: print_region_table(rows, region, truth, args))
    if 2 in parts:
        ws = run_wholeslide(args, fpn_dirs["wholeslide"])
        tables.append(lambda: print_wholeslide_table(ws))
    if 3 in parts:
        dk = run_dask(args, fpn_dirs["dask"])
        tables.append(lambda: print_dask_table(dk, args))
    for t in tables:
        t()
    print(f"\n(total {time.perf_counter() - started:.0f} s; command: python benchmarks/bench_inference.py {' '.join(argv or sys.argv[1:])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
