"""`ModelConfig`: everything needed to rebuild a model and apply it to a slide, saved as ``config.json``.

The config is the contract between a trained model and the rest of the tool: which architecture and
hyper-parameters (to rebuild the module before loading ``model.safetensors``), which classes with which
colours (for labels layers and exports), the pixel size the model was trained at (to pick pyramid levels),
the input normalisation, the scales used by multi-scale methods, and the model's lineage.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..errors import ModelError

__all__ = ["ModelConfig", "IGNORE_INDEX", "DEFAULT_COLORS", "CONFIG_FILE", "WEIGHTS_FILE"]

#: Label value that losses and metrics ignore (uncertain coarse auto-labels, unlabelled pixels).
IGNORE_INDEX = 255

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

# Distinct, colour-blind-friendlier defaults (Okabe-Ito), index 0 is background (transparent in napari).
DEFAULT_COLORS = ("#000000", "#e69f00", "#56b4e9", "#009e73", "#f0e442", "#0072b2", "#d55e00", "#cc79a7", "#999999")

# ImageNet statistics mean little for H&E models trained from scratch; these are the per-channel mean/std
# (0..1 RGB) of the real H&E tiles in shared/realdata (MICCAI 2015 nuclei + GlaS images, every 7th pixel),
# so inputs are roughly zero-mean, unit-variance.
HE_MEAN = (0.766, 0.536, 0.730)
HE_STD = (0.178, 0.237, 0.165)


@dataclass
class ModelConfig:
    """Configuration of one model version.

    Parameters
    ----------
    arch : str
        Registered architecture name (see `napari_hrseg.models.list_models`).
    num_classes : int
        Number of output classes, background included (instance models: 2, background and object).
    class_names : tuple of str
        One name per class; index 0 is the background.
    class_colors : tuple of str
        One ``#rrggbb`` colour per class.
    task : {"semantic", "instance"}
        What the model predicts.
    in_channels : int
        Input channels (3 for RGB).
    mpp : float
        Pixel size, in µm, of the input the model was trained at (its finest scale).
    mean, std : tuple of float
        Per-channel normalisation of inputs scaled to 0..1.
    scales : tuple of float
        Relative scales used by multi-scale methods, 1.0 being ``mpp``; e.g. MagNet stages ``(0.25, 0.5, 1.0)``
        read pyramid levels at ``mpp / 0.25``, ``mpp / 0.5`` and ``mpp``.
    params : dict
        Architecture hyper-parameters (widths, depths, ...), passed to the architecture's constructor.
    name : str
        Short human name ("nuclei", "glands", "tissue", or a user's).
    version : str
        Version label; fine-tuning makes a new one.
    lineage : dict
        Parent version, data fingerprint, seed, metrics, creation time, command line.
    """

    arch: str
    num_classes: int = 2
    class_names: tuple[str, ...] = ()
    class_colors: tuple[str, ...] = ()
    task: str = "semantic"
    in_channels: int = 3
    mpp: float = 0.5
    mean: tuple[float, ...] = HE_MEAN
    std: tuple[float, ...] = HE_STD
    scales: tuple[float, ...] = (1.0,)
    params: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    version: str = "1"
    lineage: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        # JSON gives lists; keep tuples so configs compare and hash predictably.
        for f in ("class_names", "class_colors", "mean", "std", "scales"):
            object.__setattr__(self, f, tuple(getattr(self, f)))
        if self.num_classes < 1:
            raise ModelError(f"num_classes={self.num_classes} must be >= 1", subject=self.arch)
        if not self.class_names:
            self.class_names = ("background",) + tuple(f"class {i}" for i in range(1, self.num_classes))
        if not self.class_colors:
            self.class_colors = tuple(DEFAULT_COLORS[i % len(DEFAULT_COLORS)] for i in range(self.num_classes))
        if len(self.class_names) != self.num_classes or len(self.class_colors) != self.num_classes:
            raise ModelError(
                f"{len(self.class_names)} class names and {len(self.class_colors)} colours for {self.num_classes} classes",
                subject=self.arch,
                hint="give one name and one colour per class, background first",
            )
        if self.task not in ("semantic", "instance"):
            raise ModelError(f"task {self.task!r} is not 'semantic' or 'instance'", subject=self.arch)
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise ModelError(f"mean/std need {self.in_channels} values", subject=self.arch)
        if not self.mpp > 0:
            raise ModelError(f"mpp={self.mpp} must be a positive pixel size in µm", subject=self.arch)
        if self.num_classes >= IGNORE_INDEX:
            raise ModelError(f"at most {IGNORE_INDEX - 1} classes are supported", subject=self.arch)
        # Keep params and lineage as JSON gives them back (tuples become lists, numpy scalars numbers), so a
        # config equals itself after a save/load round trip, and a value JSON cannot hold fails here, not at save.
        for f in ("params", "lineage"):
            try:
                object.__setattr__(self, f, json.loads(json.dumps(dict(getattr(self, f)), default=_json_default)))
            except (TypeError, ValueError) as exc:
                raise ModelError(f"config {f} cannot be saved as JSON ({exc})", subject=self.arch) from exc

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelError(f"config.json has unknown keys {unknown}", hint="was it written by a newer napari-hrseg?")
        if "arch" not in data:
            raise ModelError("config.json has no 'arch'", hint="every model config names its architecture")
        return cls(**data)

    def save(self, directory: str | Path) -> Path:
        """Write ``config.json`` into ``directory``; returns its path."""
        path = Path(directory) / CONFIG_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True, default=_json_default) + "\n")
        return path

    @classmethod
    def load(cls, directory_or_file: str | Path) -> "ModelConfig":
        p = Path(directory_or_file)
        path = p / CONFIG_FILE if p.is_dir() else p
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise ModelError("no config.json found", subject=p, hint="a model directory holds config.json and model.safetensors") from exc
        except json.JSONDecodeError as exc:
            raise ModelError(f"config.json is not valid JSON ({exc.msg} at line {exc.lineno})", subject=path) from exc
        return cls.from_dict(data)

    def evolve(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed (e.g. a new version after fine-tuning)."""
        return replace(self, **changes)

    @property
    def label(self) -> str:
        """``name@version`` (or the architecture when unnamed), for menus and logs."""
        return f"{self.name or self.arch}@{self.version}"


def _json_default(obj: Any) -> Any:
    # numpy scalars and tuples inside params/lineage
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")
