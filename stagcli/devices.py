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


_side_streams: dict = {}


def _compiling() -> bool:
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)  # torch >= 2.3
    if is_compiling is None:
        from torch._dynamo import is_compiling
    return is_compiling()


def run_concurrently(side, main, device: torch.device):
    """(side(), main()) for two chains of work that do not depend on each other. On CUDA `side` runs
    on a second stream forked from the current one and joined back before returning, so the GPU
    overlaps the two chains' kernels (a CUDA graph captured around this keeps both branches); on
    other devices, and while torch.compile traces (it does not follow stream switches), one after
    the other. Tensors `side` reads must stay referenced until this returns (the caller's locals)."""
    if device.type != "cuda" or _compiling():
        return side(), main()
    current = torch.cuda.current_stream(device)
    key = (device.index if device.index is not None else torch.cuda.current_device())
    stream = _side_streams.get(key)
    if stream is None:
        stream = _side_streams[key] = torch.cuda.Stream(device)
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        first = side()
    second = main()
    current.wait_stream(stream)
    return first, second
