"""Interpolation curves between checkpoints, pairwise curves and the multi-endpoint merge barrier.

Every evaluation here is a list of weight rows over the endpoints: ``(1 - alpha, alpha)`` for a
two-endpoint curve, identity rows for the endpoints themselves, ``1/N`` for the centroid. With an
:class:`~weightlens.lmc.Evaluator` all rows are scored in batched ``vmap`` passes; with a plain
``evaluate(state_dict)`` callable they are scored one at a time. BatchNorm reset and REPAIR build a
corrected state dict per row first (one statistics pass per row), which needs the module, so they
need an ``Evaluator``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from itertools import combinations
from typing import Any

import numpy as np
from torch import Tensor

from weightlens._options import resolve_options
from weightlens._progress import bar
from weightlens.errors import InvalidParameterError
from weightlens.io import load
from weightlens.lmc._data import Batches
from weightlens.lmc._states import Endpoints, endpoint_names
from weightlens.lmc.barriers import LMCCurve, MergeBarrier
from weightlens.lmc.evaluator import DEFAULT_SPLIT, Evaluator, SplitArrays
from weightlens.lmc.norm import Repair, channel_stats, mix_stats, repair as repair_state, reset_batchnorm

__all__ = ["MergeBarrierOptions", "curve", "curve_many", "merge_barrier"]

Evaluate = Callable[[Mapping[str, Tensor]], Mapping[str, object]] | Evaluator


def _alphas(points: int | Sequence[float]) -> np.ndarray:
    if isinstance(points, (int, np.integer)) and not isinstance(points, bool):
        if points < 2:
            raise InvalidParameterError(f"The 'points' parameter must be >= 2 (the endpoints). Got {points}.")
        return np.linspace(0.0, 1.0, int(points))
    alphas = np.asarray(points, dtype=np.float64)
    if alphas.ndim != 1 or len(alphas) < 2 or alphas[0] != 0 or alphas[-1] != 1 or np.any(np.diff(alphas) <= 0):
        raise InvalidParameterError(
            "The 'points' parameter must be an int >= 2 or an increasing sequence of alphas from 0 to 1 "
            f"(endpoints included). Got {points!r} instead."
        )
    return alphas


def _normalize(result: Mapping[str, object], row: int) -> dict[str, dict[str, float]]:
    """``{"loss", ...}`` or ``{split: {"loss", ...}}`` -> ``{split: {metric: float}}``."""
    if isinstance(result, Mapping) and result and all(isinstance(v, Mapping) for v in result.values()):
        splits = {str(s): dict(m) for s, m in result.items()}
    elif isinstance(result, Mapping) and "loss" in result:
        splits = {DEFAULT_SPLIT: dict(result)}
    else:
        raise InvalidParameterError(
            "evaluate(state_dict) must return {'loss': float, 'accuracy': float} or {split: {...}}; at "
            f"alpha row {row} it returned {result!r}."
        )
    for split, metrics in splits.items():
        if "loss" not in metrics:
            raise InvalidParameterError(f"evaluate(...)[{split!r}] has no 'loss'; got keys {sorted(metrics)}.")
    return {s: {m: float(v) for m, v in ms.items()} for s, ms in splits.items()}


def _loop(endpoints: Endpoints, weights: np.ndarray, evaluate: Callable, progress: bool | None) -> SplitArrays:
    rows = [_normalize(evaluate(endpoints.combine(w)), i)
            for i, w in enumerate(bar(weights, progress=progress, desc="lmc", unit="model"))]
    return {s: {m: np.array([r[s][m] for r in rows]) for m in rows[0][s]} for s in rows[0]}


class _NormalizedStates(Sequence):
    """Lazily built per-row state dicts with REPAIR and/or BatchNorm reset applied."""

    def __init__(self, ev: Evaluator, endpoints: Endpoints, weights: np.ndarray,
                 bn_loader: object | None, repair: Repair | None) -> None:
        self.ev, self.endpoints, self.weights = ev, endpoints, weights
        self.bn_loader, self.repair = bn_loader, repair
        self.stats = None
        if repair is not None:
            self.stats = [
                channel_stats(ev.module, ev.prepare(endpoints.state(i)), repair.data, layers=repair.layers,
                              batch_size=repair.batch_size)
                for i in range(len(endpoints))
            ]

    def __len__(self) -> int:
        return len(self.weights)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        w = self.weights[i]
        state = self.ev.prepare(self.endpoints.combine(w))
        if self.repair is not None:
            state = repair_state(self.ev.module, state, mix_stats(self.stats, w), self.repair.data,
                                 batch_size=self.repair.batch_size, eps=self.repair.eps)
        if self.bn_loader is not None:
            state = reset_batchnorm(self.ev.module, state, self.bn_loader)
        return {k: state[k] for k in self.endpoints.keys}


def _evaluate_rows(endpoints: Endpoints, weights: np.ndarray, evaluate: Evaluate, bn_loader: object | None,
                   repair: object | None, progress: bool | None) -> SplitArrays:
    """Score every weight row: batched with an Evaluator, else one call per row."""
    if not isinstance(evaluate, Evaluator):
        if bn_loader is not None or repair is not None:
            raise InvalidParameterError(
                "bn_loader and repair rebuild statistics with forward passes, so they need the module: pass "
                "evaluate=wl.lmc.Evaluator(module, data, loss_fn) instead of a plain callable."
            )
        if not callable(evaluate):
            raise InvalidParameterError(f"The 'evaluate' parameter must be callable. Got {evaluate!r} instead.")
        return _loop(endpoints, weights, evaluate, progress)
    if bn_loader is None and repair is None:
        return evaluate.evaluate_weights(endpoints, weights, progress=progress)
    # Wrap the data once: a one-shot iterator is then read once and reused for every row.
    bn = None if bn_loader is None else Batches(bn_loader, what="bn_loader")
    settings = None if repair is None else repair if isinstance(repair, Repair) else Repair(repair)
    if settings is not None:
        settings = replace(settings, data=Batches(settings.data, batch_size=settings.batch_size, what="repair"))
    states = _NormalizedStates(evaluate, endpoints, weights, bn, settings)
    return evaluate.evaluate_many(states, progress=progress)


def _normalization(bn_loader: object | None, repair: object | None) -> str:
    parts = (["repair"] if repair is not None else []) + (["bn_reset"] if bn_loader is not None else [])
    return "+".join(parts) or "none"


def _pair_names(a: object, b: object) -> list[str]:
    names = [load(a).name, load(b).name]
    return names if names[0] != names[1] else [f"{names[0]} (A)", f"{names[1]} (B)"]


def _default_label(normalization: str) -> str:
    return {"none": "interpolation", "repair": "REPAIR", "bn_reset": "BN reset",
            "repair+bn_reset": "REPAIR + BN reset"}[normalization]


def curve(
    a: object,
    b: object,
    evaluate: Evaluate,
    *,
    points: int | Sequence[float] = 25,
    bn_loader: object | None = None,
    repair: object | None = None,
    progress: bool | None = None,
    label: str | None = None,
) -> LMCCurve:
    """Loss and accuracy along ``(1 - alpha) * theta_A + alpha * theta_B``.

    Parameters
    ----------
    a, b : checkpoint source
        Anything :func:`weightlens.load` accepts; same keys and shapes.
    evaluate : Evaluator or callable
        ``evaluate(state_dict) -> {"loss", "accuracy"}`` or ``{split: {...}}``. An
        :class:`Evaluator` scores all alphas in batched passes; a callable is called per alpha.
    points : int or sequence of float, default=25
        Number of evenly spaced alphas (endpoints included), or the alphas themselves.
    bn_loader : data, optional
        Batches for resetting BatchNorm statistics at every alpha (needs an ``Evaluator``).
    repair : data or Repair, optional
        Apply REPAIR at every alpha, with statistics measured on this data (needs an ``Evaluator``).
    progress : bool or None, default=None
        A progress bar; None (default) follows ``weightlens.config.progress``.
    label : str, optional
        Display name of the curve (e.g. ``"naive"``, ``"matched"``).

    Returns
    -------
    LMCCurve
        With ``.barrier`` (Entezari), ``.barrier_midpoint`` (Git Re-Basin) and accuracy barriers per split.

    Examples
    --------
    >>> c = wl.lmc.curve(p.a, p.b, wl.lmc.Evaluator(p.make_module(), {"test": p.data("test")}))  # doctest: +SKIP
    >>> c.barrier["test"]                                                                        # doctest: +SKIP
    """
    names = _pair_names(a, b)
    alphas = _alphas(points)
    endpoints = Endpoints([a, b], names)
    weights = np.stack([1.0 - alphas, alphas], axis=1)
    metrics = _evaluate_rows(endpoints, weights, evaluate, bn_loader, repair, progress)
    normalization = _normalization(bn_loader, repair)
    return LMCCurve(alphas, metrics, label=label or _default_label(normalization),
                    endpoints=(names[0], names[1]), normalization=normalization)


def _pair_rows(n: int, alphas: np.ndarray) -> tuple[np.ndarray, dict[tuple[int, int], list[int]]]:
    """Identity rows for the endpoints, then the interior alphas of every pair; row indices per pair."""
    rows = list(np.eye(n))
    index: dict[tuple[int, int], list[int]] = {}
    for i, j in combinations(range(n), 2):
        start = len(rows)
        for alpha in alphas[1:-1]:
            w = np.zeros(n)
            w[i], w[j] = 1.0 - alpha, alpha
            rows.append(w)
        index[(i, j)] = [i, *range(start, len(rows)), j]
    return np.array(rows), index


def _take(metrics: SplitArrays, rows: list[int] | slice) -> SplitArrays:
    return {s: {m: np.asarray(v)[rows] for m, v in ms.items()} for s, ms in metrics.items()}


def _pairwise(names: list[str], alphas: np.ndarray, metrics: SplitArrays, index: Mapping,
              normalization: str) -> dict[tuple[str, str], LMCCurve]:
    return {
        (names[i], names[j]): LMCCurve(alphas, _take(metrics, rows), label=f"{names[i]} ↔ {names[j]}",
                                       endpoints=(names[i], names[j]), normalization=normalization)
        for (i, j), rows in index.items()
    }


def curve_many(
    sources: Sequence[object] | Mapping[str, object],
    evaluate: Evaluate,
    *,
    points: int | Sequence[float] = 25,
    bn_loader: object | None = None,
    repair: object | None = None,
    progress: bool | None = None,
) -> dict[tuple[str, str], LMCCurve]:
    """Curves between every pair of N endpoints, scored together (each endpoint once).

    Parameters
    ----------
    sources : sequence or mapping
        Checkpoint sources, or ``{name: source}``.
    evaluate, points, bn_loader, repair, progress
        As in :func:`curve`.

    Returns
    -------
    dict
        ``{(name_i, name_j): LMCCurve}`` for ``i < j``.
    """
    names, srcs = endpoint_names(sources)
    alphas = _alphas(points)
    endpoints = Endpoints(srcs, names)
    weights, index = _pair_rows(len(names), alphas)
    metrics = _evaluate_rows(endpoints, weights, evaluate, bn_loader, repair, progress)
    return _pairwise(names, alphas, metrics, index, _normalization(bn_loader, repair))


def _merge_weights(n: int, weights: Sequence[float] | None) -> np.ndarray:
    if weights is None:
        return np.full(n, 1.0 / n)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n,) or np.any(w < 0) or not np.isclose(w.sum(), 1.0):
        raise InvalidParameterError(
            f"The 'weights' parameter must be {n} non-negative numbers summing to 1. Got {weights!r} instead."
        )
    return w


@dataclass(frozen=True)
class MergeBarrierOptions:
    """The random simplex points :func:`merge_barrier` scores besides the merge (all have defaults).

    Attributes
    ----------
    samples : extra random simplex points, Dirichlet(1), for ``.max_sampled_barrier`` (0: none).
    seed : seed of those samples (0).
    """

    samples: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.samples, int) or self.samples < 0:
            raise InvalidParameterError(f"The 'samples' parameter must be an int >= 0. Got {self.samples!r} instead.")
        seed = self.seed
        if not (isinstance(seed, int | np.integer) and not isinstance(seed, bool) and seed >= 0):
            raise InvalidParameterError(f"The 'seed' parameter must be an int >= 0. Got {seed!r} instead.")


def merge_barrier(
    sources: Sequence[object] | Mapping[str, object],
    evaluate: Evaluate,
    *,
    weights: Sequence[float] | None = None,
    points: int | Sequence[float] = 25,
    bn_loader: object | None = None,
    repair: object | None = None,
    progress: bool | None = None,
    options: MergeBarrierOptions | None = None,
    **overrides: Any,
) -> MergeBarrier:
    """Merge barrier of N endpoints: ``L(sum_i w_i theta_i) - sum_i w_i L(theta_i)``, and pairwise curves.

    Parameters
    ----------
    sources : sequence or mapping
        N >= 2 checkpoint sources, or ``{name: source}``.
    evaluate : Evaluator or callable
        As in :func:`curve`.
    weights : sequence of float, optional
        Merge weights on the simplex; default the centroid ``1/N``.
    points : int or sequence of float, default=25
        Grid of the pairwise curves (their mean barrier is reported).
    bn_loader, repair, progress
        As in :func:`curve` (REPAIR targets are the ``w``-weighted endpoint statistics).
    options : MergeBarrierOptions, optional
        The random simplex points also scored; ``**overrides`` set its fields directly:
        ``samples`` (default 0; Dirichlet(1) points for ``.max_sampled_barrier``) and ``seed``
        (default 0), e.g. ``merge_barrier(sources, ev, samples=8, seed=1)``.

    Returns
    -------
    MergeBarrier
        ``.barrier``, ``.accuracy_barrier``, ``.mean_pairwise_barrier``, ``.max_sampled_barrier``.
    """
    names, srcs = endpoint_names(sources)
    n = len(names)
    w = _merge_weights(n, weights)
    opts = resolve_options(MergeBarrierOptions, options, overrides, caller="merge_barrier")
    samples = opts.samples
    alphas = _alphas(points)
    endpoints = Endpoints(srcs, names)
    pair_weights, index = _pair_rows(n, alphas)
    sampled = np.random.default_rng(opts.seed).dirichlet(np.ones(n), size=samples).reshape(samples, n)
    rows = np.concatenate([pair_weights, w[None, :], sampled])
    metrics = _evaluate_rows(endpoints, rows, evaluate, bn_loader, repair, progress)
    normalization = _normalization(bn_loader, repair)
    merged_row = len(pair_weights)
    return MergeBarrier(
        names=names, weights=w,
        endpoint_metrics=_take(metrics, slice(0, n)),
        merged_metrics={s: {m: float(v[merged_row]) for m, v in ms.items()} for s, ms in metrics.items()},
        pairwise=_pairwise(names, alphas, metrics, index, normalization),
        sample_weights=sampled, sample_metrics=_take(metrics, slice(merged_row + 1, None)),
    )
