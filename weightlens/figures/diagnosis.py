"""Figures of a merge diagnosis: pure functions of a :class:`weightlens.diagnosis.Diagnosis`.

:func:`figure_block_costs` draws one task's blocks ranked by predicted cost, with the measured restoration
gain where the restoration tests measured one; :func:`worst_blocks` is the table of each task's rank-1 block
and :func:`diagnosis_section` the HTML section (sentences, that table, a figure per task) that the reports
embed. Like every builder here it takes the diagnosis' tables and imports nothing of weightlens but
``errors`` (``docs/ARCHITECTURE.md``). Nothing is computed here beyond selecting and ordering the diagnosis' own rows
(``docs/diagnosis.md`` defines every column).

Examples
--------
>>> import weightlens as wl                                          # doctest: +SKIP
>>> d = wl.diagnose(tv, wl.merge(tv, method="task_arithmetic"))     # doctest: +SKIP
>>> figure_block_costs(d, "rot90").data[0].x                        # doctest: +SKIP
('fc2', 'fc1')
"""

from __future__ import annotations

import html
import math
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio

from weightlens.errors import InvalidParameterError

__all__ = ["OPPOSED", "WORST_COLUMNS", "culprit", "diagnosis_section", "figure_block_costs", "worst_blocks"]

#: Columns of :func:`worst_blocks` (``measured_gain`` is NaN where the restoration tests did not run).
WORST_COLUMNS = ["task", "block", "predicted_cost", "energy_share", "kept", "sign_lost", "crowded_by", "crowding",
                 "opposed_by", "opposition", "measured_gain"]
_BAR, _MEASURED = "#4c78a8", "#e45756"
#: ``weightlens.diagnosis._result.OPPOSED``, the share of a task's update another must cancel for the summary to
#: name it (figures import nothing of weightlens but ``errors``; ``tests/test_figures_diagnosis.py`` checks they agree).
OPPOSED = 0.05


