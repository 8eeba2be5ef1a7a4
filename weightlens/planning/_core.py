"""``plan(tv, method)``: what a merge will read, decompose, hold and take, from headers alone.

The plan describes ``wl.export(wl.merge(tv, method=...), out)`` (what ``weightlens merge`` runs): one
walk over the keys, each key's inputs read once per pass (the merge's pass and the whole-model passes
of the method's ``prepare``, declared on its registration), the decompositions its registration
declares (``decomposes=``) for each 2-D key, the update rebuilt, added to the base and written.
Definitions of every term, and how well it predicts, are in ``docs/plan.md``.

Memory: the merge streams, so the peak is what the process holds now (its resident set), plus what the
decomposition cache gains (the per-task or per-sum factors, bounded by the cache's ``max_bytes``), plus
the working set of the largest key (its stored inputs, the fp32 stack of its task vectors, the base,
update and output, and one decomposition's input, factors and workspace). On a CUDA device the cache
and the decompositions live in device memory, the reads and the stack in host memory.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from weightlens import decompositions
from weightlens.errors import InvalidParameterError, PlanRefusedError, WeightlensError
from weightlens.io._layout import parse_size
from weightlens.linalg import resolve_device, svd_nbytes
from weightlens.linalg.devices import available_memory
from weightlens.merge.registry import MergeMethod, get_method, task_top_k
from weightlens.planning._rates import RECORDED, Rates, calibrate, measure_method, method_label
from weightlens.taskvectors import TaskVectors

__all__ = ["OPTIMISTIC", "Plan", "long_run_plan", "plan"]

#: Rates no machine beats by much: a plan priced with them that stays short needs no calibration.
OPTIMISTIC = Rates("bound", 1e10, 1e10, 2e11, 2e12, 1e-11, 0.0, 0.0, 0.0, "optimistic bound")
_ELEMENTWISE_PASSES = 4  # fp32 passes over the task stack per key (stack, method's own passes, add, cast)


@dataclass(frozen=True)
class _Op:
    """``count`` decompositions ``what`` of an ``m x n`` matrix in ``dtype`` (``k``: the leading triplets of a
    ``topk_svd``, by the float64 Gram eigensolve when ``gram``)."""

    what: str
    m: int
    n: int
    count: int
    dtype: torch.dtype = torch.float32
    k: int = 0
    gram: bool = False

    def text(self) -> str:
        bits = "" if self.dtype == torch.float32 else " fp64"
        top = f" k={self.k}" if self.what == "topk_svd" else ""
        return f"{self.count} x {self.what} {self.m}x{self.n}{top}{bits}"

    def nbytes(self) -> int:
        """Bytes of one result: the thin SVD's factors, or the leading ``k`` triplets'."""
        if self.what != "topk_svd":
            return svd_nbytes((self.m, self.n), self.dtype)
        return (self.m * self.k + self.k + self.k * self.n) * _itemsize(self.dtype)


@dataclass(frozen=True)
class _KeyWork:
    key: str
    kind: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    read_bytes: int  # one pass: the base's and every task's stored bytes
    extra_read_bytes: int  # the decompositions' own reads (each task's delta: the base again, the task)
    out_bytes: int
    numel: int
    ops: tuple[_Op, ...]
    rebuild_flops: float  # the update rebuilt from its factors
    cached_bytes: int  # what the decomposition cache gains
    host_bytes: int  # working set in host memory
    device_bytes: int  # working set of the decompositions (host memory on the CPU)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _stored_bytes(tv: TaskVectors, task: str, key: str) -> int:
    """Bytes task ``task`` reads for ``key``: its factors for a LoRA key, else its stored tensor."""
    f = tv.factors(task, key)
    if f is not None:
        return int(f.A.numel() * f.A.element_size() + f.B.numel() * f.B.element_size())
    ckpt = tv.finetuned[task]
    own = getattr(tv, "_own", {}).get(task, {}).get(key, key)
    full = getattr(ckpt, "full_keys", None)
    own = full.get(own, own) if isinstance(full, Mapping) else own
    try:
        info = ckpt.info(own)
    except KeyError:  # an adapter's untouched key (KeyMismatchError): nothing is read, the delta is zero
        return 0
    return math.prod(info.shape) * _itemsize(info.dtype)


def _ops(spec: MergeMethod, m: int, n: int, T: int, cached: tuple[int, int], device: torch.device) -> tuple[_Op, ...]:
    """The decompositions of one ``m x n`` key on ``device``; ``cached``: how many of the task decompositions
    the method reads, and whether the sum's SVD, ``tv.cache`` holds."""
    r, k = min(m, n), task_top_k((m, n), T)
    if device.type == "cpu":  # MergeContext.task_top: the leading k alone
        tops = (_Op("topk_svd", m, n, T - cached[0], k=k, gram=True),) if k else ()
    else:  # sliced from each task's full SVD
        tops = (_Op("svd", m, n, T - cached[0]),)
    table = {
        "tasks": (_Op("svd", m, n, T - cached[0]),),
        "task_tops": tops,
        "residuals": (_Op("svd", m, n, T),),
        "sum": (_Op("svd", m, n, 1 - cached[1]),),
        "polar": (_Op("polar", m, r, 1), _Op("polar", n, r, 1)),
        "concat": (_Op("svd", m, T * n, 1, torch.float64),),
    }
    return tuple(op for what in spec.decomposes for op in table[what] if op.count > 0)


