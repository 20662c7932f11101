"""The npe2 reader command: napari's File > Open for every slide format napari-hrseg reads.

``napari_get_reader(path)`` answers quickly without reading pixels:

- ``None`` for a list of paths (napari's "stack" opening), for a directory that is neither a zarr store nor a
  folder of DICOM files, and for a file whose extension is not one of ours and whose content no reader claims;
- otherwise a function that opens the slide lazily and returns one multiscale image layer.

A file with one of our extensions is claimed even when its content is broken (an empty ``.svs``, a ``.png``
that is really text), so the user gets our one-line reason rather than napari's "no reader found".  Errors are
`HrsegError`s; napari wraps them in its ``ReaderPluginError`` and shows the message (a notification or the
reader dialog) while the viewer stays up.  This module imports neither napari nor Qt.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any, Callable

from .slide import open_slide, registered_readers

__all__ = ["napari_get_reader", "read_slide_layers"]

log = logging.getLogger(__name__)

# Kept in step with napari.yaml's filename_patterns.
_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".qptiff", ".dcm", ".png", ".jpg", ".jpeg", ".zarr")

LayerData = tuple[Any, dict[str, Any], str]


def _claimed(path: Path) -> bool:
    name = path.name.lower()
    if path.is_dir():
        return any(reader.sniff(path) for reader in registered_readers() if reader.name in ("zarr", "dicom"))
    if name.endswith(_EXTENSIONS):
        return True
    if not path.exists():
        return False
    return any(_safe_sniff(reader, path) for reader in registered_readers())


def _safe_sniff(reader: Any, path: Path) -> bool:
    try:
        return bool(reader.sniff(path))
    except Exception:  # a sniffer must never break napari's reader discovery
        log.debug("sniffing %s with %s failed", path, reader.name, exc_info=True)
        return False


def napari_get_reader(path: str | list[str]) -> Callable[[str], list[LayerData]] | None:
    """Return a reader function for ``path``, or ``None`` if napari-hrseg does not read it (see module doc)."""
    if not isinstance(path, (str, Path)):
        return None
    p = Path(path).expanduser()
    try:
        if not _claimed(p):
            return None
    except OSError:
        return None
    return partial(read_slide_layers, p)


def read_slide_layers(path: str | Path, *_: Any) -> list[LayerData]:
    """Open ``path`` lazily and return ``[(levels, layer_kwargs, "image")]`` (one multiscale image layer).

    Raises
    ------
    HrsegError
        With the file, the problem and what to do; napari shows it and the viewer stays usable.
    """
    slide = open_slide(Path(path))
    log.info("opened %s: %s, %d levels, %s", slide.path, slide.format, slide.level_count, slide.shape)
    return [(slide.as_layer_data(), slide.layer_kwargs(), "image")]
