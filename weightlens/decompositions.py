"""Cached decompositions of task matrices, shared by analysis, merges and widgets.

Every decomposition is computed once per (what, tasks, key, device, dtype) and kept in
``tv.cache`` (a :class:`weightlens.linalg.DecompositionCache`), so moving a coefficient or
switching a method never repeats an SVD that is already known. Singular values reuse a cached full
SVD when there is one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from weightlens import linalg
from weightlens.taskvectors import TaskVectors

__all__ = [
    "sum_delta",
    "sum_svd",
    "sum_topk_svd",
    "task_svd",
    "task_svdvals",
    "task_topk_svd",
]


def _tag(device: str | torch.device, dtype: torch.dtype) -> tuple[str, str]:
    return str(linalg.resolve_device(device)), str(dtype)


def _tasks(tv: TaskVectors, tasks: Sequence[str] | None) -> tuple[str, ...]:
    return tuple(tv.names if tasks is None else tasks)


def _matrix(tv: TaskVectors, key: str) -> None:
    if tv.kind(key) != "matrix":
        from weightlens.errors import InvalidParameterError

        raise InvalidParameterError(
            f"Key {key!r} has shape {tv.shape(key)}; singular values need a 2-D matrix."
        )


def task_svd(
    tv: TaskVectors,
    task: str,
    key: str,
    *,
    device: str | torch.device = "auto",
    dtype: torch.dtype = torch.float32,
    delta: torch.Tensor | None = None,
) -> linalg.SVD:
    """Thin SVD of one task matrix ``finetuned[task][key] - base[key]`` (cached).

    ``delta``: that task matrix when the caller already holds it (saves re-reading it on a miss).
    """
    _matrix(tv, key)
    cache_key = ("svd", task, key, *_tag(device, dtype))
    return tv.cache.get_or_compute(
        cache_key, lambda: linalg.svd(_or_read(tv, task, key, delta), device=device, dtype=dtype, name=key)
    )


def task_svdvals(
    tv: TaskVectors,
    task: str,
    key: str,
    *,
    device: str | torch.device = "auto",
    dtype: torch.dtype = torch.float32,
    delta: torch.Tensor | None = None,
) -> torch.Tensor:
    """Singular values of one task matrix; taken from a cached SVD when there is one."""
    _matrix(tv, key)
    tag = _tag(device, dtype)
    full = ("svd", task, key, *tag)
    if full in tv.cache:
        return task_svd(tv, task, key, device=device, dtype=dtype).S
    return tv.cache.get_or_compute(
        ("svdvals", task, key, *tag),
        lambda: linalg.svdvals(_or_read(tv, task, key, delta), device=device, dtype=dtype, name=key),
    )


def _or_read(tv: TaskVectors, task: str, key: str, delta: torch.Tensor | None) -> torch.Tensor:
    return tv.delta(task, key) if delta is None else delta


def _or_sum(tv: TaskVectors, key: str, names: tuple[str, ...], delta: torch.Tensor | None) -> torch.Tensor:
    return sum_delta(tv, key, names) if delta is None else delta


def sum_delta(tv: TaskVectors, key: str, tasks: Sequence[str] | None = None) -> torch.Tensor:
    """Task-arithmetic sum ``sum_t delta_t`` of ``key`` over ``tasks`` (all by default), fp32 CPU."""
    names = _tasks(tv, tasks)
    total = tv.delta(names[0], key).clone()
    for name in names[1:]:
        total += tv.delta(name, key)
    return total


def sum_svd(
    tv: TaskVectors,
    key: str,
    tasks: Sequence[str] | None = None,
    *,
    device: str | torch.device = "auto",
    dtype: torch.dtype = torch.float32,
    delta: torch.Tensor | None = None,
) -> linalg.SVD:
    """Thin SVD of the task-arithmetic sum of ``key`` (cached per task set).

    ``delta``: the sum when the caller already holds it (saves re-reading the tasks on a miss).
    """
    _matrix(tv, key)
    names = _tasks(tv, tasks)
    cache_key = ("svd_sum", names, key, *_tag(device, dtype))
    return tv.cache.get_or_compute(
        cache_key, lambda: linalg.svd(_or_sum(tv, key, names, delta), device=device, dtype=dtype, name=key)
    )


def _topk(
    tv: TaskVectors,
    full_key: tuple,
    topk_key: tuple,
    k: int,
    compute: Callable[[], torch.Tensor],
    device: str | torch.device,
    dtype: torch.dtype,
    name: str,
) -> linalg.SVD:
    """Leading ``k`` triplets: sliced from a cached full SVD when there is one, else cached top-k."""
    if full_key in tv.cache:  # (the fallback only runs if it was evicted in between)
        U, S, Vh = tv.cache.get_or_compute(
            full_key, lambda: linalg.svd(compute(), device=device, dtype=dtype, name=name)
        )
        return linalg.SVD(U[..., :k], S[..., :k], Vh[..., :k, :])
    return tv.cache.get_or_compute(
        topk_key, lambda: linalg.topk_svd(compute(), k, device=device, dtype=dtype, name=name)
    )


def task_topk_svd(
    tv: TaskVectors,
    task: str,
    key: str,
    k: int,
    *,
    device: str | torch.device = "auto",
    dtype: torch.dtype = torch.float32,
    delta: torch.Tensor | None = None,
) -> linalg.SVD:
    """Leading ``k`` singular triplets of one task matrix (cached; sliced from a cached full SVD).

    For very large layers where only the top of the spectrum is wanted (``linalg.topk_svd``,
    ``method="auto"``).
    """
    _matrix(tv, key)
    tag = _tag(device, dtype)
    return _topk(
        tv, ("svd", task, key, *tag), ("topk_svd", task, key, int(k), *tag), int(k),
        lambda: _or_read(tv, task, key, delta), device, dtype, key,
    )


def sum_topk_svd(
    tv: TaskVectors,
    key: str,
    k: int,
    tasks: Sequence[str] | None = None,
    *,
    device: str | torch.device = "auto",
    dtype: torch.dtype = torch.float32,
    delta: torch.Tensor | None = None,
) -> linalg.SVD:
    """Leading ``k`` singular triplets of the task-arithmetic sum (cached per task set)."""
    _matrix(tv, key)
    names = _tasks(tv, tasks)
    tag = _tag(device, dtype)
    return _topk(
        tv, ("svd_sum", names, key, *tag), ("topk_svd_sum", names, key, int(k), *tag), int(k),
        lambda: _or_sum(tv, key, names, delta), device, dtype, key,
    )
