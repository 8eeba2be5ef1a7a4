"""What-if across methods: what every other merge would keep of each task, and which one to use.

For each method of the what-if, one merge at its default (or, for the diagnosed method, its given)
parameters and ``merge.compare`` against it give each task's ``kept`` share from the weights (SAR,
energy-weighted over keys as in the blocks table; ``alpha`` scales the update, so ``kept`` does not depend
on it). With ``evaluate``, ``merge.sweep`` scores a few coefficients of each method on the selection split
(the base and fine-tuned references scored once for all), and the suggestion is the method and coefficient
whose *worst* task keeps most of its fine-tuned accuracy (normalized accuracy; ties broken by the mean),
scored on the report split too, beside task arithmetic at its validated coefficient
(``docs/diagnosis.md#what-if``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pandas as pd

from weightlens._progress import bar
from weightlens.diagnosis._options import DiagnoseOptions
from weightlens.diagnosis._result import WHATIF_COLUMNS, Suggestion
from weightlens.errors import WeightlensError
from weightlens.merge.compare import Comparison, compare
from weightlens.merge.engine import MergeResult, merge
from weightlens.merge.registry import get_method, list_methods
from weightlens.merge.sweep import SweepResult, alpha_grid, reference_scores, sweep
from weightlens.taskvectors import TaskVectors

__all__ = ["BASELINE", "candidate_alphas", "whatif"]

#: The method every suggestion is measured against (at its validated coefficient).
BASELINE = "task_arithmetic"


def candidate_alphas(method: str, n_tasks: int, points: int, params: Mapping[str, Any],
                     given: float | None = None) -> list[float]:
    """The coefficients the what-if scores: ``points`` evenly spread quantiles of the method's grid
    (``(2i + 1) / (2 points)``; 3 points: 1/6, 1/2, 5/6, as the notebooks' CI runs), its default ``alpha``
    and ``given`` (the diagnosed merge's own), sorted and without duplicates."""
    grid = alpha_grid(method, n_tasks, **params)
    picks = {grid[min(len(grid) - 1, int((2 * i + 1) / (2 * points) * len(grid)))] for i in range(points)}
    picks.add(float(get_method(method).resolve(dict(params), n_tasks)["alpha"]))
    if given is not None:
        picks.add(float(given))
    return sorted(picks)


def _methods(chosen: str | Sequence[str], diagnosed: str | None) -> list[str]:
    names = list_methods() if chosen == "all" else list(dict.fromkeys(chosen))
    for extra in (diagnosed, BASELINE):  # the diagnosed merge and the baseline are always compared
        if extra is not None and extra not in names:
            names.insert(0, extra)
    return names


def _params_text(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in params.items() if k != "alpha")


def _worst_mean(rows: pd.DataFrame, column: str) -> tuple[float, float, str | None]:
    values = rows.set_index("task")[column].astype(float)
    if values.isna().all():
        return math.nan, math.nan, None
    return float(values.min()), float(values.mean()), str(values.idxmin())


def whatif(
    tv: TaskVectors,
    merged: Mapping[str, Any],
    kept_of: Callable[[Comparison], pd.Series],
    evaluate: Callable[..., Mapping[str, Any]] | None,
    opts: DiagnoseOptions,
    progress: bool | None,
) -> tuple[pd.DataFrame, Suggestion | None, list[str]]:
    """The what-if table, the suggestion (None without ``evaluate``) and notes (methods skipped and why).
    ``kept_of(comparison)`` is each task's ``kept`` against a method's merge (the diagnosis' own definition)."""
    diagnosed = merged.method if isinstance(merged, MergeResult) else None
    given = dict(merged.params) if isinstance(merged, MergeResult) else {}
    names = _methods(opts.whatif, diagnosed)
    data = merged.data if isinstance(merged, MergeResult) else None  # a data-based diagnosed merge's data
    notes: list[str] = []
    if data is None and opts.whatif == "all":  # left out, not tried: they cannot run without data
        unfed = [n for n in names if get_method(n).needs_data and n != diagnosed]
        names = [n for n in names if n not in unfed]
        if unfed:
            notes.append(f"What-if: {', '.join(unfed)} left out: they need data= (per task a model and inputs: "
                         "diagnose a merge made with data=zoo.merge_data() to include them)")
    reference = reference_scores(tv, evaluate, (opts.split, opts.report_split)) if evaluate is not None else None
    rows: list[pd.DataFrame] = []
    sweeps: dict[str, SweepResult] = {}
    for name in bar(names, progress=progress, desc="what-if", unit="method"):
        params = {k: v for k, v in given.items() if k != "alpha"} if name == diagnosed else {}
        try:
            result = merged if name == diagnosed else merge(tv, method=name, device=opts.device, data=data, **params)
            comparison = compare(tv, result, criterion=opts.criterion, eps=opts.eps, device=opts.device,
                                 progress=False, task_arithmetic=False)
            kept = kept_of(comparison)
            params = {k: v for k, v in result.params.items() if k != "alpha"}
            if evaluate is None:
                alphas = [float(result.params["alpha"])]
                scores = pd.DataFrame({"alpha": alphas[0], "task": tv.names})
            else:
                alphas = candidate_alphas(name, len(tv), opts.whatif_points, params,
                                          given.get("alpha") if name == diagnosed else None)
                sweeps[name] = sweep(tv, name, alphas, evaluate, select_on=opts.split, report_on=opts.report_split,
                                     reference=reference, device=opts.device, data=data, progress=False, **params)
                scores = sweeps[name].table
        except WeightlensError as err:  # a method these task vectors do not fit (e.g. SLERP of 3 tasks)
            notes.append(f"What-if: {name} skipped: {str(err).splitlines()[0]}")
            continue
        rows.append(_method_rows(name, params, kept, scores, sweeps.get(name), opts))
    table = pd.concat(rows, ignore_index=True)[WHATIF_COLUMNS] if rows else pd.DataFrame(columns=WHATIF_COLUMNS)
    if evaluate is None or table.empty:
        return table, None, notes
    table, suggestion = _suggest(tv, table, sweeps, evaluate, reference, opts, data)
    return table, suggestion, notes


def _method_rows(name: str, params: Mapping[str, Any], kept: pd.Series, scores: pd.DataFrame,
                 swept: SweepResult | None, opts: DiagnoseOptions) -> pd.DataFrame:
    """One row per coefficient and task: ``kept`` (weights), then the selection and report scores."""
    if swept is None:
        out = scores[["alpha", "task"]].assign(accuracy=math.nan, normalized_accuracy=math.nan, chosen=True,
                                               report_accuracy=math.nan, report_normalized_accuracy=math.nan)
    else:
        t = swept.table
        select = t[t["split"] == opts.split][["alpha", "task", "accuracy", "normalized_accuracy"]]
        report = t[(t["split"] == opts.report_split) & (t["alpha"] == swept.best_alpha)]
        report = report[["alpha", "task", "accuracy", "normalized_accuracy"]].rename(
            columns={"accuracy": "report_accuracy", "normalized_accuracy": "report_normalized_accuracy"})
        out = select.merge(report, on=["alpha", "task"], how="left")
        out["chosen"] = out["alpha"] == swept.best_alpha
    out["method"], out["params"] = name, _params_text(params)
    out["kept"] = out["task"].map(kept).astype(float)
    return out


def _suggest(tv: TaskVectors, table: pd.DataFrame, sweeps: dict[str, SweepResult],
             evaluate: Callable[..., Mapping[str, Any]], reference: pd.DataFrame,
             opts: DiagnoseOptions, data: Any = None) -> tuple[pd.DataFrame, Suggestion | None]:
    """The (method, alpha) with the best worst-task normalized accuracy on the selection split (then the
    best mean; then the first listed), scored on the report split if it was not already. Methods that give
    one model per task (EMR) are scored in the table but not suggested: the suggestion is one merged model."""
    best: tuple[float, float, int] | None = None
    pick = None
    for i, ((method, alpha), rows) in enumerate(table.groupby(["method", "alpha"], sort=False)):
        if get_method(method).per_task is not None:
            continue
        worst, mean, _ = _worst_mean(rows, "normalized_accuracy")
        if math.isnan(worst):
            continue
        score = (worst, mean, -i)
        if best is None or score > best:
            best, pick = score, (method, alpha)
    if pick is None:
        return table, None
    method, alpha = pick
    at = (table["method"] == method) & (table["alpha"] == alpha)
    if table.loc[at, "report_normalized_accuracy"].isna().all() and opts.report_split != opts.split:
        extra = sweep(tv, method, [alpha], evaluate, select_on=opts.report_split, report_on=opts.report_split,
                      reference=reference, device=opts.device, data=data, progress=False,
                      **sweeps[method].params).table
        extra = extra.set_index("task")
        table.loc[at, "report_accuracy"] = table.loc[at, "task"].map(extra["accuracy"]).to_numpy()
        table.loc[at, "report_normalized_accuracy"] = table.loc[at, "task"].map(
            extra["normalized_accuracy"]).to_numpy()
    rows = table[at]
    worst, mean, worst_task = _worst_mean(rows, "normalized_accuracy")
    report_worst, report_mean, _ = _worst_mean(rows, "report_normalized_accuracy")
    baseline = None
    if BASELINE in sweeps:
        b = table[(table["method"] == BASELINE) & table["chosen"]]
        b_worst, b_mean, b_task = _worst_mean(b, "normalized_accuracy")
        b_report_worst, b_report_mean, _ = _worst_mean(b, "report_normalized_accuracy")
        baseline = {"method": BASELINE, "alpha": sweeps[BASELINE].best_alpha, "worst_task": b_task,
                    "worst": b_worst, "mean": b_mean, "report_worst": b_report_worst, "report_mean": b_report_mean}
    suggestion = Suggestion(method=method, alpha=float(alpha), params=dict(sweeps[method].params),
                            worst_task=str(worst_task), worst=worst, mean=mean, report_worst=report_worst,
                            report_mean=report_mean, select_on=opts.split, report_on=opts.report_split,
                            baseline=baseline)
    return table, suggestion
