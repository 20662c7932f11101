"""Architecture registry: ``register_model`` / ``create_model`` / ``list_models`` (timm's pattern).

The decorator only records the class; it has no side effects, so importing a model module is cheap.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Callable, TypeVar

from ..errors import ModelError, UnknownModelError
from .base import HrsegModel
from .config import ModelConfig

__all__ = ["register_model", "create_model", "list_models", "model_class", "build_model"]

_REGISTRY: dict[str, type[HrsegModel]] = {}
M = TypeVar("M", bound=type[HrsegModel])


def register_model(name: str) -> Callable[[M], M]:
    """Class decorator registering an `HrsegModel` subclass under ``name``."""

    def decorate(cls: M) -> M:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ModelError(f"architecture {name!r} is registered twice", hint="pick another name")
        if not issubclass(cls, HrsegModel):
            raise ModelError(f"{cls.__name__} is not an HrsegModel", subject=name)
        cls.arch_name = name  # type: ignore[attr-defined]
        _REGISTRY[name] = cls
        return cls

    return decorate


def _ensure_builtin_models() -> None:
    from . import architectures  # noqa: F401  (registers the built-in architectures)


def list_models() -> list[str]:
    """Names of every registered architecture, sorted."""
    _ensure_builtin_models()
    return sorted(_REGISTRY)


def model_class(name: str) -> type[HrsegModel]:
    """The class registered under ``name``; raises `UnknownModelError` listing the known names."""
    _ensure_builtin_models()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {name!r}", hint=f"known: {', '.join(sorted(_REGISTRY))}"
        ) from None


def create_model(name: str, /, **config: Any) -> HrsegModel:
    """Build a freshly initialised model.

    Parameters
    ----------
    name : str
        Registered architecture name (positional-only, so ``name=`` can set ``ModelConfig.name``).
    **config
        `ModelConfig` fields (``num_classes``, ``class_names``, ``mpp``, ...) and architecture
        hyper-parameters (anything else, e.g. ``widths=(16, 32, 64, 128)``), which go to ``config.params``.

    Raises
    ------
    UnknownModelError
        For an unregistered name.
    ModelError
        For a hyper-parameter the architecture does not have.
    """
    cls = model_class(name)
    config_fields = {f.name for f in fields(ModelConfig)} - {"arch", "params"}
    cfg_kwargs = {k: v for k, v in config.items() if k in config_fields}
    params = dict(config.get("params", {}))
    params.update({k: v for k, v in config.items() if k not in config_fields and k != "params"})
    cfg_kwargs.setdefault("task", cls.task)
    return build_model(ModelConfig(arch=name, params=params, **cfg_kwargs))


def build_model(config: ModelConfig) -> HrsegModel:
    """Build the architecture a config names, with its hyper-parameters (weights freshly initialised)."""
    cls = model_class(config.arch)
    unknown = sorted(set(config.params) - set(cls.default_params))
    if unknown:
        raise ModelError(
            f"unknown hyper-parameters {unknown}",
            subject=config.arch,
            hint=f"{config.arch} takes: {', '.join(sorted(cls.default_params)) or 'none'}",
        )
    return cls(config)