def _cached(tv: TaskVectors, key: str, spec: MergeMethod, device: torch.device) -> tuple[int, int]:
    """How many of ``key``'s task decompositions the method reads (SVDs; TSV-M's leading triplets on the CPU),
    and whether its sum's SVD, are in ``tv.cache`` already (fp32, on ``device``; the keys of
    :mod:`weightlens.decompositions`): a merge reuses them."""
    if "task_tops" in spec.decomposes and device.type == "cpu":
        op: tuple[Any, ...] = ("topk_svd_eigh", task_top_k(tv.shape(key), len(tv)))
    else:
        op = ("svd",)
    tasks = sum(decompositions.is_cached(tv, key, t, *op, device=device) for t in tv.names)
    return tasks, int(decompositions.is_cached(tv, key, tv.names, "svd", device=device))


def _decomposition_bytes(op: _Op) -> int:
    """Working bytes of one thin SVD (or polar factor) of ``op``: the copy LAPACK overwrites, the factors, and
    ``gesdd``'s workspace, about four ``r x r`` matrices (its bidiagonal solve and the small factors). A Gram
    eigensolve: the float64 copy, its ``r x r`` Gram matrix and eigenvectors, the float64 leading vectors."""
    r, size = min(op.m, op.n), _itemsize(op.dtype)
    if op.gram:
        return 8 * (op.m * op.n + 2 * r * r + max(op.m, op.n) * op.k) + op.nbytes()
    return op.m * op.n * size + svd_nbytes((op.m, op.n), op.dtype) + 4 * r * r * size


def _key_work(tv: TaskVectors, key: str, spec: MergeMethod, device: torch.device) -> _KeyWork:
    shape, T = tuple(tv.shape(key)), len(tv)
    dtype = tv.base.dtype(key)
    numel = math.prod(shape)
    base_bytes = numel * _itemsize(dtype)
    tasks = sum(_stored_bytes(tv, t, key) for t in tv.names)
    read = base_bytes + tasks
    ops: tuple[_Op, ...] = ()
    rebuild = 0.0
    cached = decomp = extra = 0
    if tv.kind(key) == "matrix" and spec.decomposes:
        m, n = shape
        have = _cached(tv, key, spec, device)
        ops = _ops(spec, m, n, T, have, device)
        every = T * base_bytes + tasks  # each task's delta read once: the base again per task, the task
        uncached = every * (T - have[0]) // T  # the tasks whose decompositions are not cached read again
        per = {"tasks": uncached, "task_tops": uncached, "residuals": every, "sum": every * (1 - have[1])}
        extra = sum(per.get(what, 0) for what in spec.decomposes)
        rebuild = 2.0 * m * n * min(m, n)
        cached = sum(op.count * op.nbytes() for op in ops if op.what in ("svd", "topk_svd"))  # polar: not kept
        decomp = max((_decomposition_bytes(op) for op in ops), default=0)
    host = read + (T + 4) * numel * 4  # stored inputs, fp32 stack, base, update, output
    return _KeyWork(key, tv.kind(key), shape, dtype, read, extra, base_bytes, numel, ops, rebuild, cached, host, decomp)


