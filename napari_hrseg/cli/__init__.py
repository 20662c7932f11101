"""``napari-hrseg`` command line: one module per subcommand, each with ``add_parser`` and ``run``.

Every `HrsegError` ends as one line on stderr and exit status 2 (no traceback); ``--debug`` shows the
traceback.  Ctrl-C exits with 130 after the command has cleaned up.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

from ..errors import HrsegError

__all__ = ["main", "build_parser"]

# Subcommand modules, in the order `--help` lists them (each module's add_parser names its command).
_COMMANDS = ("view", "info", "segment", "train", "export", "annotations")

log = logging.getLogger("napari_hrseg")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="napari-hrseg",
        description="Open, segment, correct and export gigapixel pathology slides.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in _COMMANDS:
        importlib.import_module(f".{name}", __name__).add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s" if args.debug else "%(message)s",
    )
    try:
        return int(args.run(args) or 0)
    except HrsegError as exc:
        if args.debug:
            raise
        print(f"napari-hrseg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"napari-hrseg {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
