"""``Diagnosis``: the tables :func:`weightlens.diagnosis.diagnose` returns, in sentences and as one HTML page."""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from weightlens.errors import InvalidParameterError
from weightlens.io._atomic import atomic_write_text

__all__ = ["BLOCK_COLUMNS", "TASK_COLUMNS", "WHATIF_COLUMNS", "Diagnosis", "Suggestion"]

BLOCK_COLUMNS = ["task", "block", "energy_share", "kept", "lost_energy", "coef", "crowded_by", "crowding",
                 "merged_share", "sign_lost", "sign_won_by", "sign_won", "opposed_by", "opposition", "predicted_cost",
                 "rank", "measured_gain", "cost_to_others"]
TASK_COLUMNS = ["task", "norm", "rel_distance", "kept", "lost_energy", "coef", "crowded_by", "crowding",
                "merged_share", "sign_lost", "sign_won_by", "sign_won", "opposed_by", "opposition", "predicted_cost",
                "worst_block", "checks", "spearman"]
#: The summary names a task that opposes another when it cancels at least this share of its update.
OPPOSED = 0.05
#: What-if rows: one per method, coefficient and task. ``kept`` is from the weights (SAR of the task against
#: that merge, energy-weighted over keys); ``accuracy``/``normalized_accuracy`` are scored on the selection
#: split, ``report_accuracy``/``report_normalized_accuracy`` on the report split at each method's chosen
#: coefficient only (``chosen``); all four NaN without ``evaluate``.
WHATIF_COLUMNS = ["method", "params", "alpha", "task", "kept", "accuracy", "normalized_accuracy", "chosen",
                  "report_accuracy", "report_normalized_accuracy"]


@dataclass(frozen=True)
class Suggestion:
    """The merge the what-if suggests: the method and coefficient whose worst task keeps most of its
    fine-tuned accuracy (normalized accuracy on ``select_on``; ties broken by the mean), with the same
    figures for task arithmetic at its validated coefficient as the baseline.

    ``worst``/``mean`` are on ``select_on``, ``report_worst``/``report_mean`` on ``report_on`` (NaN when not
    scored there). ``baseline`` holds the same keys for task arithmetic (None when it was not in the what-if).
    ``merge(tv)`` re-runs the suggested merge.
    """

    method: str
    alpha: float
    params: dict[str, Any]
    worst_task: str
    worst: float
    mean: float
    report_worst: float
    report_mean: float
    select_on: str
    report_on: str
    baseline: dict[str, Any] | None = None

    def sentence(self) -> str:
        """One sentence: what to merge with, and the evidence against task arithmetic."""
        text = (f"Suggested: {self.method} at alpha={self.alpha:g}: its worst task ({self.worst_task}) keeps "
                f"{_pct(self.worst)} of its fine-tuned accuracy on {self.select_on} (mean {_pct(self.mean)})")
        if not _nan(self.report_worst):
            text += f", {_pct(self.report_worst)} on {self.report_on} (mean {_pct(self.report_mean)})"
        b = self.baseline
        if b is not None:
            text += (f"; task arithmetic at its validated alpha={b['alpha']:g}: worst {_pct(b['worst'])} on "
                     f"{self.select_on}")
            if not _nan(b["report_worst"]):
                text += f", {_pct(b['report_worst'])} on {self.report_on}"
        return text + "."

    def merge(self, tv: Any, **kwargs: Any) -> Any:
        """``wl.merge(tv, method=..., alpha=..., **params)``: the suggested merge (``kwargs`` e.g. ``device``)."""
        from weightlens.merge import merge

        return merge(tv, method=self.method, alpha=self.alpha, **self.params, **kwargs)


def _pct(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.0%}"


