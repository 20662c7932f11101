"""Where the model computes: CUDA, Apple MPS or the CPU, and the reduced precision each supports.

``resolve_device("auto")`` picks CUDA, then MPS, then the CPU.  Asking for a device that is not there is an
error, never a silent fall-back: a user who typed ``--device cuda`` on a machine without a working GPU must be
told, not left wondering why a slide takes a day.

Autocast: on CUDA, bfloat16 where the GPU supports it (Ampere and later; same range as float32, so logits
never overflow) else float16; on MPS float16; on the CPU none by default, because float32 convolutions are
faster there than bfloat16 ones on CPUs without AMX, and results stay bit-stable across runs.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import ContextManager

import torch

from ..errors import ModelError

__all__ = ["InferenceDevice", "resolve_device", "available_devices"]

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def available_devices() -> list[str]:
    """Device kinds usable here, best first (``"cpu"`` always last)."""
    kinds = []
    if torch.cuda.is_available():
        kinds.append("cuda")
    if _mps_available():
        kinds.append("mps")
    kinds.append("cpu")
    return kinds


@dataclass(frozen=True)
class InferenceDevice:
    """A torch device and the autocast dtype used on it.

    Parameters
    ----------
    device : torch.device
        Where the model's weights and activations live.
    autocast_dtype : torch.dtype or None
        Reduced precision for the forward pass, or None for float32.
    """

    device: torch.device
    autocast_dtype: torch.dtype | None = None

    @property
    def type(self) -> str:
        return self.device.type

    def autocast(self) -> ContextManager:
        """Context for a forward pass: ``torch.autocast`` with ``autocast_dtype``, or nothing."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def __str__(self) -> str:
        precision = str(self.autocast_dtype).replace("torch.", "") if self.autocast_dtype else "float32"
        return f"{self.device} ({precision})"


def resolve_device(name: str | torch.device = "auto", autocast: str | bool = "auto") -> InferenceDevice:
    """Turn ``--device`` and an autocast choice into an `InferenceDevice`.

    Parameters
    ----------
    name : str or torch.device
        ``"auto"`` (CUDA, else MPS, else CPU), ``"cuda"``, ``"cuda:N"``, ``"mps"`` or ``"cpu"``.
    autocast : str or bool
        ``"auto"`` (see the module docstring), ``False``/``"off"`` for float32, ``True`` for the device's
        preferred reduced dtype, or ``"bfloat16"`` / ``"float16"``.

    Raises
    ------
    ModelError
        For an unknown name, or a device this machine does not have (with what it does have).
    """
    text = str(name).strip().lower() if not isinstance(name, torch.device) else str(name)
    if text == "auto":
        text = available_devices()[0]
    try:
        device = torch.device(text)
    except RuntimeError as exc:
        raise ModelError(
            f"unknown device {name!r}", subject="--device", hint="use auto, cuda, cuda:N, mps or cpu"
        ) from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(
                "CUDA is not available (no NVIDIA GPU, no driver, or a CPU-only torch build)",
                subject="--device cuda",
                hint=f"use --device {available_devices()[0]} or install a CUDA build of torch",
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ModelError(
                f"there is no GPU {device.index}; this machine has {torch.cuda.device_count()}",
                subject=f"--device {text}",
                hint="pick cuda:0 .. cuda:N-1",
            )
    elif device.type == "mps":
        if not _mps_available():
            raise ModelError(
                "Apple MPS is not available (not a Mac with Apple silicon, or torch without MPS)",
                subject="--device mps",
                hint=f"use --device {available_devices()[0]}",
            )
    elif device.type != "cpu":
        raise ModelError(f"device type {device.type!r} is not supported", subject="--device", hint="use auto, cuda, mps or cpu")
    return InferenceDevice(device, _autocast_dtype(device, autocast))


def _autocast_dtype(device: torch.device, autocast: str | bool) -> torch.dtype | None:
    choice = autocast.lower() if isinstance(autocast, str) else autocast
    if choice in (False, "off", "none", "float32", "fp32", "no"):
        return None
    if isinstance(choice, str) and choice in _DTYPES:
        dtype = _DTYPES[choice]
        if device.type == "cpu" and dtype is torch.float16:
            raise ModelError("float16 autocast is not supported on the CPU", subject="--autocast", hint="use bfloat16 or off")
        return dtype
    if choice not in (True, "auto", "on", "yes"):
        raise ModelError(f"unknown autocast choice {autocast!r}", subject="--autocast", hint="use auto, off, bfloat16 or float16")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    # CPU: only when asked explicitly ("on"/True); "auto" keeps float32 (see the module docstring).
    return torch.bfloat16 if choice in (True, "on", "yes") else None
