"""Restoration tests: what a block costs a task, measured with ``evaluate`` rather than predicted.

For a task ``t`` and a block ``b``, the merged weights with every task-vector key of ``b`` set to ``t``'s own
fine-tuned values (``base + tau_t``; keys the merge leaves alone are unchanged; ``restore_by="own"``) or
merged again with ``t``'s task vector times ``weight`` in ``b`` (``restore_by="weight"``: the same method and
parameters on a view of the task vectors, :class:`_Weighted`) are scored on ``t`` and on every other task. ``measured_gain`` is ``t``'s improvement over the merge, ``cost_to_others`` the mean
worsening of the others (both in the metric's own units, signs such that positive is "better for t" and
"worse for the others"). Nothing is decomposed again: the merged weights are read once, each restored
model is a shallow copy with one block swapped, and the cost is ``evaluate`` calls (``T`` per test, ``T``
more for the merge itself), bounded by ``max_evals``; ``restore_by="weight"`` also merges ``b``'s keys
again (a method with whole-model statistics, TIES' global thresholds, makes its pass again).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from weightlens._progress import bar
from weightlens.diagnosis._options import DiagnoseOptions, lower_is_better
from weightlens.errors import InvalidParameterError, WeightlensError
from weightlens.linalg import DecompositionCache
from weightlens.merge import MergeResult, merge
from weightlens.taskvectors import TaskVectors

if TYPE_CHECKING:
    from weightlens.io.sources import LoraFactors

__all__ = ["Measured", "RestorationError", "check_evaluate", "measure", "plan", "spearman"]


class RestorationError(WeightlensError, RuntimeError):
    """``evaluate`` failed (or returned no usable metric) during a restoration test of ``diagnose``."""


@dataclass
class Measured:
    """What the restoration tests measured: the blocks table's new columns, per-task Spearman, notes."""

    gain: dict[tuple[str, str], float] = field(default_factory=dict)
    cost: dict[tuple[str, str], float] = field(default_factory=dict)
    merged_scores: dict[str, float] = field(default_factory=dict)
    evaluations: int = 0
    sign: float = 1.0
    notes: list[str] = field(default_factory=list)

    def record(self, opts: DiagnoseOptions) -> dict[str, Any]:
        """``Diagnosis.measured``: the split, metric, calls made, the merge's own scores (unsigned), notes."""
        return {"split": opts.split, "metric": opts.metric, "restore_by": opts.restore_by,
                "weight": float(opts.weight) if opts.restore_by == "weight" else None, "evaluations": self.evaluations,
                "merged_scores": {t: self.sign * v for t, v in self.merged_scores.items()}, "notes": list(self.notes)}


def plan(table: pd.DataFrame, restore: int, controls: int) -> list[tuple[str, str]]:
    """``(task, block)`` tests in order: every task's rank-1 block, then rank 2, ..., then the controls (each
    task's lowest-ranked blocks with energy), so a ``max_evals`` budget reaches every task's top first."""
    tops: dict[str, list[str]] = {}
    lows: dict[str, list[str]] = {}
    for task, rows in table.groupby("task", sort=False):
        rows = rows.sort_values("rank")
        tops[task] = list(rows["block"].iloc[:restore])
        rest = rows.iloc[restore:]
        rest = rest[rest["energy_share"] > 0]
        lows[task] = list(rest["block"].iloc[::-1].iloc[:controls])
    out = []
    for chosen in (tops, lows):
        depth = max((len(v) for v in chosen.values()), default=0)
        out += [(t, blocks[i]) for i in range(depth) for t, blocks in chosen.items() if i < len(blocks)]
    return out


