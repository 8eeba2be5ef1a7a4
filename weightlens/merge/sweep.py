"""Scoring merges over a grid of coefficients: chosen on validation, reported on test.

``sweep`` merges once per ``alpha`` (every decomposition is cached, so each further ``alpha`` costs a
scale-and-add) and evaluates the merged weights on every task and split. Normalisation follows
``docs/methods.md#choosing-alpha``:

* normalized accuracy ``n_t = Acc_t(merged) / Acc_t(finetuned_t)`` (mean of ratios, not clipped);
* NAI ``(Acc_t(merged) - Acc_t(base)) / (Acc_t(finetuned_t) - Acc_t(base))``, NaN when the fine-tune
  does not beat the base on that task and split;
* a method with one model per task (``emr``: ``MergeResult.has_task_models``) is scored on each task with
  that task's model (``merged.for_task(task)``), every other with the one merged model;
* ``alpha`` is chosen by the mean normalized accuracy on ``select_on`` (ties: the smaller alpha), and
  reported on ``report_on``, which is scored only at the chosen alpha unless ``report_all=True``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from weightlens._options import option_names, resolve_options
from weightlens._progress import bar
from weightlens.errors import InvalidParameterError
from weightlens.merge.engine import check_data, merge
from weightlens.merge.registry import get_method
from weightlens.taskvectors import TaskVectors

__all__ = ["SweepOptions", "SweepResult", "alpha_grid", "reference_scores", "sweep"]

Evaluate = Callable[[Mapping[str, torch.Tensor], str, str], Mapping[str, float]]


def alpha_grid(method: str, n_tasks: int, **params: Any) -> list[float]:
    """The method's default validation grid, as declared by ``@register_merge(alpha_grid=...)``.

    The built-in grids follow the reference protocols (``docs/methods.md``, each method's section):
    ``task_arithmetic`` and ``dare`` (task-arithmetic combine): ``{1/30, ..., 1}`` (TALL-masks, TSV,
    Iso code); ``ties`` and ``dare`` with ``combine="ties"``: ``{0.8, 0.9, ..., 2.5}`` (TIES
    README); ``tsv``, ``iso_c``, ``iso_cts``: ``{0.1, ..., 3.0}`` (TSV and Iso code). STAR is
    untuned in its paper (``alpha = 1/T``); its grid is ``{0.1, ..., 3.0} / T`` around that default.
    ``params`` are the method's parameters the grid may depend on (e.g. DARE's ``combine``); names the
    method does not have are ignored.
    """
    return get_method(method).alpha_grid(params, n_tasks)


def reference_scores(
    tv: TaskVectors, evaluate: Evaluate, splits: Sequence[str] = ("val", "test")
) -> pd.DataFrame:
    """Accuracy and loss of the base and of each fine-tune on its own task: ``task, split, model, ...``."""
    rows = []
    for task in tv.names:
        for split in dict.fromkeys(splits):
            for model, weights in (("base", tv.base), ("finetuned", tv.finetuned_weights(task))):
                rows.append({"task": task, "split": split, "model": model, **_metrics(evaluate(weights, task, split))})
    return pd.DataFrame(rows)


def _metrics(scores: Mapping[str, float]) -> dict[str, float]:
    if "accuracy" not in scores:
        raise InvalidParameterError(
            f"evaluate(weights, task, split) must return a mapping with 'accuracy' (and optionally "
            f"'loss'); got keys {sorted(scores)}."
        )
    return {"accuracy": float(scores["accuracy"]), "loss": float(scores.get("loss", math.nan))}


@dataclass(frozen=True)
class SweepResult:
    """Scores of one method over a grid of ``alpha``.

    Attributes
    ----------
    table : DataFrame
        ``alpha, task, split, accuracy, loss, normalized_accuracy, nai`` (one row per evaluation).
    reference : DataFrame
        ``task, split, model, accuracy, loss`` for ``model`` in {base, finetuned}.
    """

    method: str
    params: dict[str, Any]
    table: pd.DataFrame = field(repr=False)
    reference: pd.DataFrame = field(repr=False)
    select_on: str = "val"
    report_on: str = "test"

    def summary(self) -> pd.DataFrame:
        """Means over tasks per ``(alpha, split)``: accuracy, loss, normalized_accuracy, nai.

        A method, like ``Report.summary()``; one row per alpha and split scored.
        """
        cols = ["accuracy", "loss", "normalized_accuracy", "nai"]
        return self.table.groupby(["alpha", "split"], sort=True)[cols].mean().reset_index()

    @property
    def best_alpha(self) -> float:
        """The alpha with the highest mean normalized accuracy on ``select_on`` (smallest on ties).

        Means that differ by rounding only (1e-12 relative: the same scores summed in another order)
        are ties, so the choice does not depend on which other rows the table holds.
        """
        s = self.summary()
        s = s[s["split"] == self.select_on].sort_values("alpha")
        values = s["normalized_accuracy"].to_numpy(dtype=float)
        if np.isnan(values).all():
            return float(s["alpha"].iloc[0])
        top = np.nanmax(values)
        return float(s["alpha"].iloc[int(np.flatnonzero(values >= top - 1e-12 * max(1.0, abs(top)))[0])])

    @property
    def best(self) -> pd.DataFrame:
        """Per-task rows at :attr:`best_alpha` on ``report_on``."""
        t = self.table
        return t[(t["alpha"] == self.best_alpha) & (t["split"] == self.report_on)].reset_index(drop=True)

    def report(self) -> dict[str, Any]:
        """One line for a results table: method, alpha, selection and report means, base and fine-tuned."""
        s, ref = self.summary(), self.reference
        at = s[s["alpha"] == self.best_alpha].set_index("split")
        means = ref.groupby(["split", "model"])["accuracy"].mean()
        return {
            "method": self.method,
            "alpha": self.best_alpha,
            f"{self.select_on}_normalized_accuracy": float(at.loc[self.select_on, "normalized_accuracy"]),
            f"{self.report_on}_accuracy": float(at.loc[self.report_on, "accuracy"]),
            f"{self.report_on}_normalized_accuracy": float(at.loc[self.report_on, "normalized_accuracy"]),
            f"{self.report_on}_nai": float(at.loc[self.report_on, "nai"]),
            f"base_{self.report_on}_accuracy": float(means.loc[(self.report_on, "base")]),
            f"finetuned_{self.report_on}_accuracy": float(means.loc[(self.report_on, "finetuned")]),
        }


def _normalize(table: pd.DataFrame, reference: pd.DataFrame) -> pd.DataFrame:
    ref = reference.pivot_table(index=["task", "split"], columns="model", values="accuracy").reset_index()
    out = table.merge(ref, on=["task", "split"], how="left")
    out["normalized_accuracy"] = out["accuracy"] / out["finetuned"]
    gain = out["finetuned"] - out["base"]
    out["nai"] = ((out["accuracy"] - out["base"]) / gain).where(gain > 0)
    return out.drop(columns=["base", "finetuned"])


@dataclass(frozen=True)
class SweepOptions:
    """The less common settings of :func:`sweep` (all have defaults).

    Attributes
    ----------
    report_all : also score ``report_on`` at every alpha (for curves; one more evaluation per
        alpha). Default False: ``report_on`` is scored at the chosen alpha only.
    reference : base and fine-tuned scores from :func:`reference_scores` (or a previous sweep's
        ``.reference``), to skip re-evaluating them (default None: evaluated).
    device : passed to ``merge`` (default ``"auto"``).
    data : the ``MergeData`` a data-based method reads (``regmean``, ``fisher``; ``zoo.merge_data()``),
        passed to ``merge`` (default None; other methods ignore it).
    """

    report_all: bool = False
    reference: pd.DataFrame | None = field(default=None, repr=False)
    device: str | torch.device = "auto"
    data: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.report_all, bool):
            raise InvalidParameterError(f"The 'report_all' parameter must be a bool. Got {self.report_all!r} instead.")
        if self.reference is not None and not isinstance(self.reference, pd.DataFrame):
            raise InvalidParameterError(
                "The 'reference' parameter must be a DataFrame from reference_scores or None. Got "
                f"{type(self.reference).__name__} instead."
            )
        if not isinstance(self.device, str | torch.device):
            raise InvalidParameterError(
                f"The 'device' parameter must be a str or torch.device. Got {self.device!r} instead."
            )


_OPTION_NAMES = option_names(SweepOptions)


def sweep(
    tv: TaskVectors,
    method: str,
    alphas: Iterable[float] | None,
    evaluate: Evaluate,
    *,
    select_on: str = "val",
    report_on: str = "test",
    progress: bool | None = None,
    options: SweepOptions | None = None,
    **params: Any,
) -> SweepResult:
    """Merge at every ``alpha`` and score each task: normalized accuracy, NAI, choice on validation.

    Parameters
    ----------
    tv : TaskVectors
    method : str
        A registered merge method.
    alphas : iterable of float, or None
        The grid; None takes :func:`alpha_grid` of the method.
    evaluate : callable
        ``evaluate(weights, task, split) -> {"accuracy": ..., "loss": ...}`` (a zoo's ``evaluate``).
    select_on, report_on : str, default="val", "test"
        Split scored at every alpha to choose it, and split reported at the chosen alpha.
    progress : bool or None, default=None
        One bar over the grid; None (default) follows ``weightlens.config.progress``.
    options : SweepOptions, optional
        ``report_all`` (False), ``reference`` (None), ``device`` (``"auto"``) and ``data`` (None: the
        ``MergeData`` of ``regmean``/``fisher``); the keywords ``report_all=``, ``reference=``, ``device=`` and
        ``data=`` set them directly.
    **params
        Other parameters of the method (not ``alpha``).

    Returns
    -------
    SweepResult
    """
    if "alpha" in params:
        raise InvalidParameterError(
            f"sweep() takes the coefficients in 'alphas', not as alpha=; got alpha={params['alpha']!r}."
        )
    given = {name: params.pop(name) for name in _OPTION_NAMES if name in params}
    opts = resolve_options(SweepOptions, options, given, caller="sweep")
    report_all, reference, device = opts.report_all, opts.reference, opts.device
    check_data(get_method(method), tv, opts.data)  # a data-based method without data fails before any scoring
    grid = [float(a) for a in (alpha_grid(method, len(tv), **params) if alphas is None else alphas)]
    if not grid:
        raise InvalidParameterError(f"sweep({method!r}) needs at least one alpha; got an empty grid.")
    splits = tuple(dict.fromkeys((select_on, report_on)))
    ref = reference if reference is not None else reference_scores(tv, evaluate, splits)
    rows: list[dict[str, Any]] = []
    resolved: dict[str, Any] = {}

    def score(alpha: float, chosen: Sequence[str]) -> None:
        nonlocal resolved
        merged = merge(tv, method=method, device=device, alpha=alpha, data=opts.data, **params)
        resolved = {k: v for k, v in merged.params.items() if k != "alpha"}
        for task in tv.names:
            for split in chosen:
                weights = merged.for_task(task) if merged.has_task_models else merged
                rows.append({"alpha": alpha, "task": task, "split": split,
                             **_metrics(evaluate(weights, task, split))})

    for alpha in bar(grid, progress=progress, desc=f"sweep {method}", unit="alpha"):
        score(alpha, splits if report_all else (select_on,))
    table = _normalize(pd.DataFrame(rows), ref)
    result = SweepResult(method, resolved, table, ref, select_on, report_on)
    if not report_all and report_on != select_on:
        score(result.best_alpha, (report_on,))
        result = SweepResult(method, resolved, _normalize(pd.DataFrame(rows), ref), ref, select_on, report_on)
    return result
