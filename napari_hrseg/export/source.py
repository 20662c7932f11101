"""`LabelSource`: what every exporter takes, labels at one pyramid level plus what they mean.

A label store, a napari Labels layer or a plain array all become a `LabelSource`; the exporters (OME-Zarr,
OME-TIFF, GeoJSON, CSV measurements) never care which.  The labels stay lazy: a zarr or dask array is read
chunk by chunk by the exporters, so a 100,000 x 100,000 slide's labels are never loaded whole.

Conventions
-----------
- ``labels`` is ``(H, W)`` of integers at one pyramid level; ``downsample = (dy, dx)`` is that level's exact
  per-axis ratio to level 0 (``slide_shape / labels.shape``), as in `napari_hrseg.geometry`.
- ``kind == "semantic"``: a pixel's value *is* its class index (0 background).
- ``kind == "instance"``: a pixel's value is an object id (0 background); ``instance_classes[id]`` is the
  object's class index (objects missing from the mapping are class 1, the usual single "object" class).
- Colours are ``#rrggbb`` strings, one per class, index 0 the background.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Literal, Mapping, Sequence

import dask.array as da
import numpy as np

from ..errors import ExportError

__all__ = ["LabelSource", "DEFAULT_CLASS_COLORS", "default_class_names", "hex_to_rgb"]

#: Okabe-Ito based palette (the same defaults as `napari_hrseg.models.config.DEFAULT_COLORS`, repeated here so
#: that exporting labels does not import torch); index 0 is the background.
DEFAULT_CLASS_COLORS = (
    "#000000",
    "#e69f00",
    "#56b4e9",
    "#009e73",
    "#f0e442",
    "#0072b2",
    "#d55e00",
    "#cc79a7",
    "#999999",
)

_HEX = re.compile(r"^#[0-9a-fA-F]{6}$")

LabelKind = Literal["semantic", "instance"]


def hex_to_rgb(color: str) -> tuple[int, int, int]:
    """``"#rrggbb"`` -> ``(r, g, b)`` with 0..255 integers."""
    return int(color[1:3], 16), int(color[3:5], 16), int(color[5:7], 16)


def default_class_names(n_classes: int, kind: str = "semantic") -> tuple[str, ...]:
    """``("background", "class 1", ...)``; an instance source with one class gets ``("background", "object")``."""
    if kind == "instance" and n_classes <= 2:
        return ("background", "object")
    return ("background",) + tuple(f"class {i}" for i in range(1, max(n_classes, 2)))


def _default_colors(n: int) -> tuple[str, ...]:
    colors = list(DEFAULT_CLASS_COLORS[:n])
    # Past the palette, spread hues evenly (golden angle) so many-class models still get distinct colours.
    for i in range(len(colors), n):
        h = (i * 137.508) % 360 / 60
        x = 1 - abs(h % 2 - 1)
        r, g, b = [(1, x, 0), (x, 1, 0), (0, 1, x), (0, x, 1), (x, 0, 1), (1, 0, x)][int(h) % 6]
        colors.append("#{:02x}{:02x}{:02x}".format(*(int(55 + 200 * v) for v in (r, g, b))))
    return tuple(colors)


@dataclass(frozen=True, eq=False)
class LabelSource:
    """Labels at one pyramid level, with their classes, scale and provenance.

    Parameters
    ----------
    labels : array-like, shape (H, W)
        Integer labels at one pyramid level: a numpy, dask or zarr array (anything with ``shape``, ``dtype``
        and numpy slicing).  Never loaded whole by the exporters.
    downsample : (float, float)
        ``(dy, dx)`` of this level relative to level 0 (exact ratios, >= 1).
    class_names : tuple of str
        One name per class; index 0 is the background.
    class_colors : tuple of str
        One ``#rrggbb`` colour per class (same length as ``class_names``).
    mpp_yx : (float, float) or None
        Level-0 pixel size in µm, ``(y, x)``; ``None`` when unknown (exports then state pixel units).
    kind : {"semantic", "instance"}
        Whether values are class indices or object ids.
    instance_classes : Mapping[int, int]
        Instance kind only: object id -> class index.
    model_version : str or None
        Version of the model that predicted the labels (``None`` for purely manual labels).
    slide_fingerprint : str or None
        `Slide.fingerprint` of the slide the labels belong to; exports record it and measurements check it.
    slide_shape : (int, int)
        Level-0 ``(Y, X)`` of the slide; defaults to ``round(labels.shape * downsample)``.
    name : str
        Short name used for layers and label groups (e.g. ``"tissue"``, ``"nuclei"``).
    """

    labels: Any
    downsample: tuple[float, float] = (1.0, 1.0)
    class_names: tuple[str, ...] = ()
    class_colors: tuple[str, ...] = ()
    mpp_yx: tuple[float, float] | None = None
    kind: LabelKind = "semantic"
    instance_classes: Mapping[int, int] = field(default_factory=dict)
    model_version: str | None = None
    slide_fingerprint: str | None = None
    slide_shape: tuple[int, int] | None = None
    name: str = "labels"

    def __post_init__(self):
        labels = self.labels
        subject = f"labels {self.name!r}"
        if not hasattr(labels, "shape") or not hasattr(labels, "dtype"):
            labels = np.asarray(labels)
            object.__setattr__(self, "labels", labels)
        if len(labels.shape) != 2:
            raise ExportError(
                f"labels have shape {tuple(labels.shape)}; expected (H, W)",
                subject=subject,
                hint="pass one 2-D label image (squeeze singleton axes first)",
            )
        if not np.issubdtype(np.dtype(labels.dtype), np.integer):
            raise ExportError(
                f"labels have dtype {labels.dtype}; label values must be integers",
                subject=subject,
                hint="convert probabilities to labels first (argmax), or cast a boolean mask to uint8",
            )
        if labels.shape[0] == 0 or labels.shape[1] == 0:
            raise ExportError("labels are empty (a zero-sized array)", subject=subject)
        if self.kind not in ("semantic", "instance"):
            raise ExportError(f"kind {self.kind!r} is neither 'semantic' nor 'instance'", subject=subject)

        dy, dx = (float(self.downsample[0]), float(self.downsample[1]))
        if not (math.isfinite(dy) and math.isfinite(dx) and dy > 0 and dx > 0):
            raise ExportError(f"downsample {self.downsample!r} must be two positive numbers", subject=subject)
        object.__setattr__(self, "downsample", (dy, dx))

        if self.slide_shape is None:
            shape0 = (int(round(labels.shape[0] * dy)), int(round(labels.shape[1] * dx)))
        else:
            shape0 = (int(self.slide_shape[0]), int(self.slide_shape[1]))
            # A level's size is the level-0 size divided by the downsample, rounded either way by the scanner.
            for axis, (n0, n, d) in enumerate(zip(shape0, labels.shape, (dy, dx))):
                if abs(n0 / d - n) > 1.0 + 1e-6:
                    raise ExportError(
                        f"labels of shape {tuple(labels.shape)} at downsample {self.downsample} do not cover a "
                        f"slide of shape {shape0} (axis {axis})",
                        subject=subject,
                        hint="give the downsample of the level the labels were made at",
                    )
        object.__setattr__(self, "slide_shape", shape0)

        if self.mpp_yx is not None:
            mpp = (float(self.mpp_yx[0]), float(self.mpp_yx[1]))
            if not all(math.isfinite(v) and v > 0 for v in mpp):
                raise ExportError(f"pixel size {self.mpp_yx!r} must be two positive numbers of µm", subject=subject)
            object.__setattr__(self, "mpp_yx", mpp)

        names = tuple(str(n) for n in self.class_names) or default_class_names(2, self.kind)
        colors = tuple(self.class_colors) or _default_colors(len(names))
        if len(colors) != len(names):
            raise ExportError(
                f"{len(names)} class names but {len(colors)} class colours",
                subject=subject,
                hint="give one #rrggbb colour per class, background included",
            )
        for c in colors:
            if not isinstance(c, str) or not _HEX.match(c):
                raise ExportError(f"colour {c!r} is not of the form #rrggbb", subject=subject)
        if len(set(n.casefold() for n in names)) != len(names):
            raise ExportError(f"class names {names} are not unique", subject=subject)
        object.__setattr__(self, "class_names", names)
        object.__setattr__(self, "class_colors", tuple(c.lower() for c in colors))
        object.__setattr__(
            self, "instance_classes", MappingProxyType({int(k): int(v) for k, v in dict(self.instance_classes).items()})
        )
        for obj, cls in self.instance_classes.items():
            if not 0 < cls < len(names):
                raise ExportError(
                    f"object {obj} has class index {cls}, outside 1..{len(names) - 1}",
                    subject=subject,
                    hint=f"classes are {', '.join(names)}",
                )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_array(
        cls,
        labels: Any,
        *,
        downsample: float | Sequence[float] = 1.0,
        class_names: Sequence[str] | None = None,
        class_colors: Sequence[str] | None = None,
        mpp: float | Sequence[float] | None = None,
        kind: LabelKind | None = None,
        instance_classes: Mapping[int, int] | None = None,
        model_version: str | None = None,
        slide_fingerprint: str | None = None,
        slide_shape: Sequence[int] | None = None,
        name: str = "labels",
    ) -> "LabelSource":
        """Wrap a plain label image, filling in sensible defaults.

        Parameters
        ----------
        labels : array-like, shape (H, W)
            Integer labels (numpy, dask or zarr; a boolean mask becomes 0/1).
        downsample : float or (float, float)
            Level downsample relative to level 0.
        class_names, class_colors : sequence of str, optional
            Default: ``background, class 1, ...`` up to the largest value (semantic) or ``background, object``
            (instance), with the project's palette.
        mpp : float or (float, float), optional
            Level-0 pixel size in µm (one value for square pixels, or ``(y, x)``).
        kind : {"semantic", "instance"}, optional
            Default: ``"instance"`` when ``instance_classes`` is given, else ``"semantic"``.
        instance_classes, model_version, slide_fingerprint, slide_shape, name
            As the fields of the same names.

        Returns
        -------
        LabelSource
        """
        if not hasattr(labels, "shape") or not hasattr(labels, "dtype"):
            labels = np.asarray(labels)
        if np.dtype(labels.dtype) == np.bool_:
            labels = (
                labels.astype(np.uint8) if isinstance(labels, (np.ndarray, da.Array)) else np.asarray(labels, np.uint8)
            )
        kind = kind or ("instance" if instance_classes else "semantic")
        ds = (float(downsample), float(downsample)) if np.isscalar(downsample) else tuple(float(v) for v in downsample)
        mpp_yx = (
            None if mpp is None else ((float(mpp), float(mpp)) if np.isscalar(mpp) else tuple(float(v) for v in mpp))
        )
        if class_names is None:
            if kind == "instance":
                n = max([2] + [int(c) + 1 for c in (instance_classes or {}).values()])
            else:
                # Finding the largest value reads the array once; only a small (in-memory) array is cheap to scan.
                n = int(_max_value(labels)) + 1
            class_names = default_class_names(n, kind)
        return cls(
            labels=labels,
            downsample=ds,  # type: ignore[arg-type]
            class_names=tuple(class_names),
            class_colors=tuple(class_colors or ()),
            mpp_yx=mpp_yx,  # type: ignore[arg-type]
            kind=kind,
            instance_classes=dict(instance_classes or {}),
            model_version=model_version,
            slide_fingerprint=slide_fingerprint,
            slide_shape=None if slide_shape is None else (int(slide_shape[0]), int(slide_shape[1])),
            name=name,
        )

    def with_labels(self, labels: Any, downsample: tuple[float, float]) -> "LabelSource":
        """The same classes and provenance for the same slide, at another level (e.g. a coarser pyramid level)."""
        return replace(self, labels=labels, downsample=downsample)

    # ------------------------------------------------------------------ derived facts
    @property
    def shape(self) -> tuple[int, int]:
        """``(H, W)`` of the labels at their level."""
        return (int(self.labels.shape[0]), int(self.labels.shape[1]))

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.labels.dtype)

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def level_mpp_yx(self) -> tuple[float, float] | None:
        """Pixel size of the labels' own level in µm, ``(y, x)``, or ``None``."""
        if self.mpp_yx is None:
            return None
        return (self.mpp_yx[0] * self.downsample[0], self.mpp_yx[1] * self.downsample[1])

    @property
    def chunks(self) -> tuple[int, int]:
        """The storage chunk shape ``(rows, cols)`` to read by: the zarr/dask chunking, or 1024 x 1024."""
        arr = self.labels
        if isinstance(arr, da.Array):
            return (int(arr.chunksize[0]), int(arr.chunksize[1]))
        chunks = getattr(arr, "chunks", None)
        if isinstance(chunks, tuple) and len(chunks) == 2 and all(isinstance(c, (int, np.integer)) for c in chunks):
            return (int(chunks[0]), int(chunks[1]))
        return (min(1024, self.shape[0]), min(1024, self.shape[1]))

    def as_dask(self) -> da.Array:
        """The labels as a dask array whose chunks are the storage chunks (so each task reads whole chunks)."""
        if isinstance(self.labels, da.Array):
            return self.labels
        return da.from_array(self.labels, chunks=self.chunks, asarray=True, lock=False)

    def class_of(self, value: int) -> int:
        """Class index of a label value (the value itself for semantic labels)."""
        if self.kind == "semantic":
            return int(value)
        return int(self.instance_classes.get(int(value), 1))

    def class_rgb(self, class_index: int) -> tuple[int, int, int]:
        """``(r, g, b)`` of a class (grey for a value outside the class table)."""
        if 0 <= class_index < len(self.class_colors):
            return hex_to_rgb(self.class_colors[class_index])
        return (128, 128, 128)

    def class_name(self, class_index: int) -> str:
        """Name of a class index (``"class N"`` for a value outside the class table, which exports still keep)."""
        if 0 <= class_index < len(self.class_names):
            return self.class_names[class_index]
        return f"class {class_index}"

    def provenance(self) -> dict[str, Any]:
        """JSON-ready facts every export records: model version, slide fingerprint and shape, level, classes."""
        return {
            "name": self.name,
            "kind": self.kind,
            "model_version": self.model_version,
            "slide_fingerprint": self.slide_fingerprint,
            "slide_shape": list(self.slide_shape or ()),
            "downsample": list(self.downsample),
            "mpp_yx": None if self.mpp_yx is None else list(self.mpp_yx),
            "class_names": list(self.class_names),
            "class_colors": list(self.class_colors),
        }


def _max_value(labels: Any) -> int:
    if isinstance(labels, da.Array):
        return int(labels.max().compute()) if labels.size else 0
    if isinstance(labels, np.ndarray):
        return int(labels.max()) if labels.size else 0
    return int(da.from_array(labels, chunks=getattr(labels, "chunks", "auto")).max().compute())
