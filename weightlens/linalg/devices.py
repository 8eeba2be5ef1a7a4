"""Devices and the CUDA SVD driver table (see :mod:`weightlens.linalg.backend` for how they are used).

:func:`resolve_device` turns ``"auto" | "cpu" | "cuda" | "cuda:N"`` into a ``torch.device``;
:func:`choose_driver` picks the cuSOLVER driver for a matrix shape from :data:`CUDA_DRIVER_TABLE`;
:func:`gesvda_tolerance` is the accuracy bar a ``gesvda`` result must pass; :func:`torch_threads`
sets torch's CPU thread count for a block (LAPACK's last bits depend on it) and :func:`available_cores`
says how many cores this process may use; :func:`available_memory` how many bytes it may still allocate.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from weightlens.errors import InvalidParameterError

__all__ = ["CUDA_DRIVER_TABLE", "GESVDA_RTOL_FACTOR", "available_cores", "available_memory", "cgroup_cpu_quota",
           "choose_driver",
           "gesvda_tolerance", "resolve_device", "torch_threads", "warn_if_oversubscribed"]

#: OpenMP settings that say how waiting threads behave; with any of them set, the user has chosen.
_WAIT_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
_contention_warned = False
_contention_next_check = 0.0

_CPU = torch.device("cpu")

#: CUDA driver per shape, rows ``(smallest min(m, n), driver)``; the first row whose threshold
#: ``min(m, n)`` reaches wins, so keep thresholds descending. ``None`` = torch's default (Jacobi
#: with torch's fallback to gesvd; ``gesvdjBatched`` for <= 32x32). The thresholds and their H100
#: figures are in :mod:`weightlens.linalg.backend`; benchmarks/RESULTS.md has no CUDA timings yet.
#: gesvda results are always verified (see that module's docstring).
CUDA_DRIVER_TABLE: tuple[tuple[int, str | None], ...] = (
    (256, "gesvda"),
    (0, None),
)

#: gesvda is accepted when its probe residuals are below ``factor * sqrt(max(m, n)) * eps``.
GESVDA_RTOL_FACTOR: float = 100.0


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turn ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a ``torch.device`` into a device.

    Parameters
    ----------
    device : str or torch.device, default="auto"
        ``"auto"`` is CUDA (the current GPU) when available, else the CPU.

    Returns
    -------
    torch.device
        ``cpu`` or ``cuda:<index>`` (always with an index, so equal devices compare equal).

    Raises
    ------
    InvalidParameterError
        CUDA requested where it is not available, an index past the last GPU, or another device.
    """
    if isinstance(device, str) and device.strip().lower() == "auto":
        return _current_cuda() if torch.cuda.is_available() else _CPU
    dev = _parse_device(device)
    if dev.type == "cpu":
        return _CPU
    if dev.type != "cuda":
        raise InvalidParameterError(
            f"The 'device' parameter must be 'auto', 'cpu' or 'cuda[:index]'. Got {device!r} "
            f"instead; weightlens decomposes on CPU or CUDA only."
        )
    if not torch.cuda.is_available():
        raise InvalidParameterError(
            f"device={device!r} was requested but CUDA is not available here (torch "
            f"{torch.__version__}, CUDA build: {torch.version.cuda or 'none'}). Pass device='cpu', "
            f"or device='auto' to use a GPU only when one is present."
        )
    index = torch.cuda.current_device() if dev.index is None else dev.index
    count = torch.cuda.device_count()
    if index >= count:
        raise InvalidParameterError(
            f"device={device!r} was requested but only {count} CUDA device(s) exist "
            f"(indices 0..{count - 1})."
        )
    return torch.device("cuda", index)


def _parse_device(device: object) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if isinstance(device, str):
        try:
            return torch.device(device.strip())
        except RuntimeError as exc:
            raise InvalidParameterError(
                f"The 'device' parameter must be 'auto', 'cpu' or 'cuda[:index]'. Got {device!r} "
                f"instead ({exc})."
            ) from None
    raise InvalidParameterError(
        f"The 'device' parameter must be a str or torch.device. Got {type(device).__name__} "
        f"{device!r} instead."
    )


def _current_cuda() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


def choose_driver(shape: tuple[int, int], device: torch.device) -> str | None:
    """cuSOLVER driver for an ``(m, n)`` matrix on ``device`` (``None`` on the CPU).

    Looks ``min(m, n)`` up in :data:`CUDA_DRIVER_TABLE` (the one table to retune). ``None`` means
    torch's default driver. Also ``None`` when torch prefers MAGMA, which takes no driver.

    Parameters
    ----------
    shape : tuple of int
        ``(m, n)``; longer shapes use their last two entries.
    device : torch.device
        The compute device.

    Returns
    -------
    str or None
        ``"gesvd"``, ``"gesvdj"``, ``"gesvda"`` or ``None``.
    """
    if torch.device(device).type != "cuda" or _magma_preferred():
        return None
    side = min(int(shape[-2]), int(shape[-1]))
    for threshold, driver in CUDA_DRIVER_TABLE:
        if side >= threshold:
            return driver
    return None


def _magma_preferred() -> bool:
    try:
        backend = torch.backends.cuda.preferred_linalg_library()
        return backend == torch._C._LinalgBackend.Magma
    except (AttributeError, RuntimeError):
        return False