def _name(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _num(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def culprit(row: pd.Series | dict[str, Any]) -> str:
    """Who took a block from its task, in words: ``"opposed by X"`` when a task cancels at least
    ``OPPOSED`` (5%) of its update there, else ``"crowded by X"`` when one holds its lost directions,
    else ``""``. The sign story comes first: a task trained against another spans its directions with
    the opposite sign, so the subspace crowding names a bystander there (``docs/diagnosis.md``)."""
    if _name(row["opposed_by"]) and _num(row["opposition"]) >= OPPOSED:
        return f"opposed by {row['opposed_by']}"
    if _name(row["crowded_by"]):
        return f"crowded by {row['crowded_by']}"
    return ""


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.0%}"


def _hover(row: pd.Series) -> str:
    lines = [f"<b>{html.escape(str(row['block']))}</b> (rank {int(row['rank'])})",
             f"predicted cost {_num(row['predicted_cost']):.4f}",
             f"energy share {_pct(_num(row['energy_share']))}, kept {_pct(_num(row['kept']))}, "
             f"sign lost {_pct(_num(row['sign_lost']))}"]
    if _name(row["crowded_by"]):
        lines.append(f"crowded by {html.escape(row['crowded_by'])} (overlap {_num(row['crowding']):.2f})")
    if _name(row["opposed_by"]):
        lines.append(f"opposed by {html.escape(row['opposed_by'])} (cancels {_pct(_num(row['opposition']))})")
    if _name(row["sign_won_by"]):
        lines.append(f"signs won by {html.escape(row['sign_won_by'])} ({_pct(_num(row['sign_won']))})")
    gain = _num(row["measured_gain"])
    if not math.isnan(gain):
        lines.append(f"measured gain {gain:+.4f}, cost to others {_num(row['cost_to_others']):+.4f}")
    return "<br>".join(lines)


def figure_block_costs(diagnosis: Any, task: str, *, top: int | None = None, title: str | None = None) -> go.Figure:
    """One task's blocks ranked by predicted cost (bars), the measured restoration gain overlaid where measured.

    Parameters
    ----------
    diagnosis : Diagnosis
        From :func:`weightlens.diagnosis.diagnose` (with a merge: without one there are no blocks).
    task : str
        One of ``diagnosis.tasks.task``.
    top : int, optional
        Only the ``top`` highest-ranked blocks (default: all of them).
    title : str, optional
        Overrides the default title.

    Returns
    -------
    plotly.graph_objects.Figure
        Bar trace ``"predicted cost"`` (x: blocks in rank order, text: :func:`culprit`, hover: kept, crowding,
        opposition and sign figures); with restoration tests a marker trace ``"measured gain"`` on the right
        axis, only at the tested blocks.
    """
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or top < 1):
        raise InvalidParameterError(f"The 'top' parameter of figure_block_costs must be an int >= 1 or None. "
                                    f"Got {top!r} instead.")
    rows = diagnosis.ranking(task)
    if top is not None:
        rows = rows.head(top)
    blocks = rows["block"].astype(str).tolist()
    fig = go.Figure()
    fig.add_trace(go.Bar(x=blocks, y=rows["predicted_cost"].astype(float).tolist(), name="predicted cost",
                         marker_color=_BAR, text=[culprit(r) for _, r in rows.iterrows()], textposition="auto",
                         hovertext=[_hover(r) for _, r in rows.iterrows()],
                         hovertemplate="%{hovertext}<extra></extra>"))
    tested = rows[rows["measured_gain"].notna()]
    measured = diagnosis.measured or {}
    layout: dict[str, Any] = {}
    if not tested.empty:
        what = f"{measured.get('metric', 'metric')} on {measured.get('split', '?')}"
        fig.add_trace(go.Scatter(x=tested["block"].astype(str).tolist(),
                                 y=tested["measured_gain"].astype(float).tolist(), mode="markers",
                                 name=f"measured gain ({what})", yaxis="y2",
                                 marker={"color": _MEASURED, "symbol": "diamond", "size": 12},
                                 hovertext=[_hover(r) for _, r in tested.iterrows()],
                                 hovertemplate="%{hovertext}<extra></extra>"))
        layout["yaxis2"] = {"title": f"measured gain ({what})", "overlaying": "y", "side": "right",
                            "zeroline": True, "showgrid": False}
    if title is None:
        merge = f"{diagnosis.method} merge" if diagnosis.method else "no merge"
        title = f"Why {task} loses ({merge}): blocks by predicted cost"
    fig.update_layout(title=title, template="plotly_white", showlegend=not tested.empty,
                      xaxis={"title": "block (rank order)", "categoryorder": "array", "categoryarray": blocks},
                      yaxis={"title": "predicted cost (distance from its own weights, relative)",
                             "rangemode": "tozero"},
                      legend={"orientation": "h", "yanchor": "top", "y": -0.25, "x": 0}, **layout)
    return fig


def worst_blocks(diagnosis: Any) -> pd.DataFrame:
    """Each task's rank-1 block (``WORST_COLUMNS``), the task with the highest predicted cost first."""
    blocks = diagnosis.blocks
    if blocks.empty:
        return pd.DataFrame(columns=WORST_COLUMNS)
    order = diagnosis.tasks.sort_values("predicted_cost", ascending=False, na_position="last")["task"].tolist()
    worst = blocks[blocks["rank"] == 1].set_index("task")
    return worst.loc[[t for t in order if t in worst.index]].reset_index()[WORST_COLUMNS]


def diagnosis_section(diagnosis: Any, *, figures: bool = True, include_plotlyjs: bool | str = False,
                      top: int | None = 12, heading: str = "Diagnosis") -> str:
    """An HTML section: the diagnosis' summary sentences, its suggestion (when it has one), the worst-blocks
    table (:func:`worst_blocks`) and, with ``figures``, :func:`figure_block_costs` per task (``top`` blocks;
    plotly.js per ``include_plotlyjs``, as :func:`plotly.io.to_html`)."""
    parts = [f"<h2>{html.escape(heading)}</h2>"]
    parts += [f"<p>{html.escape(line)}</p>" for line in diagnosis.summary().splitlines()]
    if diagnosis.suggestion is not None:
        parts.append(f"<p><b>{html.escape(diagnosis.suggestion.sentence())}</b></p>")
    table = worst_blocks(diagnosis)
    if not table.empty:
        parts += ["<h3>Each task's worst block</h3>",
                  table.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="", escape=True)]
        if figures:
            for task in table["task"]:
                parts.append(pio.to_html(figure_block_costs(diagnosis, task, top=top),
                                         include_plotlyjs=include_plotlyjs, full_html=False))
                include_plotlyjs = False
    return "\n".join(parts)