def _nan(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


@dataclass(frozen=True)
class Diagnosis:
    """What a merge lost of each task, per block, and why (``docs/diagnosis.md`` defines every column).

    Attributes
    ----------
    blocks : DataFrame
        One row per task and block: ``task, block, energy_share, kept, lost_energy, coef, crowded_by,
        crowding, merged_share, sign_lost, sign_won_by, sign_won,
        opposed_by, opposition, predicted_cost, rank, measured_gain, cost_to_others`` (``rank`` 1: the block
        where the task is predicted to lose most; the last two are measured by the restoration tests of
        ``evaluate=``, NaN for blocks not tested). Empty without a merge.
    tasks : DataFrame
        One row per task, the same figures over the whole model, plus ``norm``, ``rel_distance`` (distance
        from the base over the base's norm), ``worst_block``, the pre-merge ``checks`` that fired for it and
        ``spearman`` (rank correlation of its blocks' ``predicted_cost`` and ``measured_gain``).
    checks : DataFrame
        Pre-merge checks: ``check, severity, task, block, value, threshold, fired, message``, fired first.
    whatif : DataFrame
        Every method of the what-if (``whatif=``) per coefficient and task: ``method, params, alpha, task,
        kept, accuracy, normalized_accuracy, chosen, report_accuracy, report_normalized_accuracy`` (empty
        without ``whatif=``).
    suggestion : Suggestion or None
        With ``whatif=`` and ``evaluate=``: the method and coefficient that maximise the worst task's
        normalized accuracy, with task arithmetic's figures as the baseline.
    notes : tuple of str
        What the diagnosis could not do, in sentences (e.g. a what-if method these task vectors do not fit).
    comparison : Comparison or None
        The ``merge.compare`` behind ``kept`` and the sign counts (per key; the merge's rows alone: call
        ``wl.compare(tv, merged)`` for task arithmetic beside it).
    measured : dict or None
        With ``evaluate=``: ``split``, ``metric``, ``restore_by`` and ``weight`` (how blocks were restored),
        ``evaluations`` (calls made), ``merged_scores`` (the merge's
        own metric per task) and ``notes`` (e.g. tests skipped for ``max_evals``); None otherwise.
    """

    method: str | None
    params: dict[str, Any]
    blocks: pd.DataFrame = field(repr=False)
    tasks: pd.DataFrame = field(repr=False)
    checks: pd.DataFrame = field(repr=False)
    whatif: pd.DataFrame = field(repr=False)
    comparison: Any = field(repr=False, default=None)
    criterion: str = "paper"
    eps: float = 0.05
    measured: dict[str, Any] | None = field(repr=False, default=None)
    suggestion: Suggestion | None = None
    notes: tuple[str, ...] = ()

    @property
    def spearman(self) -> float:
        """Mean over tasks of the per-task Spearman correlation of ``predicted_cost`` and ``measured_gain``
        (tasks with NaN left out; NaN without restoration tests)."""
        values = self.tasks["spearman"].dropna() if "spearman" in self.tasks else []
        return float(values.mean()) if len(values) else math.nan

    def _amount(self, x: float) -> str:
        """A measured difference: points for an accuracy-like metric, the metric's units otherwise."""
        x = float(x) + 0.0  # no "-0.0"
        metric = self.measured["metric"]
        scores = self.measured["merged_scores"].values()
        if "acc" in metric.lower() and all(0 <= v <= 1 for v in scores):
            return f"{100 * x:+.1f} points"
        return f"{x:+.3g}"

    def _measured_sentence(self, task: str) -> str:
        mine = self.ranking(task)
        tested = mine[mine["measured_gain"].notna()]
        if tested.empty:
            return ""
        top = tested.iloc[0]
        metric, split = self.measured["metric"], self.measured["split"]
        text = (f"Measured ({metric} on {split}): restoring {top['block']} (rank {top['rank']}) recovers "
                f"{self._amount(top['measured_gain'])} of {task}'s {metric}")
        if not _nan(top["cost_to_others"]):
            text += f" for {self._amount(-top['cost_to_others'])} on the others (mean)"
        best = tested.loc[tested["measured_gain"].idxmax()]
        if best["block"] != top["block"] and best["measured_gain"] > top["measured_gain"]:
            text += (f"; the largest gain is in {best['block']} (rank {best['rank']}, "
                     f"{self._amount(best['measured_gain'])})")
        rho = self.tasks.set_index("task").loc[task, "spearman"]
        rho_text = "n/a" if _nan(rho) else f"{rho:.2f}"
        return text + f"; Spearman of predicted cost and measured gain over {len(tested)} blocks: {rho_text}."

    def ranking(self, task: str) -> pd.DataFrame:
        """The blocks of ``task``, highest predicted cost first."""
        if task not in set(self.tasks["task"]):
            raise InvalidParameterError(f"Diagnosis.ranking: no task {task!r}; tasks are {list(self.tasks['task'])}.")
        return self.blocks[self.blocks["task"] == task].sort_values("rank").reset_index(drop=True)

    def _task_sentence(self, row: pd.Series) -> str:
        task = row["task"]
        if self.blocks.empty:
            return ""
        worst = self.ranking(task).iloc[0]
        kept = "" if math.isnan(worst["kept"]) else f"kept {_pct(worst['kept'])} of its update there, "
        text = (f"{task} loses most in {worst['block']} (the merged block is {worst['predicted_cost']:.1%} of the "
                f"task's own weights away from them: predicted cost {worst['predicted_cost']:.3f}; {kept}which holds "
                f"{_pct(worst['energy_share'])} of its update energy)")
        if isinstance(worst["crowded_by"], str):
            text += f", crowded by {worst['crowded_by']} (overlap {worst['crowding']:.2f})"
        if isinstance(worst["opposed_by"], str) and worst["opposition"] >= OPPOSED:
            text += (f", opposed by {worst['opposed_by']} (whose update there cancels "
                     f"{_pct(worst['opposition'])} of this one at equal weight)")
        if worst["sign_lost"] > 0:
            text += f"; the merge opposes the sign of {_pct(worst['sign_lost'])} of its mass there"
            if isinstance(worst["sign_won_by"], str):
                text += f", mostly on coordinates {worst['sign_won_by']} won ({_pct(worst['sign_won'])})"
        return (text + f". Over the whole model it keeps {_pct(row['kept'])} of its update "
                f"(predicted cost {row['predicted_cost']:.3f}: the merge is that far from its fine-tune, relatively).")

    def _whatif_sentence(self) -> str:
        """The what-if from the weights: per method the share its worst task keeps (``kept``)."""
        kept = self.whatif.groupby("method", sort=False)["kept"].min().sort_values(ascending=False)
        parts = ", ".join(f"{m} {_pct(v)}" for m, v in kept.items())
        return f"What-if from the weights (the worst task's kept share per method): {parts}."

    def summary(self) -> str:
        """Plain sentences: each task's worst block and why (with ``evaluate=``: what restoring it measured),
        then the pre-merge checks that fired."""
        what = f"{self.method} merge" if self.method else "task vectors (no merge given)"
        source = "from the weights alone" if self.measured is None else "from the weights, with restoration tests"
        lines = [f"Diagnosis of the {what}, {source} (rank rule {self.criterion!r}, eps={self.eps})."]
        order = self.tasks.sort_values("predicted_cost", ascending=False, na_position="last")
        for _, r in order.iterrows():
            lines += [s for s in (self._task_sentence(r),
                                  self._measured_sentence(r["task"]) if self.measured else "") if s]
        if self.measured:
            rho = "n/a" if math.isnan(self.spearman) else f"{self.spearman:.2f}"
            lines.append(f"Restoration tests: {self.measured['evaluations']} evaluations; mean Spearman of predicted "
                         f"cost and measured gain over the tasks: {rho}.")
            lines += list(self.measured["notes"])
        if not self.whatif.empty:
            lines.append(self._whatif_sentence())
        if self.suggestion is not None:
            lines.append(self.suggestion.sentence())
        lines += list(self.notes)
        fired = self.checks[self.checks["fired"]]
        if fired.empty:
            lines.append("No pre-merge check fired.")
        lines += [f"Check {r['check']}: {r['message']}" for _, r in fired.iterrows()]
        return "\n".join(lines)

    def to_html(self, path: str | Path | None = None, *, title: str = "weightlens diagnosis") -> str:
        """One self-contained HTML page: the summary, then the checks, tasks and blocks tables.

        Returns the page; with ``path`` (a file) it is also written there atomically.
        """
        tables = [("Pre-merge checks", self.checks), ("Tasks", self.tasks),
                  ("Blocks (task x block)", self.blocks.sort_values(["task", "rank"]))]
        if not self.whatif.empty:
            tables.append(("What-if across methods", self.whatif))
        body = "".join(f"<p>{html.escape(line)}</p>" for line in self.summary().splitlines())
        for heading, table in tables:
            shown = table.to_html(index=False, float_format=lambda x: f"{x:.4g}", na_rep="", escape=True)
            body += f"<h2>{html.escape(heading)}</h2>{shown}"
        style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
                 "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}")
        page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>")
        if path is not None:
            target = Path(path).expanduser()
            if target.is_dir():
                raise InvalidParameterError(
                    f"to_html({str(path)!r}): that is a folder; pass a file path such as "
                    f"{str(target / 'diagnosis.html')!r}."
                )
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(target, page)
        return page
