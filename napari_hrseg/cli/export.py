"""``napari-hrseg export SOURCE --out OUT``: labels to OME-Zarr, OME-TIFF, QuPath GeoJSON or CSV measurements.

SOURCE is a label store directory (``*.hrseg-labels``), a label image file (TIFF / OME-TIFF, PNG, ``.npy``) or a
zarr array / OME-Zarr label group.  The format follows OUT's ending (``.ome.zarr``/``.zarr``,
``.ome.tif``/``.tif``, ``.geojson``, ``.csv``) unless ``--format`` says otherwise.  ``--slide`` gives the slide the
labels belong to: its pixel size, level-0 size (so labels made at a coarser level get level-0 coordinates) and
fingerprint, and the pixels that CSV measurements unmix into haematoxylin and eosin.  The export is written to a
temporary name and renamed, so an interrupted export leaves no file that looks complete.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..errors import ExportError, HrsegError, SlideError

__all__ = ["add_parser", "run", "load_label_source"]

log = logging.getLogger(__name__)

_FORMATS = ("ome-zarr", "ome-tiff", "geojson", "csv")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "export",
        help="export labels as OME-Zarr, OME-TIFF, QuPath GeoJSON or per-object CSV measurements",
        description=__doc__.split("\n\n")[0],
        epilog=(
            "examples:\n"
            "  napari-hrseg export slide.hrseg-labels --out slide.geojson          # QuPath: File > Import objects\n"
            "  napari-hrseg export slide.hrseg-labels --out slide.ome.zarr --name tissue\n"
            "  napari-hrseg export nuclei.tif --kind instance --slide slide.svs --out nuclei.csv\n"
            "  napari-hrseg export mask.png --classes background,tumor,stroma --mpp 0.5 --out mask.ome.tif"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", type=Path, help="label store directory, label image (TIFF, PNG, .npy) or zarr array")
    parser.add_argument("--out", "-o", type=Path, required=True, help="output file or .ome.zarr directory")
    parser.add_argument("--format", choices=_FORMATS, default=None, help="default: from --out's ending")
    parser.add_argument(
        "--slide",
        type=Path,
        default=None,
        help="the slide the labels belong to (checked, and used "
        "for the pixel size, level-0 size and stain intensities)",
    )
    parser.add_argument("--name", default=None, help="label image name inside an OME-Zarr (default: the labels' name)")
    parser.add_argument(
        "--level", type=int, default=0, help="label store only: 0 for the working level, k for 2**k times coarser"
    )
    parser.add_argument(
        "--kind",
        choices=("semantic", "instance"),
        default=None,
        help="label image files: class indices or object ids (default: instance for 16/32-bit "
        "images, semantic for 8-bit)",
    )
    parser.add_argument("--classes", default=None, help="comma-separated class names, background first")
    parser.add_argument("--colors", default=None, help="comma-separated #rrggbb colours, one per class")
    parser.add_argument("--mpp", type=float, default=None, help="level-0 pixel size in µm when nothing states it")
    parser.add_argument(
        "--downsample",
        type=float,
        default=None,
        help="label image files: downsample of the labels' level (default: from --slide, else 1)",
    )
    parser.add_argument("--model-version", default=None, help="record this model version in the export")
    parser.add_argument(
        "--ngff-version",
        choices=("0.4", "0.5"),
        default=None,
        help="OME-Zarr: NGFF version of a new container (default 0.4)",
    )
    parser.add_argument(
        "--object-type",
        choices=("auto", "annotation", "detection"),
        default="auto",
        help="GeoJSON: QuPath object type (default: detections for instances, annotations otherwise)",
    )
    parser.add_argument("--no-overwrite", action="store_true", help="refuse to replace an existing OUT")
    parser.set_defaults(run=run)
    return parser


# ---------------------------------------------------------------------- reading sources
def _is_label_store(path: Path) -> bool:
    meta = path / "zarr.json"
    if not meta.is_file():
        return False
    try:
        attrs = json.loads(meta.read_text(encoding="utf-8")).get("attributes") or {}
    except (OSError, ValueError):
        return False
    return isinstance(attrs.get("napari_hrseg"), dict)


def _read_label_image(path: Path) -> tuple[Any, dict[str, Any]]:
    """The labels of a file or zarr directory (lazily where the format allows) and what the file says about them."""
    name = path.name.lower()
    hints: dict[str, Any] = {}
    if path.is_dir():
        import zarr

        try:
            node = zarr.open(str(path), mode="r")
        except Exception as exc:
            raise ExportError(f"not a zarr array or label store ({exc})", subject=path) from exc
        if isinstance(node, zarr.Group):
            from ..export.ome_zarr import read_ome_attrs

            _, attrs = read_ome_attrs(path)
            if not attrs.get("multiscales"):
                raise ExportError(
                    "a zarr group that is neither a label store nor an OME-Zarr label image",
                    subject=path,
                    hint="pass the label array itself",
                )
            node = zarr.open_array(str(path / attrs["multiscales"][0]["datasets"][0]["path"]), mode="r")
            if "image-label" in attrs:
                props = attrs["image-label"].get("properties") or []
                hints["classes_by_value"] = {int(p["label-value"]): str(p.get("class")) for p in props if "class" in p}
        return node, hints
    if name.endswith(".npy"):
        return np.load(path, mmap_mode="r"), hints
    if name.endswith((".tif", ".tiff")):
        import tifffile

        from ..export.ome_tiff import read_label_tiff_metadata

        try:
            with tifffile.TiffFile(path) as tif:
                data = tif.series[0].levels[0].asarray()
            meta = read_label_tiff_metadata(path)
        except Exception as exc:
            raise ExportError(f"cannot be read as a TIFF label image ({exc})", subject=path) from exc
        if meta["class_names"]:
            hints.update(class_names=meta["class_names"], class_colors=meta["class_colors"])
            ann = meta["map_annotation"]
            hints["kind"] = ann.get("kind") or None
            if ann.get("downsample"):
                hints["downsample"] = tuple(float(v) for v in ann["downsample"].split())
            if ann.get("slide_shape"):
                hints["slide_shape"] = tuple(int(v) for v in ann["slide_shape"].split())
            if ann.get("instance_classes"):
                hints["instance_classes"] = {int(k): int(v) for k, v in json.loads(ann["instance_classes"]).items()}
            if ann.get("model_version"):
                hints["model_version"] = ann["model_version"]
            if meta["physical_size_yx"] and hints.get("downsample"):
                ds = hints["downsample"]
                hints["mpp"] = (meta["physical_size_yx"][0] / ds[0], meta["physical_size_yx"][1] / ds[1])
        return data, hints
    if name.endswith((".png", ".bmp", ".gif")):
        from PIL import Image

        try:
            with Image.open(path) as img:
                if img.mode not in ("L", "P", "I", "I;16", "I;16B", "1"):
                    raise ExportError(
                        f"is a {img.mode} colour image, not a label image (one integer per pixel)",
                        subject=path,
                        hint="save labels as a single-channel PNG or TIFF",
                    )
                return np.asarray(img), hints
        except OSError as exc:
            raise ExportError(f"cannot be read as an image ({exc})", subject=path) from exc
    raise ExportError(
        "not a label image napari-hrseg can read",
        subject=path,
        hint="give a label store, a TIFF, PNG or .npy label image, or a zarr array",
    )


@contextlib.contextmanager
def load_label_source(args: argparse.Namespace, slide: Any = None) -> Iterator[Any]:
    """The `LabelSource` the command exports, from the source path and options (kept valid inside the block:
    a label store stays open, read-only, while its labels are exported)."""

    src: Path = args.source
    if not src.exists():
        raise ExportError("no such file or directory", subject=src, hint="check the path")
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    colors = [c.strip() for c in args.colors.split(",")] if args.colors else None

    if src.is_dir() and _is_label_store(src):
        from ..labels import LabelStore

        # Read-only: an export never modifies the store and may run while the viewer has it open for writing.
        with LabelStore.open(src, slide, read_only=True) as store:
            yield _adjust_store_source(store.to_label_source(args.level, name=args.name), args, slide, classes, colors)
        return
    yield _file_source(src, args, slide, classes, colors)


def _adjust_store_source(source: Any, args: argparse.Namespace, slide: Any, classes, colors) -> Any:
    """Command-line overrides of what the store says (class names, model version, a missing pixel size)."""
    changes: dict[str, Any] = {}
    if classes:
        changes["class_names"] = tuple(classes)
        changes["class_colors"] = tuple(colors) if colors else ()
    if args.model_version:
        changes["model_version"] = args.model_version
    if source.mpp_yx is None and (args.mpp or (slide is not None and slide.mpp_yx)):
        changes["mpp_yx"] = (args.mpp, args.mpp) if args.mpp else slide.mpp_yx
    if changes:
        from dataclasses import replace

        source = replace(source, **changes)
    return source


def _file_source(src: Path, args: argparse.Namespace, slide: Any, classes, colors) -> Any:
    from ..export.source import LabelSource

    labels, hints = _read_label_image(src)
    if len(labels.shape) == 3 and 1 in (labels.shape[0], labels.shape[-1]):
        labels = labels[0] if labels.shape[0] == 1 else labels[..., 0]
    if len(labels.shape) != 2:
        raise ExportError(f"has shape {tuple(labels.shape)}; a label image is 2-D", subject=src)
    kind = args.kind or hints.get("kind") or ("instance" if np.dtype(labels.dtype).itemsize > 1 else "semantic")
    if args.kind is None and not hints.get("kind"):
        log.info("%s: %s labels (%s); pass --kind to choose", src.name, kind, labels.dtype)
    slide_shape = hints.get("slide_shape")
    downsample: Any = hints.get("downsample") or 1.0
    if args.downsample is not None:
        downsample = args.downsample
    fingerprint = None
    if slide is not None:
        slide_shape = slide.level_shapes[0]
        fingerprint = slide.fingerprint()
        if args.downsample is None:
            downsample = (slide_shape[0] / labels.shape[0], slide_shape[1] / labels.shape[1])
            if max(downsample) > 1.01:
                log.info(
                    "labels are %dx%d, the slide %dx%d: exporting at downsample %.4g",
                    labels.shape[1],
                    labels.shape[0],
                    slide_shape[1],
                    slide_shape[0],
                    downsample[0],
                )
    mpp = args.mpp or hints.get("mpp") or (slide.mpp_yx if slide is not None else None)
    if classes is None and hints.get("class_names"):
        classes, colors = hints["class_names"], colors or hints.get("class_colors")
    if classes is None and hints.get("classes_by_value"):
        by_value = hints["classes_by_value"]
        if kind == "semantic" and by_value:
            classes = ["background"] + [by_value.get(i, f"class {i}") for i in range(1, max(by_value) + 1)]
    return LabelSource.from_array(
        labels,
        downsample=downsample,
        class_names=classes,
        class_colors=colors,
        mpp=mpp,
        kind=kind,
        instance_classes=hints.get("instance_classes"),
        model_version=args.model_version or hints.get("model_version"),
        slide_fingerprint=fingerprint,
        slide_shape=slide_shape,
        name=args.name or src.name.split(".")[0] or "labels",
    )


# ---------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> int:
    from ..export import export_geojson, export_measurements_csv, export_ome_tiff, export_ome_zarr, format_from_path

    if args.mpp is not None and not (math.isfinite(args.mpp) and args.mpp > 0):
        raise ExportError(f"--mpp {args.mpp} must be a positive number of µm per pixel", subject="--mpp")
    fmt = args.format or format_from_path(args.out)
    slide = None
    if args.slide is not None:
        from ..slide import open_slide

        try:
            slide = open_slide(args.slide, mpp=args.mpp)
        except OSError as exc:
            raise SlideError(f"cannot read: {exc.strerror or exc}", subject=args.slide) from exc
    try:
        with load_label_source(args, slide) as source:
            progress, close = _progress_bar(fmt)
            overwrite = not args.no_overwrite
            try:
                if fmt == "ome-zarr":
                    written = export_ome_zarr(
                        source,
                        args.out,
                        name=args.name,
                        version=args.ngff_version,
                        progress=progress,
                        overwrite=overwrite,
                    )
                elif fmt == "ome-tiff":
                    written = export_ome_tiff(source, args.out, progress=progress, overwrite=overwrite)
                elif fmt == "geojson":
                    written = export_geojson(
                        source, args.out, object_type=args.object_type, progress=progress, overwrite=overwrite
                    )
                else:
                    written = export_measurements_csv(source, args.out, slide, progress=progress, overwrite=overwrite)
            finally:
                close()
    except HrsegError:
        raise
    except OSError as exc:  # reading the source failed below the exporters' own handling
        raise ExportError(f"cannot read the labels: {exc.strerror or exc}", subject=args.source) from exc
    finally:
        if slide is not None:
            slide.close()
    print(
        f"wrote {written} ({fmt}, {source.kind} labels {source.shape[1]}x{source.shape[0]} px at downsample "
        f"{source.downsample[0]:.4g})"
    )
    sys.stdout.flush()
    return 0


def _progress_bar(fmt: str):
    """A tqdm bar on stderr when it is a terminal; the exporters call it with counts."""
    if not sys.stderr.isatty():
        return None, lambda: None
    from tqdm import tqdm

    bar = tqdm(desc=f"export {fmt}", unit="chunk" if fmt in ("ome-zarr", "ome-tiff") else "object", file=sys.stderr)

    def progress(done: int, total: int | None = None) -> None:
        if total is not None:
            bar.total = total
        bar.n = done
        bar.refresh()

    return progress, bar.close
