"""Models and slides for the multi-scale pipeline tests (MagNet, multi-scale attention, GLNet, instances).

Models are trained briefly, once per test process (``functools.lru_cache``), on one thread:

- on the real CMU-1 slide (tissue vs glass at 2 µm/px, targets from tissue detection, as `test_inference_support`):
  MagNet and the attention model reuse the tissue FPN trained there as their segmenter / trunk (the same FPN
  trunk and widths), and train only what they add (MagNet's refiner, the attention head); GLNet is trained
  from scratch on the same data;
- on the virtual slide (glass / stroma / epithelium at 4 µm/px against its exact ground truth): the same, from an
  FPN trained on it.

`watched` wraps a slide so that every chunk read is recorded per pyramid level and levels a pipeline must not
need fail when read.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections import defaultdict
from dataclasses import dataclass

import dask.array as da
import numpy as np
import pytest
import torch

from napari_hrseg.inference import PixelGrid
from napari_hrseg.models import Batch, create_model, to_input_tensor
from napari_hrseg.models.config import ModelConfig
from napari_hrseg.models.registry import build_model
from napari_hrseg.slide import Slide, open_slide
from napari_hrseg.virtual import virtual_slide

from test_inference_support import (  # noqa: F401 (one_torch_thread is a fixture)
    CMU1_PYRAMID,
    MODEL_MPP,
    SMALL_FPN,
    one_torch_thread,
    single_thread,
    tissue_targets,
    train_fpn,
    trained_tissue_model,
)

MAGNET_SCALES = (0.25, 0.5, 1.0)
PATCH = 128
SMALL_GLNET = dict(widths=(8, 16, 24, 32), depths=(1, 1, 1, 1), stem_width=8, fpn_width=16, head_width=8,
                   size_g=64, size_p=128, min_overlap=16)


# ---------------------------------------------------------------------------------------------- slides
@dataclass
class Reads:
    """Chunks read per level of a `watched` slide: ``levels[level]`` is a list of ``((r0, r1), (c0, c1))``."""

    levels: dict[int, list[tuple[tuple[int, int], tuple[int, int]]]]

    def count(self, level: int) -> int:
        return len(self.levels.get(level, []))

    def clear(self) -> None:
        self.levels.clear()


def watched(slide: Slide, forbid: set[int] = frozenset()) -> tuple[Slide, Reads]:
    """The slide with every level's chunk reads recorded, and the levels in ``forbid`` failing when read."""
    reads = Reads(defaultdict(list))
    lock = threading.Lock()

    def wrap(level: int):
        def read(block, block_info=None):
            if level in forbid:
                raise AssertionError(f"level {level} was read; the pipeline should not need it")
            loc = block_info[0]["array-location"]
            with lock:
                reads.levels[level].append((tuple(loc[0]), tuple(loc[1])))
            return block

        return read

    levels = tuple(lev.map_blocks(wrap(i), dtype=lev.dtype) for i, lev in enumerate(slide.levels))
    return Slide(levels, path=slide.path, format=slide.format, mpp_yx=slide.mpp_yx, name=slide.name), reads


def cmu1() -> Slide:
    """The CMU-1 pyramid (levels at 0.5, 1, 2, 4 and 8 µm/px)."""
    return open_slide(CMU1_PYRAMID)


@dataclass
class VirtualCase:
    """A 4 x 4 mm virtual slide at 1 µm/px whose levels from 2 µm on are held in memory, and its ground truth at
    the model's 4 µm (glass / stroma / epithelium)."""

    slide: Slide
    truth: np.ndarray
    grid: PixelGrid
    semantic: tuple

    def classes_on(self, grid: PixelGrid) -> np.ndarray:
        """The virtual slide's own classes on a native grid (0 glass, 1 stroma, 2 normal, 3 lumen, 4 tumour)."""
        assert grid.native
        return np.asarray(self.semantic[grid.level].compute(scheduler="threads"))


VIRTUAL_MPP = 4.0
VIRTUAL_CLASSES = ("glass", "stroma", "epithelium")
TO_VIRTUAL_CLASSES = np.array([0, 1, 2, 2, 2], dtype=np.int64)  # glass, stroma, normal, lumen, tumour


