"""What every benchmark shares: the machine and load its header prints, and one timed call (CUDA synchronised)."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable

import torch


def machine(device: torch.device | str | None = None) -> str:
    """The GPU's name when ``device`` is CUDA (or None and CUDA is present), else CPU model, threads, cores."""
    dev = torch.device(device) if device is not None else None
    if (dev is None and torch.cuda.is_available()) or (dev is not None and dev.type == "cuda"):
        return f"{torch.cuda.get_device_name(dev)} (torch {torch.__version__})"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            model = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {model}, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores, torch {torch.__version__}"


def load_average() -> str:
    """The 1-, 5- and 15-minute load averages (other processes skew every timing)."""
    try:
        return ", ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def timed(fn: Callable[[], object], repeat: int = 1) -> tuple[float, object]:
    """Best wall time in seconds of ``repeat`` calls of ``fn`` (CUDA synchronised around each) and the last result."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    best, out = float("inf"), None
    for _ in range(repeat):
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best, out
