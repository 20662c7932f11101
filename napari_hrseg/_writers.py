"""npe2 writers: save a napari Labels layer as QuPath GeoJSON, pyramidal OME-TIFF or OME-Zarr labels.

``File > Save Selected Layer(s)`` (or ``viewer.layers.save(path, plugin="napari-hrseg")``) with a name ending in
``.geojson``, ``.ome.tif`` / ``.ome.tiff`` or ``.ome.zarr`` / ``.zarr`` lands here.  The layer becomes a
`LabelSource`:

- a layer showing a label store (``metadata["hrseg_label_store"]``, set by `napari_hrseg.labels.napari_bridge`)
  exports the *whole store*, read-only, at its working level, whichever window the layer shows;
- any other Labels layer exports its data (level 0 of a multiscale layer), with the layer's ``scale`` as the
  downsample to level 0 (napari-hrseg layers are in level-0 pixel units), class names and colours from
  ``metadata["class_names"]`` / ``["class_colors"]`` or a direct colormap, the pixel size from
  ``metadata["mpp_yx"]`` and the kind from ``metadata["kind"]`` (default: semantic for a direct colormap or
  8-bit data, else instance).

Errors are `ExportError`s with the reason; napari shows them in a notification and the viewer stays up.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ExportError

__all__ = ["write_labels_geojson", "write_labels_ome_tiff", "write_labels_ome_zarr", "layer_label_source"]

log = logging.getLogger(__name__)


def _rgb_hex(rgba: Any) -> str:
    r, g, b = (int(round(float(v) * 255)) for v in list(rgba)[:3])
    return f"#{r:02x}{g:02x}{b:02x}"


def _classes_from_colormap(colormap: Any, n: int) -> list[str] | None:
    color_dict = getattr(colormap, "color_dict", None)
    if not color_dict:
        return None
    colors = []
    for i in range(n):
        rgba = color_dict.get(i)
        colors.append("#000000" if i == 0 or rgba is None else _rgb_hex(rgba))
    return colors


def layer_label_source(data: Any, meta: dict[str, Any]):
    """The `LabelSource` of a Labels layer's ``(data, meta)`` as napari hands them to writers.

    Returns
    -------
    LabelSource, and a callable that releases what it holds (a read-only label store).
    """
    from .export.source import LabelSource

    metadata = dict(meta.get("metadata") or {})
    name = str(meta.get("name") or "labels")
    source = metadata.get("hrseg_label_source")
    if isinstance(source, LabelSource):
        return source, lambda: None
    store_path = metadata.get("hrseg_label_store")
    if store_path:
        from .labels import LabelStore

        store = LabelStore.open(store_path, read_only=True)
        try:
            return store.to_label_source(0, name=name.replace(" (overview)", "")), store.close
        except BaseException:
            store.close()
            raise

    labels = data[0] if isinstance(data, (list, tuple)) else data
    while len(labels.shape) > 2 and labels.shape[0] == 1:
        labels = labels[0]
    if len(labels.shape) != 2:
        raise ExportError(
            f"the layer's labels have shape {tuple(labels.shape)}; only 2-D slide labels can be exported",
            subject=name,
        )
    scale = tuple(float(s) for s in (meta.get("scale") or (1.0, 1.0)))[-2:]
    downsample = scale if all(s >= 1 for s in scale) else (1.0, 1.0)
    colormap = meta.get("colormap")
    kind = metadata.get("kind")
    if kind not in ("semantic", "instance"):
        direct = getattr(colormap, "color_dict", None) is not None and not hasattr(colormap, "seed")
        kind = "semantic" if direct or np.dtype(labels.dtype).itemsize == 1 else "instance"
    class_names = metadata.get("class_names")
    class_colors = metadata.get("class_colors")
    if class_names and not class_colors:
        class_colors = _classes_from_colormap(colormap, len(class_names))
    mpp = metadata.get("mpp_yx") or metadata.get("mpp")
    slide_shape = metadata.get("slide_shape")
    source = LabelSource.from_array(
        labels,
        downsample=downsample,
        class_names=class_names,
        class_colors=class_colors,
        mpp=mpp,
        kind=kind,
        instance_classes=metadata.get("instance_classes"),
        model_version=metadata.get("model_version"),
        slide_fingerprint=metadata.get("slide_fingerprint"),
        slide_shape=slide_shape,
        name=name,
    )
    return source, lambda: None


def _write(path: str, data: Any, meta: dict[str, Any], fmt: str) -> list[str]:
    from .export import export_labels

    source, release = layer_label_source(data, meta)
    try:
        written = export_labels(source, path, format=fmt)
    finally:
        release()
    if fmt == "ome-zarr":
        written = Path(path)  # the container, not the label group inside it
    log.info("saved layer %r as %s", meta.get("name"), written)
    return [str(written)]


def write_labels_geojson(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """npe2 single-layer writer: a Labels layer as a QuPath GeoJSON FeatureCollection."""
    return _write(path, data, meta, "geojson")


def write_labels_ome_tiff(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """npe2 single-layer writer: a Labels layer as a tiled pyramidal OME-TIFF."""
    return _write(path, data, meta, "ome-tiff")


def write_labels_ome_zarr(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """npe2 single-layer writer: a Labels layer as NGFF labels (``labels/<layer name>``) in an OME-Zarr."""
    from .export.ome_zarr import export_ome_zarr

    source, release = layer_label_source(data, meta)
    try:
        name = "".join(c if c.isalnum() or c in "-_" else "_" for c in source.name).strip("_") or "labels"
        export_ome_zarr(source, path, name=name)
    finally:
        release()
    return [str(Path(path))]