@functools.lru_cache(maxsize=1)
def virtual_case() -> VirtualCase:
    v = virtual_slide(seed=0, size=4096, mpp=1.0)
    # The renderer keeps no cache; the pipelines read levels 1.. only, rendered once here (level 0 stays lazy).
    levels = tuple(
        lev if i < 1 else da.from_array(np.asarray(lev.compute(scheduler="threads")), chunks=lev.chunks)
        for i, lev in enumerate(v.slide.levels)
    )
    slide = dataclasses.replace(v.slide, levels=levels)
    grid = PixelGrid.for_mpp(slide, VIRTUAL_MPP)
    truth = TO_VIRTUAL_CLASSES[np.asarray(v.semantic[grid.level].compute(scheduler="threads"))]
    return VirtualCase(slide, truth, grid, v.semantic)


def miou(pred: np.ndarray, truth: np.ndarray, n: int) -> float:
    scores = []
    for k in range(n):
        union = ((pred == k) | (truth == k)).sum()
        if union:
            scores.append(((pred == k) & (truth == k)).sum() / union)
    return float(np.mean(scores))


# ---------------------------------------------------------------------------------------------- training
def _crops(image: np.ndarray, target: np.ndarray, crop: int, n: int, rng: np.random.Generator):
    rs = rng.integers(0, image.shape[0] - crop + 1, n)
    cs = rng.integers(0, image.shape[1] - crop + 1, n)
    pix = np.stack([image[r : r + crop, c : c + crop] for r, c in zip(rs, cs)])
    lab = np.stack([target[r : r + crop, c : c + crop] for r, c in zip(rs, cs)])
    return pix, torch.from_numpy(np.ascontiguousarray(lab))


def _fit(model, params, image, target, *, steps: int, crop: int, batch: int = 2, lr: float = 3e-3, seed: int = 0):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    opt = torch.optim.Adam(params, lr=lr)
    model.train()
    for _ in range(steps):
        pix, lab = _crops(image, target, crop, batch, rng)
        x = to_input_tensor(pix, model.config).contiguous()
        loss = model.loss(model(x), Batch(x, lab))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def magnet_from(fpn, *, refiner_steps: int, image: np.ndarray, target: np.ndarray, **params):
    """A MagNet whose segmenter is ``fpn`` (same widths), its refiner trained ``refiner_steps`` steps."""
    cfg = fpn.config
    kw = dict(SMALL_FPN, patch_size=PATCH, kernel_size=5, n_points=0.75)
    kw.update(params)
    model = create_model("magnet", num_classes=cfg.num_classes, class_names=cfg.class_names, mpp=cfg.mpp,
                         scales=MAGNET_SCALES, **kw)
    model.segmenter.load_state_dict(fpn.state_dict())
    model.train_phase = "refiner"
    _fit(model, [p for p in model.parameters() if p.requires_grad], image, target, steps=refiner_steps, crop=2 * PATCH)
    return model


def hmsa_from(fpn, *, steps: int, image: np.ndarray, target: np.ndarray):
    """A multi-scale attention model whose trunk is ``fpn`` (frozen), its attention head trained ``steps`` steps."""
    cfg = fpn.config
    model = create_model("hmsa", num_classes=cfg.num_classes, class_names=cfg.class_names, mpp=cfg.mpp,
                         scales=MAGNET_SCALES, attention_width=8, **SMALL_FPN)
    model.trunk.load_state_dict(fpn.state_dict())
    model.trunk.requires_grad_(False)
    _fit(model, model.attention_head.parameters(), image, target, steps=steps, crop=128)
    model.trunk.eval()
    return model


def train_glnet(image: np.ndarray, target: np.ndarray, class_names, mpp: float, *, steps: int):
    """A small GLNet trained jointly (mode 0) on 256-px crops: global view 64 px (scale 0.25), 128-px patches."""
    torch.manual_seed(0)
    model = create_model("glnet", num_classes=len(class_names), class_names=class_names, mpp=mpp, scales=(0.25, 1.0),
                         **SMALL_GLNET)
    return _fit(model, model.trainable_parameters(), image, target, steps=steps, crop=256, lr=3e-3)


def _frozen(model):
    """(config, state) for the lru caches: every caller rebuilds its own copy."""
    return model.config.to_dict(), {k: v.detach().clone() for k, v in model.state_dict().items()}


def _rebuild(frozen):
    config, state = frozen
    model = build_model(ModelConfig.from_dict(dict(config)))
    model.load_state_dict(state)
    return model.eval()


@functools.lru_cache(maxsize=1)
def _cmu1_data():
    slide = cmu1()
    grid = PixelGrid.for_mpp(slide, MODEL_MPP)
    return grid.read(slide, grid.extent), tissue_targets(slide, grid)


