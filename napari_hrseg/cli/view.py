"""``napari-hrseg view [PATH]``: napari with a slide and the napari-hrseg panels docked.

Without PATH the virtual 100,000 x 100,000 slide opens (rendered lazily, nothing on disk), with its ground truth as
hidden layers.  The slide is opened (metadata only) before napari starts, so a bad path ends in one line and exit
status 2, not in a window.

Where labels go: ``--labels DIR`` (or ``$HRSEG_LABELS_DIR``) puts every label store under DIR; by default a
slide's store lives beside it (``<slide>.hrseg/<model>.hrseg-labels``) when its folder is writable, else -- and
for the virtual slide -- in the per-user data directory (``napari-hrseg`` under the platform's data folder, or
``$HRSEG_DATA_DIR``).  See `napari_hrseg._widgets._workspace`.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import napari

__all__ = ["add_parser", "run", "open_view", "configure_for_gui"]

log = logging.getLogger(__name__)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "view",
        help="open napari with a slide and the napari-hrseg panels",
        description="Open napari with a slide (default: the virtual 100,000 x 100,000 slide) and the Segment, "
                    "Review, Improve model and Export panels docked. Shortcuts: Shift-S segment the view, "
                    "Shift-R mark it reviewed, Shift-N next region to review.",
    )
    parser.add_argument("path", nargs="?", help="slide file or folder (default: the virtual slide)")
    parser.add_argument("--mpp", type=float, help="level-0 pixel size in µm, for files that do not state it")
    parser.add_argument("--model", help="shipped model name (tissue, glands, glands-hmsa, nuclei, tissue-hmsa, "
                                         "tissue-glnet) or a model folder")
    parser.add_argument("--method", help="inference method: auto, sliding_window, global, magnet, magnet_fast, "
                                         "hms_attention, glnet, instances (default auto)")
    parser.add_argument("--labels", type=Path, help="folder for label stores (default: beside the slide, or the "
                                                     "per-user data folder)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the virtual slide (default 0)")
    parser.add_argument("--live", action="store_true", help="re-segment whenever the view settles")
    parser.set_defaults(run=run)
    return parser


def _slide_layers(path: str | None, mpp: float | None, seed: int) -> list:
    """Layer data of the slide (opened here, before any window exists, so errors are one line)."""
    from .._sample_data import virtual_slide_layers
    from ..slide import open_slide
    from ..virtual import virtual_slide

    if path is None:
        return virtual_slide_layers(virtual_slide(seed=seed))
    slide = open_slide(Path(path), mpp=mpp)
    return [(slide.as_layer_data(), slide.layer_kwargs(), "image")]


def open_view(viewer: "napari.Viewer", path: str | None = None, *, mpp: float | None = None,
              model: str | None = None, method: str | None = None, seed: int = 0, live: bool = False) -> dict:
    """Put a slide and the panels in ``viewer`` (what ``napari-hrseg view`` does, minus starting Qt's loop).

    Returns
    -------
    dict
        ``{title: panel}`` of the docked panels.
    """
    from .._widgets import dock_panels
    from .._widgets._catalog import method_by_key
    from .._widgets._session import AppSession

    session = AppSession.for_viewer(viewer)
    if model is not None:  # before the panels fill their lists
        directory = Path(model).expanduser()
        if directory.is_dir():
            session.controller.load_directory(directory)
        else:
            from .._widgets._catalog import SHIPPED_HINT
            from ..errors import ModelError

            entry = session.controller.catalog.latest(model)
            if entry is None:
                raise ModelError("no model folder or shipped model of that name", subject=model, hint=SHIPPED_HINT)
            session.controller.set_active(entry.label)
    if method is not None:
        session.controller.method = method_by_key(method).key
    for data, kwargs, kind in _slide_layers(path, mpp, seed):
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    panels = dock_panels(viewer)
    viewer.reset_view()
    if live:
        panels["Segment"].live_check.setChecked(True)
    return panels


def _check_model(model: str) -> None:
    """Refuse a model that is neither a model folder nor a shipped model, before a window opens."""
    from .._widgets._catalog import SHIPPED_HINT
    from ..errors import ModelError
    from ..models.config import ModelConfig
    from ..models.weights import shipped_models

    directory = Path(model).expanduser()
    if directory.is_dir():
        ModelConfig.load(directory)
    elif model not in shipped_models():
        raise ModelError("no model folder or shipped model of that name", subject=model, hint=SHIPPED_HINT)


def configure_for_gui() -> None:
    """Process settings that keep the window responsive while workers compute (the standalone app only; the
    plugin inside someone else's napari leaves the process alone):

    - torch uses all cores but one, so the GUI thread always finds a free core;
    - a 1 ms GIL switch interval (Python's default is 5 ms): the GUI thread waits less for the GIL behind a worker;
    - napari's asynchronous slicing (``NAPARI_ASYNC=1``, unless set): slide tiles load in napari's own thread,
      so panning the procedural virtual slide (about 0.2 s of CPU per tile) does not freeze the window.
    """
    import sys

    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
    sys.setswitchinterval(0.001)
    os.environ.setdefault("NAPARI_ASYNC", "1")


def run(args: argparse.Namespace) -> int:
    layers = _slide_layers(args.path, args.mpp, args.seed)  # fail fast, before a window opens
    del layers
    if args.model is not None:
        _check_model(args.model)
    if args.labels is not None:
        os.environ["HRSEG_LABELS_DIR"] = str(args.labels.expanduser().resolve())
    configure_for_gui()
    import napari

    viewer = napari.Viewer(title="napari-hrseg")
    open_view(viewer, args.path, mpp=args.mpp, model=args.model, method=args.method, seed=args.seed, live=args.live)
    napari.run()
    return 0
