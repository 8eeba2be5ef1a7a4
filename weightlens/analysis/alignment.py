"""Singular-vector alignment: SAR, STI, principal angles and subspace overlap, cosines.

Definitions: ``docs/methods.md#sar``, ``#sti`` and ``#principal-angles-and-overlap``:

* **SAR** (Iso, Eq. 5): ``||U_k^T delta_t||_F / ||delta_t||_F`` with ``U_k`` the top-k left singular
  vectors of a reference (the task-arithmetic sum, a merge's update, or another task); k from the
  reference's spectrum by the ``"paper"`` (Eq. 6) or ``"iso_script"`` (``fig_3a.py``) rule. One
  projection gives SAR for every k, so both rules cost one matrix product.
* **STI** (TSV): ``||(Uc^T Uc - I) Sc (Vc^T Vc - I)||_1`` (entrywise) with the task singular vectors
  concatenated as *columns*; ``sti_normalized = STI / ||Sc||_1`` is a weightlens extension.
* **Principal angles** between top-k subspaces (cosines from ``A^T B``, sines from
  ``(I - A A^T) B`` for small angles), overlap ``||A^T B||_F^2 / min(p, q)`` with chance
  ``max(p, q) / d``, Grassmann distance.

Examples
--------
>>> import torch
>>> from weightlens.analysis.alignment import sar, subspace_overlap
>>> d = torch.diag(torch.tensor([3.0, 4.0]))
>>> round(sar(d, torch.eye(2)[:, 1:]), 3)
0.8
>>> subspace_overlap(torch.eye(3)[:, :1], torch.eye(3)[:, 1:2])
0.0
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd
import torch

from weightlens import decompositions, linalg
from weightlens._progress import bar
from weightlens.analysis.spectra import CRITERIA, Criterion, check_criterion, rank_for_energy
from weightlens.errors import InvalidParameterError, KeyMismatchError, ShapeMismatchError
from weightlens.merged import check_merged, merged_keys, merged_update
from weightlens.taskvectors import TaskVectors

__all__ = [
    "alignment_to_merged",
    "cosine_matrix",
    "grassmann_distance",
    "leading_vectors",
    "left_span",
    "overlap_chance",
    "principal_angles",
    "sar",
    "sar_curve",
    "sar_curves",
    "sar_rows",
    "sar_to_reference",
    "sti",
    "subspace_overlap",
]

_F64 = torch.float64


# ---------------------------------------------------------------------------------------- SAR
def sar_curve(deltas: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """SAR of each delta against the first k columns of ``U``, for every ``k = 0..K``.

    Parameters
    ----------
    deltas : ``(m, n)`` or ``(T, m, n)`` task matrices.
    U : ``(m, K)`` orthonormal columns (e.g. left singular vectors of a reference, descending).

    Returns
    -------
    Tensor
        float64 of shape ``(K + 1,)`` or ``(T, K + 1)``; entry k is ``||U[:, :k]^T d||_F / ||d||_F``
        (NaN for a zero delta).
    """
    return sar_curves(deltas, [U])[0]


def sar_curves(deltas: torch.Tensor, Us: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """:func:`sar_curve` against several references at once (one matrix product for all of them)."""
    for U in Us:
        if deltas.shape[-2] != U.shape[0]:
            raise ShapeMismatchError(
                f"sar: the delta has {deltas.shape[-2]} rows but U has {U.shape[0]}; U must hold left "
                f"singular vectors (m x k) of a matrix of the same shape."
            )
    x = deltas.to(device=Us[0].device, dtype=Us[0].dtype)
    proj = torch.cat(list(Us), dim=1).mT @ x  # (..., sum K, n)
    rows = (proj * proj).sum(-1).to(_F64)  # squared row norms (n terms each), then float64 sums
    total = linalg.sum64(x.flatten(-2).square(), -1).to(rows.device).unsqueeze(-1)
    curves = []
    for part in torch.split(rows, [U.shape[1] for U in Us], dim=-1):
        zero = torch.zeros((*part.shape[:-1], 1), dtype=_F64, device=part.device)
        out = torch.sqrt(torch.cat([zero, torch.cumsum(part, -1)], -1) / total)
        curves.append(torch.where(total > 0, out.clamp(max=1.0), torch.full_like(out, math.nan)).cpu())
    return curves


def sar(delta: torch.Tensor, U: torch.Tensor) -> float:
    """Subspace alignment ratio ``||U^T delta||_F / ||delta||_F`` (Iso Eq. 5) for ``U`` (m x k)."""
    if delta.ndim != 2:
        raise ShapeMismatchError(f"sar needs one 2-D delta; got shape {tuple(delta.shape)}.")
    return float(sar_curve(delta, U)[-1])


def sar_rows(
    key: str,
    deltas: torch.Tensor,
    tasks: Sequence[str],
    reference: str,
    U: torch.Tensor,
    ranks: Mapping[str, int],
    criterion: Criterion = "iso_script",
    *,
    curve: torch.Tensor | None = None,
) -> list[dict[str, Any]]:
    """Rows ``{key, task, reference, k_<rule>, sar_<rule>, k, sar, clipped}`` for one key.

    ``ranks`` maps rules of :data:`CRITERIA` to their k (from the reference spectrum); it must hold
    ``criterion``, and a rule it lacks gets ``k = None`` and ``sar = NaN``. A k past the columns of
    ``U`` (a top-N truncation, or the reference's numerical rank, see :func:`left_span`) is clipped
    and flagged ``clipped``. ``curve``: ``sar_curve(deltas, U)`` when already computed (its leading
    columns suffice: up to the largest k of ``ranks`` within ``U``).
    """
    criterion = check_criterion(criterion)
    if criterion not in ranks:
        raise InvalidParameterError(f"sar_rows: ranks {dict(ranks)} lack the chosen rule {criterion!r}.")
    curve = sar_curve(deltas, U) if curve is None else curve
    K = U.shape[1]
    rows = []
    for t, task in enumerate(tasks):
        row: dict[str, Any] = {"key": key, "task": task, "reference": reference}
        for rule in CRITERIA:
            k = min(int(ranks[rule]), K) if rule in ranks else None
            row[f"k_{rule}"], row[f"sar_{rule}"] = k, (float(curve[t, k]) if k is not None else math.nan)
        row["k"], row["sar"] = row[f"k_{criterion}"], row[f"sar_{criterion}"]
        row["clipped"] = any(int(k) > K for k in ranks.values())
        rows.append(row)
    return rows


def left_span(dec: linalg.SVD | linalg.LeftSVD, shape: tuple[int, int]) -> torch.Tensor:
    """Left singular vectors of ``dec`` (an SVD or its left side) up to its numerical rank
    (``linalg.numerical_rank``).

    Vectors past the numerical rank are an arbitrary orthonormal completion (a rank-4 LoRA delta
    has 4 meaningful directions), so SAR never projects on them: k is capped there and flagged.
    """
    return leading_vectors(dec, linalg.numerical_rank(dec.S, shape))


def leading_vectors(dec: linalg.SVD | linalg.LeftSVD, k: int) -> torch.Tensor:
    """The first ``k`` left singular vectors of an SVD, or of its left side (``k`` within its numerical rank)."""
    return dec.span(k) if isinstance(dec, linalg.LeftSVD) else dec.U[:, :k]


def reference_ranks(S: torch.Tensor, eps: float, total_sq: float | None = None) -> dict[str, int]:
    """k of both rank rules for a reference spectrum ``S``."""
    return {rule: rank_for_energy(S, eps, criterion=rule, total_sq=total_sq) for rule in CRITERIA}


def sar_to_reference(
    key: str,
    deltas: torch.Tensor,
    tasks: Sequence[str],
    reference: str,
    dec: linalg.SVD | linalg.LeftSVD,
    eps: float = 0.05,
    criterion: Criterion = "iso_script",
) -> list[dict[str, Any]]:
    """SAR of stacked task matrices ``(T, m, n)`` against a reference update's SVD ``dec`` (or its left
    side, :class:`weightlens.linalg.LeftSVD`): :func:`sar_rows`.

    The one "tasks against a merged update" SAR of weightlens (:func:`alignment_to_merged`,
    ``analyze(merged=)`` through the same rules, and ``merge.compare``): k of both rules from
    ``dec.S`` at ``eps`` (:func:`reference_ranks`), the projection capped at the reference's numerical
    rank (:func:`left_span`; a k past it is clipped and flagged).
    """
    ranks = reference_ranks(dec.S, eps)
    U = left_span(dec, tuple(deltas.shape[-2:]))
    # the curve up to the largest k of the rules only: the columns past it would be projected for nothing
    curve = sar_curve(deltas, U[:, : min(max(ranks.values()), U.shape[1])])
    return sar_rows(key, deltas, tasks, reference, U, ranks, criterion, curve=curve)


# ---------------------------------------------------------------------------------------- STI
def sti(
    Us: Sequence[torch.Tensor],
    Ss: Sequence[torch.Tensor],
    Vs: Sequence[torch.Tensor],
    *,
    normalized: bool = False,
    chunk: int = 2048,
) -> float:
    """Singular task interference (TSV) of one layer, singular vectors concatenated as columns.

    Parameters
    ----------
    Us, Ss, Vs : per task, left vectors ``U_i (m, k_i)``, values ``S_i (k_i,)`` and right vectors
        ``V_i (n, k_i)`` -- **V, not Vh** (``V = Vh.T``).
    normalized : divide by ``||S_cat||_1 = sum of all S_i`` (a weightlens extension, comparable
        across layers).
    chunk : rows of the ``(Tk x Tk)`` product formed at once (bounds memory).

    Returns
    -------
    float
        ``||(Uc^T Uc - I) diag(Sc) (Vc^T Vc - I)||_1`` (sum of absolute entries), in float64.
    """
    if not (len(Us) == len(Ss) == len(Vs)) or not Us:
        raise InvalidParameterError(
            f"sti needs one (U, S, V) per task; got {len(Us)} U, {len(Ss)} S and {len(Vs)} V."
        )
    Uc = torch.cat([u.to("cpu", _F64) for u in Us], dim=1)  # columns: (m, Tk)
    Vc = torch.cat([v.to("cpu", _F64) for v in Vs], dim=1)
    Sc = torch.cat([s.to("cpu", _F64).flatten() for s in Ss])
    if Uc.shape[1] != Sc.numel() or Vc.shape[1] != Sc.numel():
        raise ShapeMismatchError(
            f"sti: {Uc.shape[1]} U columns, {Sc.numel()} singular values and {Vc.shape[1]} V "
            "columns must agree (pass V = Vh.T, one column per singular value)."
        )
    eye = torch.eye(Sc.numel(), dtype=_F64)
    right = Vc.mT @ Vc - eye
    total = 0.0
    for lo in range(0, Sc.numel(), chunk):
        left = Uc[:, lo : lo + chunk].mT @ Uc - eye[lo : lo + chunk]
        total += float((left * Sc).mm(right).abs().sum())
    if normalized:
        norm = float(Sc.abs().sum())
        return total / norm if norm > 0 else math.nan
    return total


# ------------------------------------------------------------------------- principal angles
#: Angles below this (radians) are taken from sines (Bjorck-Golub); above it ``arccos`` of the
#: float64 cosines is accurate to ~1e-14 relative, so the second decomposition is skipped.
SMALL_ANGLE = 1e-2


def principal_angles(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians, ascending) between the column spans of orthonormal ``A``, ``B``.

    Cosines are the singular values of ``A^T B``. Angles below :data:`SMALL_ANGLE` are taken from
    the sines, the singular values of ``(I - A A^T) B`` (Bjorck-Golub): ``arccos`` of a cosine near
    1 loses precision. Returns ``min(p, q)`` angles in float64.
    """
    return _angles(*_as_pair(A, B, "principal_angles"))[0]


