"""Coarse auto-labels: a teacher model's confident predictions, hard-thresholded, stored compressed in zarr.

Following the hierarchical multi-scale attention paper's auto-labelling (Tao et al. 2020; NVIDIA's recipe keeps a
pixel when its top probability is above ``custom_coarse_prob = 0.5``): every pixel gets the argmax class where
the teacher's probability for it is **strictly above** ``threshold``, and `IGNORE_INDEX` (255) elsewhere, so
training on them never learns from the teacher's doubts.  Hard labels are one uint8 per pixel and compress
well (long runs of one class); the soft alternative, float16 probabilities for every class, costs ``2 C`` bytes
per pixel before compression.  `storage_report` measures both on the same region with the same codec.

Note that for a 2-class model the top probability is always >= 0.5, so the default threshold only drops exact
ties; use a higher one (the paper's text says 0.9) to ignore more of a binary teacher's doubtful pixels.

A region or a whole slide is processed tile by tile (`iter_coarse_labels` is a generator of `AutoLabelProgress`,
cancelable between tiles) and written into a zarr array on disk, so a whole slide never sits in memory.  On a
slide, tiles whose window holds no tissue (`napari_hrseg.inference.tissue.tissue_mask_for`) are skipped: the
teacher is not run on glass, and their labels stay `IGNORE_INDEX` (chunks never written cost no disk).

Store layout (zarr v3 group)::

    labels            (H, W) uint8, chunks 256 x 256, blosc-zstd; fill 255 (= not yet labelled / ignored)
    attributes["napari_hrseg"] = {kind: "coarse-labels", threshold, teacher, teacher_weights, mpp,
                                  region: [row, col, height, width] (level-0) or null, ignore_index: 255,
                                  class_names, source, complete}

Tiles are `napari_hrseg.tiling.Tiler` cores with the model's halo (crop-to-core, exact when the halo covers the
model's reach), read through `napari_hrseg.training.predict.PixelGrid` at the model's pixel size.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Generator

import numpy as np
import torch
import zarr

from ..errors import Cancelled, TrainingError
from ..geometry import Region
from ..models.base import HrsegModel
from ..models.config import IGNORE_INDEX
from ..models.weights import state_fingerprint
from ..slide import Slide
from .predict import PixelGrid, probabilities, tiles
from .samples import Sample
from .cancel import CancelToken, is_cancelled

__all__ = [
    "hard_labels",
    "CoarseLabels",
    "AutoLabelProgress",
    "iter_coarse_labels",
    "coarse_labels",
    "open_coarse_labels",
    "StorageReport",
    "storage_report",
    "label_codec",
    "DEFAULT_THRESHOLD",
]

log = logging.getLogger(__name__)

#: The paper's (and NVIDIA's code's) confidence threshold.
DEFAULT_THRESHOLD = 0.5
#: Chunk side of the label arrays.
CHUNK = 256
_ATTR = "napari_hrseg"


def label_codec():
    """The compressor used for coarse labels and, in `storage_report`, for the soft probabilities alike."""
    from zarr.codecs import BloscCodec

    return BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")


def hard_labels(probs: np.ndarray | torch.Tensor, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """Coarse labels of a probability map.

    Parameters
    ----------
    probs : array
        ``(C, H, W)`` class probabilities (summing to 1 over C).
    threshold : float
        A pixel keeps its argmax class when that class's probability is > ``threshold``.

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` uint8: class, or `IGNORE_INDEX` where the teacher is unsure.
    """
    p = torch.as_tensor(probs)
    top, cls = p.max(dim=0)
    out = torch.where(top > threshold, cls, torch.full_like(cls, IGNORE_INDEX))
    return out.to(torch.uint8).cpu().numpy()


@dataclass(frozen=True)
class AutoLabelProgress:
    """``done`` of ``total`` tiles handled (``skipped`` of them glass, left ignored); ``labelled`` / ``ignored``
    pixels so far (skipped tiles count as ignored)."""

    done: int
    total: int
    labelled: int
    ignored: int
    skipped: int = 0


@dataclass(frozen=True, eq=False)
class CoarseLabels:
    """Coarse labels in a zarr store.

    Parameters
    ----------
    path : Path
        The zarr group.
    labels : zarr.Array
        ``(H, W)`` uint8 at ``mpp``; `IGNORE_INDEX` where the teacher was unsure.
    region : Region or None
        Level-0 region of the slide the labels cover (None for an image array).
    mpp : float
        Pixel size of ``labels`` in µm.
    threshold : float
        Confidence threshold used.
    teacher : str
        The teacher's ``name@version``.
    """

    path: Path
    labels: zarr.Array
    region: Region | None
    mpp: float
    threshold: float
    teacher: str

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.labels.shape)  # type: ignore[return-value]

    def fraction_ignored(self) -> float:
        """Share of pixels left at `IGNORE_INDEX` (reads the whole array)."""
        arr = self.labels[...]
        return float(np.mean(arr == IGNORE_INDEX))

    def sample(self, source: np.ndarray | Slide, box: Region | None = None, key: str = "") -> Sample:
        """Pixels and coarse labels of ``box`` (grid pixels; default all) as a training `Sample`.

        ``source`` is the image or slide the labels were made from.
        """
        grid = PixelGrid.of(source, self.region, self.mpp)
        if grid.shape != self.shape:
            raise TrainingError(f"the coarse labels ({self.shape}) were not made from this source ({grid.shape})",
                                subject=self.path)
        box = box or Region.from_shape(self.shape)
        inside = box.clip(self.shape)
        labels = np.full(box.shape, IGNORE_INDEX, np.uint8)
        if not inside.is_empty:
            labels[inside.relative_to(box).slices] = self.labels[inside.slices]
        return Sample(grid.read(box), labels, key=key or f"{self.path.name}[{box}]")


def _create_store(path: Path, shape: tuple[int, int], attrs: dict) -> tuple[zarr.Group, zarr.Array]:
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    arr = group.create_array("labels", shape=shape, dtype="uint8", chunks=(CHUNK, CHUNK),
                             compressors=[label_codec()], fill_value=IGNORE_INDEX, dimension_names=("y", "x"))
    group.attrs[_ATTR] = attrs
    return group, arr


def iter_coarse_labels(model: HrsegModel, source: np.ndarray | Slide, out: str | Path, *, region: Region | None = None,
                       threshold: float = DEFAULT_THRESHOLD, tile: int = 512, halo: int | None = None,
                       device: str | torch.device | None = None, skip_glass: bool = True, cancel: CancelToken = None,
                       ) -> Generator[AutoLabelProgress, None, CoarseLabels]:
    """Auto-label an image or a slide region tile by tile into a zarr store; a generator of progress.

    Parameters
    ----------
    model : HrsegModel
        The teacher (used in eval mode; not modified).
    source : numpy.ndarray or Slide
        ``(H, W, 3)`` uint8 image at the model's pixel size, or a slide (read at ``model.config.mpp`` from the
        best pyramid level).
    out : path
        Zarr group to create (replaced if it exists and holds coarse labels; refused if it holds anything else).
    region : Region, optional
        Level-0 region of the slide (pixels of the image) to label; default all of it.
    threshold : float
        Keep the argmax where its probability is > ``threshold``.
    tile : int
        Core tile size in model pixels.
    halo : int, optional
        Context read around every tile, in model pixels (default ``model.halo``); the labels equal a whole-region
        pass with the same surroundings when it covers the model's receptive-field reach.
    device : optional
        Where the teacher runs (default: where its weights are).
    skip_glass : bool
        On a slide, skip tiles whose window has no tissue (their labels stay ignored).  Images are never skipped.
    cancel : threading.Event or callable, optional
        Checked between tiles; raises `Cancelled`, and the partial store is deleted.

    Yields
    ------
    AutoLabelProgress
        After every tile.

    Returns
    -------
    CoarseLabels
    """
    if not 0 <= threshold < 1:
        raise TrainingError(f"threshold {threshold} is not in [0, 1)", subject="auto-labelling")
    out = Path(out)
    _check_replaceable(out)
    grid = PixelGrid.of(source, region, model.config.mpp)
    dev = torch.device(device) if device is not None else model.device
    if dev != model.device:
        raise TrainingError(f"the teacher's weights are on {model.device}, not {dev}", subject=model.config.label,
                            hint="move the model first (model.to(device))")
    attrs = {
        "kind": "coarse-labels",
        "threshold": float(threshold),
        "teacher": model.config.label,
        "teacher_weights": state_fingerprint(model),
        "mpp": float(model.config.mpp),
        "region": list(grid.region.as_tuple()) if grid.is_slide else None,
        "ignore_index": IGNORE_INDEX,
        "class_names": list(model.config.class_names),
        "source": source.name if isinstance(source, Slide) else "array",
        "complete": False,
    }
    group, arr = _create_store(out, grid.shape, attrs)
    plan = list(tiles(grid.shape, tile, model.halo if halo is None else halo, model.stride))
    tissue = None
    if skip_glass and grid.is_slide:
        from ..inference.tissue import tissue_mask_for  # the engine's cached detection of the same slide

        tissue = tissue_mask_for(source)  # type: ignore[arg-type]
    was_training = model.training
    model.eval()
    labelled = ignored = skipped = 0
    finished = False
    try:
        for i, (core, window) in enumerate(plan):
            if is_cancelled(cancel):
                raise Cancelled(f"auto-labelling was cancelled after {i} of {len(plan)} tiles", subject=out)
            if tissue is not None and not tissue.has_tissue(grid.to_level0(window)):
                skipped += 1
                ignored += core.area
                yield AutoLabelProgress(i + 1, len(plan), labelled, ignored, skipped)
                continue
            probs = probabilities(model, grid.read(window), dev)
            hard = hard_labels(probs[(slice(None),) + core.relative_to(window).slices], threshold)
            arr[core.slices] = hard
            n_ign = int(np.count_nonzero(hard == IGNORE_INDEX))
            ignored += n_ign
            labelled += hard.size - n_ign
            yield AutoLabelProgress(i + 1, len(plan), labelled, ignored, skipped)
        group.attrs[_ATTR] = {**attrs, "complete": True}
        finished = True
    finally:
        model.train(was_training)
        if not finished:  # cancelled, closed or failed: never leave a half-written store that looks usable
            shutil.rmtree(out, ignore_errors=True)
    log.info("coarse labels of %s: %d px labelled, %d px ignored (threshold %.2f; %d of %d tiles glass) -> %s",
             attrs["source"], labelled, ignored, threshold, skipped, len(plan), out)
    return CoarseLabels(out, arr, grid.region if grid.is_slide else None, float(model.config.mpp), float(threshold),
                        model.config.label)


def coarse_labels(model: HrsegModel, source: np.ndarray | Slide, out: str | Path, **kwargs) -> CoarseLabels:
    """`iter_coarse_labels` run to the end (for scripts and tests; the viewer iterates the generator)."""
    gen = iter_coarse_labels(model, source, out, **kwargs)
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


def open_coarse_labels(path: str | Path) -> CoarseLabels:
    """Open a coarse-label store written by `iter_coarse_labels`."""
    path = Path(path)
    try:
        group = zarr.open_group(str(path), mode="r")
        attrs = dict(group.attrs[_ATTR])
        arr = group["labels"]
    except (FileNotFoundError, KeyError) as exc:
        raise TrainingError("not a coarse-label store", subject=path, hint="make one with iter_coarse_labels") from exc
    if attrs.get("kind") != "coarse-labels":
        raise TrainingError("not a coarse-label store", subject=path)
    if not attrs.get("complete"):
        raise TrainingError("the coarse labels are incomplete (the run was interrupted)", subject=path,
                            hint="run the auto-labelling again")
    region = Region(*attrs["region"]) if attrs.get("region") else None
    return CoarseLabels(path, arr, region, float(attrs["mpp"]), float(attrs["threshold"]), str(attrs["teacher"]))


def _check_replaceable(out: Path) -> None:
    if not out.exists():
        return
    try:
        kind = dict(zarr.open_group(str(out), mode="r").attrs.get(_ATTR, {})).get("kind")
    except Exception:
        kind = None
    if kind != "coarse-labels":
        raise TrainingError("exists and is not a coarse-label store; refusing to overwrite it", subject=out,
                            hint="choose another output path")


# ---------------------------------------------------------------------------------------------- storage
@dataclass(frozen=True)
class StorageReport:
    """Bytes on disk of hard coarse labels vs soft probabilities of the same region, same codec and chunks.

    ``*_bytes`` count the compressed chunks (the part that grows with the region); ``*_total_bytes`` add the
    stores' JSON metadata (about a kilobyte each, whatever the region's size).
    """

    pixels: int
    classes: int
    hard_bytes: int
    soft_bytes: int
    hard_total_bytes: int = 0
    soft_total_bytes: int = 0

    @property
    def hard_bytes_per_pixel(self) -> float:
        return self.hard_bytes / self.pixels

    @property
    def soft_bytes_per_pixel(self) -> float:
        return self.soft_bytes / self.pixels

    @property
    def ratio(self) -> float:
        """How many times smaller the hard labels are."""
        return self.soft_bytes / max(1, self.hard_bytes)

    def __str__(self) -> str:
        return (f"{self.pixels} px, {self.classes} classes: hard uint8 {self.hard_bytes_per_pixel:.4f} B/px, "
                f"soft float16 {self.soft_bytes_per_pixel:.4f} B/px ({self.ratio:.1f}x larger; chunks only; "
                f"with metadata {self.hard_total_bytes} vs {self.soft_total_bytes} bytes)")


def _disk_bytes(path: Path, *, chunks_only: bool) -> int:
    files = (f for f in path.rglob("*") if f.is_file())
    return sum(f.stat().st_size for f in files if not (chunks_only and f.name == "zarr.json"))


def storage_report(model: HrsegModel, source: np.ndarray | Slide, *, region: Region | None = None,
                   threshold: float = DEFAULT_THRESHOLD, tile: int = 512, halo: int | None = None,
                   workdir: str | Path | None = None) -> StorageReport:
    """Write hard coarse labels and soft float16 probabilities ``(C, H, W)`` of one region with the same codec
    and chunking, and compare their size on disk (metadata included).

    Parameters
    ----------
    model, source, region, threshold, tile, halo
        As for `iter_coarse_labels`.
    workdir : path, optional
        Where the two temporary stores are written (default a temporary directory); they are deleted after.
    """
    tmp = Path(tempfile.mkdtemp(prefix="hrseg-storage-", dir=workdir))
    try:
        halo = model.halo if halo is None else halo
        hard = coarse_labels(model, source, tmp / "hard.zarr", region=region, threshold=threshold, tile=tile, halo=halo)
        grid = PixelGrid.of(source, region, model.config.mpp)
        c = model.config.num_classes
        soft_group = zarr.open_group(str(tmp / "soft.zarr"), mode="w", zarr_format=3)
        soft = soft_group.create_array("probabilities", shape=(c,) + grid.shape, dtype="float16",
                                       chunks=(c, CHUNK, CHUNK), compressors=[label_codec()], fill_value=0)
        was_training = model.training
        model.eval()
        try:
            for core, window in tiles(grid.shape, tile, halo, model.stride):
                p = probabilities(model, grid.read(window))
                inner = (slice(None),) + core.relative_to(window).slices
                soft[(slice(None),) + core.slices] = p[inner].astype(np.float16)
        finally:
            model.train(was_training)
        h, w = grid.shape
        soft_path = tmp / "soft.zarr"
        return StorageReport(h * w, c,
                             _disk_bytes(hard.path, chunks_only=True), _disk_bytes(soft_path, chunks_only=True),
                             _disk_bytes(hard.path, chunks_only=False), _disk_bytes(soft_path, chunks_only=False))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

