"""Registry of region pipelines: ``register_pipeline`` / ``get_pipeline`` / ``run_request``.

A pipeline is a function ``pipeline(request, cancel=None) -> PipelineGenerator`` (see `types`).  The viewer
and the command line pick one by ``request.options.method``; phase-2 methods (MagNet, multi-scale attention,
GLNet, instances) register themselves in their own modules, listed in `_BUILTIN_MODULES`.
"""

from __future__ import annotations

import importlib
import logging
from typing import Callable, Protocol

from ..errors import HrsegError
from .types import CancelToken, InferenceRequest, PipelineGenerator

__all__ = ["Pipeline", "register_pipeline", "get_pipeline", "list_pipelines", "run_request"]

log = logging.getLogger(__name__)


class Pipeline(Protocol):
    def __call__(self, request: InferenceRequest, cancel: CancelToken | None = None) -> PipelineGenerator: ...


_PIPELINES: dict[str, Pipeline] = {}

# Modules whose import registers pipelines (a module not written yet is skipped).
_BUILTIN_MODULES = ("single_scale", "magnet", "hms_attention", "glnet", "instances")


def register_pipeline(name: str) -> Callable[[Pipeline], Pipeline]:
    """Decorator registering a pipeline function under ``name``."""

    def decorate(fn: Pipeline) -> Pipeline:
        if name in _PIPELINES and _PIPELINES[name] is not fn:
            raise HrsegError(f"pipeline {name!r} is registered twice", hint="pick another name")
        _PIPELINES[name] = fn
        fn.pipeline_name = name  # type: ignore[attr-defined]
        return fn

    return decorate


def _ensure_builtin_pipelines() -> None:
    for module in _BUILTIN_MODULES:
        try:
            importlib.import_module(f"{__package__}.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__package__}.{module}":
                raise


def list_pipelines() -> list[str]:
    """Registered pipeline names, sorted."""
    _ensure_builtin_pipelines()
    return sorted(_PIPELINES)


def get_pipeline(name: str) -> Pipeline:
    """The pipeline registered as ``name``; `HrsegError` listing the known ones otherwise."""
    _ensure_builtin_pipelines()
    try:
        return _PIPELINES[name]
    except KeyError:
        raise HrsegError(f"unknown inference method {name!r}", subject="method", hint=f"known: {', '.join(sorted(_PIPELINES))}") from None


def run_request(request: InferenceRequest, cancel: CancelToken | None = None) -> PipelineGenerator:
    """Start the pipeline ``request.options.method`` names (a generator; iterate it or `run_to_completion`)."""
    return get_pipeline(request.options.method)(request, cancel)