@functools.lru_cache(maxsize=None)
def _tissue(kind: str):
    with single_thread():
        image, target = _cmu1_data()
        fpn = trained_tissue_model() if kind in ("magnet", "hmsa") else None
        if kind == "magnet":
            return _frozen(magnet_from(fpn, refiner_steps=15, image=image, target=target))
        if kind == "hmsa":
            return _frozen(hmsa_from(fpn, steps=15, image=image, target=target))
        if kind == "glnet":
            return _frozen(train_glnet(image, target, ("glass", "tissue"), MODEL_MPP, steps=20))
    raise KeyError(kind)


def tissue_model(kind: str):
    """A fresh copy of the CMU-1 tissue/glass model of architecture ``kind`` (``"magnet"``, ``"hmsa"``, ``"glnet"``)."""
    return _rebuild(_tissue(kind))


@functools.lru_cache(maxsize=None)
def _virtual(kind: str):
    case = virtual_case()
    image = case.grid.read(case.slide, case.grid.extent)
    with single_thread():
        fpn = _rebuild(_virtual("fpn")) if kind != "fpn" else None
        if kind == "fpn":
            return _frozen(train_fpn(image, case.truth, VIRTUAL_CLASSES, VIRTUAL_MPP, steps=40))
        if kind == "magnet":
            return _frozen(magnet_from(fpn, refiner_steps=15, image=image, target=case.truth))
        if kind == "hmsa":
            return _frozen(hmsa_from(fpn, steps=15, image=image, target=case.truth))
    raise KeyError(kind)


def virtual_model(kind: str):
    """A fresh copy of the virtual-slide model of architecture ``kind`` (``"fpn"``, ``"magnet"``, ``"hmsa"``)."""
    return _rebuild(_virtual(kind))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_watched_slide_records_and_forbids_reads():
    slide, reads = watched(cmu1(), forbid={0})
    grid = PixelGrid.of_level(slide, 3)
    grid.read(slide, grid.extent)
    assert reads.count(3) >= 1 and reads.count(2) == 0
    with pytest.raises(AssertionError, match="level 0 was read"):
        slide.read_level(0, grid.extent)


# ---------------------------------------------------------------------------------------------- instances
NUCLEI_MPP = 0.5  # the MICCAI 2015 tiles at 20x
# max_train_rois 16: the mask head on at most 16 RoIs per crop, a third of the cost of a step at its default of 96
SMALL_REFINEMASK = dict(widths=(16, 24, 32, 48), depths=(1, 1, 1, 1), stem_width=16, fpn_width=32, semantic_width=16,
                        center_width=16, mask_width=24, max_train_rois=16)


def miccai(n: int) -> tuple[np.ndarray, np.ndarray]:
    """MICCAI 2015 nuclei tile ``n``: ``(H, W, 3)`` uint8 RGB and ``(H, W)`` int64 instance ids."""
    from PIL import Image

    from conftest import REALDATA

    root = REALDATA / "miccai2015-nuclei"
    image = np.asarray(Image.open(root / f"image{n:02d}.png"))[..., :3].copy()
    return image, np.asarray(Image.open(root / f"image{n:02d}_label.png")).astype(np.int64)


def train_refinemask(tiles: list[tuple[np.ndarray, np.ndarray]], *, steps: int, crop: int = 128, batch: int = 2, seed: int = 0):
    """A small RefineMask trained ``steps`` steps on random crops of (image, instances) pairs."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = create_model("refinemask", num_classes=2, class_names=("background", "nucleus"), mpp=NUCLEI_MPP, **SMALL_REFINEMASK)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        pix, ins = [], []
        for _ in range(batch):
            image, inst = tiles[rng.integers(len(tiles))]
            r, c = rng.integers(0, image.shape[0] - crop + 1), rng.integers(0, image.shape[1] - crop + 1)
            pix.append(image[r : r + crop, c : c + crop])
            ins.append(inst[r : r + crop, c : c + crop])
        x = to_input_tensor(np.stack(pix), model.config).contiguous()
        inst = torch.from_numpy(np.stack(ins))
        loss = model.loss(model(x), Batch(x, (inst > 0).long(), inst))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@functools.lru_cache(maxsize=1)
def _nuclei():
    with single_thread():
        return _frozen(train_refinemask([miccai(n) for n in (2, 3, 4, 6, 7)], steps=80))


def nuclei_model():
    """A fresh copy of the small RefineMask trained on five MICCAI 2015 20x tiles (not on tile 5)."""
    return _rebuild(_nuclei())
