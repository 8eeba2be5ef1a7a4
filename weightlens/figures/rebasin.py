"""Figures of Git Re-Basin: what matching did to each layer, and the barriers it removed.

Pure builders: tables in, ``plotly.graph_objects.Figure`` out.

* :func:`figure_layer_distances`: per-layer distance between the models before and after matching
  (the table of :func:`weightlens.rebasin.layer_distances`).
* :func:`figure_permutations`: each permutation as a heatmap (row: new position, column: the unit it
  takes); wide layers are shown in blocks, counting the units that land in each block.
* :func:`figure_singular_alignment`: ``|<u_i^A, u_i^B>|`` of the top singular vectors of every layer,
  before and after (:func:`weightlens.rebasin.singular_alignment`).
* :func:`figure_barriers`: naive vs matched barrier per model width (or any other x column).

Naive vs matched interpolation curves are :func:`weightlens.figures.lmc.figure_lmc`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from weightlens.errors import InvalidParameterError

__all__ = ["figure_barriers", "figure_layer_distances", "figure_permutations", "figure_singular_alignment",
           "permutation_blocks"]

_TEMPLATE = "plotly_white"
_BEFORE, _AFTER = "#9e9e9e", qualitative.Plotly[0]
_STAGE_COLORS = {"naive": _BEFORE, "before": _BEFORE, "matched": _AFTER, "after": _AFTER}


def _require(frame: object, columns: Sequence[str], what: str) -> pd.DataFrame:
    if not isinstance(frame, pd.DataFrame):
        raise InvalidParameterError(f"{what} takes a pandas DataFrame with columns {list(columns)}. "
                                    f"Got {type(frame).__name__} instead.")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise InvalidParameterError(f"{what}: the table lacks columns {missing}; expected {list(columns)}.")
    if frame.empty:
        raise InvalidParameterError(f"{what}: the table is empty; nothing to draw.")
    return frame


def figure_layer_distances(
    distances: pd.DataFrame,
    *,
    relative: bool = True,
    kinds: Sequence[str] | None = None,
    title: str | None = None,
    height: int = 380,
) -> go.Figure:
    """Distance between the two models per layer, before and after matching (grouped bars).

    Parameters
    ----------
    distances : DataFrame
        :func:`weightlens.rebasin.layer_distances` (columns ``key``, ``kind``, ``before``, ``after``,
        ``relative_before``, ``relative_after``).
    relative : bool, default=True
        Plot ``||a - pi(b)|| / sqrt(||a||^2 + ||b||^2)`` (1 = unrelated, 0 = equal) instead of the raw norm.
    kinds : sequence of str, optional
        Keep these kinds only (e.g. ``["matrix", "conv"]``); default all.
    title : str, optional
        Figure title.
    height : int, default=380
        Figure height in pixels.

    Returns
    -------
    plotly.graph_objects.Figure
        Two bar traces, ``before`` and ``after``, one bar per key.
    """
    cols = ["key", "kind", "relative_before", "relative_after"] if relative else ["key", "kind", "before", "after"]
    frame = _require(distances, cols, "figure_layer_distances")
    if kinds is not None:
        frame = frame[frame["kind"].isin(list(kinds))]
        if frame.empty:
            have = sorted(set(distances["kind"]))
            raise InvalidParameterError(f"No layers of kinds {list(kinds)}; the table has {have}.")
    prefix = "relative_" if relative else ""
    fig = go.Figure()
    for stage, color in (("before", _BEFORE), ("after", _AFTER)):
        fig.add_trace(go.Bar(
            x=frame["key"], y=frame[prefix + stage], name=stage, marker_color=color,
            hovertemplate=f"%{{x}}<br>{stage}: %{{y:.4g}}<extra></extra>",
        ))
    label = "‖A − π(B)‖ / √(‖A‖² + ‖B‖²)" if relative else "‖A − π(B)‖_F"
    fig.update_layout(barmode="group", template=_TEMPLATE, height=height, title=title,
                      yaxis_title=label, xaxis_title="tensor", legend_title_text="matching")
    if relative:
        fig.add_hline(y=1.0, line_dash="dash", line_color="#555", annotation_text="unrelated",
                      annotation_position="top left")
    return fig


def permutation_blocks(perm: Sequence[int] | np.ndarray, max_cells: int = 128) -> tuple[np.ndarray, int]:
    """Permutation matrix ``P[i, perm[i]] = 1`` summed over ``b x b`` blocks so its side is <= ``max_cells``.

    Returns the (possibly blocked) matrix and the block size ``b`` (1: the matrix itself).
    """
    p = np.asarray(perm, dtype=np.int64).reshape(-1)
    n = len(p)
    if n == 0 or sorted(p.tolist()) != list(range(n)):
        raise InvalidParameterError(f"Expected a permutation of 0..n-1; got {p[:10].tolist()} (length {n}).")
    block = max(1, math.ceil(n / max_cells))
    side = math.ceil(n / block)
    z = np.zeros((side, side))
    np.add.at(z, (np.arange(n) // block, p // block), 1.0)
    return z, block


def _perm_items(perms: object, names: Sequence[str] | None) -> dict[str, np.ndarray]:
    """``{name: index array}`` from a ``Permutations`` (duck-typed) or a mapping of index arrays."""
    if hasattr(perms, "perms") and hasattr(perms, "spec"):
        table = {n: np.asarray(v) for n, v in perms.perms.items()}
        default = [u for u in perms.spec.units if u not in perms.spec.heads]
    elif isinstance(perms, Mapping):
        table = {str(n): np.asarray(v) for n, v in perms.items()}
        default = list(table)
    else:
        raise InvalidParameterError(
            "figure_permutations takes a Permutations (from weight_matching) or a {name: index array} mapping. "
            f"Got {type(perms).__name__} instead."
        )
    chosen = list(names) if names is not None else default
    unknown = [n for n in chosen if n not in table]
    if unknown or not chosen:
        raise InvalidParameterError(f"Unknown permutations {unknown or chosen}; choose among {sorted(table)}.")
    return {n: table[n] for n in chosen}


def figure_permutations(
    perms: object,
    *,
    names: Sequence[str] | None = None,
    max_cells: int = 128,
    cols: int = 3,
    title: str | None = None,
    height: int | None = None,
) -> go.Figure:
    """Each permutation as a heatmap: row ``i`` (new position) has its 1 in column ``perm[i]`` (old unit).

    Parameters
    ----------
    perms : Permutations or mapping
        Found permutations, or ``{name: index array}``.
    names : sequence of str, optional
        Which permutations (default: every plain permutation of the spec; head-group views such as
        ``"blk0.attn.q"`` can be named too).
    max_cells : int, default=128
        Above this size the matrix is summed over square blocks (the colour counts units per block).
    cols : int, default=3
        Panels per row.
    title : str, optional
        Figure title.
    height : int, optional
        Figure height in pixels (default: 330 per row of panels).

    Returns
    -------
    plotly.graph_objects.Figure
        One heatmap per permutation; its panel title gives the size and the share of units moved.
    """
    items = _perm_items(perms, names)
    cols = max(1, min(cols, len(items)))
    rows = math.ceil(len(items) / cols)
    titles = []
    mats = {}
    for name, p in items.items():
        z, block = permutation_blocks(p, max_cells)
        mats[name] = (z, block)
        moved = float(np.mean(p != np.arange(len(p))))
        titles.append(f"{name}: n={len(p)}, {moved:.0%} moved" + (f" ({block}x{block} blocks)" if block > 1 else ""))
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, horizontal_spacing=0.08,
                        vertical_spacing=0.12)
    for i, (name, (z, block)) in enumerate(mats.items()):
        r, c = divmod(i, cols)
        axis = np.arange(z.shape[0]) * block
        fig.add_trace(go.Heatmap(
            z=z, x=axis, y=axis, colorscale="Blues", zmin=0, zmax=block, showscale=False, name=name,
            hovertemplate=f"{name}<br>new position %{{y}}<br>old unit %{{x}}<br>units %{{z}}<extra></extra>",
        ), row=r + 1, col=c + 1)
        fig.update_yaxes(autorange="reversed", title_text="new position" if c == 0 else None, row=r + 1, col=c + 1)
        fig.update_xaxes(title_text="old unit", row=r + 1, col=c + 1)
    fig.update_layout(template=_TEMPLATE, title=title, height=height or 330 * rows)
    return fig


def figure_singular_alignment(
    alignment: object,
    *,
    side: str = "left",
    title: str | None = None,
    height: int | None = None,
) -> go.Figure:
    """``|<u_i^A, u_i^B>|`` per layer (rows) and singular index (columns), before | after matching.

    Parameters
    ----------
    alignment : SingularAlignment or DataFrame
        :func:`weightlens.rebasin.singular_alignment` (or its ``.vectors`` table: columns ``key``,
        ``side``, ``index``, ``before``, ``after``).
    side : {"left", "right"}, default="left"
        Left singular vectors live on a layer's outputs, right ones on its inputs. A side that is not
        permuted (the network's input or output) stays as it was.
    title : str, optional
        Figure title.
    height : int, optional
        Figure height in pixels (default grows with the number of layers).

    Returns
    -------
    plotly.graph_objects.Figure
        Two heatmaps (``before``, ``after``) on one colour scale from 0 to 1; the row labels carry
        the top-k subspace overlap before -> after when the layer table is given.
    """
    if side not in ("left", "right"):
        raise InvalidParameterError(f"The 'side' parameter must be 'left' or 'right'. Got {side!r} instead.")
    layers = getattr(alignment, "layers", None)
    vectors = getattr(alignment, "vectors", alignment)
    frame = _require(vectors, ["key", "side", "index", "before", "after"], "figure_singular_alignment")
    frame = frame[frame["side"] == side]
    keys = list(dict.fromkeys(frame["key"]))
    labels = keys
    if isinstance(layers, pd.DataFrame) and not layers.empty:
        ov = layers[layers["side"] == side].set_index("key")
        labels = [f"{k} ({ov.at[k, 'overlap_before']:.2f}→{ov.at[k, 'overlap_after']:.2f})" if k in ov.index
                  else k for k in keys]
    fig = make_subplots(rows=1, cols=2, subplot_titles=["before matching", "after matching"],
                        shared_yaxes=True, horizontal_spacing=0.04)
    for col, stage in enumerate(("before", "after"), start=1):
        grid = frame.pivot_table(index="key", columns="index", values=stage, aggfunc="first").reindex(keys)
        z = [[None if pd.isna(v) else float(v) for v in row] for row in grid.to_numpy()]  # gaps: small layers
        fig.add_trace(go.Heatmap(
            z=z, x=[int(c) for c in grid.columns], y=labels, zmin=0.0, zmax=1.0,
            colorscale="Viridis", showscale=col == 2, name=stage, colorbar={"title": "|cos|"},
            hovertemplate=f"%{{y}}<br>singular vector %{{x}}<br>|cos| %{{z:.3f}}<extra>{stage}</extra>",
        ), row=1, col=col)
        fig.update_xaxes(title_text="singular vector i (top first)", row=1, col=col)
    fig.update_yaxes(autorange="reversed", row=1, col=1)
    vec = "u" if side == "left" else "v"
    fig.update_layout(template=_TEMPLATE, height=height or max(260, 70 + 40 * len(keys)),
                      title=title or f"|⟨{vec}_i^A, {vec}_i^B⟩| of the top singular vectors ({side}; "
                                     "subspace overlap before→after)")
    return fig


def figure_barriers(
    barriers: pd.DataFrame,
    *,
    x: str = "width",
    value: str = "barrier",
    split: str | None = None,
    log_x: bool = True,
    title: str | None = None,
    height: int = 380,
) -> go.Figure:
    """Barrier against model width (or any column ``x``), one line per label (e.g. naive, matched).

    Parameters
    ----------
    barriers : DataFrame
        Long table with columns ``x``, ``label``, ``split`` and ``value`` (e.g. from
        ``pd.concat`` of ``LMCCurve.summary()`` frames with a width column added).
    x : str, default="width"
        Column on the x axis.
    value : str, default="barrier"
        Column on the y axis (``"barrier_midpoint"``, ``"accuracy_barrier"``, ...).
    split : str, optional
        Keep one split (default: every split, told apart by the line dash).
    log_x : bool, default=True
        Logarithmic x axis (widths double).
    title : str, optional
        Figure title.
    height : int, default=380
        Figure height in pixels.
    """
    frame = _require(barriers, [x, "label", "split", value], "figure_barriers")
    if split is not None:
        if split not in set(frame["split"]):
            raise InvalidParameterError(f"The 'split' parameter must be one of {sorted(set(frame['split']))}. "
                                        f"Got {split!r} instead.")
        frame = frame[frame["split"] == split]
    splits = list(dict.fromkeys(frame["split"]))
    fig = go.Figure()
    for li, label in enumerate(dict.fromkeys(frame["label"])):
        for si, s in enumerate(splits):
            part = frame[(frame["label"] == label) & (frame["split"] == s)].sort_values(x)
            color = _STAGE_COLORS.get(str(label), qualitative.Plotly[li % len(qualitative.Plotly)])
            fig.add_trace(go.Scatter(
                x=part[x], y=part[value], mode="lines+markers+text",
                name=f"{label} · {s}" if len(splits) > 1 else label,
                line={"color": color, "dash": ("solid", "dot", "dash")[si % 3]},
                text=[f"{v:.3f}" for v in part[value]], textposition="top center",
                hovertemplate=f"{x} %{{x}}<br>{value} %{{y:.4f}}<extra>{label} · {s}</extra>",
            ))
    fig.add_hline(y=0.0, line_color="#888", line_width=1)
    fig.update_layout(template=_TEMPLATE, height=height, title=title, xaxis_title=x, yaxis_title=value)
    if log_x:
        fig.update_xaxes(type="log", tickvals=sorted(set(frame[x])))
    return fig
