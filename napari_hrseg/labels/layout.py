"""A label store's description on disk: file names, format version, and choosing its level and classes.

The description lives in the store's ``zarr.json`` as ``attributes["napari_hrseg"]`` (see
`napari_hrseg.labels.store` for the whole layout).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..errors import LabelStoreError

if TYPE_CHECKING:
    from ..slide import Slide

__all__ = ["STORE_FORMAT", "STORE_VERSION", "DTYPES", "JOURNAL", "CHECKPOINT", "CURSORS", "LOCK", "ARRAY",
           "pick_level", "pick_classes", "read_info", "read_json"]

STORE_FORMAT = "napari-hrseg-labels"
STORE_VERSION = 1
#: Label dtype of each kind: class indices, or object ids.
DTYPES = {"semantic": np.dtype(np.uint8), "instance": np.dtype(np.uint32)}
JOURNAL, CHECKPOINT, CURSORS, LOCK, ARRAY = "journal.hrj", "checkpoint.json", "cursors.json", ".lock", "labels"
# Okabe-Ito, index 0 the background (the same palette as ModelConfig and LabelSource, kept here so that the
# headless store does not import torch through napari_hrseg.models).
_PALETTE = ("#000000", "#e69f00", "#56b4e9", "#009e73", "#f0e442", "#0072b2", "#d55e00", "#cc79a7", "#999999")


def pick_level(slide: "Slide", level: int | None, mpp: float | None, model: Any) -> int:
    if level is not None:
        if not 0 <= level < slide.level_count:
            raise LabelStoreError(f"level {level} does not exist; the slide has levels 0..{slide.level_count - 1}",
                                  subject=slide.name)
        return level
    target = mpp if mpp is not None else getattr(model, "mpp", None)
    if target is None or slide.mpp is None:
        if mpp is not None:
            raise LabelStoreError("the slide's pixel size is unknown, so no level can be chosen by mpp",
                                  subject=slide.name, hint="pass level=, or open the slide with --mpp")
        return 0
    return slide.level_for_mpp(float(target))


def pick_classes(model: Any, names: Sequence[str] | None, colors: Sequence[str] | None, kind: str,
                  subject: Path) -> tuple[list[str], list[str]]:
    if names is None:
        names = getattr(model, "class_names", None) or (("background", "object") if kind == "instance"
                                                        else ("background", "class 1"))
    if colors is None:
        model_colors = getattr(model, "class_colors", None)
        colors = model_colors if model_colors and len(model_colors) == len(names) else \
            [_PALETTE[i % len(_PALETTE)] for i in range(len(names))]
    names, colors = [str(n) for n in names], [str(c).lower() for c in colors]
    if len(names) < 2:
        raise LabelStoreError("a label store needs at least two classes (background first)", subject=subject)
    if kind == "semantic" and len(names) > 255:
        raise LabelStoreError(f"{len(names)} classes do not fit in uint8 labels", subject=subject)
    if len(colors) != len(names):
        raise LabelStoreError(f"{len(names)} class names but {len(colors)} colours", subject=subject,
                              hint="give one #rrggbb colour per class, background first")
    for c in colors:
        if len(c) != 7 or c[0] != "#" or any(ch not in "0123456789abcdef" for ch in c[1:]):
            raise LabelStoreError(f"colour {c!r} is not of the form #rrggbb", subject=subject)
    if len({n.casefold() for n in names}) != len(names):
        raise LabelStoreError(f"class names {names} are not unique", subject=subject)
    return names, colors


def read_info(path: Path) -> dict[str, Any]:
    meta = path / "zarr.json"
    if not meta.is_file():
        what = "no such directory" if not path.exists() else "not a label store (no zarr.json)"
        raise LabelStoreError(what, subject=path, hint="create one with LabelStore.create(path, slide)")
    try:
        info = json.loads(meta.read_text())["attributes"]["napari_hrseg"]
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise LabelStoreError("a zarr group but not a napari-hrseg label store", subject=path) from exc
    if info.get("format") != STORE_FORMAT:
        raise LabelStoreError(f"unknown store format {info.get('format')!r}", subject=path)
    if int(info.get("version", 0)) > STORE_VERSION:
        raise LabelStoreError(f"store format version {info['version']} is newer than this napari-hrseg reads",
                              subject=path, hint="upgrade napari-hrseg")
    return info


def read_json(path: Path, default: Any) -> Any:
    """A small JSON file of the store, or ``default`` if it does not exist."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default
    except json.JSONDecodeError as exc:
        raise LabelStoreError(f"{path.name} is not valid JSON", subject=path.parent) from exc