def gesvda_tolerance(shape: tuple[int, ...], dtype: torch.dtype) -> float:
    """Relative tolerance a gesvda result must meet: ``factor * sqrt(max(m, n)) * eps(dtype)``."""
    side = max(int(shape[-2]), int(shape[-1]), 1)
    return GESVDA_RTOL_FACTOR * math.sqrt(side) * torch.finfo(dtype).eps


def available_cores(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup CPU quota (``docker --cpus``).

    torch's default thread count follows the machine's cores, not a container's quota, and more
    threads than cores make decompositions spin (see :func:`torch_threads`).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota(cgroup_root)
    return max(1, min(cores, int(quota))) if quota is not None else cores


def cgroup_cpu_quota(root: str = "/sys/fs/cgroup") -> float | None:
    """CPUs granted by the cgroup quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), or None if unlimited."""
    def read(*parts: str) -> str | None:
        try:
            with open(os.path.join(root, *parts)) as fh:
                return fh.read().strip()
        except OSError:
            return None

    def ratio(quota: str | None, period: str | None) -> float | None:
        try:
            q, p = int(quota or ""), int(period or "")
        except ValueError:  # "max" (no limit), missing or unreadable
            return None
        return q / p if q > 0 and p > 0 else None

    v2 = read("cpu.max")  # "max 100000" or "<quota> <period>"
    if v2 is not None:
        quota, _, period = v2.partition(" ")
        return ratio(quota, period)
    return ratio(read("cpu", "cpu.cfs_quota_us"), read("cpu", "cpu.cfs_period_us"))


def available_memory(root: str = "/sys/fs/cgroup", meminfo: str = "/proc/meminfo") -> int | None:
    """Bytes this process may still allocate: the smaller of the system's and its cgroup's, or None.

    The system's is ``MemAvailable`` of ``meminfo`` (else ``os.sysconf`` free pages); the cgroup's
    (v2 ``memory.max``, v1 ``memory.limit_in_bytes``) is its limit minus its usage plus the
    reclaimable page cache (``inactive_file``). None when neither can be read.
    """
    def read(*parts: str) -> str | None:
        try:
            with open(os.path.join(*parts)) as fh:
                return fh.read().strip()
        except OSError:
            return None

    def field(text: str | None, name: str) -> int:
        for line in (text or "").splitlines():  # "MemAvailable:  123 kB" or "inactive_file 123"
            parts = line.replace(":", " ").split()
            if len(parts) >= 2 and parts[0] == name:
                return int(parts[1])
        raise ValueError(name)

    found = []
    try:
        found.append(field(read(meminfo), "MemAvailable") * 1024)  # in kB
    except ValueError:
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            pass
    for limit, usage, stat, cache in (("memory.max", "memory.current", "memory.stat", "inactive_file"),
                                      ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes",
                                       "memory/memory.stat", "total_inactive_file")):
        try:
            cap, used = int(read(root, limit) or ""), int(read(root, usage) or "")
        except ValueError:  # "max" (no limit), missing or unreadable
            continue
        try:
            used -= field(read(root, stat), cache)
        except ValueError:
            pass
        if cap < 2**60:  # v1 writes a huge number for "no limit"
            found.append(max(0, cap - max(0, used)))
        break
    return min(found) if found else None


@contextmanager
def torch_threads(n: int) -> Iterator[int]:
    """Run the block on ``n`` torch intra-op (CPU) threads, then restore the caller's count; yields ``n``.

    The count changes the last bits of LAPACK results, and more threads than cores spin (16 on 2 cores
    made SVDs 270x slower, measured), so callers choose it deliberately.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InvalidParameterError(f"torch_threads needs a positive thread count. Got {n!r} instead.")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


_threads_checked: int | None = None


def warn_if_oversubscribed() -> None:
    """Warn when torch uses more CPU threads than this process may use cores (checked once per count)."""
    global _threads_checked
    threads = torch.get_num_threads()
    if threads == _threads_checked:
        return
    _threads_checked = threads
    cores = available_cores()
    if threads > cores:
        warnings.warn(
            f"torch runs on {threads} CPU threads and this process may use {cores} core(s) (affinity and "
            f"cgroup quota); decompositions then spin and can run 100x slower. Call torch.set_num_threads({cores}).",
            RuntimeWarning, stacklevel=4,
        )
    _warn_if_contended(threads)


def _warn_if_contended(threads: int) -> None:
    """Warn once per process when other processes keep the cores busy (1-minute load average at least the
    cores + 1, looked at every 30 s) while torch's OpenMP threads wait by spinning (no wait setting chosen):
    a 2-thread SVD then ran 5-15x slower here (``docs/scale.md``, "On a shared machine")."""
    global _contention_warned, _contention_next_check
    if _contention_warned or threads < 2 or any(v in os.environ for v in _WAIT_SETTINGS):
        return
    now = time.monotonic()
    if now < _contention_next_check or not hasattr(os, "getloadavg"):
        return
    _contention_next_check = now + 30.0
    load, cores = os.getloadavg()[0], available_cores()
    if load < cores + 1:
        return
    _contention_warned = True
    warnings.warn(
        f"Other processes keep this machine's {cores} core(s) busy (load average {load:.1f}), and torch's "
        f"{threads} OpenMP threads spin while they wait: decompositions can run 5-15x slower. Start Python with "
        "OMP_WAIT_POLICY=PASSIVE (set before torch is imported; GOMP_SPINCOUNT=1000 is a middle way), or call "
        "torch.set_num_threads(1) (the last bits of CPU SVDs depend on the thread count). docs/scale.md says more.",
        RuntimeWarning, stacklevel=5,
    )
