"""``analyze(tv) -> Report``: spectra, alignment and sign conflicts of task vectors in one pass.

One pass over keys reads each key's deltas once; every decomposition goes through
:mod:`weightlens.decompositions` (cached in ``tv.cache`` by task, key, device and dtype), so
merges and widgets that follow reuse them (on CUDA computed ahead, a window of keys at a time, batched by
shape: ``weightlens.config.batch``). Tasks get a full thin SVD only where singular vectors
are needed (``pairwise=True``: task x task SAR, STI, subspace overlaps); otherwise singular values
alone. Keys whose deltas are all zero (frozen layers) are not decomposed.

Examples
--------
>>> import torch, weightlens as wl
>>> from weightlens.analysis import analyze
>>> g = torch.Generator().manual_seed(0)
>>> base = {"layer.0.w": torch.zeros(6, 4), "layer.0.b": torch.zeros(4)}
>>> fts = {t: {k: torch.randn(v.shape, generator=g) for k, v in base.items()} for t in "ab"}
>>> rep = analyze(wl.TaskVectors(base, fts), device="cpu", progress=False)
>>> sorted(rep.spectra.task.unique())
['a', 'b', 'sum']
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from weightlens import decompositions, linalg
from weightlens._executor import check_executor, map_keys
from weightlens._progress import bar
from weightlens.analysis.alignment import (
    cosine_matrix,
    gram,
    left_span,
    reference_ranks,
    sar_curves,
    sar_rows,
    sti,
    subspace_row,
)
from weightlens.analysis.options import AnalysisOptions, resolve_options
from weightlens.analysis.signs import (
    conflict_stats,
    empty_stats,
    global_thresholds,
    pair_rows,
    pairwise_conflicts,
    trim,
)
from weightlens.analysis.spectra import CRITERIA, complete_spectrum, spectrum_rows
from weightlens.errors import InvalidParameterError, KeyMismatchError
from weightlens.io._atomic import atomic_write_text
from weightlens.io.keys import block_of
from weightlens.merged import check_merged, merged_keys, merged_update
from weightlens.taskvectors import TaskVectors

__all__ = ["AnalysisOptions", "Report", "analyze", "block_of"]



# ------------------------------------------------------------------------------------ aggregates
def _wmean(values: pd.Series, weights: pd.Series) -> float:
    ok = values.notna() & weights.notna() & (weights > 0)
    return float((values[ok] * weights[ok]).sum() / weights[ok].sum()) if ok.any() else math.nan


def _ratio(num: pd.Series, den: pd.Series) -> float:
    total = float(den.sum())
    return float(num.sum()) / total if total > 0 else math.nan


def _mean(values: pd.Series) -> float:
    return float(values.mean()) if values.notna().any() else math.nan


def _row(
    metric: str,
    plain: float,
    weighted: float,
    chance: float = math.nan,
    weighting: str = "numel",
    note: str = "",
) -> dict[str, Any]:
    return {"metric": metric, "plain": plain, "weighted": weighted, "chance": chance,
            "weighting": weighting, "note": note}


def _by_numel(metric: str, values: pd.Series, weights: pd.Series, **kw: Any) -> dict[str, Any]:
    """Summary row: plain mean, and mean weighted by parameter count."""
    return _row(metric, _mean(values), _wmean(values, weights), **kw)


@dataclass(frozen=True, eq=False)
class Report:
    """Result of :func:`analyze`: tidy tables, aggregates, figures and a standalone HTML page.

    Attributes
    ----------
    spectra : one row per (key, task) for matrix keys, tasks plus ``"sum"`` (and ``"merged"``):
        ``sigma_max, frob, stable_rank, erank, erank_rel (= erank / min(m, n)), rank_eps,
        numerical_rank, energy_at_<k>, ...``; ``zero`` marks a delta that is exactly 0.
    alignment : one row per (key, task, reference); reference ``"sum"``, ``"merged"`` or another
        task (task x task SAR with k taken from the sum, Iso Fig. 3b). Columns ``k_paper,
        sar_paper, k_iso_script, sar_iso_script`` and ``k, sar`` for the chosen rule; against
        another task only the chosen rule is computed (the other's columns are empty).
    pairs : one row per (key, unordered task pair): ``cosine``, ``conflict_pair`` (chance 0.5) and
        for matrices ``overlap_left/right`` with ``chance_left/right`` (k/d) and Grassmann distances.
    interference : one row per matrix key: ``sti`` and ``sti_normalized`` (weightlens extension).
    signs : one row per key: conflict rate with its chance baseline, mass-weighted conflict,
        TIES discarded mass, agreement, and the counts behind them.
    singular_values : long table ``key, task, index, sigma`` (for spectrum plots).
    cosines : whole-model cosine similarity of the task vectors (task x task).
    """

    spectra: pd.DataFrame
    alignment: pd.DataFrame
    pairs: pd.DataFrame
    interference: pd.DataFrame
    signs: pd.DataFrame
    singular_values: pd.DataFrame
    cosines: pd.DataFrame
    tasks: tuple[str, ...]
    options: AnalysisOptions
    keys: tuple[str, ...]
    notes: tuple[str, ...] = ()

    def __repr__(self) -> str:
        n_matrix = int(self.spectra["key"].nunique()) if not self.spectra.empty else 0
        return (f"Report(tasks={list(self.tasks)}, keys={len(self.keys)} ({n_matrix} matrices), "
                f"sar_criterion={self.options.sar_criterion!r})")

    def _task_spectra(self, task: str | None = None) -> pd.DataFrame:
        s = self.spectra
        if s.empty:
            return s
        s = s[~s["zero"]]
        return s[s["task"].isin(self.tasks)] if task is None else s[s["task"] == task]

    def _sar(self, kind: str) -> pd.DataFrame:
        a = self.alignment
        if a.empty:
            return a
        if kind == "other":
            return a[a["reference"].isin(self.tasks) & (a["reference"] != a["task"])]
        if kind == "self":
            return a[a["reference"] == a["task"]]
        return a[a["reference"] == kind]

    def sar_matrix(self, *, value: str = "sar", weighted: bool = False) -> pd.DataFrame:
        """Task x reference table of SAR averaged over matrices (plain mean, or weighted by numel)."""
        if self.alignment.empty:  # no matrix key
            return pd.DataFrame(index=list(self.tasks), columns=pd.Index([], name="reference"), dtype=float)
        a = self.alignment.dropna(subset=[value])
        agg = (lambda g: _wmean(g[value], g["numel"])) if weighted else (lambda g: g[value].mean())
        table = a.groupby(["task", "reference"]).apply(agg, include_groups=False).unstack("reference")
        cols = [c for c in [*self.tasks, "sum", "merged"] if c in table.columns]
        return table.reindex(index=list(self.tasks), columns=cols)

    def conflict_matrix(self, *, weighted: bool = True) -> pd.DataFrame:
        """Task x task sign-conflict rate ``c_ij`` (chance 0.5; 0 on the diagonal by definition).

        ``weighted=True``: pooled counts over every parameter (``sum n_opposite / sum n_pair``);
        ``False``: plain mean of the per-key rates.
        """
        names = list(self.tasks)
        table = pd.DataFrame(math.nan, index=names, columns=names)
        for (a, b), g in self.pairs.groupby(["task_a", "task_b"], sort=False) if not self.pairs.empty else ():
            value = _ratio(g["n_opposite"], g["n_pair"]) if weighted else _mean(g["conflict_pair"])
            table.loc[a, b] = table.loc[b, a] = value
        for name in names:
            table.loc[name, name] = 0.0
        return table

    def summary(self) -> pd.DataFrame:
        """Model-level aggregates with chance baselines.

        ``plain``: every key counts once (as the Iso code averages SAR over matrices);
        ``weighted``: by parameter count (``numel``), or for rates the pooled counts over all
        parameters; the ``weighting`` column says which. Returns a DataFrame indexed by metric with
        columns ``plain, weighted, chance, weighting, note``.
        """
        rows = self._summary_cosines()
        for metric, task in (("erank_rel", None), ("stable_rank", None), ("erank_rel", "sum")):
            s = self._task_spectra(task)
            if not s.empty:
                note = "erank_rel = erank / min(m, n)" if metric == "erank_rel" else ""
                rows.append(_by_numel(f"{metric} ({task or 'tasks'})", s[metric], s["numel"], note=note))
        rule = f"rule {self.options.sar_criterion}, eps={self.options.eps}"
        for label, kind in (("sum", "sum"), ("merged", "merged"), ("other task", "other"), ("itself", "self")):
            a = self._sar(kind)
            if not a.empty:
                note = f"{rule}; k from the {'merged' if kind == 'merged' else 'sum'} spectrum"
                rows.append(_by_numel(f"SAR task vs {label}", a["sar"], a["numel"], note=note))
        return pd.DataFrame(rows + self._summary_pairs() + self._summary_signs()).set_index("metric")

    def _summary_cosines(self) -> list[dict[str, Any]]:
        if len(self.tasks) < 2:
            return []
        off = self.cosines.to_numpy()[~torch.eye(len(self.tasks), dtype=torch.bool).numpy()]
        per_pair = self.pairs.groupby(["task_a", "task_b"])["cosine"].mean()
        whole = "whole model (flattened vector)"
        return [
            _row("cosine (mean over pairs)", _mean(self.pairs["cosine"]), float(off.mean()), 0.0, whole,
                 "plain: mean over keys and pairs"),
            _row("max |cosine| over pairs", float(per_pair.abs().max()), float(abs(off).max()), 0.0, whole,
                 "plain: largest |mean over keys| of a pair"),
        ]

    def _summary_pairs(self) -> list[dict[str, Any]]:
        rows, i = [], self.interference
        if not i.empty:
            rows.append(_by_numel("STI normalized", i["sti_normalized"], i["numel"],
                                  note="weightlens extension: STI / ||Sigma_cat||_1"))
        for side in ("left", "right"):
            col = f"overlap_{side}"
            if col in self.pairs and self.pairs[col].notna().any():
                q = self.pairs.dropna(subset=[col])
                rows.append(_by_numel(f"subspace overlap ({side})", q[col], q["numel"],
                                      chance=_wmean(q[f"chance_{side}"], q["numel"]),
                                      note="top-k singular subspaces; chance k/d"))
        return rows

    def _summary_signs(self) -> list[dict[str, Any]]:
        s, p = self.signs, self.pairs
        if s.empty or len(self.tasks) < 2:
            return []
        note = (f"chance 1-2^(1-T) = {float(s['chance_T'].iloc[0]):.4f} untrimmed; "
                f"density={self.options.sign_density}")
        return [
            _row("conflict rate", _mean(s["conflict_rate"]), _ratio(s["n_conflict"], s["n_eligible"]),
                 _ratio(s["chance_sum"], s["n_eligible"]), "pooled counts", note),
            _row("pairwise conflict rate", _mean(p["conflict_pair"]), _ratio(p["n_opposite"], p["n_pair"]),
                 0.5, "pooled counts"),
            _row("mass-weighted conflict", _mean(s["mass_conflict"]),
                 _ratio(s["mass_conflicting"], s["mass_eligible"]), weighting="pooled mass"),
            _row("TIES discarded mass", _mean(s["discarded_mass"]), _ratio(s["mass_discarded"], s["mass_total"]),
                 weighting="pooled mass"),
            _by_numel("sign agreement", s["agreement"], s["n_coords"]),
        ]

    def by_block(self) -> pd.DataFrame:
        """Per-block aggregates (block = key prefix up to the layer index), plain and weighted."""
        out = pd.DataFrame(index=pd.Index(list(dict.fromkeys(block_of(k) for k in self.keys)), name="block"))
        if not self.signs.empty:
            g = self.signs.groupby("block")
            counted = g["n_eligible"].sum().replace(0, math.nan)
            out["numel"] = g["numel"].sum()
            out["conflict_rate_plain"] = g["conflict_rate"].mean()
            out["conflict_rate_pooled"] = g["n_conflict"].sum() / counted
            out["chance_pooled"] = g["chance_sum"].sum() / counted
        parts = [("erank_rel", "erank_rel", self._task_spectra())]
        parts += [(f"sar_{kind}", "sar", self._sar(kind)) for kind in ("sum", "other")]
        for name, col, table in parts:
            if not table.empty:
                g = table.groupby("block")
                out[f"{name}_plain"] = g[col].mean()
                out[f"{name}_weighted"] = g.apply(lambda d, c=col: _wmean(d[c], d["numel"]), include_groups=False)
        if not self.pairs.empty:
            out["cosine_plain"] = self.pairs.groupby("block")["cosine"].mean()
        return out

    def figures(self) -> dict[str, Any]:
        """The standard figures as ``{name: plotly Figure}`` (see :mod:`weightlens.figures.analysis`)."""
        from weightlens.figures import analysis as fa

        return fa.report_figures(self)

    def to_html(self, path: str | Path, *, title: str = "weightlens interference report",
                diagnosis: Any = None) -> Path:
        """Write a standalone HTML page (summary, figures, per-block table; plotly.js inlined once).

        With ``diagnosis`` (a :class:`weightlens.diagnosis.Diagnosis` of a merge of these task vectors) the
        page has a "Diagnosis" section: its summary sentences, suggestion, each task's worst block and the
        blocks-by-predicted-cost figure of every task (:mod:`weightlens.figures.diagnosis`).

        The page goes to a hidden temporary file beside ``path``, renamed onto it at the end: a
        failure leaves the earlier page (or nothing) and no temporary file. ``path`` is a file, not
        a folder (``InvalidParameterError``).
        """
        from weightlens.figures import analysis as fa

        shown, path = str(path), Path(path).expanduser()
        if path.is_dir():
            raise InvalidParameterError(
                f"to_html({shown!r}): that is a folder, and the report is one HTML file; pass a file path "
                f"such as {str(path / 'report.html')!r}."
            )
        settings = dataclasses.asdict(self.options) | {"tasks": list(self.tasks)}
        html = fa.report_page(title, self.summary(), self.by_block(), self.figures(), settings=settings,
                              notes=self.notes, diagnosis=diagnosis)
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write_text(path, html)


# ------------------------------------------------------------------------------------ the pass
@dataclass
class _Run:
    """State of one :func:`analyze` pass: inputs and the rows collected so far."""

    tv: TaskVectors
    opts: AnalysisOptions
    device: str | torch.device
    merged: Mapping[str, torch.Tensor] | None
    merged_keys: frozenset[str]
    thresholds: list[float | None] | None
    gram: torch.Tensor
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    ahead: Callable[[str], None] | None = None  # decompositions batched ahead (local walks only)

    @property
    def names(self) -> list[str]:
        return self.tv.names

    def add(self, table: str, rows: Iterable[dict[str, Any]]) -> None:
        self.rows.setdefault(table, []).extend(rows)


def analyze(
    tv: TaskVectors,
    *,
    device: str | torch.device = "auto",
    tasks: Iterable[str] | None = None,
    keys: Iterable[str] | None = None,
    merged: Mapping[str, torch.Tensor] | None = None,
    progress: bool | None = None,
    executor: str = "local",
    options: AnalysisOptions | None = None,
    **overrides: Any,
) -> Report:
    """Spectra, singular-vector alignment and sign conflicts of task vectors, in one report.

    Parameters
    ----------
    tv : the task vectors (its ``cache`` is filled and reused).
    device : decomposition device, ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda[:i]"``.
    tasks, keys : restrict to these tasks / tensor keys (default: all).
    merged : optional merge: a ``wl.merge(...)`` result or full merged weights (a state dict,
        ``wl.load(folder)``), as ``compare`` takes; adds ``"merged"`` spectra and SAR for the matrix
        keys it updates (its update ``merged - base`` comes from ``weightlens.merged.merged_update``).
    progress : a bar over keys: None (default) follows ``weightlens.config.progress`` (auto: shown in
        notebooks and terminals when the work takes a while), True or False.
    executor : ``"local"`` (default: this process) or ``"ray"``: one Ray task per key, reading the task
        vectors from their files, decomposing on this process's torch thread count; the tables are
        equal to the local ones and the decompositions land in ``tv.cache`` as locally
        (``docs/scale.md``).
    options : an :class:`AnalysisOptions`; ``**overrides`` set its fields directly, e.g.
        ``analyze(tv, sar_criterion="paper", top_n=256, sign_density=0.2)``.

    Returns
    -------
    Report
        Tidy tables ``spectra``, ``alignment``, ``pairs``, ``interference``, ``signs``,
        ``singular_values`` and ``cosines``; ``summary()``, ``by_block()``, ``figures()``, ``to_html()``.
    """
    if not isinstance(tv, TaskVectors):
        raise InvalidParameterError(
            f"analyze needs a weightlens.TaskVectors; got {type(tv).__name__}. Build one with "
            "wl.TaskVectors(base, finetuned)."
        )
    opts = resolve_options(options, overrides)
    check_executor(executor, caller="analyze")
    if tasks is not None:
        tv = tv.subset(tasks)
    notes = (tv.vocab.summary(),) if tv.vocab is not None else ()
    tv = tv.shared_rows()  # added vocabulary rows are merged per row, never analysed
    chosen = _select_keys(tv, keys)
    with_merged = _merged_keys(tv, merged, chosen)
    thresholds = None
    if opts.sign_density is not None and opts.trim_scope == "global":
        thresholds = list(global_thresholds(tv, opts.sign_density, keys=chosen).values())
    run = _Run(tv, opts, device, merged, with_merged, thresholds, torch.zeros(len(tv), len(tv), dtype=torch.float64))
    if executor == "local":
        run.ahead = decompositions.ahead(tv, chosen, lambda key: _ahead_of(tv, opts, key), device=device,
                                         dtype=opts.dtype)
    fn = _analyze_here if executor == "local" else _analyze_there
    gpus = 1 if executor != "local" and linalg.resolve_device(device).type == "cuda" else 0
    walk = map_keys(fn, chosen, executor=executor, shared=run, gpus=gpus)
    for _, found in bar(walk, progress=progress, desc="analyze", unit="key", total=len(chosen)):
        if found is not None:  # a Ray task's rows, gram and cache entries, added in key order
            rows, g, entries = found
            for table, added in rows.items():
                run.add(table, added)
            run.gram += g
            for tag, value in entries:
                tv.cache.get_or_compute(tag, lambda value=value: value)
    return _build_report(run, chosen, notes)


def _ahead_of(tv: TaskVectors, opts: AnalysisOptions, key: str) -> tuple[str, ...]:
    """The SVDs :func:`_decompose` takes at ``key`` (``decompositions.ahead``): the sum's, and each task's
    when ``pairwise``; none under ``top_n`` (top-k triplets are not batched)."""
    r = min(tv.shape(key))
    if opts.top_n is not None and r > opts.top_n:
        return ()
    return ("tasks", "sum") if opts.pairwise else ("sum",)


def _analyze_here(run: _Run, key: str) -> None:
    if run.ahead is not None:
        run.ahead(key)
    _analyze_key(run, key, run.tv.deltas(key))  # the only read of this key


def _analyze_there(run: _Run, key: str) -> tuple[dict[str, list[dict[str, Any]]], torch.Tensor, list]:
    """One key in a Ray worker: its rows, its Gram matrix and what it stored in the (worker's) ``tv.cache``."""
    run.tv.cache = linalg.DecompositionCache(run.tv.cache.max_bytes)  # this key's entries only
    mine = dataclasses.replace(run, rows={}, gram=torch.zeros_like(run.gram))
    _analyze_key(mine, key, mine.tv.deltas(key))
    return mine.rows, mine.gram, run.tv.cache.items()


def _select_keys(tv: TaskVectors, keys: Iterable[str] | None) -> list[str]:
    chosen = list(tv.keys) if keys is None else list(keys)
    unknown = [k for k in chosen if k not in tv.keys]
    if unknown:
        shown = ", ".join(repr(k) for k in unknown[:5])
        raise KeyMismatchError(f"analyze(keys=...) names key(s) {shown} that the task vectors lack (see tv.keys).")
    return chosen


def _merged_keys(tv: TaskVectors, merged: Mapping[str, torch.Tensor] | None, chosen: list[str]) -> frozenset[str]:
    """Chosen keys the merge updates (or the merged weights hold), their shapes checked before any work."""
    if merged is None:
        return frozenset()
    held = set(merged_keys(tv, merged))
    if tv.vocab is not None:  # a merge over a vocabulary union has more rows there than the shared ones
        held -= set(tv.vocab.keys)
    keys = [k for k in chosen if k in held]
    check_merged(tv, merged, keys, caller="analyze(merged=...)")
    return frozenset(keys)


def _analyze_key(run: _Run, key: str, deltas: torch.Tensor) -> None:
    """Signs, cosines and pair rows of any key (``deltas``: its task matrices); spectra and alignment
    of a matrix key."""
    kind, numel, block = run.tv.kind(key), run.tv.numel(key), block_of(key)
    T = deltas.shape[0]
    if bool(deltas.any()):
        g = gram(deltas)
        local = run.opts.sign_density if run.thresholds is None else None
        x = trim(deltas, local, thresholds=run.thresholds)
        stats, counts = conflict_stats(x), pairwise_conflicts(x)
    else:  # frozen in every task (e.g. embeddings): every statistic is known without another pass
        g = torch.zeros(T, T, dtype=torch.float64)
        stats, counts = empty_stats(T, numel), (g.clone(), g.clone())
    run.gram += g
    run.add("signs", [{"key": key, "block": block, "kind": kind, "numel": numel, **stats}])
    pairs = pair_rows(key, run.names, *counts)
    cos = cosine_matrix(g)
    index = {n: i for i, n in enumerate(run.names)}
    for row in pairs:
        cosine = float(cos[index[row["task_a"]], index[row["task_b"]]])
        row.update(block=block, kind=kind, numel=numel, cosine=cosine)
    if kind == "matrix":
        _matrix_key(run, key, deltas, g, {(r["task_a"], r["task_b"]): r for r in pairs})
    run.add("pairs", pairs)


def _decompose(run: _Run, key: str, deltas: torch.Tensor, kv: int, r: int) -> tuple[list[Any], Any]:
    """Per-task decompositions (SVD, or singular values alone) and the SVD of the sum (cached)."""
    kw = {"device": run.device, "dtype": run.opts.dtype}
    tasks: list[Any] = []
    for t, name in enumerate(run.names):
        if kv < r:
            tasks.append(decompositions.topk_svd(run.tv, key, name, kv, delta=deltas[t], **kw))
        elif run.opts.pairwise:
            tasks.append(decompositions.svd(run.tv, key, name, delta=deltas[t], **kw))
        else:
            S = decompositions.svdvals(run.tv, key, name, delta=deltas[t], **kw)
            tasks.append(linalg.SVD(None, S, None))  # singular values alone
    total = deltas.sum(0)
    if kv < r:
        return tasks, decompositions.topk_svd(run.tv, key, run.names, kv, delta=total, **kw)
    return tasks, decompositions.svd(run.tv, key, run.names, delta=total, **kw)


def _merged_svd(run: _Run, key: str, kv: int, r: int) -> tuple[Any, float]:
    merged = merged_update(run.tv, run.merged, key, caller="analyze(merged=...)")  # type: ignore[arg-type]
    kw = {"device": run.device, "dtype": run.opts.dtype, "name": key}
    dec = linalg.topk_svd(merged, kv, **kw) if kv < r else linalg.svd(merged, **kw)
    return dec, float((merged.double() ** 2).sum())


def _matrix_key(run: _Run, key: str, deltas: torch.Tensor, g: torch.Tensor, pairs: dict) -> None:
    """Spectra of tasks, sum (and merged), SAR against them, then the pairwise quantities."""
    (m, n), opts, block = run.tv.shape(key), run.opts, block_of(key)
    r = min(m, n)
    spec = {"eps": opts.eps, "energy_ranks": opts.energy_ranks, "entropy": opts.entropy}
    norms2, sum_sq = torch.diagonal(g).tolist(), float(g.sum())
    if sum_sq == 0.0 and max(norms2) == 0.0:  # frozen layer: nothing to decompose
        zeros = {name: (torch.zeros(r), 0.0) for name in [*run.names, "sum"]}
        run.add("spectra", [{**row, "block": block, "zero": True} for row in spectrum_rows(key, (m, n), zeros, **spec)])
        return
    kv = opts.top_n if opts.top_n is not None and r > opts.top_n else r
    truncated = kv < r  # truncated spectra take their total energy from the deltas themselves
    tasks, ref = _decompose(run, key, deltas, kv, r)
    values = {name: _spectrum(tasks[t], kv, (m, n), norms2[t] if truncated else None)
              for t, name in enumerate(run.names)}
    refs = {"sum": (ref, _spectrum(ref, kv, (m, n), sum_sq if truncated else None)[1])}
    if key in run.merged_keys:
        mdec, msq = _merged_svd(run, key, kv, r)
        refs["merged"] = (mdec, msq if truncated else None)
    values.update({label: _spectrum(dec, kv, (m, n), sq) for label, (dec, sq) in refs.items()})
    zero_task = {name: norms2[t] == 0.0 for t, name in enumerate(run.names)}
    rows = spectrum_rows(key, (m, n), values, **spec)
    run.add("spectra", [{**row, "block": block, "zero": zero_task.get(row["task"], False)} for row in rows])
    run.add("singular_values", [
        {"key": key, "task": name, "index": i + 1, "sigma": s}
        for name, (S, _) in values.items() for i, s in enumerate(S.detach().cpu().tolist())
    ])
    ranks_sum = reference_ranks(ref.S, opts.eps, refs["sum"][1])
    spans = {label: (left_span(dec, (m, n)), reference_ranks(dec.S, opts.eps, sq))
             for label, (dec, sq) in refs.items()}
    if opts.pairwise:  # task x task SAR: each task's vectors, k from the sum (Iso Fig. 3b), chosen rule
        chosen = {opts.sar_criterion: ranks_sum[opts.sar_criterion]}
        spans.update({name: (left_span(tasks[j], (m, n)), chosen) for j, name in enumerate(run.names)})
    # only the columns some rule keeps (the rest would not change any reported SAR)
    spans = {label: (U[:, : min(max(ranks.values()), U.shape[1])], ranks) for label, (U, ranks) in spans.items()}
    projected = deltas
    if opts.pairwise and not truncated and n > m:
        # ||U^T delta_t||_F = ||U^T U_t diag(S_t)||_F (Vh_t has orthonormal rows): for a wide matrix
        # the m x r factor is cheaper to project than the m x n delta (from factors, m x rank: zero
        # columns pad them to one width, which changes no norm)
        width = max(tasks[t].S.numel() for t in range(len(tasks)))
        projected = torch.stack([_pad_columns(tasks[t].U * tasks[t].S, width) for t in range(len(tasks))])
    curves = sar_curves(projected, [U for U, _ in spans.values()])  # one product for every reference
    for (label, (U, ranks)), curve in zip(spans.items(), curves):
        rows = sar_rows(key, deltas, run.names, label, U, ranks, opts.sar_criterion, curve=curve)
        if label in zero_task and zero_task[label]:  # a zero reference spans nothing
            for row in rows:
                row.update({c: math.nan for c in row if c.startswith("sar")})
        run.add("alignment", [{**row, "block": block} for row in rows])
    if opts.pairwise:
        _pairwise(run, key, tasks, zero_task, pairs, kv)


def _spectrum(dec: Any, kv: int, shape: tuple[int, int], total_sq: float | None) -> tuple[torch.Tensor, float | None]:
    """``(S, total_sq)`` for :func:`spectrum_rows`: a decomposition with fewer than the ``kv`` values asked
    for is exact and of lower rank (from LoRA factors), so its spectrum is complete (zeros past the rank)."""
    if dec.S.numel() < kv:
        return complete_spectrum(dec.S, shape), None
    return dec.S, total_sq


def _pad_columns(x: torch.Tensor, width: int) -> torch.Tensor:
    return x if x.shape[-1] == width else torch.cat([x, x.new_zeros((*x.shape[:-1], width - x.shape[-1]))], -1)


def _pairwise(run: _Run, key: str, tasks: list, zero_task: dict[str, bool], pairs: dict, kv: int) -> None:
    """STI and top-k subspace overlaps of one key (task x task SAR is in :func:`_matrix_key`).

    ``kv``: the triplets asked of each task (``min(m, n)``, or ``top_n``); a task decomposed from LoRA
    factors may have fewer (its rank), and then brings only those: the dense path's directions past the
    rank are an arbitrary completion (singular values zero)."""
    (m, n), opts, names, block = run.tv.shape(key), run.opts, run.names, block_of(key)
    r, T = min(m, n), len(names)
    k_sti = min(kv, r if opts.sti_k == "r" else (opts.sti_k or max(r // T, 1)))
    live = [t for t, name in enumerate(names) if not zero_task[name]]
    parts = (
        [tasks[t].U[:, :k_sti] for t in live],
        [tasks[t].S[:k_sti] for t in live],
        [tasks[t].Vh[:k_sti].mT for t in live],  # V = Vh^T: columns are right singular vectors
    )
    value = sti(*parts) if live else math.nan
    mass = float(sum(float(S.double().sum()) for S in parts[1]))  # ||Sigma_cat||_1
    run.add("interference", [{
        "key": key, "block": block, "m": m, "n": n, "numel": m * n, "k": k_sti, "tasks": len(live),
        "sti": value, "sti_normalized": value / mass if mass > 0 else math.nan,
    }])
    k_sub = min(kv, opts.subspace_k or max(r // T, 1))
    for i in range(T):
        for j in range(i + 1, T):
            if zero_task[names[i]] or zero_task[names[j]]:
                continue
            a, b = tasks[i], tasks[j]
            k = min(k_sub, *(linalg.numerical_rank(x.S, (m, n)) for x in (a, b)))  # no arbitrary completions
            pairs[(names[i], names[j])].update(subspace_row(a.U[:, :k], b.U[:, :k], a.Vh[:k].mT, b.Vh[:k].mT))


def _build_report(run: _Run, keys: list[str], notes: tuple[str, ...] = ()) -> Report:
    names = run.names
    tables = {name: pd.DataFrame(run.rows.get(name, [])) for name in
              ("spectra", "alignment", "pairs", "interference", "signs", "singular_values")}
    spectra = tables["spectra"]
    if not spectra.empty:
        spectra["erank_rel"] = spectra["erank"] / spectra[["m", "n"]].min(axis=1)
    if not tables["alignment"].empty:
        align = tables["alignment"]
        align["numel"] = align["key"].map({k: run.tv.numel(k) for k in keys})
        for col in ("k", *(f"k_{rule}" for rule in CRITERIA)):  # None where a rule was not computed
            align[col] = align[col].astype("Int64")
    return Report(
        spectra=spectra,
        alignment=tables["alignment"],
        pairs=tables["pairs"],
        interference=tables["interference"],
        signs=tables["signs"],
        singular_values=tables["singular_values"],
        cosines=pd.DataFrame(cosine_matrix(run.gram).numpy(), index=names, columns=names),
        tasks=tuple(names),
        options=run.opts,
        keys=tuple(keys),
        notes=notes,
    )