def _as_pair(A: torch.Tensor, B: torch.Tensor, op: str) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 CPU copies with ``p >= q`` columns (angles and overlap are symmetric)."""
    if A.shape[0] != B.shape[0]:
        raise ShapeMismatchError(
            f"{op}: A spans R^{A.shape[0]} and B spans R^{B.shape[0]}; both need the same ambient "
            "dimension (rows)."
        )
    a, b = A.to("cpu", _F64), B.to("cpu", _F64)
    return (b, a) if a.shape[1] < b.shape[1] else (a, b)


def _angles(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(angles ascending, cosines descending)`` for ``a`` with at least as many columns as ``b``."""
    if b.shape[1] == 0:
        empty = torch.zeros(0, dtype=_F64)
        return empty, empty
    cross = a.mT @ b
    cos = _svdvals64(cross).clamp(0.0, 1.0)  # descending -> angles ascending
    angles = torch.arccos(cos)
    small = angles < SMALL_ANGLE
    if bool(small.any()):
        sin = _svdvals64(b - a @ cross).clamp(0.0, 1.0).flip(0)  # ascending
        angles = torch.where(small, torch.arcsin(sin), angles)
    return angles, cos


def _svdvals64(x: torch.Tensor) -> torch.Tensor:
    return linalg.svdvals(x, device="cpu", dtype=_F64)


