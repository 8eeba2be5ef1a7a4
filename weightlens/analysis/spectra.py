"""Spectra of task matrices: energy, rank for a tolerance, stable and effective rank.

Definitions: ``docs/methods.md#spectra``. The pure functions take a vector of singular values
(descending) and the matrix shape; :func:`spectra_table` walks a :class:`TaskVectors` and returns one
row per (key, task), the task-arithmetic sum included, reusing cached decompositions.

Examples
--------
>>> import torch
>>> from weightlens.analysis.spectra import spectrum_metrics
>>> m = spectrum_metrics(torch.tensor([2.0, 1.0, 1.0]), (3, 3))
>>> round(m["stable_rank"], 3), m["rank_eps"]
(1.5, 3)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch

from weightlens.errors import InvalidParameterError

__all__ = [
    "CRITERIA",
    "complete_spectrum",
    "effective_rank",
    "rank_for_energy",
    "spectrum_metrics",
    "spectrum_rows",
]

Criterion = Literal["paper", "iso_script"]
CRITERIA = ("paper", "iso_script")
_ALIASES = {"paper": "paper", "paper_eq6": "paper", "iso_script": "iso_script"}
DEFAULT_ENERGY_RANKS = (1, 8, 32)


def check_criterion(criterion: str) -> Criterion:
    """Canonical rank rule name (``"paper_eq6"`` is accepted for ``"paper"``)."""
    if criterion not in _ALIASES:
        raise InvalidParameterError(
            f"The 'criterion' parameter must be one of {CRITERIA} ('paper_eq6' is an alias of "
            f"'paper'). Got {criterion!r} instead."
        )
    return _ALIASES[criterion]  # type: ignore[return-value]


def _check_eps(eps: float) -> float:
    if not (isinstance(eps, (int, float)) and 0.0 < float(eps) < 1.0):
        raise InvalidParameterError(f"The 'eps' parameter must be a float in (0, 1). Got {eps!r} instead.")
    return float(eps)


def _as64(S: torch.Tensor) -> torch.Tensor:
    return S.detach().to(device="cpu", dtype=torch.float64).flatten()


def complete_spectrum(S: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """All ``min(m, n)`` singular values from the nonzero ones: ``S`` followed by exact zeros.

    For an exact SVD with fewer triplets than ``min(m, n)``, e.g. from a LoRA update's factors
    (``weightlens.decompositions``): its values past the rank are exactly zero, so the spectrum is
    complete, not truncated (:func:`spectrum_metrics` then counts every value, ``energy_at_k`` past the
    rank is 1.0). ``S`` is returned as is when it already has ``min(m, n)`` values.
    """
    r = min(shape)
    if S.numel() >= r:
        return S
    return torch.cat([S.flatten(), S.new_zeros(r - S.numel())])


def rank_for_energy(
    S: torch.Tensor,
    eps: float = 0.05,
    *,
    criterion: Criterion = "paper",
    total_sq: float | None = None,
) -> int:
    """Number of leading singular vectors kept by a rank rule (``docs/methods.md#sar``).

    Parameters
    ----------
    S : singular values, descending (may be only the top ones when ``total_sq`` is given).
    eps : tolerance; 0.05 in the Iso paper and script.
    criterion : ``"paper"`` (Iso Eq. 6): the least k with ``sum_{i>k} s_i^2 <= eps^2 sum s_i^2``.
        ``"iso_script"`` (``fig_3a.py``): the 0-based index of the first i with
        ``sqrt(cumsum(s^2)_i / sum s^2) > 1 - eps``, i.e. one fewer than the least count passing.
    total_sq : ``sum s_i^2`` over the full spectrum (``||delta||_F^2``) when ``S`` is truncated.

    Returns
    -------
    int
        k in ``[0, len(S)]``; 0 for a zero matrix. When a truncated ``S`` never reaches the
        criterion, ``len(S)`` (a lower bound).
    """
    criterion = check_criterion(criterion)
    eps = _check_eps(eps)
    s2 = _as64(S) ** 2
    total = float(s2.sum()) if total_sq is None else float(total_sq)
    if total <= 0.0 or s2.numel() == 0:
        return 0
    cum = torch.cumsum(s2, 0)
    if criterion == "paper":
        ok = (total - cum) <= eps * eps * total * (1 + 1e-12)
        hits = torch.nonzero(ok)
        return int(hits[0]) + 1 if hits.numel() else int(s2.numel())
    ok = torch.sqrt(cum / total) > 1.0 - eps
    hits = torch.nonzero(ok)
    return int(hits[0]) if hits.numel() else int(s2.numel())


def effective_rank(S: torch.Tensor, *, entropy: Literal["l1", "energy"] = "l1") -> float:
    """``exp`` of the spectral entropy (Roy & Vetterli 2007); NaN for a zero matrix.

    ``entropy="l1"`` uses ``p_i = s_i / sum s`` (default), ``"energy"`` uses ``p_i = s_i^2 / sum s^2``.
    """
    if entropy not in ("l1", "energy"):
        raise InvalidParameterError(
            f"The 'entropy' parameter must be one of ('l1', 'energy'). Got {entropy!r} instead."
        )
    s = _as64(S)
    w = s if entropy == "l1" else s * s
    total = float(w.sum())
    if total <= 0.0:
        return math.nan
    p = w[w > 0] / total
    return float(torch.exp(-(p * torch.log(p)).sum()))


def _numerical_rank(s: torch.Tensor, shape: Sequence[int], dtype_eps: float) -> float:
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0.0
    tol = max(shape) * dtype_eps * float(s[0])
    n = int((s > tol).sum())
    return math.nan if n == s.numel() < min(shape) else float(n)


def spectrum_metrics(
    S: torch.Tensor,
    shape: Sequence[int],
    *,
    total_sq: float | None = None,
    eps: float = 0.05,
    energy_ranks: Sequence[int] = DEFAULT_ENERGY_RANKS,
    entropy: Literal["l1", "energy"] = "l1",
    dtype_eps: float = float(torch.finfo(torch.float32).eps),
) -> dict[str, float]:
    """Spectral summary of one matrix from its singular values (``docs/methods.md#spectra``).

    Parameters
    ----------
    S : singular values, descending; all ``min(m, n)`` of them, or the top ones only (an exact SVD of
        lower rank, from factors, gives all of them with :func:`complete_spectrum`).
    shape : ``(m, n)`` of the matrix.
    total_sq : ``||delta||_F^2``; needed for exact energies when ``S`` is truncated.
    eps : tolerance of ``rank_eps`` (Iso Eq. 6 rule).
    energy_ranks : k values for the ``energy_at_<k>`` columns (energy retained at rank k).
    entropy : ``"l1"`` (default) or ``"energy"`` spectral entropy for ``erank``.
    dtype_eps : epsilon of the values' dtype (numerical rank: ``s_i > max(m, n) dtype_eps s_1``).

    Returns
    -------
    dict
        ``n_values, truncated, sigma_max, frob, nuclear, stable_rank, erank, participation_ratio,
        rank_eps, numerical_rank, energy_at_<k>``. Values that need the full spectrum are NaN when
        ``S`` is truncated and cannot settle them; ratios are NaN for a zero matrix.
    """
    if len(shape) != 2:
        raise InvalidParameterError(f"spectrum_metrics needs a 2-D shape; got {tuple(shape)}.")
    s = _as64(S)
    r = min(shape)
    truncated = s.numel() < r
    total = float((s * s).sum()) if total_sq is None else float(total_sq)
    s1 = float(s[0]) if s.numel() else 0.0
    zero = total <= 0.0 or s1 == 0.0
    nan = math.nan
    out: dict[str, Any] = {
        "n_values": int(s.numel()),
        "truncated": bool(truncated),
        "sigma_max": s1,
        "frob": math.sqrt(max(total, 0.0)),
        "nuclear": nan if truncated else float(s.sum()),
        "stable_rank": nan if zero else total / (s1 * s1),
        "erank": nan if truncated else effective_rank(s, entropy=entropy),
        "participation_ratio": nan if (zero or truncated) else total**2 / float((s**4).sum()),
        "numerical_rank": _numerical_rank(s, shape, dtype_eps),
    }
    k_eps = rank_for_energy(s, eps, criterion="paper", total_sq=total)
    out["rank_eps"] = nan if (truncated and k_eps == s.numel()) else k_eps
    cum = torch.cumsum(s * s, 0)
    for k in energy_ranks:
        if zero:
            out[f"energy_at_{k}"] = nan
        elif k <= s.numel():
            out[f"energy_at_{k}"] = float(cum[k - 1]) / total
        else:
            out[f"energy_at_{k}"] = 1.0 if not truncated and k >= r else nan
    return out


def spectrum_rows(
    key: str,
    shape: Sequence[int],
    values: Mapping[str, tuple[torch.Tensor, float | None]],
    **options: Any,
) -> list[dict[str, Any]]:
    """Rows ``{key, task, m, n, numel, <metrics>}`` for the spectra of one key.

    ``values`` maps a task name (or ``"sum"``/``"merged"``) to ``(S, total_sq)`` where ``total_sq``
    may be None when ``S`` is the full spectrum. ``options`` go to :func:`spectrum_metrics`.
    """
    m, n = shape
    rows = []
    for task, (S, total_sq) in values.items():
        metrics = spectrum_metrics(S, shape, total_sq=total_sq, **options)
        rows.append({"key": key, "task": task, "m": m, "n": n, "numel": m * n, **metrics})
    return rows
