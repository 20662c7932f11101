"""Saving and loading model versions: ``config.json`` + ``model.safetensors``; never a pickle.

A model directory holds exactly those two files.  Loading parses the config (plain JSON), builds the
architecture from the registry, and reads tensors with safetensors, which cannot execute code.  Foreign
PyTorch checkpoints can be imported with :func:`import_torch_state_dict`, which uses
``torch.load(weights_only=True)``: a file that needs anything beyond tensors and plain containers is refused.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

import torch

from ..errors import ModelError, UnsafeCheckpointError
from .base import HrsegModel
from .config import CONFIG_FILE, WEIGHTS_FILE, ModelConfig
from .registry import build_model

__all__ = [
    "WEIGHTS_FILE",
    "save_model",
    "load_model",
    "load_state_dict_safely",
    "import_torch_state_dict",
    "shipped_models",
    "shipped_model_dir",
]

log = logging.getLogger(__name__)



def save_model(model: HrsegModel, directory: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``directory`` atomically.

    Both files are written into a temporary sibling directory that is renamed into place, so an
    interrupted save never leaves a directory that looks like a complete model.

    Parameters
    ----------
    model : HrsegModel
    directory : str or Path
    dtype : torch.dtype, optional
        Store floating-point tensors in this type (``torch.float16`` halves the file: the shipped models);
        integer tensors (batch-norm counters, ...) are kept as they are.  `load_model` casts them back to the
        model's own float32 parameters, so a half-precision file loads transparently.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    # mkdtemp makes a private (0700) directory; a model directory is meant to be shared like any other file.
    # (Reading the umask would need os.umask, which is process-global and races with other threads.)
    os.chmod(tmp, 0o755)
    try:
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        metadata = {"arch": model.config.arch, "version": model.config.version}
        if dtype is not None:
            metadata["stored_dtype"] = str(dtype).removeprefix("torch.")
        save_file(state, str(tmp / WEIGHTS_FILE), metadata=metadata)
        model.config.save(tmp)
        for written in tmp.iterdir():  # safetensors writes its file 0600; weights are meant to be shared too
            os.chmod(written, 0o644)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


def load_state_dict_safely(path: str | Path) -> dict[str, torch.Tensor]:
    """Read tensors from a safetensors file; anything else (a pickle, a zip checkpoint) is refused."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        return load_file(str(path), device="cpu")
    except FileNotFoundError as exc:
        raise ModelError("weights file not found", subject=path) from exc
    except (SafetensorError, ValueError, OSError) as exc:
        raise UnsafeCheckpointError(
            f"not a valid safetensors file ({exc})",
            subject=path,
            hint="napari-hrseg never unpickles weights; convert checkpoints with import_torch_state_dict",
        ) from exc


def load_model(source: str | Path, *, device: str | torch.device = "cpu") -> HrsegModel:
    """Load a model version in eval mode.

    Parameters
    ----------
    source : str or Path
        A model directory, or the name of a shipped model (``"tissue"``, ``"glands"``, ``"nuclei"``, ...).
    device : str or torch.device
        Where to put the weights.
    """
    directory = Path(source)
    if not directory.exists():
        shipped = shipped_model_dir(str(source))
        if shipped is None:
            names = ", ".join(shipped_models()) or "none"
            raise ModelError("no model directory or shipped model of that name", subject=source, hint=f"shipped models: {names}")
        directory = shipped
    config = ModelConfig.load(directory)
    model = build_model(config)
    state = load_state_dict_safely(directory / WEIGHTS_FILE)
    hint = "config.json and model.safetensors must come from the same save"
    current = model.state_dict()
    wrong_shape = sorted(k for k, v in state.items() if k in current and tuple(current[k].shape) != tuple(v.shape))
    if wrong_shape:
        k = wrong_shape[0]
        raise ModelError(
            f"weights do not match the architecture ({len(wrong_shape)} tensors of another shape, e.g. {k} "
            f"{tuple(state[k].shape)} where the config builds {tuple(current[k].shape)})",
            subject=directory,
            hint=hint,
        )
    # A half-precision file (shipped models) loads into the float32 model: load_state_dict copies with a cast.
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelError(
            f"weights do not match the architecture (missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})",
            subject=directory,
            hint=hint,
        )
    return model.to(device).eval()


def import_torch_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a foreign ``.pt``/``.pth`` state dict without executing code (``weights_only=True``)."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise ModelError("checkpoint not found", subject=path) from exc
    except Exception as exc:  # pickle.UnpicklingError and friends: the file wants to run code
        raise UnsafeCheckpointError(
            f"refused to load: the checkpoint needs code execution to unpickle ({type(exc).__name__})",
            subject=path,
            hint="export a plain state_dict of tensors (or safetensors) from a trusted environment",
        ) from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError("the checkpoint is not a state dict of tensors", subject=path)
    return obj


def _shipped_root() -> Path:
    return Path(str(resources.files("napari_hrseg"))) / "weights"


def shipped_models() -> list[str]:
    """Names of the model versions shipped inside the package."""
    root = _shipped_root()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / CONFIG_FILE).is_file())


def shipped_model_dir(name: str) -> Path | None:
    """Directory of a shipped model, or None."""
    d = _shipped_root() / name
    return d if (d / CONFIG_FILE).is_file() else None


def state_fingerprint(model: HrsegModel) -> str:
    """Short hash of the weights (to tell versions apart in lineage and exports)."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]
