"""Per-task accuracy of a merged model against the fine-tuned (and base) models.

Pure builders: a tidy table in, a ``plotly.graph_objects.Figure`` out; nothing computed beyond
reading the table.

Examples
--------
>>> import pandas as pd
>>> from weightlens.figures.task_accuracy import figure_task_accuracy
>>> t = pd.DataFrame({"task": ["a", "a"], "model": ["merged", "fine-tuned"], "accuracy": [0.8, 0.9]})
>>> [tr.type for tr in figure_task_accuracy(t).data]
['bar', 'scatter']
"""

from __future__ import annotations

import math

import pandas as pd
import plotly.graph_objects as go

from weightlens.errors import InvalidParameterError

__all__ = ["figure_task_accuracy"]

_COLUMNS = ("task", "model", "accuracy")
_MARKERS = {"fine-tuned": ("#222222", "line-ew-open"), "base": ("#d62728", "x-thin-open")}


def figure_task_accuracy(
    scores: pd.DataFrame, *, split: str = "val", title: str | None = None, label: str = "merged"
) -> go.Figure:
    """Accuracy of the merged model per task (bars) against the fine-tuned (and base) models (marks).

    Parameters
    ----------
    scores : DataFrame
        Columns ``task, model, accuracy``; ``model`` in ``{"merged", "fine-tuned", "base"}``. An
        empty table gives an empty figure with the axes set (nothing scored yet).
    split : str, default="val"
        Shown in the title.
    title : str, optional
        Overrides the default title.
    label : str, default="merged"
        Legend name of the merged bars (e.g. the method and alpha).

    Returns
    -------
    plotly.graph_objects.Figure
    """
    missing = [c for c in _COLUMNS if c not in scores.columns]
    if missing:
        raise InvalidParameterError(f"figure_task_accuracy needs columns {list(_COLUMNS)}; missing {missing}.")
    merged = scores[scores["model"] == "merged"]
    tasks = list(dict.fromkeys(scores["task"]))
    fig = go.Figure()
    fig.add_trace(go.Bar(x=merged["task"].tolist(), y=merged["accuracy"].tolist(), name=label,
                         marker_color="#4c78a8", texttemplate="%{y:.3f}", textposition="outside"))
    for model, (color, symbol) in _MARKERS.items():
        rows = scores[scores["model"] == model]
        if not rows.empty:
            fig.add_trace(go.Scatter(x=rows["task"].tolist(), y=rows["accuracy"].tolist(), mode="markers",
                                     name=model, marker={"color": color, "symbol": symbol, "size": 26,
                                                         "line": {"width": 3, "color": color}}))
    if title is None:
        mean = float(merged["accuracy"].mean()) if not merged.empty else math.nan
        title = f"Accuracy per task ({split})" + ("" if math.isnan(mean) else f": mean {mean:.3f}")
    fig.update_layout(title=title, template="plotly_white", yaxis={"title": "accuracy", "range": [0, 1.08]},
                      xaxis={"title": "task", "categoryorder": "array", "categoryarray": tasks},
                      barmode="overlay", legend_title_text="model")
    return fig
