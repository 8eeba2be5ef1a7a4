"""Sign conflicts between task vectors, optionally after TIES trimming (``docs/methods.md#sign-conflicts``).

Per tensor, with ``n+_p`` / ``n-_p`` the number of tasks whose (trimmed) entry p is positive /
negative and ``n_p = n+_p + n-_p``:

* **conflict rate** ``#{p: n+_p > 0 and n-_p > 0} / #{p: n_p >= 2}``; chance ``1 - 2^(1-T)`` for fair
  independent signs with every entry nonzero. After trimming, coordinates have fewer survivors,
  so the matching baseline is the mean of ``1 - 2^(1 - n_p)`` over counted coordinates
  (``chance``); ``chance_T`` keeps the untrimmed formula.
* **mass-weighted conflict** (weightlens): share of the total ``|tau|`` mass of counted
  coordinates that sits on conflicting ones.
* **discarded mass** ``D``: the ``|tau|`` mass whose sign opposes the TIES elected sign
  ``sgn(sum_t tau_t)`` (ties at 0 take the tensor's majority sign), over all mass.
* **sign agreement** mean of ``|n+ - n-| / n`` (1 where ``n = 0``), the TIES repo's helper.
* **pairwise conflict** ``c_ij = #{tau_i tau_j < 0} / #{tau_i tau_j != 0}`` (chance 0.5).

Examples
--------
>>> import torch
>>> from weightlens.analysis.signs import conflict_stats
>>> s = conflict_stats(torch.tensor([[1.0, 2.0, -1.0], [1.0, -2.0, -3.0]]))
>>> s["conflict_rate"], s["chance_T"]
(0.3333333333333333, 0.5)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from weightlens import linalg
from weightlens._order_stats import kth_values
from weightlens.errors import InvalidParameterError
from weightlens.taskvectors import TaskVectors

__all__ = [
    "chance_conflict",
    "conflict_stats",
    "elected_sign",
    "global_thresholds",
    "majority_sign",
    "radix_thresholds",
    "streaming_thresholds",
    "pairwise_conflicts",
    "sign_votes",
    "ties_threshold",
    "trim",
]

_F64 = torch.float64
_CHUNK = 1 << 20  # coordinates per block in pairwise counts


def chance_conflict(n_tasks: int) -> float:
    """Chance conflict rate ``1 - 2^(1 - T)`` of T independent fair signs (all nonzero)."""
    return 1.0 - 2.0 ** (1 - int(n_tasks)) if n_tasks >= 1 else math.nan


def check_density(density: float | None) -> float | None:
    """Validate a TIES density (fraction of entries kept per task) in ``(0, 1]``."""
    if density is None:
        return None
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
        raise InvalidParameterError(
            f"The 'density' parameter must be None or a float in (0, 1] (fraction of entries TIES "
            f"keeps per task; the paper uses 0.2). Got {density!r} instead."
        )
    return float(density)


def ties_threshold(values: torch.Tensor, density: float) -> float | None:
    """TIES trim threshold of one task: keep ``|tau| >= threshold``; None keeps everything.

    As in the TIES reference code: ``k_keep = int(P * density)`` and the threshold is the
    ``(P - k_keep)``-th smallest ``|tau|`` (``kthvalue``), so ties at it keep slightly more.
    """
    density = check_density(density)
    if density is None:
        return None
    flat = values.detach().reshape(-1).abs()
    P = flat.numel()
    kth = P - int(P * density)
    if kth <= 0 or P == 0:
        return None
    return float(torch.kthvalue(flat.cpu(), kth).values)  # in the input dtype: no rounding


def trim(
    stacked: torch.Tensor,
    density: float | None = None,
    *,
    thresholds: Sequence[float | None] | torch.Tensor | None = None,
) -> torch.Tensor:
    """TIES trim of stacked deltas ``(T, ...)``: per task keep the entries with ``|tau_t| >= threshold_t``.

    ``thresholds`` (one per task: a sequence, None keeping that task whole, e.g. from
    :func:`global_thresholds`, or a ``(T,)`` tensor from :func:`streaming_thresholds`) wins over
    ``density``; with ``density`` alone the threshold is local to this tensor. Neither: returned
    unchanged. The one TIES threshold trim of weightlens (analysis and ``merge`` alike); trimmed
    entries become ``+0`` and kept ones keep their bits.
    """
    if thresholds is None:
        if check_density(density) is None:
            return stacked
        thresholds = [ties_threshold(stacked[t], density) for t in range(stacked.shape[0])]  # type: ignore[arg-type]
    if len(thresholds) != stacked.shape[0]:
        raise InvalidParameterError(
            f"trim got {len(thresholds)} thresholds for {stacked.shape[0]} tasks; pass one per task."
        )
    if isinstance(thresholds, torch.Tensor):
        thr = thresholds.to(device=stacked.device, dtype=stacked.dtype)
    else:  # None keeps everything: |x| < 0 never holds
        thr = torch.tensor([0.0 if t is None else t for t in thresholds], dtype=stacked.dtype, device=stacked.device)
    out = stacked.clone()
    for part, threshold in zip(out, thr):  # task by task: a temporary of one task's size, not T times it
        part.masked_fill_(part.abs() < threshold, 0.0)
    return out


def elected_sign(total: torch.Tensor, zero: int | None = None) -> torch.Tensor:
    """TIES elected sign ``gamma = sgn(total)`` from the per-coordinate vote sums ``total = sum_t tau_t``.

    A zero sum takes ``zero``: None (default) the tensor's majority sign ``sgn(sum_p gamma_p)``
    (what the sign statistics use); an int the caller's choice (``merge``'s TIES: the whole-model
    majority, or +1 as mergekit); 0 leaves it 0. The one elected sign of weightlens.
    """
    gamma = torch.sign(total)
    if zero is None:
        return torch.where(gamma == 0, torch.sign(gamma.sum()), gamma)
    return gamma.masked_fill(gamma == 0, float(zero)) if zero else gamma


def sign_votes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-coordinate sign votes of flattened task deltas ``x`` ``(T, P)``: ``(signs, net, n, conflict)``.

    ``signs`` is ``sgn(x)`` ``(T, P)``; ``net = n+ - n-`` and ``n = n+ + n-`` per coordinate ``(P,)``;
    ``conflict`` marks the coordinates where both signs are present; ``n >= 2`` the counted
    (contested) ones. All in float32: signs and counts are exact there (for T < 2^24), and it is
    several times faster than int or float64 passes on the CPU. The one sign count behind
    :func:`conflict_stats` and ``merge.compare``'s sign outcomes.
    """
    sd = torch.sign(x).to(torch.float32)
    net, n = sd.sum(0), sd.abs().sum(0)
    return sd, net, n, net.abs() < n


