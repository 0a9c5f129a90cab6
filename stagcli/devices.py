"""Which device to run on, checked before any slow work, and how to describe the machine."""
from __future__ import annotations

import os
import platform

import torch

from .errors import StagError


def resolve_device(device: str | None = None) -> torch.device:
    """The torch device for a --device value (default: cuda when available, else cpu); a one-line
    StagError for a name torch does not know or a device this machine does not have."""
    if device is None or device == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise StagError(f"--device '{device}' is not a device name (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise StagError(f"--device {device}: this machine has no CUDA GPU (use cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise StagError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type not in ("cpu", "mps", "xpu"):
        raise StagError(f"--device {device}: not supported (cpu or cuda)")
    return dev


def machine(device: torch.device | None = None) -> str:
    """One line naming the hardware a number was measured on."""
    device = device or resolve_device()
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return (f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores, "
            f"{torch.get_num_threads()} threads), torch {torch.__version__}")
