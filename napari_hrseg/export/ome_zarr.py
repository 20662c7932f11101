"""OME-Zarr (NGFF) label pyramids that ome-zarr-py and napari-ome-zarr read.

Layout (NGFF "labels", https://ngff.openmicroscopy.org/0.4/#labels-md)::

    OUT.ome.zarr/                 a new container, or an existing OME-Zarr image
      labels/                     group, attrs {"labels": [NAME, ...]}
        NAME/                     group, attrs {"multiscales": [...], "image-label": {...}}
          0/ 1/ 2/ ...            integer arrays (y, x), finest first, each half the previous

- ``multiscales``: axes ``y``, ``x`` of type space with unit ``micrometer`` when the pixel size is known; one
  ``scale`` + ``translation`` per level in micrometres, so the labels land on the slide's pixels at whatever
  level they were made (a level of downsample ``d`` has scale ``mpp * d`` and translation ``mpp * (d - 1) / 2``:
  its pixel centres sit at the centres of the level-0 pixel blocks they cover).
- ``image-label``: ``colors`` (``label-value`` and ``rgba`` 0..255) and ``properties`` (``label-value``,
  ``class``, ``class-index``) for every class of semantic labels; for instance labels one property entry per
  object id with its class (colours are left to the viewer, so touching nuclei stay distinguishable).
- Coarser levels take every second pixel of the level before (labels are never averaged), read back from the
  level just written, one output chunk at a time: memory holds a few chunks whatever the slide size.
- Zarr chunks are the label source's storage chunks (so writing reads each source chunk once and never
  splits or shares a chunk between tasks); empty chunks are not written (a sparse slide stays small).

NGFF version: ``0.4`` (zarr v2) by default for a new container, because every reader understands it
(ome-zarr-py >= 0.8, napari-ome-zarr, Fiji/MoBIE, vizarr, QuPath via Bio-Formats); ``0.5`` (zarr v3) on
request, which ome-zarr-py >= 0.12 (0.18 here) and napari-ome-zarr >= 0.6 read.  Labels written beside an
existing image always take the image's version, since one container cannot mix zarr formats.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Literal

import numcodecs
import numpy as np
import zarr
from zarr.storage import LocalStore

from ..errors import ExportError
from ..geometry import Region
from ._atomic import atomic_output
from ._atomic import write_text_atomic as _write_text_atomic
from .source import LabelSource, hex_to_rgb

__all__ = ["export_ome_zarr", "NGFF_VERSIONS", "read_ome_attrs"]

log = logging.getLogger(__name__)

NgffVersion = Literal["0.4", "0.5"]
NGFF_VERSIONS = ("0.4", "0.5")


# ---------------------------------------------------------------------- metadata on disk
def read_ome_attrs(group_dir: Path) -> tuple[str | None, dict[str, Any]]:
    """The NGFF attributes of a zarr group directory and its NGFF version (``None`` if not a zarr group).

    Zarr v2 keeps them in ``.zattrs``; zarr v3 (NGFF 0.5) under ``"ome"`` in ``zarr.json``.
    """
    v3 = group_dir / "zarr.json"
    v2 = group_dir / ".zattrs"
    try:
        if v3.is_file():
            meta = json.loads(v3.read_text(encoding="utf-8"))
            ome = (meta.get("attributes") or {}).get("ome") or {}
            return str(ome.get("version", "0.5")), dict(ome)
        if (group_dir / ".zgroup").is_file():
            attrs = json.loads(v2.read_text(encoding="utf-8")) if v2.is_file() else {}
            ms = attrs.get("multiscales") or [{}]
            return str(ms[0].get("version", "0.4")), attrs
    except (OSError, ValueError) as exc:
        raise ExportError(f"its zarr metadata cannot be read ({exc})", subject=group_dir) from exc
    return None, {}


def _write_group_attrs(
    group_dir: Path,
    version: str,
    ome_attrs: dict[str, Any],
    extra: dict[str, Any] | None = None,
    *,
    atomic: bool = False,
) -> None:
    """Write a group's metadata files directly, for either zarr format.

    ``atomic`` for a group that readers may be looking at (an existing image's ``labels``); inside a temporary
    tree that is renamed into place as a whole, plain writes suffice.
    """
    extra = extra or {}

    def write_text_atomic(path: Path, text: str) -> None:
        if atomic:
            _write_text_atomic(path, text)
        else:
            path.write_text(text, encoding="utf-8")

    group_dir.mkdir(parents=True, exist_ok=True)
    if version == "0.5":
        path = group_dir / "zarr.json"
        meta = (
            json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"zarr_format": 3, "node_type": "group"}
        )
        attrs = dict(meta.get("attributes") or {})
        attrs["ome"] = {"version": "0.5", **{k: v for k, v in ome_attrs.items() if k != "version"}}
        attrs.update(extra)
        meta["attributes"] = attrs
        write_text_atomic(path, json.dumps(meta, indent=2, ensure_ascii=False))
    else:
        if not (group_dir / ".zgroup").is_file():
            write_text_atomic(group_dir / ".zgroup", json.dumps({"zarr_format": 2}))
        path = group_dir / ".zattrs"
        attrs = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        attrs.update(ome_attrs)
        attrs.update(extra)
        write_text_atomic(path, json.dumps(attrs, indent=2, ensure_ascii=False))


# ---------------------------------------------------------------------- the image beside which labels go
class _ImageInfo:
    """What the labels must agree with when written into an existing OME-Zarr image."""

    def __init__(self, root: Path, version: str, attrs: dict[str, Any]):
        ms = attrs["multiscales"][0]
        axes = ms.get("axes") or [{"name": "y"}, {"name": "x"}]
        self.axes = [a if isinstance(a, dict) else {"name": a} for a in axes]
        self.version = version
        names = [a["name"] for a in self.axes]
        if "y" not in names or "x" not in names:
            raise ExportError(f"the image's axes {names} have no y and x", subject=root)
        first = ms["datasets"][0]
        arr = zarr.open_array(LocalStore(root / first["path"], read_only=True), mode="r")
        self.shape = dict(zip(names, arr.shape))
        scale = [1.0] * len(names)
        translation = [0.0] * len(names)
        for t in first.get("coordinateTransformations") or []:
            if t.get("type") == "scale":
                scale = [float(v) for v in t["scale"]]
            elif t.get("type") == "translation":
                translation = [float(v) for v in t["translation"]]
        self.scale = dict(zip(names, scale))
        self.translation = dict(zip(names, translation))
        for name in names:
            if (
                name not in ("y", "x")
                and self.axes[names.index(name)].get("type") != "channel"
                and self.shape[name] > 1
            ):
                raise ExportError(
                    f"the image has {self.shape[name]} planes along {name!r}; slide labels are 2-D",
                    subject=root,
                )

    def label_axes(self) -> list[dict[str, Any]]:
        # Labels have the image's axes without the channel axis (NGFF: one label value per pixel).
        return [a for a in self.axes if a.get("type") != "channel" and a["name"] != "c"]


# ---------------------------------------------------------------------- writing arrays
def _compressor(version: str):
    if version == "0.5":
        return zarr.codecs.BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle")
    return numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.BITSHUFFLE)


def _create_level(
    group_dir: Path,
    path: str,
    shape: tuple[int, ...],
    chunks: tuple[int, ...],
    dtype,
    version: str,
    dim_names: list[str],
):
    kwargs: dict[str, Any] = {
        "shape": shape,
        "chunks": chunks,
        "dtype": dtype,
        "fill_value": 0,
        "compressors": _compressor(version),
        "config": {"write_empty_chunks": False},
        "zarr_format": 3 if version == "0.5" else 2,
        "overwrite": True,
    }
    if version == "0.5":
        kwargs["dimension_names"] = dim_names
    else:
        kwargs["chunk_key_encoding"] = {"name": "v2", "separator": "/"}
    return zarr.create_array(LocalStore(group_dir), name=path, **kwargs)


def _n_levels(shape: tuple[int, int], chunks: tuple[int, int], max_levels: int | None) -> int:
    n = 1
    h, w = shape
    # Halve until the whole level fits one chunk (a viewer's overview reads one chunk), at most 12 levels.
    while (h > chunks[0] or w > chunks[1]) and n < 12:
        h, w = math.ceil(h / 2), math.ceil(w / 2)
        n += 1
    return n if max_levels is None else max(1, min(n, max_levels))


def _copy_level0(
    source: LabelSource, arr, lead: tuple[int, ...], tick: Callable[[], None], ids: set[int] | None
) -> None:
    ch, cw = source.chunks
    for region in Region.from_shape(source.shape).grid((ch, cw)):
        block = np.asarray(source.labels[region.slices])
        if ids is not None:
            ids.update(int(v) for v in np.unique(block) if v)
        if block.any():
            arr[(*lead, *region.slices)] = block.astype(arr.dtype, copy=False)
        tick()


def _halve_level(prev, arr, lead: tuple[int, ...], chunks: tuple[int, int], tick: Callable[[], None]) -> None:
    h, w = arr.shape[-2:]
    for region in Region.from_shape((h, w)).grid(chunks):
        src = (*lead, slice(2 * region.row, 2 * region.end_row, 2), slice(2 * region.col, 2 * region.end_col, 2))
        block = np.asarray(prev[src])
        if block.any():
            arr[(*lead, *region.slices)] = block
        tick()


# ---------------------------------------------------------------------- metadata content
def _label_metadata(source: LabelSource, version: str, ids: set[int] | None, beside_image: bool) -> dict[str, Any]:
    colors: list[dict[str, Any]] = []
    properties: list[dict[str, Any]] = []
    if source.kind == "semantic":
        colors.append({"label-value": 0, "rgba": [0, 0, 0, 0]})  # background: transparent
        for i in range(1, source.n_classes):
            colors.append({"label-value": i, "rgba": [*hex_to_rgb(source.class_colors[i]), 255]})
            properties.append({"label-value": i, "class": source.class_names[i], "class-index": i})
    else:
        for obj in sorted(ids or set(source.instance_classes)):
            ci = source.class_of(obj)
            properties.append({"label-value": obj, "class": source.class_name(ci), "class-index": ci})
    image_label: dict[str, Any] = {"colors": colors, "properties": properties}
    if not colors:
        del image_label["colors"]
    if beside_image:
        image_label["source"] = {"image": "../../"}
    if version == "0.4":
        image_label["version"] = "0.4"
    return image_label


def _multiscales(
    source: LabelSource,
    version: str,
    name: str,
    n_levels: int,
    axes: list[dict[str, Any]],
    base_yx: tuple[float, float] | None,
    lead_scale: list[float],
    origin_yx: tuple[float, float] = (0.0, 0.0),
) -> list[dict[str, Any]]:
    dy, dx = source.downsample
    sy, sx = base_yx if base_yx is not None else (1.0, 1.0)
    oy, ox = origin_yx
    datasets = []
    for k in range(n_levels):
        fy, fx = dy * 2**k, dx * 2**k
        datasets.append(
            {
                "path": str(k),
                "coordinateTransformations": [
                    {"type": "scale", "scale": [*lead_scale, sy * fy, sx * fx]},
                    {
                        "type": "translation",
                        "translation": [*([0.0] * len(lead_scale)), oy + sy * (fy - 1) / 2, ox + sx * (fx - 1) / 2],
                    },
                ],
            }
        )
    ms: dict[str, Any] = {
        "name": name,
        "axes": axes,
        "datasets": datasets,
        "type": "nearest",
        "metadata": {
            "description": "each level takes every second pixel of the previous one (labels are never averaged)",
            "method": "napari_hrseg.export.ome_zarr",
        },
    }
    if version == "0.4":
        ms["version"] = "0.4"
    return [ms]


# ---------------------------------------------------------------------- public
def export_ome_zarr(
    source: LabelSource,
    path: str | os.PathLike,
    *,
    name: str | None = None,
    version: NgffVersion | None = None,
    chunks: tuple[int, int] | None = None,
    max_levels: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    overwrite: bool = True,
) -> Path:
    """Write ``source`` as an NGFF multiscale label image, atomically.

    Parameters
    ----------
    source : LabelSource
        Labels at any level; read one storage chunk at a time.
    path : path
        An OME-Zarr container.  If it is an existing OME-Zarr *image* (its root has ``multiscales``), the labels
        are added under its ``labels/NAME`` (replacing a label image of the same name) and take its NGFF version,
        axes and units; its level-0 size must be the slide's.  Otherwise a new container holding only
        ``labels/NAME`` is written (replacing ``path`` if ``overwrite``).
    name : str, optional
        Label image name; default ``source.name``.
    version : {"0.4", "0.5"}, optional
        NGFF version of a new container (default ``"0.4"``); must match an existing image's.
    chunks : (int, int), optional
        Zarr chunk shape; default the source's storage chunks.
    max_levels : int, optional
        Cap on the number of pyramid levels (default: halve until one chunk holds a level).
    progress : callable, optional
        ``progress(done, total)`` after each chunk written; may raise `Cancelled` to stop (nothing is left).
    overwrite : bool
        Replace an existing container / label image of the same name.

    Returns
    -------
    Path
        The label image group, ``path/labels/NAME``.

    Raises
    ------
    ExportError
        Shape or version disagreement with an existing image, disk full, permissions.
    """
    root = Path(path).expanduser().absolute()
    name = name or source.name
    if not name or "/" in name or name.startswith("."):
        raise ExportError(f"label name {name!r} must be a plain, non-hidden folder name", subject=root)
    if version is not None and version not in NGFF_VERSIONS:
        raise ExportError(f"NGFF version {version!r} is not one of {', '.join(NGFF_VERSIONS)}", subject=root)

    image = None
    if root.is_dir():
        img_version, attrs = read_ome_attrs(root)
        if img_version is not None and attrs.get("multiscales"):
            image = _ImageInfo(root, img_version, attrs)
            if version is not None and version != image.version:
                raise ExportError(
                    f"the image is NGFF {image.version}; labels beside it cannot be {version}",
                    subject=root,
                    hint=f"leave the version unset or choose {image.version}",
                )
            if (image.shape["y"], image.shape["x"]) != tuple(source.slide_shape):
                raise ExportError(
                    f"the image is {image.shape['x']} x {image.shape['y']} px but the labels belong to a slide of "
                    f"{source.slide_shape[1]} x {source.slide_shape[0]} px",
                    subject=root,
                    hint="export beside the slide the labels were made on, or into a new .ome.zarr",
                )
    version = image.version if image is not None else (version or "0.4")
    chunk_shape = tuple(int(c) for c in (chunks or source.chunks))
    chunk_shape = (min(chunk_shape[0], source.shape[0]), min(chunk_shape[1], source.shape[1]))
    n_levels = _n_levels(source.shape, chunk_shape, max_levels)

    # Axes and physical scale: the image's when beside one (so the labels overlay it), else the source's.
    if image is not None:
        axes = image.label_axes()
        lead = tuple(1 for a in axes if a["name"] not in ("y", "x"))
        lead_scale = [image.scale[a["name"]] for a in axes if a["name"] not in ("y", "x")]
        base_yx = (image.scale["y"], image.scale["x"])
        origin_yx = (image.translation["y"], image.translation["x"])
    else:
        unit = "micrometer" if source.mpp_yx is not None else None
        origin_yx = (0.0, 0.0)
        axes = [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}]
        if unit:
            for a in axes:
                a["unit"] = unit
        lead, lead_scale, base_yx = (), [], source.mpp_yx
    dim_names = [a["name"] for a in axes]
    level_shapes = [source.shape]
    for _ in range(1, n_levels):
        h, w = level_shapes[-1]
        level_shapes.append((math.ceil(h / 2), math.ceil(w / 2)))
    total = sum(math.ceil(h / chunk_shape[0]) * math.ceil(w / chunk_shape[1]) for h, w in level_shapes)
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    def write_label_group(group_dir: Path) -> None:
        ids: set[int] | None = set() if source.kind == "instance" else None
        arrays = []
        for k, (h, w) in enumerate(level_shapes):
            arr = _create_level(
                group_dir, str(k), (*lead, h, w), (*lead, *chunk_shape), source.dtype, version, dim_names
            )
            if k == 0:
                _copy_level0(source, arr, lead, tick, ids)
            else:
                _halve_level(arrays[-1], arr, lead, chunk_shape, tick)
            arrays.append(arr)
        ome = {
            "multiscales": _multiscales(source, version, name, n_levels, axes, base_yx, lead_scale, origin_yx),
            "image-label": _label_metadata(source, version, ids, image is not None),
        }
        _write_group_attrs(group_dir, version, ome, {"hrseg": source.provenance()})

    if image is not None:
        labels_dir = root / "labels"
        target = labels_dir / name
        if target.exists() and not overwrite:
            raise ExportError("a label image of this name already exists", subject=target, hint="choose another --name")
        if not labels_dir.is_dir():
            _write_group_attrs(labels_dir, version, {"labels": []}, atomic=True)
        with atomic_output(target, directory=True, overwrite=overwrite) as tmp:
            write_label_group(tmp)
        # List the label image only once it is complete under its final name.
        _, labels_attrs = read_ome_attrs(labels_dir)
        listed = [n for n in labels_attrs.get("labels", []) if n != name] + [name]
        _write_group_attrs(labels_dir, version, {"labels": listed}, atomic=True)
        log.info("wrote label image %s beside the image in %s (NGFF %s, %d levels)", name, root, version, n_levels)
        return target

    if root.exists() and not root.is_dir():
        raise ExportError("exists and is not a directory", subject=root, hint="choose a name ending in .ome.zarr")
    with atomic_output(root, directory=True, overwrite=overwrite) as tmp:
        _write_group_attrs(tmp, version, {}, {"hrseg": source.provenance()})
        _write_group_attrs(tmp / "labels", version, {"labels": [name]})
        write_label_group(tmp / "labels" / name)
    log.info("wrote %s (NGFF %s labels %r, %d levels)", root, version, name, n_levels)
    return root / "labels" / name
