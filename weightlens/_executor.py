"""Where per-key work runs: ``executor="local"`` (this process, in key order) or ``"ray"`` (Ray tasks).

:func:`map_keys` is the one loop ``merge``, ``analyze`` and ``export`` hand their per-key work to. It
calls ``fn(shared, key)`` for every key and yields ``(key, result)`` in key order, whichever executor
runs it:

* ``"local"``: a plain loop in this process (the default, and what every call did before);
* ``"ray"``: one Ray task per key. ``shared`` (the task vectors and the method's state) goes into the
  object store once (``ray.put``), and each worker process unpickles it once per call: task vectors
  opened from files travel as their paths and headers and read their tensors from those files in the
  worker (the files must be reachable there: shared storage on a multi-node cluster); in-memory
  task vectors travel with their tensors. At most ``window`` tasks are in flight, so finished
  tensors wait for the reader (the shard writer) a few keys at a time, never the whole model.

Bitwise the serial result: a task runs its decompositions on the driver's torch CPU thread count
(:func:`torch.get_num_threads` when the call starts, what a recipe records), asks Ray for that many
CPUs, and one GPU when the work runs on CUDA. ``ray`` is imported here only, when ``"ray"`` is asked
for; without a running cluster ``ray.init()`` starts a local one (``RAY_ADDRESS``, or an earlier
``ray.init(address=...)``, joins an existing cluster).
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from weightlens.errors import InvalidParameterError, WeightlensError

__all__ = ["EXECUTORS", "check_executor", "map_keys"]

EXECUTORS = ("local", "ray")

_INSTALL = "pip install 'weightlens[ray]'"


def check_executor(executor: object, *, caller: str) -> str:
    """``executor`` when it names one of :data:`EXECUTORS`, else an :class:`InvalidParameterError`."""
    if not isinstance(executor, str) or executor not in EXECUTORS:
        raise InvalidParameterError(
            f"The 'executor' parameter of {caller} must be one of {list(EXECUTORS)}. Got {executor!r} instead."
        )
    return executor


def map_keys(fn: Callable[[Any, str], Any], keys: Iterable[str], *, executor: str = "local", shared: Any = None,
             gpus: int = 0, window: int | None = None) -> Iterator[tuple[str, Any]]:
    """``(key, fn(shared, key))`` for every key, in key order, run by ``executor``.

    Parameters
    ----------
    fn : callable
        A module-level function of ``(shared, key)`` (Ray pickles it by reference).
    keys : iterable of str
        The keys, in the order results are yielded.
    executor : {"local", "ray"}, default="local"
    shared : any
        What every call reads (task vectors, the method's state); sent to the cluster once.
    gpus : int, default=0
        GPUs each Ray task asks for (1 when the work runs on CUDA).
    window : int, optional
        Ray tasks in flight at most (default: twice the tasks the cluster's CPUs run at once, at least 2).
    """
    keys = list(keys)
    if executor == "local":
        return ((key, fn(shared, key)) for key in keys)
    check_executor(executor, caller="map_keys")
    return _ray_map(fn, keys, shared, gpus, window)


def _ray() -> Any:
    """The ``ray`` module, started (``ray.init()`` when this process has not joined a cluster yet)."""
    try:
        import ray
    except ImportError as exc:
        raise ImportError(f"executor='ray' needs Ray, which is not installed. Install it with: {_INSTALL}") from exc
    if not ray.is_initialized():
        # RAY_ADDRESS ("HEAD_IP:6379", "auto") joins a running cluster; unset: a new local one
        ray.init(address=os.environ.get("RAY_ADDRESS") or None)
    return ray


def _ray_map(fn: Callable[[Any, str], Any], keys: list[str], shared: Any, gpus: int,
             window: int | None) -> Iterator[tuple[str, Any]]:
    ray = _ray()
    threads = torch.get_num_threads()
    cpus = int(ray.cluster_resources().get("CPU", 0))
    if cpus < threads:
        raise InvalidParameterError(
            f"executor='ray': each task runs on this process's {threads} torch threads (results are then bitwise "
            f"the serial path's) and asks for as many CPUs, but the Ray cluster has {cpus}. Call "
            f"torch.set_num_threads(n) with n <= {cpus} before the call, or add CPUs to the cluster."
        )
    window = window or max(2, 2 * (cpus // threads))
    ref = [ray.put(shared)]  # in a list: Ray hands the worker the reference, unpickled once per process
    task = ray.remote(_run_key).options(num_cpus=threads, num_gpus=gpus, max_retries=0)
    pending: collections.deque[tuple[str, Any]] = collections.deque()
    it = iter(keys)
    try:
        for key in it:
            pending.append((key, task.remote(fn, ref, key, threads)))
            if len(pending) >= window:
                yield _take(ray, pending)
        while pending:
            yield _take(ray, pending)
    finally:  # an error or an abandoned reader: nothing left running
        for _, obj in pending:
            ray.cancel(obj, force=True)


def _take(ray: Any, pending: collections.deque[tuple[str, Any]]) -> tuple[str, Any]:
    key, obj = pending.popleft()
    try:
        return key, ray.get(obj)
    except ray.exceptions.RayTaskError as err:  # the worker's own exception, as the serial path raises it
        cause = getattr(err, "cause", None)
        if isinstance(cause, BaseException):
            raise cause from None
        raise WeightlensError(f"executor='ray': the task of key {key!r} failed: {err}") from None


_held: dict[str, Any] = {}  # in a worker: the last call's shared object, by its object id


def _run_key(fn: Callable[[Any, str], Any], ref: list[Any], key: str, threads: int) -> Any:
    """One key in a Ray worker, on ``threads`` torch threads (the driver's count)."""
    import ray

    name = ref[0].hex()
    if name not in _held:
        _held.clear()
        _held[name] = ray.get(ref[0])
    torch.set_num_threads(threads)
    return fn(_held[name], key)
