"""Cached decompositions of task matrices, shared by analysis, merges, compare and widgets.

Four operations, :func:`svd`, :func:`svdvals`, :func:`topk_svd` and :func:`left_svd`, each of one subject: a task's
matrix ``finetuned[task][key] - base[key]`` (``of="a"``) or the task-arithmetic sum of ``key`` over
task names (``of=("a", "b")``). Each result is computed once per (operation, subject, key, device,
dtype) and kept in ``tv.cache`` (a :class:`weightlens.linalg.DecompositionCache`), so moving a
coefficient or switching a method never repeats an SVD that is already known. Singular values, top-k
triplets and left sides reuse a cached full SVD when there is one.

Cache keys: ``(op, task, key, [k,] device, dtype)`` for a task and ``(op + "_sum", names, key, [k,]
device, dtype)`` for a sum, with ``op`` one of ``"svd"``, ``"svdvals"``, ``"topk_svd"``, ``"left_svd"``.

**Low-rank factors.** When every task of the subject has LoRA factors at ``key`` (``tv.factors`` is not
None: PEFT adapters), nothing of size ``m x n`` is formed or decomposed: the SVD is computed exactly from
the factors (:func:`weightlens.linalg.factored_svd`; a sum of adapters concatenates them,
:func:`weightlens.linalg.concat_factors`, rank ``sum r``) and cached under ``"svd"``, which
:func:`topk_svd` then slices; :func:`svdvals` takes the values from the triangular factors alone
(``weightlens.linalg.factored.factored_svdvals``) unless the SVD is cached. Such an SVD is thin in the
rank: ``k = min(sum r, m, n)`` triplets, not ``min(m, n)`` (the values past them are exactly zero, their
vectors arbitrary), and :func:`topk_svd` returns at most that many. A subject with any full fine-tune
is decomposed densely, as before; so is a product with ``sum r >= min(m, n)`` (nothing to gain).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch

from weightlens import linalg
from weightlens.errors import InvalidParameterError
from weightlens.linalg.factored import factored_svdvals
from weightlens.taskvectors import TaskVectors

__all__ = ["left_svd", "svd", "svdvals", "topk_svd"]


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
        total = self.tv.delta(self.of[0], self.key).clone()
        for name in self.of[1:]:
            total += self.tv.delta(name, self.key)
        return total

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


def topk_svd(
    tv: TaskVectors,
    key: str,
    of: str | Sequence[str],
    k: int,
    *,
    device: str | torch.device = "auto",
    dtype: torch.dtype = torch.float32,
    delta: torch.Tensor | None = None,
) -> linalg.SVD:
    """Leading ``k`` singular triplets of the subject of :func:`svd` (cached).

    Sliced from its cached full SVD when there is one, else :func:`weightlens.linalg.topk_svd`
    (``method="auto"``), for very large layers where only the top of the spectrum is wanted. From LoRA
    factors: the leading ``min(k, sum r, m, n)`` triplets of the exact SVD, so fewer than ``k`` when the
    rank is smaller (the spectrum is then complete: every value past them is zero).
    """
    subject = _subject(tv, key, of, device, dtype, delta)
    k = int(k)
    factors = None if subject.cache_key("svd") in tv.cache else subject.factors()
    if factors is not None or subject.cache_key("svd") in tv.cache:  # (recomputed only if evicted since)
        U, S, Vh = subject.svd(factors)
        return linalg.SVD(U[..., :k], S[..., :k], Vh[..., :k, :])
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
