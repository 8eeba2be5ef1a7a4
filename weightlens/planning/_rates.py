"""Rates a plan prices work with: measured on this machine (a small calibration, cached) or recorded for GPUs.

A :class:`Rates` holds five numbers per device: the bytes per second of reading a stored tensor and
forming its fp32 delta, of elementwise fp32 passes, of writing a tensor to a file, the seconds of a
thin fp32 SVD as ``a * m * n * r + c * r^3 + b`` (``r = min(m, n)``), and the flops per second of a matrix
product. :func:`calibrate` measures them in about a second with a few tiny reads, passes, products and SVDs
at five sizes, and keeps them in ``<weightlens home>/calibration.json`` under the machine's
fingerprint (CPU model, usable cores, torch threads, torch version), so later plans read them.
:data:`RECORDED` holds estimates for known GPUs (from the SVD timings in ``docs/plan.md``, not
measured on every card); a CUDA device present here is measured like the CPU.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from weightlens.errors import InvalidParameterError, WeightlensError
from weightlens.io import export
from weightlens.io._atomic import atomic_write_text
from weightlens.linalg import available_cores, resolve_device, svd
from weightlens.taskvectors import TaskVectors

__all__ = ["RECORDED", "Rates", "calibrate", "fingerprint", "measure_method", "method_label"]

#: fit ``a m n r + c r^3 + b`` (``r = min(m, n)``) on these: square and tall, up to a transformer layer's size
_SVD_SIZES = ((96, 96), (192, 192), (384, 256), (512, 512), (1024, 256))
_VERSION = 4  # bump when the measurements change meaning: older entries are measured again


@dataclass(frozen=True)
class Rates:
    """Per-device rates (see the module docstring); ``source`` says where they come from."""

    device: str
    read_bytes_per_s: float
    write_bytes_per_s: float
    elementwise_bytes_per_s: float
    gemm_flops_per_s: float
    svd_a: float  # seconds per unit of m * n * min(m, n)
    svd_b: float  # seconds per call
    run_s: float = 0.0  # seconds of a run's fixed work (an export's folder, card and recipe)
    input_s: float = 0.0  # seconds of a run's work per input checkpoint (opening, its recipe fingerprint)
    source: str = "measured"
    per_element_s: Mapping[str, float] = field(default_factory=dict)  # method -> s per task element
    per_element_bytes: Mapping[str, float] = field(default_factory=dict)  # method -> working bytes per element
    svd_c: float = 0.0  # seconds per unit of min(m, n)^3 (the small SVD after a tall matrix's QR)

    def element_seconds(self, label: str) -> float | None:
        """Seconds per task-vector element of a method's own elementwise work (all its passes), if measured."""
        return self.per_element_s.get(label)

    def svd_seconds(self, m: int, n: int, dtype: torch.dtype = torch.float32) -> float:
        """Estimated seconds of one thin SVD of an ``m x n`` matrix (float64: twice float32's):
        ``a m n r + c r^3 + b`` with ``r = min(m, n)``."""
        scale = 2.0 if dtype == torch.float64 else 1.0
        r = min(m, n)
        return scale * (self.svd_a * m * n * r + self.svd_c * r**3) + self.svd_b

    def gemm_seconds(self, m: int, k: int, n: int) -> float:
        """Estimated seconds of an ``(m, k) @ (k, n)`` product."""
        return 2.0 * m * k * n / self.gemm_flops_per_s


#: Recorded estimates for known GPUs (fp32; SVD with the CUDA driver table's choice): the H100 SVD
#: timings of gesvda (9 ms at 768 x 768, 131 ms at 4096 x 4096), its fp32 matmul peak (~50 Tflop/s
#: reachable), HBM bandwidth for elementwise passes; the H200 is the H100's compute with its faster
#: memory. Host reads and writes are the host's (measured), capped by PCIe (~20 GB/s).
RECORDED: dict[str, Rates] = {
    "H100": Rates("H100", 20e9, 20e9, 1.5e12, 40e12, 1.8e-12, 8e-3, 0.0, 0.0, "recorded estimate"),
    "H200": Rates("H200", 20e9, 20e9, 2.4e12, 45e12, 1.7e-12, 8e-3, 0.0, 0.0, "recorded estimate"),
}


def fingerprint(device: str = "cpu") -> str:
    """What the measured rates depend on: device model, usable cores, torch threads, torch version."""
    if device.startswith("cuda"):
        model = torch.cuda.get_device_name(torch.device(device))
    else:
        model = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as fh:
                model = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), model)
        except OSError:
            pass
    return f"{device}|{model}|cores={available_cores()}|threads={torch.get_num_threads()}|torch={torch.__version__}"