def empty_stats(T: int, P: int) -> dict[str, float]:
    """Statistics of a tensor no task changed (e.g. a frozen layer)."""
    nan = math.nan
    return {
        "n_coords": P, "n_eligible": 0, "n_conflict": 0, "conflict_rate": nan, "chance": nan,
        "chance_T": chance_conflict(T), "chance_sum": 0.0, "mass_conflict": nan, "discarded_mass": nan,
        "agreement": 1.0 if P else nan, "kept_fraction": 0.0 if P else nan, "mass_eligible": 0.0,
        "mass_conflicting": 0.0, "mass_total": 0.0, "mass_discarded": 0.0,
    }


def conflict_stats(
    stacked: torch.Tensor,
    density: float | None = None,
    *,
    thresholds: Sequence[float | None] | None = None,
) -> dict[str, float]:
    """Sign-conflict statistics of one tensor from stacked task deltas ``(T, ...)``.

    Parameters
    ----------
    stacked : ``(T, ...)`` deltas of T tasks for one key.
    density : TIES density for local trimming (fraction kept per task); None: no trimming.
    thresholds : per-task trim thresholds (global trimming); overrides ``density``.

    Returns
    -------
    dict
        Rates ``conflict_rate, chance, chance_T, mass_conflict, discarded_mass, agreement,
        kept_fraction`` and the counts behind them for pooled (parameter-weighted) aggregation:
        ``n_coords, n_eligible, n_conflict, chance_sum, mass_eligible, mass_conflicting,
        mass_total, mass_discarded``. Sums are accumulated in float64.
    """
    T = stacked.shape[0]
    x = trim(stacked, density, thresholds=thresholds).reshape(T, -1)
    if not bool(x.any()):
        return empty_stats(T, x.shape[1])
    _, net, n, conflict = sign_votes(x)
    eligible = n >= 2
    mass = linalg.sum64(x.abs(), 0)
    total = linalg.sum64(x, 0)  # = positive mass - negative mass
    # TIES discards the mass against the elected sign gamma = sgn(sum_t tau_t): (mass - gamma * total) / 2
    gamma = elected_sign(total)
    discarded = float(torch.where(gamma != 0, mass - gamma * total, 0.0).sum()) / 2
    # joint histogram of (n, |n+ - n-|): exact counts behind the chance baseline and the agreement
    joint = torch.bincount((n * (T + 1) + net.abs()).to(torch.int32), minlength=(T + 1) ** 2)
    joint = joint.reshape(T + 1, T + 1).to(_F64)  # [survivors, |net|]
    survivors = torch.arange(T + 1, dtype=_F64)
    counts = torch.where(survivors >= 2, joint.sum(1), 0.0)  # coordinates with n >= 2 survivors
    chance_sum = float((counts * (1.0 - 2.0 ** (1.0 - survivors))).sum())
    n_el, n_cf = int(counts.sum()), int(linalg.count_nonzero(conflict))
    # agreement |n+ - n-| / n per coordinate, 1 where n = 0
    agree_sum = float(joint[0].sum() + (joint[1:] * survivors / survivors[1:, None]).sum())
    m_el, m_cf, m_tot = float((mass * eligible).sum()), float((mass * conflict).sum()), float(mass.sum())
    return {
        "n_coords": int(x.shape[1]),
        "n_eligible": n_el,
        "n_conflict": n_cf,
        "conflict_rate": n_cf / n_el if n_el else math.nan,
        "chance": chance_sum / n_el if n_el else math.nan,
        "chance_T": chance_conflict(T),
        "chance_sum": chance_sum,
        "mass_conflict": m_cf / m_el if m_el > 0 else math.nan,
        "discarded_mass": discarded / m_tot if m_tot > 0 else math.nan,
        "agreement": agree_sum / x.shape[1],
        "kept_fraction": float(n.sum(dtype=_F64)) / x.numel(),
        "mass_eligible": m_el,
        "mass_conflicting": m_cf,
        "mass_total": m_tot,
        "mass_discarded": discarded,
    }


