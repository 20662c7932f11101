"""Segmentation architectures in plain PyTorch, their registry, and safe weight files."""

from .base import Batch, HrsegModel, masked_cross_entropy, to_input_tensor
from .config import IGNORE_INDEX, ModelConfig
from .registry import build_model, create_model, list_models, model_class, register_model
from .weights import import_torch_state_dict, load_model, save_model, shipped_models

__all__ = [
    "Batch",
    "HrsegModel",
    "IGNORE_INDEX",
    "ModelConfig",
    "build_model",
    "create_model",
    "import_torch_state_dict",
    "list_models",
    "load_model",
    "masked_cross_entropy",
    "model_class",
    "register_model",
    "save_model",
    "shipped_models",
    "to_input_tensor",
]
