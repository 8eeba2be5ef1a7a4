"""Pre-merge checks: causes of a failed merge that the task vectors show before any merge.

Each check is a rule on sums the per-key pass collected (``_walk``); its thresholds are the constants
below, and ``docs/diagnosis.md#pre-merge-checks`` explains each one. Every evaluated rule gives one row
(``fired`` says whether it holds), so a clean zoo shows what was checked, not an empty table.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from weightlens.taskvectors import TaskVectors

__all__ = ["CHECK_COLUMNS", "DOMINANT_RATIO", "FOREIGN_RATIO", "FOREIGN_UNDO", "LOW_RANK", "SIGN_EXCESS",
           "checks_table"]

#: A task's update norm over the median of the others' norms at or above this: it dominates the sum.
DOMINANT_RATIO = 3.0
#: A fine-tune of another base: its distance from the base (relative to the base's norm) at or above
#: this multiple of the others' median, and ...
FOREIGN_RATIO = 3.0
#: ... its update undoing the base: cosine between ``tau_t`` and ``-base`` at or above this (a fine-tune
#: moves a few percent of the base in a direction nearly orthogonal to it; a model trained from another
#: point is ``base' - base``, whose cosine with ``-base`` is about 0.7 for independent weights).
FOREIGN_UNDO = 0.3
#: Median over the task's changed matrices of numerical rank / min(m, n) below this: LoRA-like.
LOW_RANK = 0.5
#: A block's sign-conflict rate this far from chance towards 1: ``(rate - chance) / (1 - chance)``.
SIGN_EXCESS = 0.5

CHECK_COLUMNS = ["check", "severity", "task", "block", "value", "threshold", "fired", "message"]


def _others_median(values: pd.Series, task: str) -> float:
    rest = values.drop(task)
    return float(rest.median()) if len(rest) else math.nan


def _task_checks(per_task: pd.DataFrame) -> list[dict[str, Any]]:
    """``dominant_task``, ``foreign_base`` and ``low_rank`` for every task."""
    g = per_task.groupby("task", sort=False)
    norm = g["energy"].sum().pow(0.5)
    base_norm = math.sqrt(float(per_task.drop_duplicates("key")["base_sq"].sum()))
    rel = norm / base_norm if base_norm > 0 else norm * math.nan
    undo = -g["base_dot"].sum() / (norm * base_norm)
    rows = []
    for task in norm.index:
        ratio = float(norm[task]) / _others_median(norm, task)
        rows.append(_row("dominant_task", task, None, ratio, DOMINANT_RATIO, ratio >= DOMINANT_RATIO, (
            f"{task!r}'s update has {ratio:.1f}x the norm of the other tasks' median ({float(norm[task]):.3g}): it "
            "dominates any sum of the task vectors (task arithmetic, the elected signs of TIES, the merged top "
            "subspace). Check its scale (learning rate, steps, a scaled export) or give it a smaller weight.")))
        far = float(rel[task]) / _others_median(rel, task)
        fired = float(undo[task]) >= FOREIGN_UNDO and not far < FOREIGN_RATIO  # NaN (one task): undo alone
        rows.append(_row("foreign_base", task, None, float(rel[task]), FOREIGN_UNDO, fired, (
            f"{task!r} is {float(rel[task]):.2f} of the base's norm away from the base ({far:.1f}x the other tasks' "
            f"median) and its update points back against the base (cosine {float(undo[task]):.2f} with -base): "
            "it looks like a fine-tune of another base model, so its task vector holds the difference of two "
            "bases. Check its source (base_model_name_or_path, the checkpoint it started from), or align it "
            "first (weightlens.rebasin).")))
    if "rank" in per_task:
        live = per_task[per_task["matrix"] & (per_task["energy"] > 0) & per_task["rank"].notna()]
        share = (live["rank"] / live["min_dim"]).groupby(live["task"], sort=False).median()
        for task, value in share.items():
            rows.append(_row("low_rank", task, None, float(value), LOW_RANK, float(value) < LOW_RANK, (
                f"{task!r} changes few directions per matrix (median numerical rank {float(value):.0%} of full; "
                "LoRA-like): its update lives in a small subspace, so a merge that budgets rank per task (TSV) or "
                "thresholds the merged spectrum keeps it whole or drops it whole, and its norm per direction is "
                "larger than the full fine-tunes'. Compare it with the other tasks' kept shares.")))
    return rows


def _sign_checks(conflicts: pd.DataFrame) -> list[dict[str, Any]]:
    """``sign_conflict`` per block from per-key counts (``block, contested, conflicting, chance``)."""
    rows = []
    if conflicts.empty:
        return rows
    g = conflicts.groupby("block", sort=False)
    counts = g[["contested", "conflicting"]].sum()
    chance = g["chance"].first()
    for block in counts.index:
        contested = float(counts.loc[block, "contested"])
        if contested <= 0 or not float(chance[block]) < 1:
            continue
        rate = float(counts.loc[block, "conflicting"]) / contested
        excess = (rate - float(chance[block])) / (1 - float(chance[block]))
        rows.append(_row("sign_conflict", None, block, excess, SIGN_EXCESS, excess >= SIGN_EXCESS, (
            f"In {block}, {rate:.0%} of the coordinates that two or more tasks change have conflicting signs, "
            f"far above chance for independent signs ({float(chance[block]):.0%}): the tasks pull these weights in "
            "opposite directions, and any merge cancels or discards one side (TIES elects one sign). Merge "
            "fewer tasks here, or check for a task trained against another.")))
    return rows


def _info_checks(tv: TaskVectors) -> list[dict[str, Any]]:
    """Keys only some fine-tunes have, and added vocabulary: left out of every merge, said once."""
    rows = []
    for task, keys in tv.extras.items():
        if keys:
            rows.append(_row("extra_keys", task, None, float(len(keys)), math.nan, True, (
                f"{task!r} has {len(keys)} key(s) the base lacks (e.g. {keys[0]!r}: a task head); they are not "
                "merged, and diagnose does not see them. wl.export(merged.with_head(task), ...) carries them."),
                severity="info"))
    if tv.vocab is not None:
        rows.append(_row("vocabulary", None, None, float(tv.vocab.set_aside), math.nan, True, tv.vocab.summary(),
                         severity="info"))
    return rows


def _row(check: str, task: str | None, block: str | None, value: float, threshold: float, fired: bool,
         message: str, *, severity: str = "warning") -> dict[str, Any]:
    return {"check": check, "severity": severity, "task": task, "block": block, "value": value,
            "threshold": threshold, "fired": bool(fired), "message": message}


def checks_table(tv: TaskVectors, per_task: pd.DataFrame, conflicts: pd.DataFrame) -> pd.DataFrame:
    """Every pre-merge check as one row (``CHECK_COLUMNS``), those that fired first."""
    rows = _task_checks(per_task) + _sign_checks(conflicts) + _info_checks(tv)
    table = pd.DataFrame(rows, columns=CHECK_COLUMNS)
    order = table["fired"].map({True: 0, False: 1}) + (table["severity"] == "info").astype(int)
    return table.iloc[order.argsort(kind="stable")].reset_index(drop=True)
