"""Cached decompositions of task matrices, shared by analysis, merges, compare and widgets.

Four operations, :func:`svd`, :func:`svdvals`, :func:`topk_svd` and :func:`left_svd`, each of one subject: a task's
matrix ``finetuned[task][key] - base[key]`` (``of="a"``) or the task-arithmetic sum of ``key`` over
task names (``of=("a", "b")``). Each result is computed once per (operation, subject, key, device,
dtype) and kept in ``tv.cache`` (a :class:`weightlens.linalg.DecompositionCache`), so moving a
coefficient or switching a method never repeats an SVD that is already known. Singular values, top-k
triplets and left sides reuse a cached full SVD when there is one.

Cache keys: ``(op, task, key, [k,] device, dtype)`` for a task and ``(op + "_sum", names, key, [k,]
device, dtype)`` for a sum, with ``op`` one of ``"svd"``, ``"svdvals"``, ``"topk_svd"``, ``"topk_svd_eigh"``
(:func:`topk_svd` with ``method="eigh"``), ``"left_svd"``.

**Low-rank factors.** When every task of the subject has LoRA factors at ``key`` (``tv.factors`` is not
None: PEFT adapters), nothing of size ``m x n`` is formed or decomposed: the SVD is computed exactly from
the factors (:func:`weightlens.linalg.factored_svd`; a sum of adapters concatenates them,
:func:`weightlens.linalg.concat_factors`, rank ``sum r``) and cached under ``"svd"``, which
:func:`topk_svd` then slices; :func:`svdvals` takes the values from the triangular factors alone
(``weightlens.linalg.factored.factored_svdvals``) unless the SVD is cached. Such an SVD is thin in the
rank: ``k = min(sum r, m, n)`` triplets, not ``min(m, n)`` (the values past them are exactly zero, their
vectors arbitrary), and :func:`topk_svd` returns at most that many. A subject with any full fine-tune
is decomposed densely, as before; so is a product with ``sum r >= min(m, n)`` (nothing to gain).

**Batched ahead.** :func:`prefetch` computes the thin SVDs that :func:`svd` would compute at many keys in
one go: the subjects are grouped by shape and decomposed in batches on the device
(:func:`weightlens.linalg.svd_many`), and each result is stored under the key and in the form :func:`svd`
stores it, so every consumer (merges, ``analyze``, ``compare``, ``diagnose``) finds it unchanged. Factored
subjects keep their own path (skipped), as do all-zero and non-finite matrices and what is cached already.
:func:`ahead` does this in windows of keys for a per-key walk (merges, ``analyze``) when
``weightlens.config.batch`` asks for it (``"auto"``: on CUDA only).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from weightlens import config, linalg
from weightlens._finite import finite
from weightlens.errors import InvalidParameterError
from weightlens.linalg.factored import factored_svdvals
from weightlens.taskvectors import TaskVectors

__all__ = ["SUBJECTS", "ahead", "is_cached", "left_svd", "prefetch", "svd", "svdvals", "topk_svd"]

#: What :func:`prefetch` computes at a matrix key: each task's thin SVD, the task sum's.
SUBJECTS = ("tasks", "sum")


@dataclasses.dataclass(frozen=True, eq=False)
class _Subject:
    """One request: which matrix of ``tv`` (a task's or a sum's), where and in which dtype."""

    tv: TaskVectors
    key: str
    of: str | tuple[str, ...]  # a task name, or the task names summed
    device: torch.device
    dtype: torch.dtype
    delta: torch.Tensor | None

    def cache_key(self, op: str, *extra: Any) -> tuple:
        """``tv.cache`` key of operation ``op`` on this subject (``extra``: e.g. ``k``)."""
        name = op if isinstance(self.of, str) else op + "_sum"
        return (name, self.of, self.key, *extra, str(self.device), str(self.dtype))

    def matrix(self) -> torch.Tensor:
        """The subject's matrix, fp32 CPU: the caller's ``delta``, else read (and summed)."""
        if self.delta is not None:
            return self.delta
        if isinstance(self.of, str):
            return self.tv.delta(self.of, self.key)
        return _summed(self.tv.delta(name, self.key) for name in self.of)

    def cached(self, op: str, compute: Callable[..., Any], *extra: Any) -> Any:
        """``compute(matrix, *extra, ...)`` under :meth:`cache_key`, computed on a miss only."""
        return self.tv.cache.get_or_compute(
            self.cache_key(op, *extra),
            lambda: compute(self.matrix(), *extra, device=self.device, dtype=self.dtype, name=self.key),
        )

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """``(B, A, scale)`` with the subject's matrix ``scale * B @ A`` when every task has LoRA factors
        at this key (a sum: concatenated, rank ``sum r``), else None."""
        names = (self.of,) if isinstance(self.of, str) else self.of
        parts = []
        for name in names:
            f = self.tv.factors(name, self.key)
            if f is None:
                return None
            parts.append(f)
        if len(parts) == 1:
            return parts[0].B, parts[0].A, parts[0].scale
        B, A = linalg.concat_factors(parts)
        return B, A, 1.0

    def svd(self, factors: tuple[torch.Tensor, torch.Tensor, float] | None = None) -> linalg.SVD:
        """The subject's thin SVD (cached under ``"svd"``): from its factors when it has them (``factors``:
        :meth:`factors` when the caller already has them), else dense."""

        def compute() -> linalg.SVD:
            f = self.factors() if factors is None else factors
            if f is None:
                return linalg.svd(self.matrix(), device=self.device, dtype=self.dtype, name=self.key)
            B, A, scale = f
            return linalg.factored_svd(B, A, scale=scale, device=self.device, dtype=self.dtype, name=self.key)

        return self.tv.cache.get_or_compute(self.cache_key("svd"), compute)


def _subject(
    tv: TaskVectors,
    key: str,
    of: str | Sequence[str],
    device: str | torch.device,
    dtype: torch.dtype,
    delta: torch.Tensor | None,
) -> _Subject:
    """Check that ``key`` is a matrix and ``of`` names tasks; resolve the device once."""
    if tv.kind(key) != "matrix":
        raise InvalidParameterError(
            f"Key {key!r} has shape {tv.shape(key)}; singular values need a 2-D matrix."
        )
    names = of if isinstance(of, str) else tuple(of)
    if not names:
        raise InvalidParameterError(
            f"The 'of' parameter names one task (a str) or the tasks to sum (a non-empty sequence); "
            f"got {of!r} for key {key!r}. Pass e.g. tv.names for the sum over every task."
        )
    return _Subject(tv, key, names, linalg.resolve_device(device), dtype, delta)


def svd(
    tv: TaskVectors,
    key: str,
    of: str | Sequence[str],
    *,
    device: str | torch.device = "auto",
    dtype: torch.dtype = torch.float32,
    delta: torch.Tensor | None = None,
) -> linalg.SVD:
    """Thin SVD of ``key``'s task matrix (``of`` a task name) or task sum (``of`` task names), cached.

    ``delta``: that matrix when the caller already holds it (saves re-reading it on a miss).
    From LoRA factors (see the module docstring) the SVD has ``min(sum r, m, n)`` triplets.
    """
    return _subject(tv, key, of, device, dtype, delta).svd()


def svdvals(
    tv: TaskVectors,
    key: str,
    of: str | Sequence[str],
    *,
    device: str | torch.device = "auto",
    dtype: torch.dtype = torch.float32,
    delta: torch.Tensor | None = None,
) -> torch.Tensor:
    """Singular values of the subject of :func:`svd`; taken from its cached SVD when there is one, or from
    its factors (then ``min(sum r, m, n)`` values: the rest are exactly zero)."""
    subject = _subject(tv, key, of, device, dtype, delta)
    if subject.cache_key("svd") in tv.cache:
        return subject.svd().S
    factors = subject.factors()
    if factors is not None:
        B, A, scale = factors
        return tv.cache.get_or_compute(subject.cache_key("svdvals"), lambda: factored_svdvals(
            B, A, scale=scale, device=subject.device, dtype=subject.dtype, name=key))
    return subject.cached("svdvals", linalg.svdvals)


def is_cached(
    tv: TaskVectors,
    key: str,
    of: str | Sequence[str],
    op: str,
    *extra: Any,
    device: str | torch.device = "auto",
    dtype: torch.dtype = torch.float32,
) -> bool:
    """Whether ``tv.cache`` holds operation ``op`` (``"svd"``, ``"topk_svd_eigh"``, ...; ``extra``: its
    arguments, e.g. ``k``) of the subject of :func:`svd`: what a later call would reuse (``wl.plan``)."""
    return _subject(tv, key, of, device, dtype, None).cache_key(op, *extra) in tv.cache


def topk_svd(
    tv: TaskVectors,
    key: str,
    of: str | Sequence[str],
    k: int,
    *,
    device: str | torch.device = "auto",
    dtype: torch.dtype = torch.float32,
    delta: torch.Tensor | None = None,
    method: str | None = None,
) -> linalg.SVD:
    """Leading ``k`` singular triplets of the subject of :func:`svd` (cached).

    Sliced from its cached full SVD when there is one, else :func:`weightlens.linalg.topk_svd`
    (``method="auto"``), for very large layers where only the top of the spectrum is wanted. From LoRA
    factors: the leading ``min(k, sum r, m, n)`` triplets of the exact SVD, so fewer than ``k`` when the
    rank is smaller (the spectrum is then complete: every value past them is zero).

    ``method`` (merges; a :class:`weightlens.linalg.TopkOptions` method, e.g. ``"eigh"``): that method of
    :func:`weightlens.linalg.topk_svd`, under its own cache entry (``"topk_svd_" + method``) and never sliced
    from a cached full SVD, so that the result depends on the matrix and the device alone, not on what ran
    before; LoRA factors as above.
    """
    subject = _subject(tv, key, of, device, dtype, delta)
    k = int(k)
    reuse = method is None and subject.cache_key("svd") in tv.cache  # a cached full SVD, unless a method is named
    factors = None if reuse else subject.factors()
    if factors is not None or reuse:  # (recomputed only if evicted since)
        U, S, Vh = subject.svd(factors)
        return linalg.SVD(U[..., :k], S[..., :k], Vh[..., :k, :])
    if method is not None:
        return tv.cache.get_or_compute(subject.cache_key(f"topk_svd_{method}", k), lambda: linalg.topk_svd(
            subject.matrix(), k, device=subject.device, dtype=subject.dtype, name=key, method=method))
    return subject.cached("topk_svd", linalg.topk_svd, k)


def left_svd(
    tv: TaskVectors,
    key: str,
    of: str | Sequence[str],
    *,
    device: str | torch.device = "auto",
    dtype: torch.dtype = torch.float32,
    delta: torch.Tensor | None = None,
) -> linalg.LeftSVD:
    """``U diag(S)`` and ``S`` of the subject of :func:`svd` (cached): what projections of its columns need.

    From its cached full SVD or its LoRA factors when it has them, else :func:`weightlens.linalg.left_svd`
    (an eigensolve of the float64 Gram matrix, cheaper than the SVD; cached under ``"left_svd"``, which a
    later :func:`svd` does not reuse: a merge that needs ``Vh`` decomposes the matrix itself).
    """
    subject = _subject(tv, key, of, device, dtype, delta)
    factors = None if subject.cache_key("svd") in tv.cache else subject.factors()
    if factors is not None or subject.cache_key("svd") in tv.cache:
        U, S, _ = subject.svd(factors)
        return linalg.LeftSVD(U * S[..., None, :], S)
    return subject.cached("left_svd", linalg.left_svd)


def _summed(parts: Iterable[torch.Tensor]) -> torch.Tensor:
    """The sum of ``parts`` added in order into a copy of the first (the one way a task sum is formed)."""
    it = iter(parts)
    total = next(it).clone()
    for part in it:
        total += part
    return total


def _check_of(of: Sequence[str]) -> tuple[str, ...]:
    what = (of,) if isinstance(of, str) else tuple(of)
    if not set(what) <= set(SUBJECTS):
        raise InvalidParameterError(
            f"The 'of' parameter of prefetch names what to decompose at each key, a subset of {SUBJECTS}. "
            f"Got {of!r} instead."
        )
    return what


def _factored(tv: TaskVectors, key: str, names: tuple[str, ...]) -> bool:
    """Whether the subject of ``names`` at ``key`` is decomposed from LoRA factors (:meth:`_Subject.factors`)."""
    return all(tv.factors(name, key) is not None for name in names)


def prefetch(
    tv: TaskVectors,
    keys: Iterable[str],
    of: Sequence[str] = SUBJECTS,
    *,
    device: str | torch.device = "auto",
    dtype: torch.dtype = torch.float32,
    max_batch_bytes: int | None = None,
) -> int:
    """Compute ahead, batched by shape on ``device``, the thin SVDs :func:`svd` would compute at ``keys``.

    Parameters
    ----------
    tv : TaskVectors
        Its ``cache`` receives the results, under :func:`svd`'s keys.
    keys : iterable of str
        Keys to prepare; those that are not matrices are passed over.
    of : sequence of {"tasks", "sum"}, default=("tasks", "sum")
        Each task's matrix, and/or the task-arithmetic sum over ``tv.names``.
    device, dtype
        As in :func:`svd` (the cache keys include them).
    max_batch_bytes : int, optional
        Working bytes of one batch (:func:`weightlens.linalg.svd_many`; default: a quarter of the free
        memory of a CUDA device, 256 MiB on the CPU).

    Returns
    -------
    int
        How many SVDs were computed. At most half of ``tv.cache.max_bytes`` of results are computed (the rest
        is left to :func:`svd`), so that none evicts another before it is read.
    """
    requests = [(key, _check_of(of)) for key in keys]
    return _prefetch(tv, requests, linalg.resolve_device(device), dtype, max_batch_bytes)


def _prefetch(tv: TaskVectors, requests: Iterable[tuple[str, tuple[str, ...]]], device: torch.device,
              dtype: torch.dtype, max_batch_bytes: int | None) -> int:
    room, used = tv.cache.max_bytes // 2, 0
    subjects, matrices = [], []
    for key, what in requests:
        if not what or tv.kind(key) != "matrix" or min(tv.shape(key)) == 0:
            continue
        size = linalg.svd_nbytes(tv.shape(key), dtype)
        wanted = [_Subject(tv, key, of, device, dtype, None) for of in _names(tv, what)]
        wanted = [s for s in wanted if s.cache_key("svd") not in tv.cache and not _factored(tv, key, _tuple(s.of))]
        if not wanted or used + size > room:
            continue
        deltas = tv.deltas(key)  # one read of the key for every subject
        for s in wanted:
            x = deltas[tv.names.index(s.of)] if isinstance(s.of, str) else _summed(deltas)
            if used + size > room or not bool(x.any()) or not finite(x):
                continue  # left to svd: its shortcut for zero, its error for NaN/Inf
            subjects.append(s)
            matrices.append(x)
            used += size
    found = linalg.svd_many(matrices, device=device, dtype=dtype, names=[s.key for s in subjects],
                            max_batch_bytes=max_batch_bytes)
    for s, result in zip(subjects, found):
        tv.cache.get_or_compute(s.cache_key("svd"), lambda result=result: result)
    return len(subjects)


def _names(tv: TaskVectors, what: tuple[str, ...]) -> list[str | tuple[str, ...]]:
    return [*(tv.names if "tasks" in what else ()), *((tuple(tv.names),) if "sum" in what else ())]


def _tuple(of: str | tuple[str, ...]) -> tuple[str, ...]:
    return (of,) if isinstance(of, str) else of


def _batching(batch: bool | str, device: torch.device) -> bool:
    """Whether ``batch`` (``True``, ``False`` or ``"auto"``, as ``weightlens.config.batch``) is on for ``device``."""
    if batch == "auto":
        return linalg.batching_pays(device)
    if isinstance(batch, bool):
        return batch
    raise InvalidParameterError(f"weightlens.config.batch must be True, False or 'auto'. Got {batch!r} instead.")


class _Ahead:
    """``ahead(key)`` before a walk works on ``key``: the window of keys from ``key`` on is prefetched once."""

    def __init__(self, tv: TaskVectors, keys: list[str], need: Callable[[str], Sequence[str]],
                 device: torch.device, dtype: torch.dtype) -> None:
        self.tv, self.keys, self.need, self.device, self.dtype = tv, keys, need, device, dtype
        self.index = {key: i for i, key in enumerate(keys)}
        self.done = 0  # keys before this index have been prefetched (or passed)

    def __call__(self, key: str) -> None:
        i = self.index.get(key)
        if i is None or i < self.done:
            return
        room, used, window = self.tv.cache.max_bytes // 2, 0, []
        for k in self.keys[i:]:
            what = tuple(self.need(k)) if self.tv.kind(k) == "matrix" else ()
            size = len(_names(self.tv, what)) * linalg.svd_nbytes(self.tv.shape(k), self.dtype) if what else 0
            if window and used + size > room:
                break
            window.append((k, what))
            used += size
        self.done = i + len(window)
        _prefetch(self.tv, window, self.device, self.dtype, None)


def ahead(tv: TaskVectors, keys: Iterable[str], need: Callable[[str], Sequence[str]], *,
          device: str | torch.device = "auto", dtype: torch.dtype = torch.float32) -> Callable[[str], None] | None:
    """A hook a per-key walk calls before each key, or None when ``weightlens.config.batch`` is off for ``device``.

    ``need(key)`` names what the walk decomposes at ``key`` (a subset of :data:`SUBJECTS`). The first call at a
    key not prepared yet prefetches the window of keys from it on whose results fill at most half of
    ``tv.cache`` (:func:`prefetch`): the walk streams, holding one window's inputs and results at a time.
    """
    dev = linalg.resolve_device(device)
    if not _batching(config.batch, dev):
        return None
    return _Ahead(tv, list(keys), need, dev, dtype)
