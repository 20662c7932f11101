"""Training data: labelled sources (image/label file pairs, arrays, slides with label pyramids), pairing rules,
a reproducible split by image, and a crop sampler that yields `Sample`s at the model's pixel size.

Sources
-------
Every source knows its own pixel size and reads any box of itself *at a requested pixel size* (the model's
``ModelConfig.mpp``): images are resampled antialiased-bilinear, labels and instance ids nearest-neighbour
through the same pixel-centre mapping, so they stay aligned.  Boxes may extend past the image: the outside is
white glass in the image, `IGNORE_INDEX` in the labels (padding is not evidence of background) and 0 in the
instance ids.

- `ArraySource`: an image and its labels in memory (corrections, coarse labels, tests).
- `FileSource`: one image file and one label file (PNG or TIFF), read on first use.  `pair_files` finds the
  pairs in a folder with an explicit `PairingRule`; `PRESETS` holds the rules of GlaS and MICCAI 2015.
- `SlideSource`: a `Slide` with a label pyramid (the virtual slide's ``semantic``/``instances`` levels, an
  OME-Zarr ``labels/`` group, a label store's levels), optionally restricted to a level-0 region.

Split
-----
`split_by_image` holds out whole images, never crops of an image that is also trained on; a slide is first cut
into contiguous blocks that play the role of images.  The split depends only on the source keys and the seed.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Protocol, Sequence

import numpy as np

from ..errors import TrainingError
from ..geometry import Region
from ..models.config import IGNORE_INDEX
from ..slide import Slide
from .resample import read_levels_at, read_slide_at_mpp, scaled_shape
from .samples import Sample

__all__ = [
    "LabelledSource",
    "ArraySource",
    "FileSource",
    "SlideSource",
    "PairingRule",
    "PRESETS",
    "pair_files",
    "detect_layout",
    "magnification_mpp",
    "read_image_file",
    "read_label_file",
    "split_by_image",
    "CropSampler",
    "tile_samples",
    "dataset_fingerprint",
    "LABEL_KINDS",
    "open_label_pyramid",
    "label_store_source",
]

log = logging.getLogger(__name__)

#: How a label file is turned into classes: ``"binary"`` (any value > 0 is class 1, e.g. GlaS 0/255),
#: ``"instance"`` (ids > 0 are objects of class 1 and are kept as instances, e.g. MICCAI 2015),
#: ``"semantic"`` (the value is the class index; 255 stays ignore).
LABEL_KINDS = ("binary", "instance", "semantic")

WHITE = 255


class LabelledSource(Protocol):
    """What the sampler needs from a source of labelled pixels."""

    key: str

    def size_at(self, mpp: float) -> tuple[int, int]:
        """``(H, W)`` of the whole source at ``mpp`` µm/px."""

    def read(self, box: Region, mpp: float) -> Sample:
        """The pixels of ``box`` (in the source's pixels at ``mpp``; may extend outside, padded)."""

    def fingerprint(self) -> str:
        """Hash of the source's content (files, arrays or slide + labels)."""

    @property
    def has_instances(self) -> bool:
        """Whether instance ids are available."""


# ---------------------------------------------------------------------------------------------- file reading
def read_image_file(path: str | Path) -> np.ndarray:
    """Read a PNG/JPEG/TIFF image as ``(H, W, 3)`` uint8 RGB.

    RGBA is composited over white (transparent = glass), greyscale is repeated to three channels, 16-bit
    images are scaled to 8 bits.
    """
    path = Path(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            arr = tifffile.imread(path)
        else:
            from PIL import Image

            with Image.open(path) as im:
                arr = np.asarray(im)
    except FileNotFoundError as exc:
        raise TrainingError("image file not found", subject=path) from exc
    except Exception as exc:  # PIL.UnidentifiedImageError, tifffile errors, truncated files
        raise TrainingError(f"cannot read the image ({type(exc).__name__}: {exc})", subject=path,
                            hint="use PNG, JPEG or TIFF files") from exc
    arr = np.squeeze(arr)
    if arr.dtype == np.uint16:
        arr = (arr.astype(np.float32) / 257.0).round().astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise TrainingError(f"image dtype {arr.dtype} is not 8- or 16-bit", subject=path)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise TrainingError(f"image has shape {arr.shape}; expected (H, W, 3) RGB or (H, W, 4) RGBA", subject=path)
    if arr.shape[2] == 4:
        alpha = arr[:, :, 3:4].astype(np.float32) / 255.0
        arr = np.rint(arr[:, :, :3] * alpha + WHITE * (1 - alpha)).astype(np.uint8)
    return np.ascontiguousarray(arr)


def read_label_file(path: str | Path) -> np.ndarray:
    """Read a 2-D label image (PNG or TIFF) as int64 ``(H, W)``."""
    path = Path(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            arr = tifffile.imread(path)
        else:
            from PIL import Image

            with Image.open(path) as im:
                arr = np.asarray(im)
    except FileNotFoundError as exc:
        raise TrainingError("label file not found", subject=path) from exc
    except Exception as exc:
        raise TrainingError(f"cannot read the label image ({type(exc).__name__}: {exc})", subject=path) from exc
    arr = np.squeeze(arr)
    if arr.ndim == 3 and arr.shape[2] in (3, 4) and np.all(arr[..., :3] == arr[..., :1]):
        arr = arr[..., 0]  # a grey label saved as RGB(A)
    if arr.ndim != 2:
        raise TrainingError(f"label image has shape {arr.shape}; expected a 2-D label map", subject=path)
    if arr.dtype.kind not in "ui":
        raise TrainingError(f"label image has dtype {arr.dtype}; expected integers", subject=path)
    return arr.astype(np.int64)


def labels_from_raw(raw: np.ndarray, kind: str, label_map: Mapping[int, int] | None = None,
                    subject: str = "labels") -> tuple[np.ndarray, np.ndarray | None]:
    """Turn a raw label image into ``(labels uint8, instances int32 or None)`` according to ``kind``."""
    if kind not in LABEL_KINDS:
        raise TrainingError(f"unknown label kind {kind!r}", subject=subject,
                            hint=f"use one of {', '.join(LABEL_KINDS)}")
    if label_map:
        out = np.full(raw.shape, IGNORE_INDEX, np.uint8)
        for value, cls in label_map.items():
            out[raw == value] = cls
        return out, None
    if kind == "binary":
        return (raw > 0).astype(np.uint8), None
    if kind == "instance":
        return (raw > 0).astype(np.uint8), raw.astype(np.int32)
    if raw.size and (raw.min() < 0 or raw.max() > IGNORE_INDEX):
        raise TrainingError(f"semantic labels hold values outside 0..{IGNORE_INDEX}", subject=subject,
                            hint="pass label kind 'instance' for instance ids, or a label map")
    return raw.astype(np.uint8), None


# ---------------------------------------------------------------------------------------------- array sources
class ArraySource:
    """An image and its labels held in memory.

    Parameters
    ----------
    image : numpy.ndarray
        ``(H, W, 3)`` uint8.
    labels : numpy.ndarray
        ``(H, W)`` classes (`IGNORE_INDEX` where unknown).
    instances, weight : numpy.ndarray, optional
        ``(H, W)`` instance ids / loss weights.
    mpp : float, optional
        Pixel size in µm; ``None`` means the arrays are already at whatever pixel size is asked for.
    key : str
        Identity (file name, slide region, ...).
    focus : numpy.ndarray, optional
        ``(H, W)`` bool: pixels that crops should favour (e.g. a user's corrections; see `CropSampler.focus`).
    """

    #: Resampled copies kept (oldest dropped first): enough for a multi-scale sampler's few pixel sizes.
    CACHED_SIZES = 4

    def __init__(self, image: np.ndarray, labels: np.ndarray, instances: np.ndarray | None = None,
                 weight: np.ndarray | None = None, *, mpp: float | None = None, key: str = "array",
                 focus: np.ndarray | None = None):
        self.key = key
        self.mpp = mpp
        self._base = Sample(image, labels, instances, weight, key=key, mpp=mpp)
        self._cache: dict[float, Sample] = {}
        self._focus = None if focus is None else np.argwhere(np.asarray(focus, bool))

    def focus_points(self, mpp: float) -> np.ndarray | None:
        """``(N, 2)`` (row, col) of the focus pixels at ``mpp``, or None."""
        if self._focus is None or not len(self._focus):
            return None
        if self.mpp is None or math.isclose(self.mpp, mpp, rel_tol=1e-3):
            return self._focus
        return np.floor((self._focus + 0.5) * (self.mpp / mpp)).astype(np.int64)

    @classmethod
    def from_sample(cls, sample: Sample) -> "ArraySource":
        return cls(sample.image, sample.labels, sample.instances, sample.weight, mpp=sample.mpp, key=sample.key)

    @property
    def has_instances(self) -> bool:
        return self._base.instances is not None

    @property
    def base(self) -> Sample:
        """The arrays as given (at ``mpp``)."""
        return self._base

    def _at(self, mpp: float) -> Sample:
        if self.mpp is None or math.isclose(self.mpp, mpp, rel_tol=1e-3):
            return self._base
        key = round(mpp, 6)
        if key not in self._cache:
            from .resample import resample_image, resample_labels

            shape = scaled_shape(self._base.shape, self.mpp / mpp)
            b = self._base
            if len(self._cache) >= self.CACHED_SIZES:  # multi-scale sampling alternates a few pixel sizes
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = Sample(
                resample_image(b.image, shape),
                resample_labels(b.labels, shape),
                None if b.instances is None else resample_labels(b.instances, shape),
                None if b.weight is None else resample_labels(b.weight, shape),
                key=self.key, mpp=mpp,
            )
        return self._cache[key]

    def size_at(self, mpp: float) -> tuple[int, int]:
        if self.mpp is None:
            return self._base.shape
        return scaled_shape(self._base.shape, self.mpp / mpp)

    def read(self, box: Region, mpp: float) -> Sample:
        s = self._at(mpp)
        inside = box.clip(s.shape)
        dst = inside.relative_to(box)

        def crop(arr, fill, dtype):
            out = np.full(box.shape + arr.shape[2:], fill, dtype=dtype)
            if not inside.is_empty:
                out[dst.slices] = arr[inside.slices]
            return out

        return Sample(
            crop(s.image, WHITE, np.uint8),
            crop(s.labels, IGNORE_INDEX, np.uint8),
            None if s.instances is None else crop(s.instances, 0, np.int32),
            None if s.weight is None else crop(s.weight, 0.0, np.float32),
            key=self.key,
        )

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for arr in (self._base.image, self._base.labels, self._base.instances, self._base.weight):
            if arr is not None:
                h.update(repr((arr.shape, str(arr.dtype))).encode())
                h.update(np.ascontiguousarray(arr).tobytes())
        h.update(repr(self.mpp).encode())
        return h.hexdigest()[:16]

    def __repr__(self) -> str:
        return f"ArraySource({self.key!r}, shape={self._base.shape}, mpp={self.mpp})"


class FileSource:
    """One image file and its label file, read (and resampled) on first use.

    Parameters
    ----------
    image_path, label_path : Path
        PNG/JPEG/TIFF image and PNG/TIFF label map of the same size.
    kind : {"binary", "instance", "semantic"}
        How to read the label values (see `LABEL_KINDS`).
    mpp : float
        The image's pixel size in µm (stated by the data set, see `PairingRule.mpp`).
    key : str
        Identity, e.g. the image path relative to the data root.
    label_map : mapping, optional
        Raw label value -> class; unlisted values become `IGNORE_INDEX`.
    """

    def __init__(self, image_path: Path, label_path: Path, *, kind: str, mpp: float, key: str | None = None,
                 label_map: Mapping[int, int] | None = None):
        self.image_path = Path(image_path)
        self.label_path = Path(label_path)
        self.kind = kind
        self.mpp = float(mpp)
        self.key = key or self.image_path.name
        self.label_map = dict(label_map) if label_map else None
        self._array: ArraySource | None = None
        self._shape: tuple[int, int] | None = None

    @property
    def has_instances(self) -> bool:
        return self.kind == "instance" and not self.label_map

    def load(self) -> ArraySource:
        """Read both files (once) and check that they match."""
        if self._array is None:
            image = read_image_file(self.image_path)
            raw = read_label_file(self.label_path)
            if raw.shape != image.shape[:2]:
                raise TrainingError(f"label map {raw.shape} and image {image.shape[:2]} differ in size",
                                    subject=self.label_path, hint="pair each image with the label file made for it")
            labels, instances = labels_from_raw(raw, self.kind, self.label_map, subject=str(self.label_path))
            self._array = ArraySource(image, labels, instances, mpp=self.mpp, key=self.key)
        return self._array

    def native_shape(self) -> tuple[int, int]:
        """``(H, W)`` of the image file, read from its header only."""
        if self._shape is None:
            if self._array is not None:
                self._shape = self._array.base.shape
            elif self.image_path.suffix.lower() in (".tif", ".tiff"):
                import tifffile

                with tifffile.TiffFile(self.image_path) as tif:
                    self._shape = tuple(tif.pages[0].shape[:2])  # type: ignore[assignment]
            else:
                from PIL import Image

                try:
                    with Image.open(self.image_path) as im:
                        self._shape = (im.height, im.width)
                except Exception as exc:
                    raise TrainingError(f"cannot read the image ({exc})", subject=self.image_path) from exc
        return self._shape  # type: ignore[return-value]

    def size_at(self, mpp: float) -> tuple[int, int]:
        return scaled_shape(self.native_shape(), self.mpp / mpp)

    def read(self, box: Region, mpp: float) -> Sample:
        return self.load().read(box, mpp)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for p in (self.image_path, self.label_path):
            h.update(p.name.encode())
            h.update(p.read_bytes())
        h.update(repr((self.kind, self.mpp, sorted((self.label_map or {}).items()))).encode())
        return h.hexdigest()[:16]

    def __repr__(self) -> str:
        return f"FileSource({self.key!r}, kind={self.kind!r}, mpp={self.mpp})"


# ---------------------------------------------------------------------------------------------- slide sources
def _as_levels(levels) -> tuple:
    if levels is None:
        return ()
    if hasattr(levels, "levels") and not hasattr(levels, "ndim"):  # a Slide-like pyramid object
        levels = levels.levels
    if hasattr(levels, "shape") and hasattr(levels, "ndim"):
        levels = (levels,)
    out = []
    for lev in levels:
        if lev.ndim == 3 and lev.shape[2] == 1:
            lev = lev[:, :, 0]
        if lev.ndim != 2:
            raise TrainingError(f"label level of shape {lev.shape} is not 2-D", subject="labels")
        out.append(lev)
    return tuple(out)


class SlideSource:
    """A slide with a label pyramid, optionally restricted to a level-0 region.

    Parameters
    ----------
    slide : Slide
        RGB uint8 slide with a known pixel size (``slide.mpp``).
    semantic : array or sequence of arrays
        ``(H_l, W_l)`` class labels, finest first (numpy, dask or zarr).  Each level's downsample relative to
        the slide is ``slide.shape / level.shape``, so a pyramid at a coarser working level lines up.
    instances : array or sequence of arrays, optional
        ``(H_l, W_l)`` instance ids, same convention.
    region : Region, optional
        Level-0 part of the slide to use (default: all of it).  Pixels outside it read as padding, so blocks of
        one slide used for training and validation never share labels.
    key : str, optional
        Identity; default the slide's name and the region.
    """

    def __init__(self, slide: Slide, semantic, instances=None, *, region: Region | None = None, key: str | None = None):
        if slide.mpp is None:
            raise TrainingError("the slide's pixel size is unknown", subject=slide.name,
                                hint="state it with slide.with_mpp(µm) or --data-mpp")
        if not slide.is_rgb:
            raise TrainingError(f"training reads RGB uint8 slides; this one has {slide.n_channels} channels of "
                                f"{slide.dtype}", subject=slide.name)
        self.slide = slide
        self.semantic = _as_levels(semantic)
        self.instances = _as_levels(instances)
        if not self.semantic:
            raise TrainingError("no label levels given", subject=slide.name)
        full = Region.from_shape(slide.shape)
        self.region = full if region is None else region.intersect(full)
        if self.region.is_empty:
            raise TrainingError(f"region {region} does not overlap the slide", subject=slide.name)
        self.key = key or (slide.name if self.region == full else f"{slide.name}[{self.region}]")

    @property
    def has_instances(self) -> bool:
        return bool(self.instances)

    def _factors(self, mpp: float) -> tuple[float, float]:
        my, mx = self.slide.mpp_yx  # type: ignore[misc]
        return mpp / my, mpp / mx  # level-0 pixels per output pixel

    def size_at(self, mpp: float) -> tuple[int, int]:
        fy, fx = self._factors(mpp)
        return max(1, int(round(self.region.height / fy))), max(1, int(round(self.region.width / fx)))

    def read(self, box: Region, mpp: float) -> Sample:
        fy, fx = self._factors(mpp)
        r0 = self.region.row + box.row * fy
        c0 = self.region.col + box.col * fx
        box0 = (r0, c0, r0 + box.height * fy, c0 + box.width * fx)
        image = read_slide_at_mpp(self.slide, box0, box.shape)
        shape0 = self.slide.shape[:2]
        labels = read_levels_at(self.semantic, shape0, box0, box.shape, fill=IGNORE_INDEX, dtype=np.uint8)
        instances = (read_levels_at(self.instances, shape0, box0, box.shape, fill=0, dtype=np.int32)
                     if self.instances else None)
        # Outside this source's region: padding (white glass, unknown labels), so blocks never leak labels.
        size = self.size_at(mpp)
        inside = box.clip(size).relative_to(box)
        if inside != Region.from_shape(box.shape):
            mask = np.ones(box.shape, bool)
            if not inside.is_empty:
                mask[inside.slices] = False
            image[mask] = WHITE
            labels[mask] = IGNORE_INDEX
            if instances is not None:
                instances[mask] = 0
        return Sample(image, labels, instances, key=self.key)

    def blocks(self, rows: int, cols: int) -> list["SlideSource"]:
        """Cut the region into ``rows x cols`` contiguous blocks (for a split by region of one slide)."""
        out = []
        for i in range(rows):
            for j in range(cols):
                r0 = self.region.row + self.region.height * i // rows
                r1 = self.region.row + self.region.height * (i + 1) // rows
                c0 = self.region.col + self.region.width * j // cols
                c1 = self.region.col + self.region.width * (j + 1) // cols
                reg = Region(r0, c0, r1 - r0, c1 - c0)
                out.append(SlideSource(self.slide, self.semantic, self.instances or None, region=reg,
                                       key=f"{self.slide.name}[{reg}]"))
        return out

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(self.slide.fingerprint().encode())
        h.update(str(self.region).encode())
        for lev in (self.semantic[-1],) + ((self.instances[-1],) if self.instances else ()):
            step = max(1, math.ceil(max(lev.shape) / 2048))
            win = lev[::step, ::step]
            h.update(np.ascontiguousarray(np.asarray(win.compute() if hasattr(win, "compute") else win)).tobytes())
        return h.hexdigest()[:16]

    def __repr__(self) -> str:
        return f"SlideSource({self.key!r}, mpp={self.slide.mpp})"


# ---------------------------------------------------------------------------------------------- pairing rules
@dataclass(frozen=True)
class PairingRule:
    """How to find image/label pairs in a folder.

    Parameters
    ----------
    images : str
        Glob (relative to the data root) of the image files, e.g. ``"images/*.png"`` or ``"image[0-9][0-9].png"``.
    labels : str
        Template of the label path relative to the root; ``{stem}`` is the image's file name without suffix
        and ``{name}`` the whole file name, e.g. ``"labels_binary/{stem}.png"`` or ``"{stem}_label.png"``.
    kind : {"binary", "instance", "semantic"}
        How label values are read.
    mpp : float or mapping or None
        Pixel size of the images in µm: one number, or ``{file name: µm}``.  ``None`` means "read it from a
        magnification table" (`magnification_mpp`), and fails if there is none.
    exclude : tuple of str
        Globs of image-glob matches that are not images (e.g. ``"*_label.png"``).
    name : str
        Human name of the layout.
    """

    images: str
    labels: str
    kind: str = "semantic"
    mpp: float | Mapping[str, float] | None = None
    exclude: tuple[str, ...] = ()
    name: str = "custom"

    def __post_init__(self):
        if self.kind not in LABEL_KINDS:
            raise TrainingError(f"unknown label kind {self.kind!r}", subject="pairing rule",
                                hint=f"use one of {', '.join(LABEL_KINDS)}")
        if "{stem}" not in self.labels and "{name}" not in self.labels:
            raise TrainingError(f"label template {self.labels!r} names no {{stem}} or {{name}}", subject="pairing rule",
                                hint='e.g. "labels/{stem}.png"')

    @classmethod
    def parse(cls, text: str, **kwargs) -> "PairingRule":
        """``"IMAGE_GLOB:LABEL_TEMPLATE"`` (the CLI's ``--pair``), e.g. ``"images/*.png:masks/{stem}.png"``."""
        if text.count(":") != 1:
            raise TrainingError(f"pairing {text!r} is not IMAGE_GLOB:LABEL_TEMPLATE", subject="--pair",
                                hint='e.g. --pair "images/*.png:labels/{stem}.png"')
        images, labels = text.split(":")
        return cls(images=images, labels=labels, **kwargs)

    def label_path(self, root: Path, image: Path) -> Path:
        return root / self.labels.format(stem=image.stem, name=image.name)


#: Pairing rules of the public data sets in ``shared/realdata``.
PRESETS: dict[str, PairingRule] = {
    # GlaS (Sirinukunwattana et al. 2017): 20x Zeiss MIRAX MIDI images at 0.62005 µm/px
    # (glas.grand-challenge.org/Dataset); binary gland masks 0/255.
    "glas": PairingRule(images="images/*.png", labels="labels_binary/{stem}.png", kind="binary", mpp=0.62005,
                        name="glas"),
    # MICCAI 2015 nuclei: imageNN.png with uint16 instance masks imageNN_label.png; the magnification of each
    # tile (20x or 40x) is listed in README_training.txt and read by magnification_mpp.
    "miccai2015": PairingRule(images="*.png", labels="{stem}_label.png", kind="instance", mpp=None,
                              exclude=("*_label.png", "*_poly.png", "*_mask*.png"), name="miccai2015"),
}

#: Nominal pixel size at an objective magnification: 10 µm / magnification (20x ≈ 0.5, 40x ≈ 0.25 µm/px).
MICRONS_AT_1X = 10.0

_MAG_LINE = re.compile(r"^\s*(\S+\.(?:png|tif|tiff|jpg|jpeg|bmp))\s+(\d+(?:\.\d+)?)\s*[xX]\s*$", re.IGNORECASE)


def magnification_mpp(root: str | Path) -> dict[str, float]:
    """Pixel sizes from a magnification table in a data set's README (``image01.png  20x`` lines).

    Looks at ``README*.txt`` / ``README*.md`` in ``root``; returns ``{file name: µm per pixel}`` using
    `MICRONS_AT_1X` / magnification.  Empty when there is no such table.
    """
    root = Path(root)
    table: dict[str, float] = {}
    for readme in sorted(root.glob("README*")):
        if readme.suffix.lower() not in (".txt", ".md", ""):
            continue
        try:
            text = readme.read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            m = _MAG_LINE.match(line)
            if m:
                table[m.group(1)] = MICRONS_AT_1X / float(m.group(2))
    return table


def pair_files(root: str | Path, rule: PairingRule, *, mpp: float | None = None,
               label_map: Mapping[int, int] | None = None) -> list[FileSource]:
    """Find the image/label pairs under ``root`` that ``rule`` describes.

    Parameters
    ----------
    root : path
        Data folder.
    rule : PairingRule
        Where images and labels are.
    mpp : float, optional
        Overrides the rule's pixel size for every image.
    label_map : mapping, optional
        Raw label value -> class.

    Returns
    -------
    list of FileSource
        Sorted by image path; images without a label file are skipped with a warning.

    Raises
    ------
    TrainingError
        No pair found, or a pixel size cannot be determined.
    """
    root = Path(root)
    if not root.is_dir():
        raise TrainingError("data folder not found", subject=root)
    images = sorted(p for p in root.glob(rule.images)
                    if p.is_file() and not any(fnmatch.fnmatch(p.name, pat) for pat in rule.exclude))
    table = magnification_mpp(root) if mpp is None and rule.mpp is None else {}
    sources, missing = [], []
    for img in images:
        lab = rule.label_path(root, img)
        if not lab.is_file():
            missing.append(img.name)
            continue
        if mpp is not None:
            m = mpp
        elif isinstance(rule.mpp, Mapping):
            m = rule.mpp.get(img.name)
        elif rule.mpp is not None:
            m = rule.mpp
        else:
            m = table.get(img.name)
        if m is None:
            raise TrainingError(f"the pixel size of {img.name} is not known", subject=root,
                                hint="pass --data-mpp (µm per pixel) or add a magnification table to the README")
        sources.append(FileSource(img, lab, kind=rule.kind, mpp=m, key=str(img.relative_to(root)), label_map=label_map))
    if missing:
        log.warning("%s: %d image(s) have no label file (%s...): skipped", root, len(missing), ", ".join(missing[:3]))
    if not sources:
        raise TrainingError(f"no image/label pairs found with images {rule.images!r} and labels {rule.labels!r}",
                            subject=root, hint='describe the layout with --pair "IMAGE_GLOB:LABEL_TEMPLATE"')
    return sources


def detect_layout(root: str | Path) -> PairingRule:
    """The preset whose layout ``root`` has (GlaS's ``images/`` + ``labels_binary/``, MICCAI's ``*_label.png``).

    Raises `TrainingError` naming the presets when none fits.
    """
    root = Path(root)
    if (root / "images").is_dir() and (root / "labels_binary").is_dir():
        return PRESETS["glas"]
    if any(root.glob("*_label.png")):
        return PRESETS["miccai2015"]
    raise TrainingError("the folder layout is not one of the known ones", subject=root,
                        hint=f'known: {", ".join(PRESETS)}; otherwise pass --pair "IMAGE_GLOB:LABEL_TEMPLATE" '
                             'and --label-kind')


# ---------------------------------------------------------------------------------------------- split
def split_by_image(sources: Sequence[LabelledSource], val_fraction: float, seed: int, *,
                   slide_blocks: tuple[int, int] = (2, 2)) -> tuple[list[LabelledSource], list[LabelledSource]]:
    """Hold out whole images for validation, reproducibly.

    Parameters
    ----------
    sources : sequence
        Labelled sources.  `SlideSource`s are first cut into ``slide_blocks`` contiguous blocks, each block then
        counting as one image (one slide cannot otherwise be split without sharing pixels).
    val_fraction : float
        Fraction of images held out, in [0, 1).  At least one image is held out when it is > 0, and at least one
        is kept for training.
    seed : int
        The split depends only on the sorted source keys and this seed.

    Returns
    -------
    (train, val) : two lists of sources
    """
    if not 0 <= val_fraction < 1:
        raise TrainingError(f"validation fraction {val_fraction} is not in [0, 1)", subject="--val-fraction")
    items: list[LabelledSource] = []
    for s in sources:
        items.extend(s.blocks(*slide_blocks) if isinstance(s, SlideSource) and val_fraction > 0 else [s])
    if val_fraction == 0:
        return list(items), []
    if len(items) < 2:
        raise TrainingError("one image cannot be split into training and validation by image",
                            subject=items[0].key if items else "data",
                            hint="add images, or pass --val-fraction 0 to train without validation")
    keys = sorted({s.key for s in items})
    if len(keys) != len(items):
        raise TrainingError("two sources share a key; the split by image needs unique keys", subject="data")
    order = np.random.default_rng(seed).permutation(len(keys))
    n_val = min(len(keys) - 1, max(1, int(round(val_fraction * len(keys)))))
    val_keys = {keys[i] for i in order[:n_val]}
    train = [s for s in items if s.key not in val_keys]
    val = [s for s in items if s.key in val_keys]
    return train, val


# ---------------------------------------------------------------------------------------------- sampling
@dataclass
class CropSampler:
    """Random square crops from labelled sources, at the model's pixel size, reproducible from a seed.

    A source is chosen with probability proportional to its area, then a crop position uniformly: inside the
    image when it is larger than the crop, otherwise anywhere that keeps the image inside the crop (the rest is
    white glass and ignored labels).  Crops with fewer than ``min_labelled`` known labels are redrawn (up to 20
    times), which matters for sparse corrections.

    Parameters
    ----------
    sources : sequence of LabelledSource
    mpp : float
        Pixel size of the crops in µm (the model's).
    crop : int
        Crop side in pixels.
    seed : int
        Seed of the crop positions (and of augmentation, which draws from `rng`).
    augment : callable, optional
        ``augment(sample, rng) -> sample`` (see `napari_hrseg.training.augment.Augment`).
    min_labelled : float
        Minimum fraction of labelled pixels in a crop.
    focus : float
        Share of crops placed to contain a random *focus* pixel of a source that has them (`ArraySource`'s
        ``focus``, e.g. a user's corrections), so that a small corrected area is seen often; the other crops
        are drawn as above.
    scales : sequence of float
        Relative scales the crops are drawn at, one chosen uniformly per crop: scale ``s`` reads the crop at
        ``mpp / s`` µm/px (0.25: four times coarser, so a ``crop``-px crop covers 16 times the area), always
        ``crop`` pixels wide.  ``(1.0,)`` (default) draws every crop at ``mpp``.  Multi-scale models whose one
        network sees every scale (MagNet's segmenter) train on all of them.  Focus crops are drawn at ``mpp``.
    """

    sources: Sequence[LabelledSource]
    mpp: float
    crop: int
    seed: int = 0
    augment: Callable[[Sample, np.random.Generator], Sample] | None = None
    min_labelled: float = 0.01
    focus: float = 0.0
    scales: Sequence[float] = (1.0,)
    rng: np.random.Generator = field(init=False)

    def __post_init__(self):
        if not self.sources:
            raise TrainingError("no training images", subject="data", hint="check --data and the split")
        if self.crop < 8:
            raise TrainingError(f"crop {self.crop} px is too small", subject="--crop", hint="use 64 px or more")
        self.scales = tuple(float(s) for s in self.scales)
        if not self.scales or any(not s > 0 for s in self.scales):
            raise TrainingError(f"crop scales {self.scales} must be positive", subject="training")
        self.rng = np.random.default_rng(self.seed)
        self._sizes = [s.size_at(self.mpp) for s in self.sources]
        self._sizes_at: dict[float, list[tuple[int, int]]] = {self.mpp: self._sizes}
        area = np.array([h * w for h, w in self._sizes], dtype=float)
        self._p = area / area.sum()
        points = [getattr(s, "focus_points", lambda m: None)(self.mpp) for s in self.sources]
        self._focus = [(i, pts) for i, pts in enumerate(points) if pts is not None and len(pts)]
        counts = np.array([len(pts) for _, pts in self._focus], dtype=float)
        self._focus_p = counts / counts.sum() if len(counts) else counts

    def reconfigure(self, *, crop: int | None = None, scales: Sequence[float] | None = None) -> None:
        """Change the crop side and/or the crop scales from the next crop on (a training phase's own settings);
        the random stream goes on, so a run still repeats exactly from its seed."""
        if crop is not None:
            if crop < 8:
                raise TrainingError(f"crop {crop} px is too small", subject="--crop", hint="use 64 px or more")
            self.crop = int(crop)
        if scales is not None:
            scales = tuple(float(v) for v in scales)
            if not scales or any(not v > 0 for v in scales):
                raise TrainingError(f"crop scales {scales} must be positive", subject="training")
            self.scales = scales

    @property
    def total_pixels(self) -> int:
        """Pixels of all sources at ``mpp`` (one epoch's worth of crops covers this many in expectation)."""
        return int(sum(h * w for h, w in self._sizes))

    def _one(self) -> Sample:
        c = self.crop
        if self._focus and self.focus > 0 and self.rng.random() < self.focus:
            return self._focused(c)
        i = int(self.rng.choice(len(self.sources), p=self._p))
        if len(self.scales) == 1:  # no draw, so single-scale runs repeat exactly what they always drew
            mpp = self.mpp / self.scales[0]
        else:
            mpp = self.mpp / self.scales[int(self.rng.integers(len(self.scales)))]
        if mpp not in self._sizes_at:
            self._sizes_at[mpp] = [s.size_at(mpp) for s in self.sources]
        h, w = self._sizes_at[mpp][i]
        sample = None
        for _ in range(20):
            r = int(self.rng.integers(min(0, h - c), max(0, h - c) + 1))
            col = int(self.rng.integers(min(0, w - c), max(0, w - c) + 1))
            sample = self.sources[i].read(Region(r, col, c, c), mpp)
            if sample.labelled_fraction >= self.min_labelled:
                break
        assert sample is not None
        if self.augment is not None:
            sample = self.augment(sample, self.rng)
        return sample

    def _focused(self, c: int) -> Sample:
        """A crop containing a random focus pixel, at a random position within the crop."""
        j = int(self.rng.choice(len(self._focus), p=self._focus_p))
        i, pts = self._focus[j]
        pr, pc = pts[int(self.rng.integers(len(pts)))]
        h, w = self._sizes[i]
        r = int(np.clip(pr - self.rng.integers(c), min(0, h - c), max(0, h - c)))
        col = int(np.clip(pc - self.rng.integers(c), min(0, w - c), max(0, w - c)))
        sample = self.sources[i].read(Region(r, col, c, c), self.mpp)
        return self.augment(sample, self.rng) if self.augment is not None else sample

    def batch(self, size: int) -> list[Sample]:
        """``size`` augmented crops."""
        return [self._one() for _ in range(size)]

    def __iter__(self) -> Iterator[Sample]:
        while True:
            yield self._one()


def tile_samples(sources: Iterable[LabelledSource], mpp: float, tile: int = 1024, *, max_tiles: int | None = None,
                 seed: int = 0) -> list[Sample]:
    """Cover each source with non-overlapping tiles of at most ``tile`` px (validation; no augmentation).

    An image no larger than ``tile`` is one sample of its own size, so per-image metrics (AJI, PQ) are computed
    on whole images like ``eval_instances.py`` does.  ``max_tiles`` bounds memory on slides: when there are more
    tiles, a subset drawn with ``seed`` is read (the same one every time).
    """
    tiles = []
    for s in sources:
        h, w = s.size_at(mpp)
        tiles.extend((s, reg) for reg in Region(0, 0, h, w).grid(tile))
    if max_tiles is not None and len(tiles) > max_tiles:
        keep = np.sort(np.random.default_rng(seed).choice(len(tiles), size=max_tiles, replace=False))
        tiles = [tiles[i] for i in keep]
    return [s.read(reg, mpp) for s, reg in tiles]


def dataset_fingerprint(sources: Iterable[LabelledSource]) -> str:
    """Hash of every source's key and content, independent of order (the data part of a model's lineage)."""
    h = hashlib.sha256()
    for key, fp in sorted((s.key, s.fingerprint()) for s in sources):
        h.update(f"{key}\0{fp}\n".encode())
    return h.hexdigest()[:16]



# ---------------------------------------------------------------------------------------------- zarr labels
def _squeeze_2d(arr, subject: str):
    import dask.array as da

    lazy = da.from_array(arr, chunks=arr.chunks) if not hasattr(arr, "compute") else arr
    while lazy.ndim > 2:
        if lazy.shape[0] != 1:
            raise TrainingError(f"label array of shape {tuple(arr.shape)} has more than one plane", subject=subject,
                                hint="labels are one (y, x) plane per level")
        lazy = lazy[0]
    return lazy


def open_label_pyramid(path: str | Path, name: str | None = None) -> tuple:
    """Label levels (finest first, lazy ``(y, x)`` arrays) from a zarr store.

    Understands an OME-Zarr (NGFF 0.4 / 0.5) image with a ``labels/`` group (``name`` picks the label image,
    default the first listed), an NGFF label image itself (``multiscales``), a coarse-label store of
    `napari_hrseg.training.autolabel` (array ``labels``), and a bare 2-D zarr array.
    """
    import zarr

    path = Path(path)
    try:
        node = zarr.open(str(path), mode="r")
    except Exception as exc:  # FileNotFoundError, zarr's own errors on non-stores
        raise TrainingError(f"cannot open as zarr ({type(exc).__name__}: {exc})", subject=path) from exc
    if isinstance(node, zarr.Array):
        return (_squeeze_2d(node, str(path)),)
    attrs = dict(node.attrs)
    meta = dict(attrs.get("ome", attrs))
    if "multiscales" in meta:
        datasets = meta["multiscales"][0]["datasets"]
        return tuple(_squeeze_2d(node[d["path"]], str(path)) for d in datasets)
    if "labels" in meta and isinstance(meta["labels"], list) and meta["labels"]:
        names = list(meta["labels"])
        chosen = name or names[0]
        if chosen not in names:
            raise TrainingError(f"no label image {chosen!r}", subject=path, hint=f"available: {', '.join(names)}")
        return open_label_pyramid(path / chosen)
    try:
        child = node["labels"]
    except KeyError:
        child = None
    if isinstance(child, zarr.Array):
        return (_squeeze_2d(child, str(path)),)
    if child is not None:
        return open_label_pyramid(path / "labels", name)
    raise TrainingError("holds no label pyramid", subject=path,
                        hint="expected an OME-Zarr labels group, a label image with multiscales, or a 2-D array")


def label_store_source(path: str | Path, slide: Slide, *, key: str | None = None) -> SlideSource:
    """A slide and its `napari_hrseg.labels.LabelStore` (opened read-only) as a training source.

    The store's labels are taken as complete annotations of the slide (every pixel's class, 0 = background); for
    sparse user corrections, fine-tune with `napari_hrseg.training.finetune.corrections_from_store` instead.
    Semantic stores only.
    """
    from ..labels import LabelStore

    store = LabelStore.open(path, slide, read_only=True)
    if store.kind != "semantic":
        store.close()
        raise TrainingError("training reads semantic label stores; this one holds instance ids", subject=path)
    return SlideSource(slide, store.pyramid(), key=key or f"{slide.name}:{store.name}")


def is_label_store(path: str | Path) -> bool:
    """Whether ``path`` looks like a `LabelStore` directory (rather than a plain zarr label pyramid)."""
    from ..labels import LabelStore
    from ..errors import LabelStoreError

    try:
        LabelStore.open(path, read_only=True).close()
    except (LabelStoreError, OSError):
        return False
    return True