def subspace_overlap(A: torch.Tensor, B: torch.Tensor) -> float:
    """Normalised overlap ``||A^T B||_F^2 / min(p, q)`` = mean squared cosine, in ``[0, 1]``."""
    if A.shape[0] != B.shape[0]:
        raise ShapeMismatchError(
            f"subspace_overlap: A has {A.shape[0]} rows and B has {B.shape[0]}; they must agree."
        )
    p = min(A.shape[1], B.shape[1])
    if p == 0:
        return math.nan
    cross = A.to("cpu", _F64).mT @ B.to("cpu", _F64)
    return float((cross * cross).sum()) / p


def overlap_chance(p: int, q: int, d: int) -> float:
    """Expected :func:`subspace_overlap` of independent uniformly random subspaces: ``max(p, q) / d``.

    ``E ||A^T B||_F^2 = p q / d``; for ``p = q = k`` this is the ``k / d`` baseline.
    """
    if d <= 0 or min(p, q) <= 0:
        return math.nan
    return max(p, q) / d


def grassmann_distance(angles: torch.Tensor) -> float:
    """Geodesic distance ``||theta||_2`` on the Grassmannian (max ``(pi/2) sqrt(k)``)."""
    return float(torch.linalg.vector_norm(angles.to(_F64)))


def subspace_row(
    U_a: torch.Tensor, U_b: torch.Tensor, V_a: torch.Tensor, V_b: torch.Tensor
) -> dict[str, float]:
    """Overlap, chance and Grassmann distance of top-k left (U) and right (V) subspaces of a pair.

    One small SVD per side: the overlap ``||A^T B||_F^2 / q`` is the mean of the squared cosines.
    """
    row: dict[str, float] = {"k_sub": int(min(U_a.shape[1], U_b.shape[1]))}
    for side, A, B in (("left", U_a, U_b), ("right", V_a, V_b)):
        a, b = _as_pair(A, B, "subspace_row")
        angles, cos = _angles(a, b)
        q = b.shape[1]
        row[f"overlap_{side}"] = float((cos * cos).sum()) / q if q else math.nan
        row[f"chance_{side}"] = overlap_chance(a.shape[1], q, a.shape[0])
        row[f"grassmann_{side}"] = grassmann_distance(angles)
    return row


