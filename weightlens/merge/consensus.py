"""Consensus merging with TALL masks (``docs/methods.md#consensus_ta-consensus_ties``).

Wang, Dimitriadis, Ortiz-Jimenez, Fleuret, Frossard, "Localizing Task Information for Improved Model
Merging and Compression", ICML 2024 (arXiv:2405.07813); reference code ``nik-dim/tall_masks``
(``src/utils/tallmask_utils.py``: ``generate_task_masks``, ``construct_consensus_mask``;
``src/eval/aggregation.py``: the ``consensus`` branch), also FusionBench's ``fusion_bench/method/tall_mask``.

Per key (every coordinate is decided by its own entries: no whole-model statistic beyond TIES' trim):

* the multi-task vector ``tau_MTL``: the sum of the task vectors (``consensus_ta``), or TIES' merged
  vector (``consensus_ties``; the reference: global top-20% trim, elected sign, disjoint *sum*);
* the TALL mask of task ``t``: ``m_t = |tau_t| > lambda * |tau_MTL - tau_t|`` (the reference code's strict
  ``>``; ``strict=False``: ``>=``, the paper's formula); ``tau_MTL`` is unscaled (no ``alpha``), as in the
  reference's ``theta_0 + tv``;
* the consensus mask keeps the coordinates claimed by at least ``k`` tasks (``k=2`` drops the "selfish"
  weights, claimed by one task, and the "catastrophic" ones, claimed by none);
* ``update = consensus ⊙ tau_MTL`` and ``theta = theta_0 + alpha * update``.

:func:`tall_masks` returns the per-task masks and how many tasks claim each coordinate, per key, for analysis.
Nothing is random: the same inputs give the same masks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import torch

from weightlens.errors import InvalidParameterError
from weightlens.merge.arithmetic import _TIES_GRID, MergeFunc, Unit, _ties_prepare, ties_update
from weightlens.merge.engine import MergeContext
from weightlens.merge.registry import Interval, KeyUpdate, get_method, register_merge
from weightlens.taskvectors import TaskVectors

__all__ = ["TallMasks", "claim_counts", "consensus_mask", "consensus_ta", "consensus_ties", "tall_mask", "tall_masks"]

Lambda = Annotated[float, Interval(0, None, "left")]
Count = Annotated[int, Interval(0, None, "left")]
#: The reference code's alpha grid: ``np.linspace(0, 1, n_eval_points // 2 + 1)[1:]`` with its default
#: ``n_eval_points: 21``, i.e. ``{0.1, 0.2, ..., 1.0}`` (``src/eval/eval_utils.py``, ``config/config.yaml``).
_CONSENSUS_GRID = tuple(round(0.1 * i, 10) for i in range(1, 11))


# ------------------------------------------------------------------------------ masks (pure)
def tall_mask(deltas: torch.Tensor, multi: torch.Tensor, lam: float | Sequence[float], *,
              strict: bool = True) -> torch.Tensor:
    """TALL masks of one key: ``|tau_t| > lam_t |tau_MTL - tau_t|`` (``>=`` unless ``strict``), bool ``(T, *shape)``.

    ``deltas`` are the stacked task vectors ``(T, *shape)``, ``multi`` the multi-task vector, ``lam`` one
    value for every task or one per task.
    """
    lams = torch.as_tensor(lam, dtype=deltas.dtype).reshape(-1, *([1] * (deltas.dim() - 1)))
    size, gap = deltas.abs(), (multi.unsqueeze(0) - deltas).abs() * lams
    return size > gap if strict else size >= gap


def claim_counts(masks: torch.Tensor) -> torch.Tensor:
    """How many coordinates ``j = 0..T`` tasks claim: int64 ``(T + 1,)`` from the masks ``(T, *shape)``."""
    return torch.bincount(masks.reshape(masks.shape[0], -1).sum(0), minlength=masks.shape[0] + 1)


def consensus_mask(masks: torch.Tensor, k: int) -> torch.Tensor:
    """Coordinates claimed by at least ``k`` of the masks ``(T, *shape)``: bool ``shape``."""
    return masks.sum(0) >= k


# ------------------------------------------------------------------------------ per key
def _multi(ctx: MergeContext, key: str, deltas: torch.Tensor) -> KeyUpdate:
    """The multi-task vector of ``key`` (sum, or TIES' update for consensus_ties) and its notes."""
    p = ctx.params
    if "merge_func" in p:
        return ties_update(ctx, key, deltas, p["density"], p["scope"], p["merge_func"])
    return KeyUpdate(deltas.sum(0))


def _masks(ctx: MergeContext, key: str, lam: float | Sequence[float]) -> tuple[KeyUpdate, torch.Tensor]:
    deltas = ctx.deltas(key)
    multi = _multi(ctx, key, deltas)
    return multi, tall_mask(deltas, multi.update, lam, strict=ctx.params["strict"])


def _consensus(ctx: MergeContext, key: str) -> KeyUpdate:
    k = ctx.params["k"]
    multi, masks = _masks(ctx, key, ctx.params["tall_mask_lambda"])
    update = multi.update * consensus_mask(masks, k)
    notes = multi.notes
    if multi.update.any() and not update.any():
        notes += (f"Consensus: no coordinate of this tensor is claimed by k={k} tasks' TALL masks "
                  f"(tall_mask_lambda={ctx.params['tall_mask_lambda']:g}): its update is 0.",)
    return KeyUpdate(update, notes)


def _check_k(ctx: MergeContext, k: int) -> None:
    if k > ctx.n_tasks:
        raise InvalidParameterError(
            f"The 'k' parameter of {ctx.method} must be in [0, {ctx.n_tasks}] (at most the number of tasks "
            f"merged, {ctx.n_tasks}; a larger k keeps no coordinate: the base model). Got {k!r} instead."
        )


def _prepare_ta(ctx: MergeContext, *, k: int, **_: Any) -> dict:
    """``k`` checked against the number of tasks before any key is read."""
    _check_k(ctx, k)
    return {}


def _prepare_ties(ctx: MergeContext, *, k: int, density: float, scope: str, merge_func: str, **_: Any) -> dict:
    """``k`` checked, then TIES' whole-model thresholds and majority sign (global scope)."""
    _check_k(ctx, k)
    return _ties_prepare(ctx, density=density, scope=scope, merge_func=merge_func)


def _ties_alpha(params: Mapping[str, Any], n_tasks: int) -> float:
    return 1.0 if params["merge_func"] == "mean" else 0.3


def _ties_grid(params: Mapping[str, Any], n_tasks: int) -> tuple[float, ...]:
    return _TIES_GRID if params["merge_func"] == "mean" else _CONSENSUS_GRID


_REFERENCE = "Wang et al., ICML 2024"


@register_merge(
    "consensus_ta", alpha=0.3, pretty_name="Consensus Task Arithmetic (TALL masks)", reference=_REFERENCE,
    prepare=_prepare_ta, alpha_grid=_CONSENSUS_GRID,
)
def consensus_ta(ctx: MergeContext, key: str, *, k: Count = 2, tall_mask_lambda: Lambda = 0.6,
                 strict: bool = True) -> KeyUpdate:
    """Consensus Task Arithmetic: the sum of the task vectors where at least ``k`` TALL masks agree.

    Parameters
    ----------
    k : int in [0, T], default=2
        Tasks whose TALL mask must claim a coordinate for it to be kept (the reference's ``prun_thre_k``;
        0 keeps everything: task arithmetic).
    tall_mask_lambda : float >= 0, default=0.6
        ``lambda`` of every task's TALL mask (FusionBench's default; the reference code picks it per task in
        {0.2, ..., 0.6} on validation).
    strict : bool, default=True
        ``|tau_t| > lambda |tau_MTL - tau_t|`` (the reference code); False: ``>=`` (the paper).
    alpha : float, default=0.3
        Coefficient of the masked sum (task arithmetic's default without validation).
    """
    return _consensus(ctx, key)


@register_merge(
    "consensus_ties", alpha=None, alpha_default=_ties_alpha, alpha_doc="0.3 (merge_func='sum') | 1.0 (mean)",
    pretty_name="Consensus TIES (TALL masks)", reference=_REFERENCE, prepare=_prepare_ties, alpha_grid=_ties_grid,
)
def consensus_ties(ctx: MergeContext, key: str, *, k: Count = 2, tall_mask_lambda: Lambda = 0.6,
                   strict: bool = True, density: Unit = 0.2, scope: Literal["global", "tensor"] = "global",
                   merge_func: MergeFunc = "sum") -> KeyUpdate:
    """Consensus TIES: TIES' merged vector where at least ``k`` TALL masks (built against it) agree.

    Parameters
    ----------
    k, tall_mask_lambda, strict : as :func:`consensus_ta`
    density, scope : as :func:`weightlens.merge.arithmetic.ties` (the reference: 0.2, global)
    merge_func : {"sum", "mean", "max"}, default="sum"
        TIES' disjoint merge (the reference builds the multi-task vector with the disjoint sum).
    alpha : float, default=0.3 (1.0 with merge_func="mean")
    """
    return _consensus(ctx, key)


# ------------------------------------------------------------------------------ analysis
@dataclass(frozen=True)
class TallMasks:
    """Per-key TALL masks and how many tasks claim each coordinate (:func:`tall_masks`).

    Attributes
    ----------
    tasks : task names, in mask order.
    lambdas : the ``lambda`` of each task's mask.
    k : the consensus threshold the counts are read against.
    counts : ``{key: int64 (T + 1,)}``: coordinates claimed by exactly ``j`` tasks, ``j = 0..T``.
    masks : ``{key: bool (T, *shape)}``: the masks (empty when ``keep_masks=False``).
    """

    tasks: tuple[str, ...]
    lambdas: tuple[float, ...]
    k: int
    counts: dict[str, torch.Tensor] = field(repr=False)
    masks: dict[str, torch.Tensor] = field(repr=False)

    def table(self) -> Any:
        """One row per key: ``key``, ``numel``, ``claimed_0 .. claimed_T``, ``catastrophic`` (claimed by none),
        ``selfish`` (by one), ``kept`` (by at least ``k``: what the consensus merge keeps), as a DataFrame."""
        import pandas as pd

        rows = []
        for key, c in self.counts.items():
            n = [int(v) for v in c]
            rows.append({"key": key, "numel": sum(n), **{f"claimed_{j}": v for j, v in enumerate(n)},
                         "catastrophic": n[0], "selfish": n[1] if len(n) > 1 else 0, "kept": sum(n[self.k:])})
        return pd.DataFrame(rows)


def _lambdas(value: float | Sequence[float] | Mapping[str, float], tasks: tuple[str, ...],
             method: str) -> tuple[float, ...]:
    """One non-negative ``lambda`` per task from a number, a sequence in task order or ``{task: lambda}``."""
    if isinstance(value, Mapping):
        missing = [t for t in tasks if t not in value]
        if missing or set(value) - set(tasks):
            raise InvalidParameterError(
                f"The 'tall_mask_lambda' parameter of {method} must give one value per task ({', '.join(tasks)}). "
                f"Got {dict(value)!r} instead.")
        value = [value[t] for t in tasks]
    values = [value] * len(tasks) if isinstance(value, (int, float)) and not isinstance(value, bool) else list(value)
    ok = len(values) == len(tasks) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < float("inf") for v in values)
    if not ok:
        raise InvalidParameterError(
            f"The 'tall_mask_lambda' parameter of {method} must be a number >= 0 or one per task "
            f"({len(tasks)}). Got {value!r} instead.")
    return tuple(float(v) for v in values)


