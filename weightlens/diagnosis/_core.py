"""``diagnose(tv, merged)``: what a merge lost of each task, where, why, and at what predicted cost.

One pass over the keys: :func:`weightlens.merge.compare` (SAR of every task against the merged update,
sign outcomes, the key checks) hands each key, once done with it, to ``_walk`` (the lost part's crowding,
the per-task sign story, the pre-merge sums), which takes the task vectors, the merged update, its left
side (``U S``, ``S``) and the sign pass from it (``compare``'s ``visit``) instead of reading or computing them
again; both read the decompositions cached in ``tv.cache`` (a merge result's update factors or SVDs, the
per-task SVDs a spectral merge computed). Every block and task figure is a ratio of sums over keys
(energy- or mass-weighted), defined in ``docs/diagnosis.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch

from weightlens import linalg
from weightlens._options import resolve_options
from weightlens._progress import bar
from weightlens.analysis.spectra import check_criterion
from weightlens.diagnosis._checks import checks_table
from weightlens.diagnosis._options import DiagnoseOptions
from weightlens.diagnosis._restore import Measured, check_evaluate, measure, spearman
from weightlens.diagnosis._result import BLOCK_COLUMNS, TASK_COLUMNS, WHATIF_COLUMNS, Diagnosis
from weightlens.diagnosis._walk import KeyPass, Rows, walk_key
from weightlens.diagnosis._whatif import whatif
from weightlens.errors import InvalidParameterError
from weightlens.io.keys import block_of
from weightlens.merge.compare import Comparison, compare
from weightlens.merge.engine import MergeResult
from weightlens.taskvectors import TaskVectors

__all__ = ["diagnose"]

_SUMS = ["energy", "matrix_energy", "kept_energy", "coef_num", "mass", "sign_lost_mass", "lost", "miss", "own_sq"]


def _blocks(blocks: str | Callable[[str], str]) -> Callable[[str], str]:
    if blocks == "auto":
        return block_of
    if blocks == "key":
        return str
    if callable(blocks):
        return lambda key: str(blocks(key))
    raise InvalidParameterError(
        "The 'blocks' parameter of diagnose must be 'auto' (layers, as weightlens.io.keys.block_of groups keys), "
        f"'key' (every key its own block) or a function key -> block name. Got {blocks!r} instead."
    )


def _check_inputs(tv: TaskVectors, merged: Any, evaluate: Any) -> None:
    if not isinstance(tv, TaskVectors):
        raise InvalidParameterError(
            f"diagnose needs TaskVectors (wl.TaskVectors(base, finetuned)) as its first argument. Got {tv!r}."
        )
    if merged is not None and not isinstance(merged, Mapping):
        raise InvalidParameterError(
            "The 'merged' parameter of diagnose must be a merge result (wl.merge(tv, ...)), a mapping of full "
            f"merged weights, or None (pre-merge checks only). Got {type(merged).__name__} instead."
        )
    check_evaluate(evaluate, merged)


def _with_merged_alignment(df: pd.DataFrame, comparison: Comparison) -> pd.DataFrame:
    """``df`` (``task, key, matrix_energy``, ...) with compare's SAR and coefficient against the merge, and
    the energy-weighted numerators ``kept_energy`` (``SAR^2 E``) and ``coef_num`` (``coef E``)."""
    align = comparison.alignment[comparison.alignment["which"] == "merged"][["task", "key", "sar", "kept"]]
    df = df.merge(align.rename(columns={"kept": "coef"}), on=["task", "key"], how="left")
    live = df["matrix_energy"] > 0
    df["kept_energy"] = np.where(live, df["sar"].fillna(0.0) ** 2 * df["matrix_energy"], 0.0)
    df["coef_num"] = np.where(live, df["coef"].fillna(0.0) * df["matrix_energy"], 0.0)
    return df


def _kept(kept_energy: pd.Series, matrix_energy: pd.Series) -> pd.Series:
    """``kept``: the square root of the kept share of the matrix energy (a ratio of sums over keys)."""
    return np.sqrt(_ratio(kept_energy, matrix_energy))


def _kept_by_task(energies: pd.DataFrame, comparison: Comparison) -> pd.Series:
    """Per task, ``kept`` over the whole model against another merge's comparison (the what-if's column)."""
    s = _with_merged_alignment(energies, comparison).groupby("task", sort=False)[["kept_energy", "matrix_energy"]].sum()
    return _kept(s["kept_energy"], s["matrix_energy"])


def _key_table(rows: Rows, comparison: Comparison | None) -> pd.DataFrame:
    """Per (task, key) sums, with compare's SAR and coefficient folded in as energy-weighted numerators."""
    df = pd.DataFrame(rows.per_task)
    for name in ("mass", "sign_lost_mass", "lost", "rank", "miss"):
        if name not in df:
            df[name] = np.nan
    df["own_sq"] = df["base_sq"] + 2.0 * df["base_dot"] + df["energy"]  # ||base + tau_t||^2: the task's own weights
    if comparison is not None:
        df = _with_merged_alignment(df, comparison)
    else:
        df["kept_energy"] = df["coef_num"] = np.nan
    df[["mass", "sign_lost_mass", "lost", "miss"]] = df[["mass", "sign_lost_mass", "lost", "miss"]].fillna(0.0)
    return df


