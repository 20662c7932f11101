"""``napari-hrseg segment``: segment whole slides (or folders of slides) out of core, resumably.

Examples::

    napari-hrseg segment slide.svs --model tissue --out slide.labels.ome.zarr
    napari-hrseg segment slides/ --model ./my-model --out results/ --format ome-tiff --workers 4
    napari-hrseg segment a.svs b.ndpi --model glands --out results/ --scheduler tcp://head:8786
    napari-hrseg segment scan.png --mpp 0.5 --model tissue --out scan.geojson --region 0,0,4096,4096

An interrupted run (Ctrl-C, a killed job, a power cut) keeps every finished tile in ``OUT.hrseg-work``; the
same command resumes it and computes only the remaining tiles.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from ..errors import HrsegError, SlideError

__all__ = ["add_parser", "run", "expand_inputs", "plan_outputs"]

log = logging.getLogger(__name__)

_FORMAT_SUFFIX = {"ome-zarr": ".ome.zarr", "ome-tiff": ".ome.tif", "geojson": ".geojson"}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "segment",
        help="segment whole slides into label files (resumable, optionally on a dask cluster)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="slide files, slide folders (OME-Zarr, DICOM) or folders of slides")
    p.add_argument("--model", required=True, metavar="NAME_OR_DIR", help="a shipped model name or a model directory (config.json + model.safetensors)")
    p.add_argument("--out", required=True, metavar="OUT",
                   help="output file for one slide (.ome.zarr, .ome.tif, .tif, .geojson), or a folder for several")
    p.add_argument("--format", choices=sorted(_FORMAT_SUFFIX), default=None,
                   help="output format when OUT is a folder (default ome-zarr)")
    p.add_argument("--region", metavar="ROW,COL,HEIGHT,WIDTH", default=None, help="only this level-0 region of each slide")
    p.add_argument("--device", default="auto", help="auto (default), cuda, cuda:N, mps or cpu")
    p.add_argument("--autocast", default="auto", help="auto (default: bf16/fp16 on GPUs, none on the CPU), off, bfloat16, float16")
    p.add_argument("--mpp", type=float, default=None, help="level-0 pixel size in µm for files that do not state it")
    p.add_argument("--tile-size", type=int, default=1024, help="tile core size in model pixels (default 1024)")
    p.add_argument("--batch-size", type=int, default=4, help="tiles per forward pass (default 4)")
    dist = p.add_mutually_exclusive_group()
    dist.add_argument("--workers", type=int, default=None, metavar="N", help="run tiles on a local dask cluster of N worker processes")
    dist.add_argument("--scheduler", default=None, metavar="ADDRESS", help="run tiles on an existing dask scheduler (tcp://host:8786)")
    p.add_argument("--probs", action="store_true", help="also keep float16 class probabilities (in the working store, which is then kept)")
    p.add_argument("--all-tiles", action="store_true", help="do not skip glass (no tissue detection)")
    p.add_argument("--restart", action="store_true", help="discard an interrupted run's working store instead of resuming it")
    p.add_argument("--keep-work", action="store_true", help="keep the working zarr store after exporting")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first slide that fails (default: report it and go on)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)
    return p


def _is_slide_dir(path: Path) -> bool:
    from ..slide import registered_readers

    for reader in registered_readers():
        try:
            if reader.sniff(path):
                return True
        except Exception:
            continue
    return False


def expand_inputs(inputs: Sequence[str]) -> list[Path]:
    """Slides named by the command line: files as they are; folders that are slides (OME-Zarr, DICOM) as they
    are; other folders replaced by the slides directly inside them (sorted, hidden entries skipped).

    Raises
    ------
    SlideError
        For a missing path or a folder with no slide in it.
    """
    slides: list[Path] = []
    for text in inputs:
        path = Path(text).expanduser()
        if not path.exists():
            raise SlideError("no such file or directory", subject=path, hint="check the path")
        if path.is_file() or _is_slide_dir(path):
            slides.append(path)
            continue
        found = [p for p in sorted(path.iterdir()) if not p.name.startswith(".") and (p.is_file() or p.is_dir()) and _is_slide_dir(p)]
        if not found:
            raise SlideError("the folder holds no slide napari-hrseg can read", subject=path, hint="pass slide files or a folder of them")
        slides.extend(found)
    return slides


def plan_outputs(slides: Sequence[Path], out: str, fmt: str | None) -> list[Path]:
    """One output path per slide: OUT itself for one slide with a known extension, else ``OUT/<name><ext>``."""
    from ..export import format_from_path
    from ..slide import _display_name

    out_path = Path(out).expanduser()
    is_file = False
    if len(slides) == 1 and not out.endswith(("/", "\\")) and not (out_path.is_dir() and not _has_export_suffix(out_path)):
        try:
            file_fmt = format_from_path(out_path)
            is_file = True
        except HrsegError:
            is_file = False
        if is_file and fmt is not None and file_fmt != fmt:
            raise HrsegError(f"--format {fmt} contradicts the extension of {out_path.name}", subject="--out")
    if is_file:
        return [out_path]
    if out_path.exists() and not out_path.is_dir():
        raise HrsegError("is a file, but several slides need an output folder", subject=out_path, hint="give a folder as --out")
    suffix = _FORMAT_SUFFIX[fmt or "ome-zarr"]
    outputs = [out_path / f"{_display_name(s)}.labels{suffix}" for s in slides]
    seen: dict[Path, Path] = {}
    for s, o in zip(slides, outputs):
        if o in seen:
            raise HrsegError(f"{seen[o]} and {s} would both be written to {o}", subject="--out", hint="segment them into different folders")
        seen[o] = s
    return outputs


def _has_export_suffix(path: Path) -> bool:
    name = path.name.lower()
    return any(name.endswith(s) for s in (".zarr", ".tif", ".tiff", ".geojson", ".json"))


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..geometry import Region
    from ..inference.distributed import make_client
    from ..inference.types import Started, TileDone
    from ..inference.wholeslide import SegmentOptions, SlideDone, SlideFailed, segment_slides
    from ..models import load_model

    slides = expand_inputs(args.inputs)
    outputs = plan_outputs(slides, args.out, args.format)
    region = Region.parse(args.region) if args.region else None
    model = load_model(args.model)
    options = SegmentOptions(
        tile_size=args.tile_size, batch_size=args.batch_size, device=args.device, autocast=args.autocast,
        keep_probs=args.probs, skip_glass=not args.all_tiles, restart=args.restart, keep_work=args.keep_work,
        overwrite=args.overwrite,
    )
    client = cluster = None
    if args.workers is not None or args.scheduler:
        if not getattr(args, "debug", False):  # dask's own INFO lines would bury the progress bar
            import distributed  # noqa: F401  (its import sets its loggers' levels; override them after)

            for name in ("distributed", "bokeh", "tornado"):
                logging.getLogger(name).setLevel(logging.WARNING)
        client, cluster = make_client(args.workers, args.scheduler)
        workers = len(client.scheduler_info().get("workers", {}))
        log.info("dask: %d workers, dashboard %s", workers, client.dashboard_link)
    bar = tqdm(total=0, unit="tile", disable=args.no_progress or None, dynamic_ncols=True)
    failures: list[tuple[str, Exception]] = []
    keep_going = len(slides) > 1 and not args.fail_fast
    gen = segment_slides(slides, model, outputs, region=region, options=options, mpp=args.mpp, client=client, keep_going=keep_going)
    try:
        while True:
            try:
                event = next(gen)
            except StopIteration:
                break
            if isinstance(event, Started):
                bar.total += event.total
                bar.update(event.done)
                if event.done:
                    log.info("%s: resuming, %d of %d tiles already done", event.message, event.done, event.total)
            elif isinstance(event, TileDone):
                bar.set_postfix_str(event.message, refresh=False)
                bar.update(1)
            elif isinstance(event, SlideDone) and event.result is not None:
                r = event.result
                bar.clear()
                where = r.output if r.output is not None else r.work_path
                log.info(
                    "%s -> %s: %d tiles computed, %d resumed, %d glass skipped, %.1f s (%.2f Mpx/s of model grid)",
                    r.name, where, r.tiles_computed, r.tiles_resumed, r.tiles_total - r.tiles_tissue, r.seconds,
                    r.megapixels / max(r.seconds, 1e-9),
                )
                if r.kept_work and r.output is not None:
                    log.info("%s: working store (labels%s) kept at %s", r.name, " and probabilities" if options.keep_probs else "", r.work_path)
            elif isinstance(event, SlideFailed) and event.error is not None:
                failures.append((event.message, event.error))
    except KeyboardInterrupt:
        gen.close()
        bar.close()
        log.warning("interrupted: finished tiles are saved next to the outputs (*.hrseg-work); run the same command again to resume")
        raise
    finally:
        bar.close()
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
    if failures:
        for name, error in failures:
            print(f"napari-hrseg segment: error: {error}", file=sys.stderr)
        print(f"napari-hrseg segment: {len(failures)} of {len(slides)} slides failed; the others were written", file=sys.stderr)
        return 2
    return 0