# ---------------------------------------------------------------------------------------- cosines
def cosine_matrix(gram: torch.Tensor) -> torch.Tensor:
    """Cosine similarities from a Gram matrix ``G_ij = <tau_i, tau_j>`` (NaN where a norm is 0)."""
    g = gram.to(_F64)
    norms = torch.sqrt(torch.diagonal(g).clamp(min=0.0))
    denom = norms[:, None] * norms[None, :]
    return torch.where(denom > 0, g / denom, torch.full_like(g, math.nan))


def gram(deltas: torch.Tensor) -> torch.Tensor:
    """Gram matrix ``(T, T)`` in float64 of stacked deltas ``(T, ...)`` (flattened per task)."""
    flat = deltas.reshape(deltas.shape[0], -1).to(_F64)
    return flat @ flat.mT


# ---------------------------------------------------------------------------------- TaskVectors
def _matrix_keys(tv: TaskVectors, keys: Iterable[str] | None, merged: Mapping[str, Any] | None) -> list[str]:
    chosen = tv.keys_of_kind("matrix") if keys is None else list(keys)
    unknown = [k for k in chosen if k not in tv.keys]
    if unknown:
        raise KeyMismatchError(f"Unknown key(s) {unknown[:5]}: not among the task vectors' keys.")
    chosen = [k for k in chosen if tv.kind(k) == "matrix"]
    if merged is not None:
        held = set(merged_keys(tv, merged))
        chosen = [k for k in chosen if k in held]
        check_merged(tv, merged, chosen, caller="alignment_to_merged()")
    return chosen


