"""The models the app can run and how: model versions (shipped, loaded from a folder, made by fine-tuning) and
inference methods (MagNet, MagNet-Fast, multi-scale attention, GLNet, instances, the single-scale baselines).

Headless: no Qt, no napari.  Weights load lazily (`ModelEntry.load`), in a worker.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from ..errors import ModelError

if TYPE_CHECKING:  # pragma: no cover
    from ..models import HrsegModel, ModelConfig

__all__ = ["ModelEntry", "ModelCatalog", "Method", "METHODS", "SHIPPED_NAMES", "resolve_method", "method_by_key"]

log = logging.getLogger(__name__)

#: The models the project ships, the default first (see napari_hrseg.training.shipped); listed even before their
#: weights exist.
SHIPPED_NAMES = ("tissue", "glands", "nuclei", "glands-hmsa", "tissue-hmsa", "tissue-glnet")

SHIPPED_HINT = ("no shipped weights in this installation yet: choose \"Load model directory...\" "
                "(a folder with config.json and model.safetensors, e.g. made by `napari-hrseg train`)")


@dataclass(frozen=True)
class Method:
    """An inference method the Segment panel offers.

    Parameters
    ----------
    key : str
        Stable identifier (``"magnet_fast"``).
    label : str
        What the combo box shows.
    pipelines : tuple of (str, dict)
        Candidate registered pipelines with their ``params``, first registered wins (MagNet-Fast is its own
        pipeline if registered, else ``"magnet"`` with ``fast=True``).
    tooltip : str
    """

    key: str
    label: str
    pipelines: tuple[tuple[str, Mapping[str, Any]], ...]
    tooltip: str = ""


METHODS: tuple[Method, ...] = (
    Method("auto", "automatic (by architecture)", (),
           "MagNet models run MagNet, attention models multi-scale attention, GLNet models GLNet, instance models "
           "the instance pipeline, the rest a full-resolution sliding window"),
    Method("sliding_window", "sliding window (full resolution)", (("sliding_window", {}),),
           "tiles at the model's pixel size with halos, stitched: the single-scale baseline"),
    Method("global", "global pass (downsampled)", (("global", {}),),
           "the whole view read small and segmented in one pass: fast, coarse"),
    Method("magnet", "MagNet (progressive)", (("magnet", {}),),
           "coarse stage first, then finer stages refine the most uncertain points (one uncertainty layer per stage)"),
    Method("magnet_fast", "MagNet-Fast", (("magnet_fast", {}), ("magnet", {"fast": True})),
           "MagNet refining only the most uncertain patches: faster, nearly as accurate"),
    Method("hms_attention", "multi-scale attention", (("hmsa", {}), ("hms_attention", {})),
           "hierarchical multi-scale attention over adjacent pyramid levels (one attention layer per scale)"),
    Method("glnet", "GLNet (global-local)", (("glnet", {}),),
           "global branch with context on a coarse level, local branch on tiles"),
    Method("instances", "instances (RefineMask)", (("instances", {}),),
           "nucleus proposals refined into instance masks, shown as outlines"),
)

#: The method "auto" picks for an architecture.
AUTO_BY_ARCH = {"magnet": "magnet", "hmsa": "hms_attention", "glnet": "glnet", "refinemask": "instances"}


def method_by_key(key: str) -> Method:
    for m in METHODS:
        if m.key == key:
            return m
    raise ModelError(f"unknown method {key!r}", hint="known: " + ", ".join(m.key for m in METHODS))


def resolve_method(key: str, arch: str, registered: list[str] | None = None) -> tuple[str, dict[str, Any]]:
    """The registered pipeline (and params) that runs method ``key`` for a model of architecture ``arch``.

    Raises
    ------
    ModelError
        When no pipeline for the method is installed (names the method and what to pick instead).
    """
    from ..inference import list_pipelines

    registered = list_pipelines() if registered is None else registered
    if key == "auto":
        key = AUTO_BY_ARCH.get(arch, "sliding_window")
        if not any(p in registered for p, _ in method_by_key(key).pipelines):
            key = "sliding_window"
    method = method_by_key(key)
    for pipeline, params in method.pipelines:
        if pipeline in registered:
            return pipeline, dict(params)
    raise ModelError(f"the {method.label} pipeline is not installed in this version", subject=method.label,
                     hint="choose another method (sliding window works with every semantic model)")


def available_methods(registered: list[str] | None = None) -> dict[str, bool]:
    """``{method key: whether a pipeline for it is registered}``."""
    from ..inference import list_pipelines

    registered = list_pipelines() if registered is None else registered
    return {m.key: m.key == "auto" or any(p in registered for p, _ in m.pipelines) for m in METHODS}


@dataclass(eq=False)
class ModelEntry:
    """One model version the app knows.

    Attributes
    ----------
    config : ModelConfig
        Read from ``config.json`` (cheap); the weights load on first `load`.
    path : Path or None
        Its directory, or None for a model that lives only in memory.
    origin : str
        ``"shipped"``, ``"directory"`` or ``"fine-tuned"``.
    """

    config: "ModelConfig"
    path: Path | None
    origin: str
    _model: "HrsegModel | None" = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def label(self) -> str:
        return self.config.label

    @property
    def name(self) -> str:
        return self.config.name or self.config.arch

    @property
    def version(self) -> str:
        return self.config.version

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self) -> "HrsegModel":
        """The model in eval mode on the CPU (loaded once, thread-safe); call from a worker."""
        from ..models import load_model

        with self._lock:
            if self._model is None:
                if self.path is None:
                    raise ModelError("this model version has no weights on disk", subject=self.label)
                self._model = load_model(self.path)
                log.info("loaded model %s from %s", self.label, self.path)
            return self._model

    def describe(self) -> str:
        c = self.config
        classes = ", ".join(c.class_names)
        where = f"\n{self.path}" if self.path else ""
        lineage = c.lineage or {}
        parent = (lineage.get("parent") or {}).get("label") if isinstance(lineage.get("parent"), dict) else None
        extra = f"\nfine-tuned from {parent}" if parent else ""
        return f"{c.label} ({c.arch}, {c.task}, {c.mpp:g} µm/px)\nclasses: {classes}{extra}{where}"


class ModelCatalog:
    """Model versions by label (``name@version``), in the order they became known.

    Shipped models are listed first; `scan_versions` adds the fine-tuned versions kept in the user's data
    directory (see `napari_hrseg._widgets._workspace`).
    """

    def __init__(self):
        self._entries: dict[str, ModelEntry] = {}
        self._lock = threading.Lock()
        self.refresh_shipped()

    # ------------------------------------------------------------------ adding
    def refresh_shipped(self) -> list[ModelEntry]:
        """Add every shipped model (those whose weights exist in the package)."""
        from ..models.weights import shipped_model_dir, shipped_models

        added = []
        for name in shipped_models():
            directory = shipped_model_dir(name)
            if directory is None:
                continue
            try:
                added.append(self.add_directory(directory, origin="shipped"))
            except ModelError as exc:  # a broken shipped model must not break the panel
                log.warning("shipped model %s is unusable: %s", name, exc)
        return added

    def add_directory(self, path: str | Path, *, origin: str = "directory") -> ModelEntry:
        """Add the model version in ``path`` (``config.json`` + ``model.safetensors``); reads only the config.

        Raises
        ------
        ModelError
            Not a model directory (no config.json, no weights, unknown architecture).
        """
        from ..models.config import ModelConfig
        from ..models.registry import list_models
        from ..models.weights import WEIGHTS_FILE

        path = Path(path).expanduser()
        if not path.is_dir():
            raise ModelError("not a folder", subject=path, hint="choose the folder that holds config.json and model.safetensors")
        config = ModelConfig.load(path)
        if not (path / WEIGHTS_FILE).is_file():
            raise ModelError(f"no {WEIGHTS_FILE} beside config.json", subject=path,
                             hint="a model folder holds config.json and model.safetensors from the same save")
        if config.arch not in list_models():
            raise ModelError(f"unknown architecture {config.arch!r}", subject=path,
                             hint="known: " + ", ".join(list_models()))
        entry = ModelEntry(config, path, origin)
        return self._add(entry)

    def add_model(self, model: "HrsegModel", path: str | Path | None = None, *, origin: str = "fine-tuned") -> ModelEntry:
        """Add a model already in memory (e.g. what fine-tuning returned), saved at ``path`` if given."""
        entry = ModelEntry(model.config, None if path is None else Path(path), origin, _model=model.eval())
        return self._add(entry)

    def _add(self, entry: ModelEntry) -> ModelEntry:
        with self._lock:
            existing = self._entries.get(entry.label)
            if existing is not None and existing.path == entry.path and existing.path is not None:
                return existing
            if existing is not None:
                log.info("model %s replaced by %s", entry.label, entry.path)
            self._entries[entry.label] = entry
        return entry

    def scan_versions(self, name: str) -> list[ModelEntry]:
        """Add the fine-tuned versions of ``name`` found in the user's data directory; returns all of its versions."""
        from ._workspace import models_dir

        root = models_dir(name)
        if root.is_dir():
            for d in sorted(root.iterdir()):
                if (d / "config.json").is_file() and not any(e.path == d for e in self.entries()):
                    try:
                        self.add_directory(d, origin="fine-tuned")
                    except ModelError as exc:
                        log.warning("skipping model version %s: %s", d, exc)
        return self.versions(name)

    # ------------------------------------------------------------------ queries
    def entries(self) -> list[ModelEntry]:
        with self._lock:
            return list(self._entries.values())

    def get(self, label: str) -> ModelEntry:
        with self._lock:
            try:
                return self._entries[label]
            except KeyError:
                raise ModelError("no such model version", subject=label,
                                 hint="known: " + (", ".join(self._entries) or "none")) from None

    def __contains__(self, label: str) -> bool:
        return label in self._entries

    def versions(self, name: str) -> list[ModelEntry]:
        """Versions of the model called ``name`` (same classes, same label store), in version order."""
        from ._convert import _natural_key

        same = [e for e in self.entries() if e.name == name]
        return sorted(same, key=lambda e: _natural_key(e.version))

    def names(self) -> list[str]:
        """Distinct model names, shipped ones first."""
        seen: list[str] = []
        for e in sorted(self.entries(), key=lambda e: e.origin != "shipped"):
            if e.name not in seen:
                seen.append(e.name)
        return seen

    def latest(self, name: str) -> ModelEntry | None:
        versions = self.versions(name)
        return versions[-1] if versions else None

    def unique_version(self, name: str, after: str) -> str:
        """The version label after ``after`` that no known version of ``name`` uses yet (nor a folder on disk)."""
        from ..training.lineage import next_version
        from ._workspace import models_dir, slug

        taken = {e.version for e in self.versions(name)}
        version = next_version(after)
        while version in taken or (models_dir(name) / slug(version)).exists():
            version = next_version(version)
        return version