def _own_values(tv: TaskVectors, task: str, keys: list[str], full: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """``task``'s fine-tuned tensors at ``keys``, as the merged tensors there are held (dtype, device).

    A full fine-tune's own stored tensor when it lines up with the base key (bit-exact restoration);
    ``base + delta`` otherwise (adapters, renamed or vocabulary-aligned keys).
    """
    renamed = {b: f for f, b in tv.key_maps.get(task, {}).items()}
    weights = tv.finetuned_weights(task)
    out = {}
    for key in keys:
        like = full[key]
        own = renamed.get(key, key)
        value = weights[own] if tv.vocab is None and own in weights else None
        if value is None or tuple(value.shape) != tuple(like.shape):
            value = tv.base_tensor(key).to(torch.float32) + tv.delta(task, key)
        out[key] = value.to(device=like.device, dtype=like.dtype)
    return out


class _Weighted(TaskVectors):
    """``tv`` with ``task``'s vector times ``weight`` on ``keys``, as a merge reads it (``delta``, ``deltas``,
    ``factors``); its own decomposition cache, since those keys' matrices differ."""

    def __init__(self, tv: TaskVectors, task: str, keys: list[str], weight: float) -> None:  # noqa: D107
        self.__dict__.update(tv.__dict__)
        self.cache = DecompositionCache(tv.cache.max_bytes)
        self._weighted, self._index, self._keys_weighted, self._weight = task, tv.names.index(task), set(keys), weight

    def delta(self, task: str, key: str) -> torch.Tensor:
        out = super().delta(task, key)
        return out * self._weight if task == self._weighted and key in self._keys_weighted else out

    def deltas(self, key: str) -> torch.Tensor:
        out = super().deltas(key)
        if key in self._keys_weighted:
            out[self._index] *= self._weight
        return out

    def factors(self, task: str, key: str) -> LoraFactors | None:
        out = super().factors(task, key)
        if out is None or task != self._weighted or key not in self._keys_weighted:
            return out
        return out._replace(scale=out.scale * self._weight)


def _weighted_values(merged: MergeResult, task: str, keys: list[str], weight: float) -> dict[str, torch.Tensor]:
    """``keys`` of the merge made again with ``task``'s vector times ``weight`` there (same method, parameters,
    task model)."""
    view = _Weighted(merged.task_vectors, task, keys, weight)
    again = merge(view, method=merged.method, progress=False, data=merged.data, **merged.params)  # data: regmean, fisher
    if merged.task is not None:
        again = again.for_task(merged.task)
    return {key: again.peek(key).to(device=merged[key].device, dtype=merged[key].dtype) for key in keys}


class _Scorer:
    """``evaluate`` calls counted against ``max_evals``, failures named, the metric read and signed."""

    def __init__(self, evaluate: Callable[..., Mapping[str, Any]], opts: DiagnoseOptions, progress: Any) -> None:
        self.evaluate, self.opts, self.bar, self.calls = evaluate, opts, progress, 0
        self.sign = -1.0 if lower_is_better(opts.metric) else 1.0

    def left(self) -> float:
        return math.inf if self.opts.max_evals is None else self.opts.max_evals - self.calls

    def __call__(self, state: Mapping[str, torch.Tensor], task: str, what: str) -> float:
        """The metric of ``task`` on the model ``state``, signed so that larger is better."""
        self.calls += 1
        try:
            result = self.evaluate(state, task, self.opts.split)
        except Exception as err:
            raise RestorationError(
                f"diagnose: evaluate(state_dict, {task!r}, {self.opts.split!r}) raised {type(err).__name__}: {err} "
                f"(scoring task {task!r} on {what})."
            ) from err
        finally:
            self.bar.update(1)
        metric = self.opts.metric
        if not isinstance(result, Mapping) or metric not in result:
            keys = sorted(result) if isinstance(result, Mapping) else type(result).__name__
            raise RestorationError(
                f"diagnose: evaluate(state_dict, {task!r}, {self.opts.split!r}) must return a mapping with the "
                f"metric {metric!r} (scoring task {task!r} on {what}); got {keys}. Pass metric= one of its keys."
            )
        return self.sign * float(result[metric])


def measure(tv: TaskVectors, merged: Mapping[str, torch.Tensor], table: pd.DataFrame,
            block_of: Callable[[str], str], evaluate: Callable[..., Mapping[str, Any]],
            opts: DiagnoseOptions, progress: bool | None) -> Measured:
    """Run the restoration tests of ``plan(table, ...)`` (``docs/diagnosis.md#restoration-tests``)."""
    if opts.restore_by == "weight" and not isinstance(merged, MergeResult):
        raise InvalidParameterError(
            "diagnose(restore_by='weight') merges again with a task's weight raised, which needs the merge "
            f"result (wl.merge(tv, ...)), not {type(merged).__name__} weights; pass restore_by='own' to restore "
            "blocks to the tasks' own weights instead."
        )
    tests = plan(table, opts.restore, opts.controls)
    tasks = list(tv.names)
    members: dict[str, list[str]] = {}
    for key in tv.keys:
        members.setdefault(block_of(key), []).append(key)
    full = {key: merged[key] for key in merged}  # read once; each test swaps one block in a shallow copy
    out = Measured()
    wanted = len(tasks) * (len(tests) + 1)
    total = wanted if opts.max_evals is None else min(wanted, opts.max_evals)
    with bar(total=total, progress=progress, desc="restore", unit="eval") as pbar:
        score = _Scorer(evaluate, opts, pbar)
        out.sign = score.sign
        if score.left() < len(tasks):
            out.notes.append(f"max_evals={opts.max_evals} is less than the {len(tasks)} evaluations of the merge "
                             "itself: no restoration test was run.")
            return out
        out.merged_scores = {t: score(full, t, "the merged model") for t in tasks}
        done = 0
        for task, block in tests:
            if score.left() < len(tasks):
                break
            state = dict(full)
            if opts.restore_by == "own":
                state.update(_own_values(tv, task, members[block], full))
                what = f"the merge with block {block!r} restored to task {task!r}'s own weights"
            else:
                state.update(_weighted_values(merged, task, members[block], float(opts.weight)))
                what = f"the merge with task {task!r}'s weight times {opts.weight:g} in block {block!r}"
            scores = {s: score(state, s, what) for s in tasks}
            out.gain[task, block] = scores[task] - out.merged_scores[task]
            others = [out.merged_scores[s] - scores[s] for s in tasks if s != task]
            out.cost[task, block] = float(np.mean(others)) if others else math.nan
            done += 1
        out.evaluations = score.calls
    if done < len(tests):
        out.notes.append(f"max_evals={opts.max_evals} reached after {done} of {len(tests)} restoration tests "
                         f"({score.calls} evaluations); the {len(tests) - done} others are NaN.")
    return out


def spearman(table: pd.DataFrame) -> pd.Series:
    """Per task: Spearman's rank correlation of ``predicted_cost`` and ``measured_gain`` over its measured
    blocks; NaN with fewer than 3 of them or when either is constant."""
    from scipy.stats import spearmanr

    out = {}
    for task, rows in table.groupby("task", sort=False):
        rows = rows[rows["measured_gain"].notna()]
        x, y = rows["predicted_cost"].to_numpy(float), rows["measured_gain"].to_numpy(float)
        if len(rows) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
            out[task] = math.nan
        else:
            out[task] = float(spearmanr(x, y).statistic)
    return pd.Series(out, dtype=float)


def check_evaluate(evaluate: Any, merged: Any) -> None:
    if evaluate is None:
        return
    if not callable(evaluate):
        raise InvalidParameterError(
            "The 'evaluate' parameter of diagnose must be None or a callable evaluate(state_dict, task, split) "
            f"-> {{'accuracy': ..., ...}} (a zoo's TaskZoo.evaluate). Got {evaluate!r} instead."
        )
    if merged is None:
        raise InvalidParameterError(
            "diagnose(tv, None, evaluate=...): restoration tests need a merge to restore blocks of; pass the "
            "merge result (wl.merge(tv, ...)) or drop evaluate for the pre-merge checks alone."
        )
