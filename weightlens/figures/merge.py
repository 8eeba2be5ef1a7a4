"""Before/after figures of a merge: pure builders, data in, ``plotly.graph_objects.Figure`` out.

Inputs are the tidy tables of ``weightlens.merge.compare`` (a ``Comparison``: ``.spectrum``,
``.per_task``, ``.conflicts()``) and ``weightlens.merge.sweep`` (a ``SweepResult``: ``.summary()``,
``.best_alpha``). Builders read only those attributes, hold no state and import nothing above them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import plotly.graph_objects as go

__all__ = [
    "figure_merge_spectrum",
    "figure_retained_alignment",
    "figure_merge_conflicts",
    "figure_sweep",
]

_TA = "task_arithmetic"
_TA_LABEL = "task arithmetic (sum)"
_METRICS = {
    "sar": "SAR: share of the task inside the update's top subspace",
    "kept": "kept: coefficient of the update along the task",
    "cos": "cosine(task, update)",
    "agreement": "sign agreement with the update",
}


def _labelled(items: Any) -> dict[str, Any]:
    """``{label: item}`` from one item (label = its method) or a mapping."""
    if isinstance(items, Mapping):
        return dict(items)
    return {getattr(items, "method", "merged"): items}


def figure_merge_spectrum(comparison: Any, key: str | None = None, *, normalize: bool = False) -> go.Figure:
    """Singular values of the merged update against the task-arithmetic sum for one matrix key.

    Parameters
    ----------
    comparison : Comparison or Mapping[str, Comparison]
        One comparison, or several (one line each, the sum drawn once).
    key : str, optional
        Matrix key; the first one in the table by default.
    normalize : bool, default=False
        Divide each spectrum by its largest value (compares shapes rather than scales).
    """
    comps = _labelled(comparison)
    first = next(iter(comps.values()))
    spec = first.spectrum
    if spec.empty:
        raise ValueError("figure_merge_spectrum: the comparison holds no matrix keys.")
    key = key if key is not None else str(spec["key"].iloc[0])
    fig = go.Figure()
    series = [(_TA_LABEL, first.spectrum, _TA)] + [(lab, c.spectrum, "merged") for lab, c in comps.items()]
    for label, table, which in series:
        rows = table[(table["key"] == key) & (table["which"] == which)]
        if rows.empty:
            raise ValueError(f"figure_merge_spectrum: no spectrum for key {key!r}.")
        sigma = rows["sigma"].to_numpy()
        if normalize and sigma.max() > 0:
            sigma = sigma / sigma.max()
        dash = "dash" if which == _TA else None
        fig.add_trace(go.Scatter(x=rows["index"] + 1, y=sigma, mode="lines", name=label, line={"dash": dash}))
    fig.update_layout(
        title=f"Spectrum of the update: {key}",
        xaxis_title="index i", yaxis_title="sigma_i / sigma_1" if normalize else "sigma_i",
        template="plotly_white", legend_title_text="update",
    )
    return fig


def figure_retained_alignment(comparisons: Any, *, metric: str = "sar") -> go.Figure:
    """Per task, how much of it each merged update keeps, next to task arithmetic.

    Parameters
    ----------
    comparisons : Comparison or Mapping[str, Comparison]
    metric : {"sar", "kept", "cos", "agreement"}, default="sar"
        Column of ``Comparison.per_task``.
    """
    if metric not in _METRICS:
        raise ValueError(f"The 'metric' parameter must be one of {tuple(_METRICS)}. Got {metric!r} instead.")
    comps = _labelled(comparisons)
    first = next(iter(comps.values())).per_task
    fig = go.Figure()
    ta = first[first["which"] == _TA]
    fig.add_trace(go.Bar(x=ta["task"], y=ta[metric], name=_TA_LABEL, marker_color="lightgray"))
    for label, comp in comps.items():
        rows = comp.per_task[comp.per_task["which"] == "merged"]
        fig.add_trace(go.Bar(x=rows["task"], y=rows[metric], name=label))
    fig.update_layout(
        barmode="group", title=f"What each task keeps: {_METRICS[metric]}", xaxis_title="task",
        yaxis_title=metric, template="plotly_white",
    )
    return fig


def figure_merge_conflicts(comparisons: Any) -> go.Figure:
    """Sign conflicts settled or left: for each update, at the coordinates where tasks disagree.

    Bars per update: ``zeroed`` (set to 0), ``mass_side_won`` (sign of the task sum kept) and
    ``opposing_mass`` (share of the task mass there that points against the update).
    """
    comps = _labelled(comparisons)
    labels, rows = [], []
    first = next(iter(comps.values())).conflicts().set_index("which")
    labels.append(_TA_LABEL)
    rows.append(first.loc[_TA])
    for label, comp in comps.items():
        labels.append(label)
        rows.append(comp.conflicts().set_index("which").loc["merged"])
    fig = go.Figure()
    for col, name in (("zeroed", "zeroed"), ("mass_side_won", "mass side won"),
                      ("opposing_mass", "opposing mass (cancelled or dropped)")):
        fig.add_trace(go.Bar(x=labels, y=[float(r[col]) for r in rows], name=name))
    rate = float(first.loc[_TA, "conflict_rate"])
    chance = float(first.loc[_TA, "chance_rate"])
    fig.update_layout(
        barmode="group", template="plotly_white", yaxis_title="share of conflicting coordinates",
        title=f"Sign conflicts: {rate:.1%} of contested coordinates conflict (chance {chance:.1%})",
    )
    return fig


def figure_sweep(sweeps: Any, *, metric: str = "normalized_accuracy") -> go.Figure:
    """Mean ``metric`` over tasks against alpha, per split; the chosen alpha is marked.

    Parameters
    ----------
    sweeps : SweepResult or Mapping[str, SweepResult]
    metric : {"normalized_accuracy", "accuracy", "loss", "nai"}, default="normalized_accuracy"
    """
    fig = go.Figure()
    for label, sw in _labelled(sweeps).items():
        summary = sw.summary()
        for split in summary["split"].unique():
            rows = summary[summary["split"] == split]
            dash = None if split == sw.report_on else "dot"
            fig.add_trace(go.Scatter(x=rows["alpha"], y=rows[metric], mode="lines+markers",
                                     name=f"{label} ({split})", line={"dash": dash}))
        best = summary[(summary["alpha"] == sw.best_alpha) & (summary["split"] == sw.report_on)]
        fig.add_trace(go.Scatter(x=best["alpha"], y=best[metric], mode="markers", showlegend=False,
                                 marker={"symbol": "star", "size": 14, "color": "black"},
                                 hovertext=f"{label}: alpha chosen on {sw.select_on}"))
    fig.update_layout(xaxis_title="alpha", yaxis_title=metric, template="plotly_white",
                      title=f"{metric} against alpha (star: chosen on validation, shown on test)")
    return fig
