"""Where the app keeps a slide's label stores and the model versions fine-tuning makes.

Label stores (one per slide and model name, since a store's classes are the model's)
------------------------------------------------------------------------------------
1. ``$HRSEG_LABELS_DIR/<slide name>-<fingerprint>/<model>.hrseg-labels`` when ``HRSEG_LABELS_DIR`` is set
   (a lab's shared folder, or a test's temporary folder);
2. else **beside the slide**: ``<slide file>.hrseg/<model>.hrseg-labels`` (``CMU-1.svs`` ->
   ``CMU-1.svs.hrseg/tissue.hrseg-labels``), so the corrections travel with the slide and are found again by
   whoever opens it, when the slide's folder is writable;
3. else (virtual slides, read-only slide folders, slides on a server) in the **per-user data directory**:
   ``<user data>/stores/<slide name>-<fingerprint>/<model>.hrseg-labels``, where ``<user data>`` is
   ``$HRSEG_DATA_DIR`` or the platform's (``~/.local/share/napari-hrseg`` on Linux,
   ``~/Library/Application Support/napari-hrseg`` on macOS, ``%LOCALAPPDATA%\\napari-hrseg`` on Windows).

Model versions made by "Improve model" go to ``<user data>/models/<name>/<version>/`` (``config.json`` +
``model.safetensors`` with the lineage), so an improved model is available for every slide the user opens.

Headless: no Qt, no napari.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from ..slide import Slide

__all__ = ["user_data_dir", "store_path", "models_dir", "slug"]

log = logging.getLogger(__name__)

APP_NAME = "napari-hrseg"


def user_data_dir() -> Path:
    """``$HRSEG_DATA_DIR`` or the platform's per-user data directory for napari-hrseg."""
    env = os.environ.get("HRSEG_DATA_DIR")
    if env:
        return Path(env).expanduser()
    try:
        import platformdirs

        return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))
    except ImportError:  # platformdirs comes with napari; keep a sane fallback anyway
        return Path.home() / ".local" / "share" / APP_NAME


def slug(text: str) -> str:
    """A file-name-safe form of ``text`` (letters, digits, ``-``, ``_``, ``.``)."""
    out = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    return out or "labels"


def _writable_dir(path: Path) -> bool:
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


def store_path(slide: "Slide", model_name: str) -> Path:
    """The label store of ``slide`` for the model called ``model_name`` (see the module docstring).

    Computing the slide's fingerprint reads a coarse level, so call this in a worker for large slides.
    """
    name = f"{slug(model_name)}.hrseg-labels"
    env = os.environ.get("HRSEG_LABELS_DIR")
    if env:
        return Path(env).expanduser() / _slide_key(slide) / name
    path = getattr(slide, "path", None)
    if path is not None:
        path = Path(path)
        beside = path.with_name(path.name + ".hrseg")
        if beside.is_dir() and os.access(beside, os.W_OK | os.X_OK):
            return beside / name
        if not beside.exists() and _writable_dir(path.parent):
            return beside / name
    return user_data_dir() / "stores" / _slide_key(slide) / name


def _slide_key(slide: "Slide") -> str:
    return f"{slug(slide.name)}-{slide.fingerprint()}"


def models_dir(name: str) -> Path:
    """Directory holding the versions of the model called ``name`` made by fine-tuning."""
    return user_data_dir() / "models" / slug(name)