def _ratio(num: pd.Series, den: pd.Series) -> pd.Series:
    return num / den.where(den > 0)


#: A group whose lost share (of energy or of mass) is at most this has lost nothing: no task crowds it
#: (the ratio of two rounding errors would name one at random).
NEGLIGIBLE = 1e-6


def _leader(pairs: pd.DataFrame, by: list[str], value: str, den: pd.Series, whole: pd.Series,
            prefix: str) -> pd.DataFrame:
    """Per group: the other task with the largest ``value`` sum, and that sum over ``den``; no task and 0
    where ``den`` is a negligible share of ``whole`` (nothing was lost, so nothing crowds it)."""
    out = pd.DataFrame({f"{prefix}_by": pd.Series(None, index=den.index, dtype=object),
                        prefix: pd.Series(0.0, index=den.index)})
    if pairs.empty:
        return out
    g = pairs.groupby([*by, "other"], sort=False)[value].sum().reset_index()
    best = g.loc[g.groupby(by, sort=False)[value].idxmax()].set_index(by)
    best = best.reindex(den.index)
    lost = den > NEGLIGIBLE * whole
    share = (best[value] / den.where(lost)).where(lost, 0.0)
    out[f"{prefix}_by"] = best["other"].where(lost & (share > NEGLIGIBLE), None)
    out[prefix] = share
    return out


def _opposer(pairs: pd.DataFrame, by: list[str], energy: pd.Series) -> tuple[pd.Series, pd.Series]:
    """Per group: the other task whose update points most against this one (the most negative
    ``<tau_t, tau_s>`` summed over the group's keys), and ``-<tau_t, tau_s> / ||tau_t||^2``: the share of
    ``t``'s own update that ``s``, added at the same weight, cancels. No task and 0 where none points
    against it by more than :data:`NEGLIGIBLE` of its energy."""
    who = pd.Series(None, index=energy.index, dtype=object)
    if pairs.empty:
        return who, pd.Series(0.0, index=energy.index)
    g = pairs.groupby([*by, "other"], sort=False)["dot"].sum().reset_index()
    worst = g.loc[g.groupby(by, sort=False)["dot"].idxmin()].set_index(by).reindex(energy.index)
    share = (-worst["dot"] / energy.where(energy > 0)).fillna(0.0)
    against = share > NEGLIGIBLE
    return worst["other"].where(against, None), share.where(against, 0.0)


