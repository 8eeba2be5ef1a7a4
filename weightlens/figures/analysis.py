"""Figures of the interference report: pure functions from report tables to plotly figures.

Each ``figure_*`` takes the tidy DataFrames of :class:`weightlens.analysis.Report` (or any table
with the same columns) and returns a ``plotly.graph_objects.Figure``; nothing is computed here
beyond grouping and averaging. Tasks keep one colour across figures (:func:`task_colors`).

Examples
--------
>>> import pandas as pd
>>> from weightlens.figures.analysis import figure_cosines
>>> fig = figure_cosines(pd.DataFrame([[1.0, 0.02], [0.02, 1.0]], index=["a", "b"], columns=["a", "b"]))
>>> fig.data[0].type
'heatmap'
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from weightlens.errors import InvalidParameterError
from weightlens.figures._keys import ordered, short_key, spread

__all__ = [
    "figure_conflict_matrix",
    "figure_cosines",
    "figure_sar_layers",
    "figure_sar_matrix",
    "figure_sign_conflicts",
    "figure_spectra",
    "figure_subspace_overlap",
    "report_figures",
    "report_page",
    "task_colors",
]

_FIXED = {"sum": "#222222", "merged": "#8c8c8c"}
_TEMPLATE = "plotly_white"


def task_colors(tasks: Iterable[str]) -> dict[str, str]:
    """One colour per task (plotly's qualitative palette, in order); ``sum`` black, ``merged`` grey."""
    palette = qualitative.Plotly
    out: dict[str, str] = {}
    for name in tasks:
        if name in _FIXED:
            out[name] = _FIXED[name]
        elif name not in out:
            out[name] = palette[len([n for n in out if n not in _FIXED]) % len(palette)]
    return out


def figure_spectra(
    singular_values: pd.DataFrame,
    *,
    keys: Sequence[str] | None = None,
    tasks: Sequence[str] | None = None,
    normalize: bool = False,
    max_keys: int = 6,
    cols: int = 3,
) -> go.Figure:
    """Singular values per layer (log scale), one line per task (the sum in black).

    Parameters
    ----------
    singular_values : long table ``key, task, index, sigma`` (``Report.singular_values``).
    keys : layers to show; default ``max_keys`` spread over the table's keys.
    tasks : lines to draw (default: every task in the table, ``sum``/``merged`` included).
    normalize : divide each spectrum by its largest value.
    cols : subplot columns.
    """
    sv = singular_values
    all_keys = ordered(sv["key"])
    shown = list(keys) if keys is not None else spread(all_keys, max_keys)
    names = list(tasks) if tasks is not None else ordered(sv["task"])
    colors = task_colors(names)
    rows = max(1, math.ceil(len(shown) / cols))
    fig = make_subplots(rows=rows, cols=min(cols, max(len(shown), 1)), subplot_titles=[short_key(k) for k in shown])
    seen: set[str] = set()
    for i, key in enumerate(shown):
        part = sv[sv["key"] == key]
        for name in names:
            line = part[part["task"] == name].sort_values("index")
            if line.empty:
                continue
            y = line["sigma"] / line["sigma"].max() if normalize else line["sigma"]
            y = y.where(y > 0)
            fig.add_trace(
                go.Scatter(x=line["index"], y=y, mode="lines", name=name, legendgroup=name, showlegend=name not in seen,
                           line={"color": colors[name], "width": 2 if name in _FIXED else 1.5}),
                row=i // cols + 1, col=i % cols + 1,
            )
            seen.add(name)
    fig.update_yaxes(type="log", exponentformat="power")
    fig.update_xaxes(title_text="index i")
    fig.update_layout(title="Singular values of task matrices" + (" (divided by the largest)" if normalize else ""),
                      template=_TEMPLATE, height=320 * rows, legend_title_text="task")
    return fig


def _heatmap(z: pd.DataFrame, *, title: str, zmin: float | None, zmax: float | None, colorscale: str,
             zmid: float | None = None, text: bool = True, colorbar: str = "") -> go.Figure:
    fig = go.Figure(go.Heatmap(
        z=z.to_numpy(dtype=float), x=[str(c) for c in z.columns], y=[str(i) for i in z.index],
        zmin=zmin, zmax=zmax, zmid=zmid, colorscale=colorscale, colorbar={"title": {"text": colorbar}},
        texttemplate="%{z:.2f}" if text else None, hoverongaps=False,
    ))
    fig.update_layout(title=title, template=_TEMPLATE)
    fig.update_yaxes(autorange="reversed")
    return fig


def figure_sar_matrix(matrix: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """Task x reference heatmap of average SAR (``Report.sar_matrix()``): rows are the projected
    task, columns the task (or ``sum``/``merged``) whose top singular vectors span the subspace."""
    return _heatmap(matrix, title=title or "SAR: task (row) projected on reference (column) subspace",
                    zmin=0.0, zmax=1.0, colorscale="Viridis", colorbar="SAR")


def figure_sar_layers(
    alignment: pd.DataFrame, *, reference: str = "sum", value: str = "sar", tasks: Sequence[str] | None = None
) -> go.Figure:
    """Layer x task heatmap of SAR against one reference (default the task-arithmetic sum)."""
    a = alignment[alignment["reference"] == reference]
    table = a.pivot_table(index="key", columns="task", values=value, aggfunc="mean", sort=False)
    cols = [t for t in (tasks or ordered(a["task"])) if t in table.columns]
    table = table.reindex(index=ordered(a["key"]), columns=cols)
    table.index = [short_key(k) for k in table.index]
    fig = _heatmap(table, title=f"SAR of each task against the {reference} per layer", zmin=0.0, zmax=1.0,
                   colorscale="Viridis", text=len(table) <= 60, colorbar="SAR")
    fig.update_layout(height=max(400, 18 * len(table) + 150))
    return fig


def figure_cosines(
    cosines: pd.DataFrame, *, title: str = "Cosine similarity of task vectors (whole model)"
) -> go.Figure:
    """Task x task heatmap of cosine similarities (diverging scale centred on 0)."""
    off = [abs(float(cosines.iloc[i, j])) for i in range(len(cosines)) for j in range(len(cosines)) if i != j]
    bound = max([0.05, *[v for v in off if not math.isnan(v)]])
    return _heatmap(cosines, title=title, zmin=-bound, zmax=bound, zmid=0.0, colorscale="RdBu", colorbar="cosine")


def figure_conflict_matrix(
    matrix: pd.DataFrame, *, title: str = "Pairwise sign-conflict rate (chance 0.5)"
) -> go.Figure:
    """Task x task heatmap of pairwise sign-conflict rates (``Report.conflict_matrix()``).

    The diverging scale is centred on the chance level 0.5 of independent fair signs.
    """
    return _heatmap(matrix, title=title, zmin=0.0, zmax=1.0, zmid=0.5, colorscale="RdBu_r", colorbar="conflict")


def _pooled_signs(signs: pd.DataFrame, by: str) -> pd.DataFrame:
    order = ordered(signs[by])
    g = signs.groupby(by, sort=False)
    counted = g["n_eligible"].sum()
    out = pd.DataFrame({
        "conflict_rate": g["n_conflict"].sum() / counted.where(counted > 0),
        "chance": g["chance_sum"].sum() / counted.where(counted > 0),
        "mass_conflict": g["mass_conflicting"].sum() / g["mass_eligible"].sum().where(lambda s: s > 0),
    })
    return out.reindex(order)


def figure_sign_conflicts(signs: pd.DataFrame, *, by: str = "block") -> go.Figure:
    """Sign-conflict rate per layer (pooled over the layer's parameters) with the chance line.

    ``by="block"`` (default) or ``"key"``. Bars: conflict rate; dashed line: chance for the counted
    coordinates (``1 - 2^(1-T)`` without trimming); dots: mass-weighted conflict.
    """
    if by not in ("block", "key"):
        raise InvalidParameterError(f"The 'by' parameter must be 'block' or 'key'. Got {by!r} instead.")
    table = _pooled_signs(signs, by)
    x = [short_key(k) for k in table.index]
    fig = go.Figure()
    fig.add_trace(go.Bar(x=x, y=table["conflict_rate"], name="conflict rate", marker_color="#4c78a8"))
    fig.add_trace(go.Scatter(x=x, y=table["mass_conflict"], name="mass-weighted conflict", mode="markers",
                             marker={"color": "#f58518", "size": 8}))
    fig.add_trace(go.Scatter(x=x, y=table["chance"], name="chance", mode="lines",
                             line={"color": "#d62728", "dash": "dash"}, connectgaps=True))
    chance_t = float(signs["chance_T"].iloc[0]) if len(signs) else math.nan
    fig.update_layout(title=f"Sign conflicts by {by} (chance 1 - 2^(1-T) = {chance_t:.3f})", template=_TEMPLATE,
                      yaxis={"title": "fraction", "range": [0, 1.05]}, xaxis={"tickangle": -45})
    return fig


def figure_subspace_overlap(pairs: pd.DataFrame, *, side: str = "left") -> go.Figure:
    """Overlap of top-k singular subspaces per layer (one line per task pair) against chance k/d."""
    col = f"overlap_{side}"
    p = pairs.dropna(subset=[col]) if col in pairs else pairs.iloc[0:0]
    order = ordered(p["key"]) if not p.empty else []
    fig = go.Figure()
    colors = qualitative.Plotly
    for i, ((a, b), part) in enumerate(p.groupby(["task_a", "task_b"], sort=False)):
        part = part.set_index("key").reindex(order)
        fig.add_trace(go.Scatter(x=[short_key(k) for k in order], y=part[col], mode="lines+markers",
                                 name=f"{a} / {b}", line={"color": colors[i % len(colors)]}))
    if not p.empty:
        chance = p.groupby("key", sort=False)[f"chance_{side}"].mean().reindex(order)
        fig.add_trace(go.Scatter(x=[short_key(k) for k in order], y=chance, mode="lines", name="chance k/d",
                                 line={"color": "#d62728", "dash": "dash"}))
    fig.update_layout(title=f"Overlap of top-k {side} singular subspaces between tasks", template=_TEMPLATE,
                      yaxis={"title": "mean cos^2 of principal angles", "range": [0, 1.05]}, xaxis={"tickangle": -45})
    return fig


def report_figures(report: Any) -> dict[str, go.Figure]:
    """The standard figures of a :class:`~weightlens.analysis.Report`, by name."""
    figs: dict[str, go.Figure] = {}
    if not report.singular_values.empty:
        figs["spectra"] = figure_spectra(report.singular_values)
    if not report.alignment.empty:
        figs["sar_matrix"] = figure_sar_matrix(report.sar_matrix())
        figs["sar_layers"] = figure_sar_layers(report.alignment, tasks=report.tasks)
    if len(report.tasks) > 1:
        figs["cosines"] = figure_cosines(report.cosines)
        figs["conflict_matrix"] = figure_conflict_matrix(report.conflict_matrix())
        figs["sign_conflicts"] = figure_sign_conflicts(report.signs)
        if "overlap_left" in report.pairs:
            figs["overlap"] = figure_subspace_overlap(report.pairs)
    return figs


_STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f4f4f4}.note{color:#555;font-size:13px}"""


def report_page(
    title: str,
    summary: pd.DataFrame,
    blocks: pd.DataFrame,
    figures: Mapping[str, go.Figure],
    *,
    settings: Mapping[str, Any] | None = None,
    notes: Sequence[str] = (),
    diagnosis: Any = None,
) -> str:
    """A standalone HTML page: settings, notes, summary table, figures, the diagnosis of a merge (when
    ``diagnosis`` is given: :func:`weightlens.figures.diagnosis.diagnosis_section`) and per-block table.

    plotly.js is inlined once (in the first figure); the page loads nothing from the network.
    """
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    if settings:
        text = ", ".join(f"{html.escape(str(k))}={html.escape(str(v))}" for k, v in settings.items())
        parts.append(f"<p class='note'>{text}</p>")
    parts += [f"<p class='note'>{html.escape(note)}</p>" for note in notes]
    parts += ["<h2>Summary</h2>", "<p class='note'>plain: every key counts once; weighted: by parameter count "
              "(rates: pooled counts).</p>", summary.to_html(float_format=lambda v: f"{v:.4g}", na_rep="")]
    first = True
    for name, fig in figures.items():
        parts.append(f"<h2>{html.escape(name)}</h2>")
        parts.append(pio.to_html(fig, include_plotlyjs=first, full_html=False))
        first = False
    if diagnosis is not None:
        from weightlens.figures.diagnosis import diagnosis_section

        parts.append(diagnosis_section(diagnosis, include_plotlyjs=first))
    parts += ["<h2>Per block</h2>", blocks.to_html(float_format=lambda v: f"{v:.4g}", na_rep=""), "</body></html>"]
    return "\n".join(parts)
