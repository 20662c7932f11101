"""Lineage of a model version: where it came from, on what data, with which settings, and how good it was.

Stored in ``ModelConfig.lineage`` (so in ``config.json`` beside the weights)::

    {
      "parent": {"label": "glands@1", "weights": "3f2a9c1b04de"} | null,
      "data": {"fingerprint": "...", "sources": [...], "train": [...], "val": [...], ...},
      "seed": 0,
      "metrics": {"miou": 0.81, ...},          # on the validation split (or the corrections, for fine-tuning)
      "training": {...},                        # steps, config, seconds, device
      "command": "napari-hrseg train ...",
      "created": "2026-03-01T12:00:00Z",
      "software": {"napari_hrseg": "0.1.0", "torch": "2.13.0"}
    }
"""

from __future__ import annotations

import math
import re
import shlex
import sys
import time
from typing import Any, Mapping, Sequence

import torch

from ..models.base import HrsegModel
from ..models.weights import state_fingerprint

__all__ = ["make_lineage", "parent_record", "next_version", "command_line"]


def next_version(version: str) -> str:
    """The version after ``version``: the last number is incremented (``"1"`` -> ``"2"``, ``"1.4"`` -> ``"1.5"``,
    ``"tissue-v2"`` -> ``"tissue-v3"``); a version without a number gets ``".1"`` appended."""
    m = re.search(r"(\d+)(?!.*\d)", version)
    if not m:
        return f"{version}.1" if version else "1"
    return version[: m.start()] + str(int(m.group(1)) + 1) + version[m.end():]


def parent_record(model: HrsegModel | None) -> dict[str, str] | None:
    """``{"label": name@version, "weights": short hash of the weights}`` of the model a new version starts from."""
    if model is None:
        return None
    return {"label": model.config.label, "arch": model.config.arch, "weights": state_fingerprint(model)}


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that ran, shell-quoted (``napari-hrseg train ...`` when run through the CLI)."""
    argv = list(sys.argv if argv is None else argv)
    if argv and argv[0].endswith(("napari-hrseg", "__main__.py")):
        argv[0] = "napari-hrseg"
    return " ".join(shlex.quote(a) for a in argv)


def _clean(metrics: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, float):
            out[k] = round(v, 6) if math.isfinite(v) else None
        else:
            out[k] = v
    return out


def make_lineage(*, parent: HrsegModel | None, data: Mapping[str, Any], seed: int, metrics: Mapping[str, Any],
                 training: Mapping[str, Any] | None = None, command: str | None = None,
                 kind: str = "train") -> dict[str, Any]:
    """Assemble a lineage record (see the module docstring).

    Parameters
    ----------
    parent : HrsegModel, optional
        The model this version was initialised from (None for training from scratch).
    data : mapping
        At least ``{"fingerprint": ...}``; typically also source keys and the split.
    seed : int
        The run's seed.
    metrics : mapping
        Evaluation metrics of the saved weights.
    training : mapping, optional
        Steps, config, timing, device.
    command : str, optional
        Command line; default the current process's.
    kind : str
        ``"train"`` or ``"fine-tune"``.
    """
    from .. import __version__

    return {
        "kind": kind,
        "parent": parent_record(parent),
        "data": dict(data),
        "seed": int(seed),
        "metrics": _clean(metrics),
        "training": dict(training or {}),
        "command": command if command is not None else command_line(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "software": {"napari_hrseg": __version__, "torch": torch.__version__.split("+")[0]},
    }