def _typical(fn: Callable[[], object], sync: Callable[[], None], repeat: int = 3) -> float:
    """The median of ``repeat`` timed calls after one untimed call (first-call set-up is not a rate; the
    median, not the minimum, because a long run meets the machine's usual load, not its best moment)."""
    fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return max(sorted(times)[len(times) // 2], 1e-9)


def _measure(device: torch.device) -> Rates:
    """Time a few tiny operations on ``device`` and fit the SVD model (least squares in relative error)."""
    from safetensors.torch import save_file

    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    g = torch.Generator().manual_seed(0)
    n_bytes = 8 * 2**20
    x = torch.randn(n_bytes // 8, 2, generator=g)
    with tempfile.TemporaryDirectory(prefix="wl-calibrate-") as tmp:
        save_file({"w": torch.zeros_like(x)}, str(Path(tmp) / "base.safetensors"))
        save_file({"w": x}, str(Path(tmp) / "ft.safetensors"))
        tv = TaskVectors(Path(tmp) / "base.safetensors", {"a": Path(tmp) / "ft.safetensors"})
        read = _typical(lambda: tv.delta("a", "w").to(device), sync)  # two stored tensors per delta
        outs = iter(range(40))
        write = _typical(lambda: export({"w": x}, Path(tmp) / f"out{next(outs)}"), sync, 2)
        run, per_input = _fixed_costs(Path(tmp), outs, sync)
    y = x.to(device)
    elementwise = _typical(lambda: torch.add(y, y, alpha=0.5).mul_(2.0), sync)
    a = torch.randn(384, 384, generator=g).to(device)
    gemm = _typical(lambda: a @ a, sync)
    mats = [torch.randn(m, n, generator=g) for m, n in _SVD_SIZES]
    times = [_typical(lambda m=m: svd(m, device=device), sync, 3) for m in mats]
    svd_a, svd_c, svd_b = _fit_svd(times)
    return Rates(
        device=str(device), read_bytes_per_s=2 * n_bytes / read, write_bytes_per_s=n_bytes / max(write - run, 1e-9),
        elementwise_bytes_per_s=3 * n_bytes / elementwise, gemm_flops_per_s=2 * 384**3 / gemm,
        svd_a=svd_a, svd_b=svd_b, svd_c=svd_c, run_s=run, input_s=per_input,
        source=f"measured {time.strftime('%Y-%m-%d')}",
    )


def _fit_svd(times: Sequence[float]) -> tuple[float, float, float]:
    """``(a, c, b)`` of ``a m n r + c r^3 + b`` for the SVD timings of :data:`_SVD_SIZES`, non-negative, least
    squares in relative error. One ``m n r`` rate alone, fitted on small squares, priced a 4096 x 512 SVD at
    3.4x its time (its QR first, then a 512 x 512 problem: cheaper per ``m n r`` than a square)."""
    from scipy.optimize import nnls

    rows = [[m * n * min(m, n) / t, min(m, n) ** 3 / t, 1.0 / t] for (m, n), t in zip(_SVD_SIZES, times)]
    coef, _ = nnls(np.array(rows), np.ones(len(rows)))
    a, c, b = (float(v) for v in coef)
    (m, n), t = _SVD_SIZES[-1], times[-1]
    if a * m * n * min(m, n) + c * min(m, n) ** 3 < 0.1 * t:  # times that do not grow with size (noise) would
        a, c, b = t / (m * n * min(m, n)), 0.0, 0.0  # price every SVD at a constant: a line through the largest
    return a, c, b


def _fixed_costs(tmp: Path, outs: Any, sync: Callable[[], None]) -> tuple[float, float]:
    """``(per run, per input)`` seconds of a merge and export of tiny checkpoint files: what a run costs
    besides its tensors (opening the inputs, fingerprinting them for the recipe, the card, the folder)."""
    from safetensors.torch import save_file

    from weightlens.merge import merge

    paths = []
    for i in range(3):
        paths.append(tmp / f"tiny{i}.safetensors")
        save_file({"w": torch.full((2,), float(i))}, str(paths[-1]))

    def run(n: int) -> None:
        tv = TaskVectors(paths[0], {f"t{i}": p for i, p in enumerate(paths[1:n + 1])})
        export(merge(tv, method="task_arithmetic", progress=False), tmp / f"out{next(outs)}", progress=False)

    one, two = _typical(lambda: run(1), sync), _typical(lambda: run(2), sync)
    per_input = max(two - one, 0.0)
    return max(one - 2 * per_input, 0.0), per_input


def _cache_file() -> Path:
    from weightlens.zoo._common import home

    return home() / "calibration.json"


def method_label(method: str, params: Mapping[str, Any]) -> str:
    """How a method's measured cost is filed: its name and parameters other than ``alpha``."""
    inner = ", ".join(f"{k}={v!r}" for k, v in sorted(params.items()) if k != "alpha")
    return f"{method}({inner})"


def _status(field_name: str) -> int:
    """A ``/proc/self/status`` field in bytes (0 where unknown)."""
    try:
        with open("/proc/self/status") as fh:
            return next((int(ln.split()[1]) * 1024 for ln in fh if ln.startswith(field_name + ":")), 0)
    except OSError:
        return 0


def _trim() -> None:
    """Hand freed heap memory back to the system (glibc ``malloc_trim``), so a peak measured next is growth."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> bool:
    """Reset this process' peak resident set (Linux ``clear_refs`` 5); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def measure_method(method: str, params: Mapping[str, Any], device: torch.device, n: int = 2**20,
                   n_tasks: int = 3) -> tuple[float, float]:
    """``(seconds, bytes)`` per task-vector element of ``method``'s own elementwise work and working set:
    a merge and export of ``n_tasks`` in-memory vectors of ``n`` entries (1-D keys: no decomposition), its
    ``prepare`` passes and what its export computes (TIES: the gap to mergekit's per-tensor trim) included,
    the fixed cost of an export taken off. The bytes are the growth of the peak resident set (0 where it
    cannot be read)."""
    from weightlens.merge import merge

    g = torch.Generator().manual_seed(0)
    base = {"v": torch.randn(n, generator=g)}
    fts = {f"t{i}": {"v": base["v"] + 0.01 * torch.randn(n, generator=g)} for i in range(n_tasks)}
    params = {k: v for k, v in params.items() if k != "alpha"}
    tiny = {"v": torch.zeros(2)}
    with tempfile.TemporaryDirectory(prefix="wl-calibrate-") as tmp:
        outs = iter(range(100))

        def run(weights: Any = None) -> None:
            if weights is None:
                weights = merge(TaskVectors(base, fts), method=method, device=device, progress=False, **params)
            export(weights, Path(tmp) / f"o{next(outs)}", progress=False)

        sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        held = 0
        _trim()
        if _reset_peak():  # first: freed blocks of earlier runs would hide the growth
            before = _status("VmRSS")
            run()
            held = max(_status("VmHWM") - before, 0)
        fixed = _typical(lambda: run(tiny), sync)
        seconds = _typical(run, sync)
    return max(seconds - fixed, 0.0) / (n * n_tasks), held / (n * n_tasks)


def calibrate(device: str | torch.device = "cpu", *, path: str | os.PathLike[str] | None = None,
              refresh: bool = False, methods: Sequence[tuple[str, Mapping[str, Any]]] = ()) -> Rates:
    """This machine's rates on ``device``: cached ones for its fingerprint, else measured (~1 s) and cached.

    Parameters
    ----------
    device : str or torch.device, default="cpu"
        ``"cpu"``, ``"cuda"``, ``"auto"``.
    path : path, optional
        The JSON file that keeps calibrations (default ``<weightlens home>/calibration.json``; the home is
        ``$WEIGHTLENS_HOME``, else ``$XDG_CACHE_HOME/weightlens``, else ``~/.cache/weightlens``).
    refresh : bool, default=False
        Measure again even when the file has this machine's rates.
    methods : sequence of (method, params)
        Merge methods whose own elementwise cost to measure too (a merge of in-memory vectors, ~0.1 s
        each), kept in the same file.

    Returns
    -------
    Rates
    """
    dev = resolve_device(device)
    file = Path(path) if path is not None else _cache_file()
    key = f"v{_VERSION}|{fingerprint(str(dev))}"
    try:
        known = json.loads(file.read_text()) if file.exists() else {}
    except (OSError, ValueError):
        known = {}  # an unreadable cache is measured again and rewritten
    if not isinstance(known, dict):
        known = {}
    rates = None
    if not refresh and isinstance(known.get(key), dict):
        try:
            rates = Rates(**known[key])
        except TypeError:
            rates = None
    changed = rates is None
    if rates is None:
        rates = _measure(dev)
    per, held = dict(rates.per_element_s), dict(rates.per_element_bytes)
    for name, params in methods:
        label = method_label(name, params)
        if refresh or label not in per:
            try:
                per[label], held[label] = measure_method(name, params, dev)
            except (WeightlensError, RuntimeError):  # needs more than plain vectors (slerp: one fine-tune)
                continue
            changed = True
    rates = dataclasses.replace(rates, per_element_s=per, per_element_bytes=held)
    if changed:
        known[key] = dataclasses.asdict(rates)
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(file, json.dumps(known, indent=2, sort_keys=True))
        except OSError:
            pass  # a read-only home: the rates are still returned, measured again next time
    return rates


def recorded(name: str) -> Rates:
    """The recorded estimate for GPU ``name`` (a key of :data:`RECORDED`)."""
    if name not in RECORDED:
        raise InvalidParameterError(f"No recorded rates for {name!r}; known: {', '.join(RECORDED)}.")
    return RECORDED[name]