def _seconds(w: _KeyWork, rates: Rates, passes: int, T: int, per_element: float | None) -> float:
    s = (passes * w.read_bytes + w.extra_read_bytes) / rates.read_bytes_per_s
    if per_element is not None and not w.ops:  # the method's own measured elementwise cost
        s += per_element * T * w.numel
    else:
        s += _ELEMENTWISE_PASSES * (T + 1) * w.numel * 4 / rates.elementwise_bytes_per_s
    s += w.out_bytes / rates.write_bytes_per_s
    for op in w.ops:
        if op.gram:  # float64 Gram of the smaller side (q x q), its eigensolve (priced as a q x q SVD), A V
            p, q = max(op.m, op.n), min(op.m, op.n)
            s += op.count * (2 * rates.gemm_seconds(q, p, q) + rates.svd_seconds(q, q)
                             + 2 * rates.gemm_seconds(p, q, op.k))
            continue
        s += op.count * rates.svd_seconds(op.m, op.n, op.dtype)
        if op.what == "polar":
            s += rates.gemm_seconds(op.m, op.n, op.n)
    return s + (w.rebuild_flops / rates.gemm_flops_per_s if w.ops else 0.0)


def _rss() -> int:
    """This process' resident set in bytes (``/proc/self/status``; 0 where unknown)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _cuda_free(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


@dataclass(frozen=True)
class Plan:
    """What a merge of ``tv`` with ``method`` will read, decompose, hold and take (see :func:`plan`).

    Attributes
    ----------
    method, device : the merge method; the device the merge would compute on (``"cpu"``, ``"cuda:0"``).
    keys : pandas.DataFrame
        One row per task-vector key: ``key``, ``kind``, ``shape``, ``dtype``, ``bytes`` (stored bytes read
        per pass: the base's and every task's), ``decompositions`` (e.g. ``"3 x svd 64x64"``),
        ``est_seconds`` (on ``device``).
    passes : int
        Reading passes over the inputs (the merge's and its ``prepare``'s).
    peak_host_bytes, peak_device_bytes : int
        Predicted peak resident set of this process, and of device memory (0 on the CPU).
    available_host_bytes, available_device_bytes : int or None
        What the process may use (its resident set plus what it may still allocate, or ``memory_limit``).
    seconds : dict
        Estimated seconds of the merge and export per device: this one (measured rates) and the recorded GPUs.
    rates : dict
        The :class:`~weightlens.planning.Rates` behind ``seconds``, per device.
    """

    method: str
    device: str
    keys: Any
    passes: int
    peak_host_bytes: int
    peak_device_bytes: int
    available_host_bytes: int | None
    available_device_bytes: int | None
    seconds: dict[str, float]
    rates: dict[str, Rates] = field(repr=False)

    @property
    def fits(self) -> bool:
        """True when both peaks are within what is available (unknown availability counts as fitting)."""
        return self.reason is None

    @property
    def reason(self) -> str | None:
        """Why the merge cannot fit, one sentence per memory that overflows; None when it fits."""
        out = []
        for what, peak, avail in (("host", self.peak_host_bytes, self.available_host_bytes),
                                  ("device", self.peak_device_bytes, self.available_device_bytes)):
            if avail is not None and peak > avail:
                out.append(f"its peak {what} memory {_gib(peak)} exceeds the {_gib(avail)} available")
        if not out:
            return None
        return (f"A {self.method} merge of these {len(self.keys)} keys cannot fit: {'; '.join(out)}. "
                "Merge fewer keys at a time (include=/exclude=), fewer tasks, a smaller DecompositionCache, "
                "or run on a machine with more memory.")

    def check(self) -> Plan:
        """``self`` when the merge fits; else raise :class:`~weightlens.errors.PlanRefusedError` with the reason."""
        if self.reason is not None:
            raise PlanRefusedError(self.reason)
        return self

    def summary(self) -> str:
        """A few sentences: the work, the peaks and the time per device."""
        k = self.keys
        n_dec = k["decompositions"].map(lambda s: sum(int(p.split(" x ")[0]) for p in s.split("; ")) if s else 0)
        times = "; ".join(f"{dev}: {_duration(s)} ({self.rates[dev].source})" for dev, s in self.seconds.items())
        lines = [
            f"Plan for a {self.method} merge on {self.device}: {len(k)} keys, {_gib(int(k['bytes'].sum()))} read "
            f"per pass, {self.passes} pass(es); {int(n_dec.sum())} decompositions.",
            f"Peak host memory {_gib(self.peak_host_bytes)}"
            + (f" of {_gib(self.available_host_bytes)} available" if self.available_host_bytes else "")
            + (f"; peak device memory {_gib(self.peak_device_bytes)}" if self.peak_device_bytes else "") + ".",
            f"Estimated time: {times}.",
        ]
        if self.reason:
            lines.append(f"Refused: {self.reason}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Plan({self.method} on {self.device}: {len(self.keys)} keys, fits={self.fits})"


def _duration(s: float) -> str:
    return f"{s:.2f} s" if s < 60 else f"{s / 60:.1f} min" if s < 3600 else f"{s / 3600:.1f} h"


def plan(tv: TaskVectors, method: str, *, device: str | torch.device = "auto", rates: Rates | None = None,
         memory_limit: int | str | None = None, **params: Any) -> Plan:
    """Plan a merge of ``tv`` with ``method`` from the headers alone: keys, decompositions, memory, time.

    Parameters
    ----------
    tv : TaskVectors
        The task vectors to merge (opening them read only headers; the plan reads no tensor data).
    method : str
        A registered merge method; ``**params`` its parameters (checked as ``wl.merge`` checks them).
    device : str or torch.device, default="auto"
        Where the merge would compute.
    rates : Rates, optional
        The rates to price the work on ``device`` (default :func:`~weightlens.planning.calibrate`: this
        machine's, measured once and cached under the weightlens home).
    memory_limit : int or str, optional
        Bytes of host memory the process may hold, e.g. ``8_000_000_000`` or ``"8GB"`` (default: its resident
        set plus what the system and its cgroup still let it allocate).

    Returns
    -------
    Plan
        ``.fits`` and ``.reason`` say whether it fits; ``.check()`` raises when it does not.

    Examples
    --------
    >>> import torch, weightlens as wl
    >>> tv = wl.TaskVectors({"w": torch.zeros(4, 3)}, {"a": {"w": torch.ones(4, 3)}, "b": {"w": torch.eye(4, 3)}})
    >>> p = wl.plan(tv, "tsv", device="cpu", rates=wl.planning.RECORDED["H100"])
    >>> p.keys[["key", "shape", "bytes", "decompositions"]].values.tolist()
    [['w', (4, 3), 144, '2 x svd 4x3; 1 x polar 4x3; 1 x polar 3x3']]
    """
    import pandas as pd

    rss = _rss()  # before a calibration, whose freed buffers the merge would reuse
    spec = get_method(method)
    resolved = spec.resolve(params, len(tv))
    dev = resolve_device(device)
    passes = 1 + spec.reading_passes(resolved)
    label = method_label(spec.name, resolved)
    own = rates if rates is not None else calibrate(dev, methods=[(spec.name, resolved)])
    per_element, per_bytes = own.element_seconds(label), own.per_element_bytes.get(label, 0.0)
    if per_element is None and own.source.startswith("measured") and rates is not None:
        try:  # rates given without this method's cost: measure it now (not cached)
            per_element, per_bytes = measure_method(spec.name, resolved, dev)
        except (WeightlensError, RuntimeError):  # needs more than plain vectors: the generic estimate
            per_element, per_bytes = None, 0.0
    table = {str(dev): own}
    host_rates = own if dev.type == "cpu" else calibrate("cpu")
    for name, r in RECORDED.items():
        if name not in table:
            table[name] = _with_host(r, host_rates)
    T = len(tv)
    work = [_key_work(tv, key, spec, dev) for key in tv.keys]
    rows = [{"key": w.key, "kind": w.kind, "shape": w.shape, "dtype": str(w.dtype).replace("torch.", ""),
             "bytes": w.read_bytes, "decompositions": "; ".join(op.text() for op in w.ops),
             "est_seconds": _seconds(w, own, passes, T, per_element)} for w in work]
    keys = pd.DataFrame(rows, columns=["key", "kind", "shape", "dtype", "bytes", "decompositions", "est_seconds"])
    room = max(tv.cache.max_bytes - tv.cache.nbytes, 0)
    cache_gain = min(sum(w.cached_bytes for w in work), room)
    largest_host = max((max(w.host_bytes, int(per_bytes * T * w.numel)) for w in work), default=0)
    largest_dec = max((w.device_bytes for w in work), default=0)
    if dev.type == "cpu":
        peak_host, peak_device, avail_device = rss + cache_gain + largest_host + largest_dec, 0, None
    else:
        peak_host, peak_device, avail_device = rss + largest_host, cache_gain + largest_dec, _cuda_free(dev)
    if memory_limit is not None:
        try:
            avail_host = parse_size(memory_limit)
        except InvalidParameterError:
            raise InvalidParameterError(f"The 'memory_limit' parameter of plan must be an int (bytes) or a string "
                                        f"like '8GB' or '512MiB'. Got {memory_limit!r} instead.") from None
    else:
        free = available_memory()
        avail_host = None if free is None else rss + free
    seconds = {name: r.run_s + (T + 1) * r.input_s
               + sum(_seconds(w, r, passes, T, per_element if r is own else None) for w in work)
               for name, r in table.items()}
    return Plan(spec.name, str(dev), keys, passes, int(peak_host), int(peak_device), avail_host, avail_device,
                seconds, table)


def _with_host(gpu: Rates, host: Rates) -> Rates:
    """A recorded GPU's rates with this host's reads and writes (no faster than the GPU's link)."""
    from dataclasses import replace

    return replace(gpu, read_bytes_per_s=min(gpu.read_bytes_per_s, host.read_bytes_per_s),
                   write_bytes_per_s=min(gpu.write_bytes_per_s, host.write_bytes_per_s), run_s=host.run_s,
                   input_s=host.input_s)




def long_run_plan(tv: TaskVectors, method: str, *, device: str | torch.device = "auto", threshold_s: float = 60.0,
                  **params: Any) -> Plan | None:
    """The plan of a merge estimated to take over ``threshold_s`` seconds, else None; refuses one that cannot fit.

    A first plan priced with :data:`OPTIMISTIC` rates needs no calibration: when even it stays under a tenth
    of ``threshold_s`` the run is short, and nothing is measured. Otherwise this machine's rates price it.

    Raises
    ------
    PlanRefusedError
        When the merge cannot fit in memory (:meth:`Plan.check`).
    """
    quick = plan(tv, method, device=device, rates=OPTIMISTIC, **params).check()
    if quick.seconds[quick.device] < threshold_s / 10:
        return None
    full = plan(tv, method, device=device, **params).check()
    return full if full.seconds[full.device] > threshold_s else None