def pairwise_conflicts(
    stacked: torch.Tensor,
    density: float | None = None,
    *,
    thresholds: Sequence[float | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts behind the pairwise conflict rate: ``(opposite, both_nonzero)``, each ``(T, T)``.

    ``opposite[i, j] = #{p: tau_i^p tau_j^p < 0}``, ``both_nonzero[i, j] = #{p: tau_i^p tau_j^p != 0}``
    (after the same optional trimming as :func:`conflict_stats`); the rate is their ratio.
    """
    T = stacked.shape[0]
    x = trim(stacked, density, thresholds=thresholds).reshape(T, -1)
    opposite = torch.zeros(T, T, dtype=_F64)
    both = torch.zeros(T, T, dtype=_F64)
    if not bool(x.any()):
        return opposite, both
    for lo in range(0, x.shape[1], _CHUNK):  # float32 counts are exact below 2^24 per block
        sd = torch.sign(x[:, lo : lo + _CHUNK]).to(torch.float32)  # p - q for indicators p (> 0), q (< 0)
        nz = sd.abs()  # p + q
        agree, nonzero = sd @ sd.mT, nz @ nz.mT  # (p q^T + q p^T) = (nz nz^T - sd sd^T) / 2
        opposite += ((nonzero - agree) / 2).to(_F64)
        both += nonzero.to(_F64)
    return opposite, both


def global_thresholds(
    tv: TaskVectors,
    density: float,
    *,
    tasks: Sequence[str] | None = None,
    keys: Iterable[str] | None = None,
) -> dict[str, float | None]:
    """Whole-model TIES trim threshold of each task (``scope="global"``, the paper's default).

    ``{task: threshold}`` from :func:`streaming_thresholds`; None (keep everything) at density 1.
    The same values as a ``(T,)`` tensor (what ``merge``'s TIES uses) are :func:`streaming_thresholds`.
    """
    if check_density(density) is None:
        return {t: None for t in (tv.names if tasks is None else tasks)}
    sub = tv if tasks is None else tv.subset(tasks)
    values = streaming_thresholds(sub, density, keys)
    return dict(zip(sub.names, (float(v) for v in values)))


def radix_thresholds(blocks: Callable[[], Iterable[torch.Tensor]], n_tasks: int, density: float) -> torch.Tensor:
    """Per-task ``(P - int(P * density))``-th smallest ``|x|`` over every ``(T, ...)`` stack ``blocks()``
    yields (``P`` entries per task in all), exact (``torch.kthvalue`` on the concatenation), holding one
    stack at a time: :func:`~weightlens._order_stats.kth_values` on ``|x|`` (``blocks`` is called once per
    pass). ``density >= 1`` (nothing trimmed) gives zeros without reading anything. ``(T,)`` float32."""
    if density >= 1:
        return torch.zeros(n_tasks)
    kth = kth_values(blocks, n_tasks, lambda P: [P - int(P * density)] if P else [],  # density < 1: rank >= 1
                     magnitude=True)
    return kth[:, 0] if kth.shape[1] else torch.zeros(n_tasks)  # no entries: nothing to trim


def streaming_thresholds(tv: TaskVectors, density: float, keys: Iterable[str] | None = None) -> torch.Tensor:
    """Per-task TIES threshold over the whole model: the ``(P - int(P * density))``-th smallest ``|tau_t|``.

    Exact (equal to ``torch.kthvalue`` on the flattened model) by :func:`radix_thresholds` over the task
    vectors key by key, holding one key of every task and two histograms per task at a time, never the
    flattened model. ``density = 1`` (nothing trimmed) gives 0.

    Returns
    -------
    Tensor of shape (T,), float32.
    """
    keys = list(tv.keys if keys is None else keys)
    return radix_thresholds(lambda: (tv.deltas(k) for k in keys), len(tv), density)


def majority_sign(trimmed: Iterable[torch.Tensor]) -> int:
    """Whole-model majority ``sgn(sum_p gamma_p)`` of the elected signs (TIES ``resolve_zero_signs``), from
    the stacked trimmed task vectors of every key (or block), one at a time."""
    votes = 0
    for stack in trimmed:
        votes += int(elected_sign(stack.sum(0), 0).sum(dtype=torch.float64))
    return (votes > 0) - (votes < 0)


def pair_rows(key: str, tasks: Sequence[str], opposite: torch.Tensor, both: torch.Tensor) -> list[dict[str, Any]]:
    """Rows ``{key, task_a, task_b, conflict_pair, n_pair}`` for every unordered pair of tasks."""
    rows = []
    for i in range(len(tasks)):
        for j in range(i + 1, len(tasks)):
            n = float(both[i, j])
            rows.append({
                "key": key, "task_a": tasks[i], "task_b": tasks[j],
                "conflict_pair": float(opposite[i, j]) / n if n > 0 else math.nan,
                "n_pair": n, "n_opposite": float(opposite[i, j]),
            })
    return rows
