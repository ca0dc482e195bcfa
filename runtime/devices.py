"""The one device and dtype resolver of every application: ``auto`` is CUDA when there is one
(or the caller's own choice: Accelerate's device for the process, a Space's on-demand GPU), and
the dtype ``auto`` is float16 on CUDA, float32 elsewhere. Names are the torch-free
``runtime.presets.DTYPE_NAMES``."""

from __future__ import annotations

import torch

from errors import OptionError
from runtime.presets import DTYPE_NAMES

AUTO = "auto"


def resolve_device(name: str = AUTO, auto: torch.device | str | None = None,
                   check_available: bool = True) -> torch.device:
    """``name`` as a device: ``auto`` is ``auto`` when given, else CUDA if available, else the CPU.
    A CUDA device with no GPU here is an ``OptionError`` (unless ``check_available`` is False: a
    Space's on-demand GPU appears only inside the GPU call)."""
    if name == AUTO:
        return torch.device(auto if auto is not None else "cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise OptionError(f"--device must be auto, cpu, cuda or cuda:N; got {name!r}") from None
    if check_available and device.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"--device {name} asked for, but no CUDA GPU is available")
    return device


def resolve_dtype(name: str | None, device: torch.device | str) -> torch.dtype:
    """``name`` (one of ``DTYPE_NAMES``, or ``auto``/None) as a torch dtype for ``device``."""
    if name in (None, AUTO):
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPE_NAMES:
        raise OptionError(f"--dtype must be auto or one of {', '.join(DTYPE_NAMES)}; got {name!r}")
    return getattr(torch, name)
