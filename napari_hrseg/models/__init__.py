"""Segmentation architectures in plain PyTorch, their registry, and safe weight files.

Attributes are imported lazily (PEP 562) so that ``napari_hrseg.models.config`` and the CLI's argument parsing do
not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Batch": ".base",
    "HrsegModel": ".base",
    "masked_cross_entropy": ".base",
    "to_input_tensor": ".base",
    "IGNORE_INDEX": ".config",
    "ModelConfig": ".config",
    "build_model": ".registry",
    "create_model": ".registry",
    "list_models": ".registry",
    "model_class": ".registry",
    "register_model": ".registry",
    "import_torch_state_dict": ".weights",
    "load_model": ".weights",
    "save_model": ".weights",
    "shipped_models": ".weights",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    try:
        module = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