def _aggregate(keys: pd.DataFrame, pairs: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """The figures of ``docs/diagnosis.md`` per group ``by`` (``["task", "block"]`` or ``["task"]``)."""
    s = keys.groupby(by, sort=False)[_SUMS].sum()
    total = keys.groupby("task", sort=False)["energy"].sum()
    out = pd.DataFrame(index=s.index)
    task_level = s.index.get_level_values("task") if isinstance(s.index, pd.MultiIndex) else s.index
    out["energy_share"] = _ratio(s["energy"], pd.Series(total.reindex(task_level).to_numpy(), index=s.index))
    out["kept"] = _kept(s["kept_energy"], s["matrix_energy"])
    out["lost_energy"] = 1.0 - out["kept"] ** 2
    out["coef"] = _ratio(s["coef_num"], s["matrix_energy"])
    crowd = _leader(pairs, by, "crowd", s["lost"], s["matrix_energy"], "crowding")
    out["crowded_by"], out["crowding"] = crowd["crowding_by"], crowd["crowding"]
    group = [b for b in by if b != "task"]
    occupied = s["kept_energy"].groupby(level=group, sort=False).transform("sum") if group else s[
        "kept_energy"].sum()
    out["merged_share"] = _ratio(s["kept_energy"], occupied if group else pd.Series(occupied, index=s.index))
    out["sign_lost"] = _ratio(s["sign_lost_mass"], s["mass"])
    won = _leader(pairs, by, "won", s["sign_lost_mass"], s["mass"], "sign_won")
    out["sign_won_by"], out["sign_won"] = won["sign_won_by"], won["sign_won"]
    out["opposed_by"], out["opposition"] = _opposer(pairs, by, s["energy"])
    # what restoring the group to the task's own weights changes, relative to those weights' size
    out["predicted_cost"] = np.sqrt(_ratio(s["miss"], s["own_sq"])).fillna(0.0)
    out["energy"] = s["energy"]
    return out.reset_index()


def _blocks_table(keys: pd.DataFrame, pairs: pd.DataFrame) -> pd.DataFrame:
    out = _aggregate(keys, pairs, ["task", "block"])
    out["rank"] = out.groupby("task", sort=False)["predicted_cost"].rank(ascending=False, method="first")
    out["rank"] = out["rank"].astype(int)
    out["measured_gain"] = out["cost_to_others"] = math.nan
    return out[BLOCK_COLUMNS]


def _tasks_table(keys: pd.DataFrame, pairs: pd.DataFrame, blocks: pd.DataFrame, checks: pd.DataFrame,
                 comparison: Comparison | None) -> pd.DataFrame:
    out = _aggregate(keys, pairs, ["task"]).set_index("task")
    base_norm = math.sqrt(float(keys.drop_duplicates("key")["base_sq"].sum()))
    out["norm"] = np.sqrt(out["energy"])
    out["rel_distance"] = out["norm"] / base_norm if base_norm > 0 else math.nan
    if comparison is not None:
        worst = blocks[blocks["rank"] == 1].set_index("task")["block"]
        out["worst_block"] = worst.reindex(out.index)
    else:  # no merge: only the task's own figures
        merged_only = ["kept", "lost_energy", "coef", "crowded_by", "crowding", "merged_share", "sign_lost",
                       "sign_won_by", "sign_won", "opposed_by", "opposition", "predicted_cost"]
        out[merged_only] = None
        out[[c for c in merged_only if not c.endswith("_by")]] = math.nan
        out["worst_block"] = None
    fired = checks[checks["fired"] & (checks["severity"] == "warning") & checks["task"].notna()]
    out["checks"] = [", ".join(fired.loc[fired["task"] == t, "check"]) for t in out.index]
    out["spearman"] = math.nan
    return out.reset_index()[TASK_COLUMNS]


def _conflicts(rows: Rows, comparison: Comparison | None, block: Callable[[str], str]) -> pd.DataFrame:
    if comparison is None:
        return pd.DataFrame(rows.conflicts, columns=["key", "block", "contested", "conflicting", "chance"])
    s = comparison.signs[comparison.signs["which"] == "merged"]
    return pd.DataFrame({"key": s["key"], "block": s["key"].map(block), "contested": s["contested"],
                         "conflicting": s["conflicting"], "chance": s["chance_rate"]})


def _fill(table: pd.DataFrame, tasks: pd.DataFrame, measured: Measured) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The restoration tests' columns: ``measured_gain``, ``cost_to_others`` per block, ``spearman`` per task."""
    index = list(zip(table["task"], table["block"]))
    table = table.assign(measured_gain=[measured.gain.get(i, math.nan) for i in index],
                         cost_to_others=[measured.cost.get(i, math.nan) for i in index])
    rho = spearman(table)
    tasks = tasks.assign(spearman=tasks["task"].map(rho).astype(float))
    return table, tasks


def diagnose(
    tv: TaskVectors,
    merged: Mapping[str, torch.Tensor] | None,
    *,
    evaluate: Callable[[Mapping[str, torch.Tensor], str, str], Mapping[str, Any]] | None = None,
    blocks: str | Callable[[str], str] = "auto",
    progress: bool | None = None,
    options: DiagnoseOptions | None = None,
    **overrides: Any,
) -> Diagnosis:
    """Why a merge lost each task, block by block, from the weights (``docs/diagnosis.md``), and with
    ``evaluate`` what restoring a block measurably gives back.

    Parameters
    ----------
    tv : TaskVectors
        The task vectors that were merged (full fine-tunes, PEFT adapters, or a mix).
    merged : MergeResult, Mapping[str, Tensor] or None
        The merge (``wl.merge(tv, ...)``; its update SVDs and the per-task SVDs a spectral merge computed
        are reused from ``tv.cache``), full merged weights of these task vectors, or None for the
        pre-merge checks alone (``.blocks`` is then empty).
    evaluate : callable or None, default=None
        ``evaluate(state_dict, task, split) -> {"accuracy": ..., ...}`` (a zoo's ``TaskZoo.evaluate``; the
        state dict holds full weights, adapters applied). Given, each task's top ``restore`` blocks and
        ``controls`` lowest-ranked blocks are restored to its own fine-tuned weights in turn and every
        task is scored: ``measured_gain``, ``cost_to_others`` and ``spearman`` (restoration tests,
        ``docs/diagnosis.md``). None: the weights alone, those columns NaN.
    blocks : {"auto", "key"} or callable, default="auto"
        How keys group into blocks: ``"auto"`` by layer (``weightlens.io.keys.block_of``: ``encoder.layer.3``,
        ``embeddings.word_embeddings``, ...), ``"key"`` one block per key, or a function ``key -> block``.
    progress : bool or None, default=None
        Bars over keys and evaluations; None follows ``weightlens.config.progress``.
    options : DiagnoseOptions, optional
        ``criterion`` (rank rule, default ``"paper"``), ``eps`` (0.05), ``device`` (``"auto"``) and, with
        ``evaluate``, ``restore`` (3), ``controls`` (1), ``split`` (``"val"``), ``metric``
        (``"accuracy"``), ``max_evals`` (None); any of them may also be passed as a keyword.

    Returns
    -------
    Diagnosis
        ``.blocks`` (task x block), ``.tasks``, ``.checks`` (pre-merge checks), ``.whatif`` (with ``whatif=``),
        ``.suggestion`` (with ``whatif=`` and ``evaluate=``),
        ``.spearman``, ``.summary()``, ``.to_html()``.

    Raises
    ------
    InvalidParameterError
        An option outside its range, an unknown option, ``evaluate`` not callable or without a merge, or a
        merge of other tasks.
    RestorationError
        ``evaluate`` raised or returned no ``metric`` (the message names the task and block).
    KeyMismatchError, ShapeMismatchError
        ``merged`` lacks a task-vector key or has another shape there (``merge.compare``'s checks).

    Examples
    --------
    >>> import torch, weightlens as wl
    >>> base = {"layer.0.w": torch.zeros(4, 4)}
    >>> tv = wl.TaskVectors(base, {"a": {"layer.0.w": torch.diag(torch.tensor([1.0, 1, 0, 0]))},
    ...                            "b": {"layer.0.w": torch.diag(torch.tensor([0.0, 0, 1, 1]))}})
    >>> d = wl.diagnose(tv, wl.merge(tv, method="task_arithmetic", alpha=1.0), progress=False)
    >>> d.blocks[["task", "block", "kept", "crowding"]].round(3).values.tolist()
    [['a', 'layer.0', 1.0, 0.0], ['b', 'layer.0', 1.0, 0.0]]
    """
    opts = resolve_options(DiagnoseOptions, options, overrides, caller="diagnose")
    _check_inputs(tv, merged, evaluate)
    criterion, block, eps = check_criterion(opts.criterion), _blocks(blocks), float(opts.eps)
    comparison = None
    dev = linalg.resolve_device(merged.device if isinstance(merged, MergeResult) else opts.device)
    run, rows = KeyPass(tv, merged, criterion, eps, dev, block), Rows()
    if merged is not None:  # one pass over the keys: compare's rows, then the walk's on what compare read
        comparison = compare(tv, merged, criterion=criterion, eps=eps, device=dev, progress=progress,
                             visit=lambda view: walk_key(run, view.key, rows, view), task_arithmetic=False)
    else:
        for key in bar(tv.keys, progress=progress, desc="diagnose", unit="key"):
            walk_key(run, key, rows)
    keys = _key_table(rows, comparison)
    pairs = pd.DataFrame(rows.per_pair, columns=["task", "other", "key", "block", "crowd", "won", "dot"])
    checks = checks_table(tv, keys, _conflicts(rows, comparison, block))
    table = _blocks_table(keys, pairs) if comparison is not None else pd.DataFrame(columns=BLOCK_COLUMNS)
    tasks = _tasks_table(keys, pairs, table, checks, comparison)
    measured = None
    if evaluate is not None:
        measured = measure(tv, merged, table, block, evaluate, opts, progress)
        table, tasks = _fill(table, tasks, measured)
    whatif_table, suggestion, notes = pd.DataFrame(columns=WHATIF_COLUMNS), None, []
    if opts.whatif is not None and merged is not None:
        energies = keys[["task", "key", "matrix_energy"]]

        def kept_of(comparison: Comparison) -> pd.Series:
            return _kept_by_task(energies, comparison)

        whatif_table, suggestion, notes = whatif(tv, merged, kept_of, evaluate, opts, progress)
    return Diagnosis(
        method=merged.method if isinstance(merged, MergeResult) else ("weights" if merged is not None else None),
        params=dict(merged.params) if isinstance(merged, MergeResult) else {},
        blocks=table, tasks=tasks, checks=checks, whatif=whatif_table, suggestion=suggestion, notes=tuple(notes),
        comparison=comparison, criterion=criterion, eps=eps,
        measured=None if measured is None else measured.record(opts),
    )