def alignment_to_merged(
    tv: TaskVectors,
    merged: Mapping[str, torch.Tensor] | None = None,
    *,
    tasks: Sequence[str] | None = None,
    keys: Iterable[str] | None = None,
    criterion: Criterion = "iso_script",
    eps: float = 0.05,
    reference: str | None = None,
    device: str | torch.device = "auto",
    progress: bool | None = None,
) -> pd.DataFrame:
    """SAR of every task matrix against a merge (or the task-arithmetic sum), per key.

    Parameters
    ----------
    tv : the task vectors.
    merged : a ``wl.merge(...)`` result or full merged weights (the update ``merged - base`` is taken
        by ``weightlens.merged.merged_update``); ``None`` uses the task-arithmetic sum (its SVD is
        cached in ``tv.cache``). Only the matrix keys the merge updates (or the weights hold) count.
    tasks, keys : restrict to these tasks / keys (all matrix keys by default).
    criterion, eps : rank rule for ``k_M`` (both rules are always reported; ``criterion`` picks the
        ``k``/``sar`` columns). ``"iso_script"`` reproduces the published figures.
    reference : label of the reference column (``"merged"`` or ``"sum"`` by default).
    device : decomposition device.
    progress : a bar over keys; None (default) follows ``weightlens.config.progress``.

    Returns
    -------
    pandas.DataFrame
        One row per (key, task): ``key, task, reference, k_paper, sar_paper, k_iso_script,
        sar_iso_script, k, sar, clipped``. ``SAR_avg`` is ``df.groupby("task").sar.mean()``
        (a plain mean over matrices, as in the Iso code).
    """
    criterion = check_criterion(criterion)
    names = list(tv.names if tasks is None else tasks)
    label = reference or ("sum" if merged is None else "merged")
    rows: list[dict[str, Any]] = []
    for key in bar(_matrix_keys(tv, keys, merged), progress=progress, desc="alignment", unit="key"):
        deltas = torch.stack([tv.delta(t, key) for t in names])
        if merged is None:
            ref = decompositions.svd(tv, key, names, device=device, delta=deltas.sum(0))
        else:
            m = merged_update(tv, merged, key, caller="alignment_to_merged()")
            ref = linalg.svd(m, device=device, name=key)
        rows += sar_to_reference(key, deltas, names, label, ref, eps, criterion)
    return pd.DataFrame(rows)