def tall_masks(tv: TaskVectors, *, method: Literal["consensus_ta", "consensus_ties"] = "consensus_ta",
               tall_mask_lambda: float | Sequence[float] | Mapping[str, float] = 0.6,
               keys: Iterable[str] | None = None, keep_masks: bool = True, **params: Any) -> TallMasks:
    """The TALL masks of ``method`` per key and the counts of coordinates by how many tasks claim them.

    One key at a time (adapters materialised one key at a time, as every merge method reads them).

    Parameters
    ----------
    tv : TaskVectors
    method : {"consensus_ta", "consensus_ties"}, default="consensus_ta"
        Whose multi-task vector the masks compare against: the sum, or TIES' merged vector.
    tall_mask_lambda : float, sequence of float or {task: float}, default=0.6
        One ``lambda`` for every task, or one per task (the reference code picks each task's on validation).
    keys : iterable of str, optional
        The keys to read (default: ``tv.keys``; TIES' global thresholds are still over ``tv.keys``).
    keep_masks : bool, default=True
        Keep the boolean masks (``T`` bools per parameter); False keeps only the counts.
    **params
        The method's other parameters (``k``, ``strict``, ``density``, ``scope``, ``merge_func``).

    Examples
    --------
    >>> import torch, weightlens as wl
    >>> base = {"w": torch.zeros(3)}
    >>> tv = wl.TaskVectors(base, {"a": {"w": torch.tensor([1.0, 1.0, 0.0])},
    ...                            "b": {"w": torch.tensor([0.0, 1.0, 0.0])}})
    >>> tall_masks(tv, tall_mask_lambda=0.5).counts["w"].tolist()  # claimed by 0, 1, 2 tasks
    [1, 1, 1]
    """
    spec = get_method(method)
    if method not in ("consensus_ta", "consensus_ties"):
        raise InvalidParameterError(
            f"The 'method' parameter of tall_masks must be 'consensus_ta' or 'consensus_ties'. Got {method!r} instead.")
    lambdas = _lambdas(tall_mask_lambda, tuple(tv.names), method)
    resolved = spec.resolve({**params, "tall_mask_lambda": lambdas[0]}, len(tv))
    inner = {name: v for name, v in resolved.items() if name != "alpha"}
    ctx = MergeContext(tv, torch.device("cpu"), method, inner)
    ctx.state = dict(spec.prepare(ctx, **inner)) if spec.prepare is not None else {}
    counts, masks = {}, {}
    for key in (tv.keys if keys is None else list(keys)):
        _, m = _masks(ctx, key, lambdas)
        counts[key] = claim_counts(m)
        if keep_masks:
            masks[key] = m
    return TallMasks(tuple(tv.names), lambdas, int(inner["k"]), counts, masks)
