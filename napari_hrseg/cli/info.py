"""``napari-hrseg info PATH``: what a slide is, without reading its pixels.

Prints the container, vendor, objective, pixel size, dtype, channels, every level's shape, exact downsample,
pixel size and chunking, and the conversions applied on opening.  ``--metadata`` adds the vendor properties,
``--json`` prints the same as one JSON object.  Only metadata is read, so it answers in well under a second
even for a 100,000-pixel slide.  A broken file ends with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from ..errors import SlideError
from ..slide import Slide, open_slide

__all__ = ["add_parser", "run", "slide_summary"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "info",
        help="print a slide's levels, shapes, dtype, chunking, pixel size and vendor",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("path", type=Path, help="slide file or directory (SVS, TIFF, NDPI, OME-Zarr, DICOM, PNG, ...)")
    parser.add_argument("--mpp", type=float, default=None, help="pixel size in µm to assume when the file states none")
    parser.add_argument("--metadata", action="store_true", help="also print every vendor property")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    if args.mpp is not None and not (math.isfinite(args.mpp) and args.mpp > 0):
        raise SlideError(f"--mpp {args.mpp} must be a positive number of µm per pixel", subject="--mpp")
    try:
        slide = open_slide(args.path, mpp=args.mpp)
    except OSError as exc:  # permissions, I/O errors: still one line, not a traceback
        raise SlideError(f"cannot read: {exc.strerror or exc}", subject=args.path) from exc
    with slide:
        if args.json:
            print(json.dumps(slide_summary(slide, metadata=args.metadata), indent=2, default=str))
        else:
            print(slide.describe())
            if args.metadata:
                print("metadata:")
                for key, value in sorted(slide.metadata.items()):
                    print(f"  {key} = {_short(value)}")
    sys.stdout.flush()
    return 0


def _short(value: Any, limit: int = 200) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def slide_summary(slide: Slide, *, metadata: bool = False) -> dict[str, Any]:
    """A JSON-ready description of ``slide`` (what ``info --json`` prints)."""
    levels = []
    for i, (lev, (dy, dx)) in enumerate(zip(slide.levels, slide.downsamples)):
        levels.append(
            {
                "level": i,
                "shape": [int(s) for s in lev.shape],
                "downsample": [dy, dx],
                "mpp": slide.level_mpp(i),
                "chunks": [int(lev.chunks[0][0]), int(lev.chunks[1][0])],
                "chunk_grid": [len(lev.chunks[0]), len(lev.chunks[1])],
            }
        )
    out: dict[str, Any] = {
        "path": str(slide.path) if slide.path else None,
        "format": slide.format,
        "vendor": slide.vendor,
        "objective_power": slide.objective_power,
        "mpp_yx": list(slide.mpp_yx) if slide.mpp_yx else None,
        "dtype": str(slide.dtype),
        "channels": list(slide.channel_names),
        "levels": levels,
        "conversions": list(slide.conversions),
    }
    if metadata:
        out["metadata"] = {k: v for k, v in slide.metadata.items()}
    return out
