"""Figures of linear mode connectivity: loss and accuracy along the interpolation path.

Pure builder: takes curve data, returns a ``plotly.graph_objects.Figure``; nothing is computed
beyond reading the tidy frame of :meth:`weightlens.lmc.LMCCurve.to_frame` (columns ``label``,
``split``, ``metric``, ``alpha``, ``value``, ``chord``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from weightlens.errors import InvalidParameterError

__all__ = ["figure_lmc", "lmc_frame"]

_COLUMNS = ("label", "split", "metric", "alpha", "value", "chord")
_DASHES = ("solid", "dot", "dash", "longdash", "dashdot")
_TITLES = {"loss": "loss", "accuracy": "accuracy"}
_PALETTE = qualitative.Plotly


def _frame_of(item: object, label: str | None = None) -> pd.DataFrame:
    if isinstance(item, pd.DataFrame):
        frame = item
    elif hasattr(item, "to_frame"):
        frame = item.to_frame()
    else:
        raise InvalidParameterError(
            "figure_lmc takes an LMCCurve, a sequence or {label: curve} mapping of them, or a tidy frame "
            f"with columns {list(_COLUMNS)}. Got {type(item).__name__} instead."
        )
    missing = [c for c in _COLUMNS if c not in frame.columns]
    if missing:
        raise InvalidParameterError(f"The curve frame lacks columns {missing}; expected {list(_COLUMNS)}.")
    return frame.assign(label=label) if label is not None else frame


def lmc_frame(curves: object) -> pd.DataFrame:
    """One tidy frame from a curve, a sequence of curves, a ``{label: curve}`` mapping or a frame."""
    if isinstance(curves, Mapping):
        parts = [_frame_of(c, str(label)) for label, c in curves.items()]
    elif isinstance(curves, Sequence) and not isinstance(curves, (str, bytes)):
        parts = [_frame_of(c) for c in curves]
    else:
        parts = [_frame_of(curves)]
    if not parts:
        raise InvalidParameterError("figure_lmc got no curves; pass at least one.")
    return pd.concat(parts, ignore_index=True)


def _name(label: str, split: str, metric: str, group: pd.DataFrame, show_split: bool) -> str:
    name = f"{label} · {split}" if show_split else str(label)
    excess = group["value"] - group["chord"]
    if metric == "loss":
        return f"{name} (barrier {excess.max():.3g})"
    return f"{name} (drop {(-excess).max():.3g})"


def _add_curve(fig: go.Figure, group: pd.DataFrame, *, label: str, split: str, name: str, style: dict,
               col: int, chord: bool) -> None:
    """One curve (legend only in the first panel) and, optionally, its chord."""
    key, metric = f"{label}|{split}", group["metric"].iloc[0]
    fig.add_trace(go.Scatter(
        x=group["alpha"], y=group["value"], mode="lines+markers", line=style, marker={"size": 5}, name=name,
        legendgroup=key, showlegend=col == 1, customdata=group["chord"],
        hovertemplate=f"alpha %{{x:.3f}}<br>{metric} %{{y:.4f}}<br>chord %{{customdata:.4f}}"
        f"<extra>{label} · {split}</extra>",
    ), row=1, col=col)
    if chord:
        ends = group.iloc[[0, -1]]
        fig.add_trace(go.Scatter(
            x=ends["alpha"], y=ends["chord"], mode="lines", legendgroup=key, showlegend=False,
            line={"color": style["color"], "dash": "dash", "width": 1}, opacity=0.6, name=f"{name} chord",
            hoverinfo="skip",
        ), row=1, col=col)


def figure_lmc(
    curves: object,
    *,
    metrics: Sequence[str] = ("loss", "accuracy"),
    splits: Sequence[str] | None = None,
    chord: bool = True,
    title: str | None = None,
    height: int = 420,
    alpha: float | None = None,
) -> go.Figure:
    """Loss and accuracy versus alpha; several curves (e.g. naive vs matched) are overlaid.

    Parameters
    ----------
    curves : LMCCurve, sequence, mapping or DataFrame
        Curves to draw; a ``{label: curve}`` mapping relabels them.
    metrics : sequence of str, default=("loss", "accuracy")
        One panel per metric.
    splits : sequence of str, optional
        Splits to draw (default all); line dash tells splits apart, colour tells curves apart.
    chord : bool, default=True
        Draw the straight line between the endpoint values (the barrier is the largest gap above it).
    title : str, optional
        Figure title.
    height : int, default=420
        Figure height in pixels.
    alpha : float, optional
        Mark this alpha with a vertical line in every panel (layout shapes named ``"alpha"``).

    Returns
    -------
    plotly.graph_objects.Figure
    """
    frame = lmc_frame(curves)
    known = list(dict.fromkeys(frame["metric"]))
    bad = [m for m in metrics if m not in known]
    if bad or not metrics:
        raise InvalidParameterError(f"Unknown metrics {bad or list(metrics)}; the curves hold {known}.")
    all_splits = list(dict.fromkeys(frame["split"]))
    chosen = list(splits) if splits is not None else all_splits
    if alpha is not None and not (isinstance(alpha, (int, float)) and 0.0 <= float(alpha) <= 1.0):
        raise InvalidParameterError(f"The 'alpha' parameter must be a number in [0, 1] or None. Got {alpha!r}.")
    if [s for s in chosen if s not in all_splits] or not chosen:
        raise InvalidParameterError(f"The 'splits' parameter must name splits among {all_splits}. Got {splits!r}.")
    labels = list(dict.fromkeys(frame["label"]))
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=[_TITLES.get(m, m) for m in metrics])
    for col, metric in enumerate(metrics, start=1):
        for li, label in enumerate(labels):
            for si, split in enumerate(chosen):
                group = frame[(frame["label"] == label) & (frame["split"] == split) & (frame["metric"] == metric)]
                if not group.empty:
                    style = {"color": _PALETTE[li % len(_PALETTE)], "dash": _DASHES[si % len(_DASHES)]}
                    name = _name(label, split, metric, group, len(chosen) > 1)
                    _add_curve(fig, group.sort_values("alpha"), label=label, split=split, name=name,
                               style=style, col=col, chord=chord)
        fig.update_xaxes(title_text="alpha (0 = A, 1 = B)", range=[-0.02, 1.02], row=1, col=col)
        fig.update_yaxes(title_text=_TITLES.get(metric, metric), row=1, col=col)
        if alpha is not None:
            fig.add_vline(x=float(alpha), line={"color": "#444", "width": 1, "dash": "dot"}, name="alpha",
                          row=1, col=col)
    fig.update_layout(title=title, height=height, template="plotly_white", legend={"groupclick": "togglegroup"})
    return fig
