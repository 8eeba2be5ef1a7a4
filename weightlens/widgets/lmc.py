"""``LMCExplorer``: naive vs matched interpolation between two models, and what the matching did.

A thin ipywidgets view. Numbers come from :mod:`weightlens.rebasin` (weight matching, layer
distances, singular-vector alignment) and :mod:`weightlens.lmc` (curves and barriers): the matching
and the curves when the explorer is built (or passed in, already computed), the distances and the
alignment once, the first time their view is shown; figures come from :mod:`weightlens.figures.lmc` and
:mod:`weightlens.figures.rebasin`. Controls only pick what to show: moving a control never
recomputes a curve, a matching or an SVD.

Each view has one plotly ``FigureWidget``, created the first time the view is shown and then
updated in place with :func:`weightlens.widgets._common.refresh`, which re-syncs the widget's full
state after every update (why: see :mod:`weightlens.widgets._common`). Like the other
panels, a headless run (``$WEIGHTLENS_HEADLESS``) displays static snapshots of the figures.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ipywidgets as widgets
import numpy as np
import pandas as pd
import plotly.graph_objects as go

from weightlens._options import option_names, resolve_options
from weightlens.errors import InvalidParameterError
from weightlens.figures.lmc import figure_lmc
from weightlens.figures.rebasin import figure_layer_distances, figure_permutations, figure_singular_alignment
from weightlens.lmc import Evaluator, LMCCurve, curve, relative_reduction
from weightlens.rebasin import (
    Permutations,
    PermutationSpec,
    SingularAlignment,
    layer_distances,
    singular_alignment,
    weight_matching,
)
from weightlens.widgets._common import Panel, figure_widget, refresh
from weightlens.widgets._controls import Controls

__all__ = ["LMCExplorer", "LMCExplorerOptions", "LMCExplorerResults"]

VIEWS = ("interpolation", "layer distance", "permutations", "singular vectors")


@dataclass(frozen=True)
class LMCExplorerOptions:
    """How :class:`LMCExplorer` computes what it is not given (all have defaults).

    Attributes
    ----------
    points : alphas per curve, endpoints included (25), or the alphas themselves (as in
        :func:`weightlens.lmc.curve`, which checks them).
    seed : seed of weight matching (0).
    bn_loader, repair : BatchNorm reset / REPAIR at every alpha (need an ``Evaluator``; see
        :func:`weightlens.lmc.curve`).
    k : top singular vectors compared per layer (16).

    ``points``, ``bn_loader`` and ``repair`` apply only to a curve computed by the explorer, ``seed``
    only to a matching it runs, ``k`` only to an alignment it measures.
    """

    points: int | Sequence[float] = 25
    seed: int = 0
    bn_loader: object | None = None
    repair: object | None = None
    k: int = 16

    def __post_init__(self) -> None:
        if not (isinstance(self.k, int) and not isinstance(self.k, bool) and self.k >= 1):
            raise InvalidParameterError(f"The 'k' parameter must be an int >= 1. Got {self.k!r} instead.")
        if not isinstance(self.seed, int | np.integer):
            raise InvalidParameterError(f"The 'seed' parameter must be an int. Got {self.seed!r} instead.")


@dataclass(frozen=True)
class LMCExplorerResults:
    """Results already computed that :class:`LMCExplorer` shows as they are (each None: computed).

    Attributes
    ----------
    naive, matched : ``weightlens.lmc.curve`` of ``a, b`` and of ``a`` and the matched ``b``; same
        alphas and splits.
    distances : ``weightlens.rebasin.layer_distances(a, b, spec, permutations)``.
    alignment : ``weightlens.rebasin.singular_alignment(a, b, spec, permutations, k=k)``.
    """

    naive: LMCCurve | None = None
    matched: LMCCurve | None = None
    distances: pd.DataFrame | None = None
    alignment: SingularAlignment | None = None

    def __post_init__(self) -> None:
        kinds = {"naive": LMCCurve, "matched": LMCCurve, "distances": pd.DataFrame, "alignment": SingularAlignment}
        for name, kind in kinds.items():
            value = getattr(self, name)
            if value is not None and not isinstance(value, kind):
                raise InvalidParameterError(
                    f"The {name!r} parameter must be a {kind.__name__} or None. Got {type(value).__name__} instead."
                )


def _resolve(results: LMCExplorerResults | None, options: LMCExplorerOptions | None,
             overrides: dict[str, Any]) -> tuple[LMCExplorerResults, LMCExplorerOptions]:
    """The explorer's results and options, each with its fields from ``overrides`` applied."""
    result_names, option_names_ = option_names(LMCExplorerResults), option_names(LMCExplorerOptions)
    unknown = sorted(set(overrides) - set(result_names) - set(option_names_))
    if unknown:
        raise InvalidParameterError(
            f"LMCExplorer() got unknown option(s) {unknown}; valid options: {option_names_} (see "
            f"LMCExplorerOptions) and {result_names} (see LMCExplorerResults)."
        )
    given = {name: overrides.pop(name) for name in result_names if name in overrides}
    return (resolve_options(LMCExplorerResults, results, given, caller="LMCExplorer"),
            resolve_options(LMCExplorerOptions, options, overrides, caller="LMCExplorer"))


class LMCExplorer(Panel):
    """Interpolation between ``a`` and ``b``, naively and after Git Re-Basin weight matching.

    Building the explorer matches ``b`` to ``a`` (unless ``permutations`` are given) and scores both
    interpolation curves (unless ``naive`` and ``matched`` are given); per-layer distances and
    singular-vector alignment are measured the first time they are shown or read. The views:
    loss and accuracy curves with a movable alpha, distance per layer before and after matching,
    the permutation matrices, and the alignment of the top singular vectors of each layer.

    Parameters
    ----------
    a, b : checkpoint source
        Two models of one architecture (anything :func:`weightlens.load` accepts).
    evaluate : Evaluator or callable or None
        As in :func:`weightlens.lmc.curve`: ``evaluate(state_dict) -> {"loss", "accuracy"}`` or
        ``{split: {...}}``; an :class:`weightlens.lmc.Evaluator` scores all alphas in batched passes.
        May be None when both ``naive`` and ``matched`` are given.
    spec : PermutationSpec
        Permutation spec of the architecture (e.g. :func:`weightlens.rebasin.mlp_spec`).
    permutations : Permutations, optional
        Use these (e.g. from activation matching) instead of running weight matching.
    results : LMCExplorerResults, optional
        Results already computed, shown as they are: curves ``naive`` and ``matched``,
        ``distances`` and ``alignment``; the keywords ``naive=``, ``matched=``, ``distances=`` and
        ``alignment=`` set them directly.
    options : LMCExplorerOptions, optional
        How what is not given is computed; ``**overrides`` set its fields directly: ``points``
        (25), ``seed`` (0, of weight matching), ``bn_loader`` and ``repair`` (BatchNorm reset /
        REPAIR at every alpha; need an ``Evaluator``) and ``k`` (16 top singular vectors per layer).

    Attributes
    ----------
    permutations_ : Permutations
    naive_, matched_ : LMCCurve
    distances_ : pandas.DataFrame
        Computed on first access (the "layer distance" view) unless given.
    alignment_ : weightlens.rebasin.SingularAlignment
        Computed on first access (the "singular vectors" view) unless given.
    options : LMCExplorerOptions
    controls : Controls
        The user-facing controls: an ipywidgets ``VBox`` (the header row: view and split) and, by name,
        ``view``, ``split``, ``alpha``, ``permutation``, ``side`` (the last three are shown with their
        view); set ``.value`` to drive it from code.
    figures : dict of FigureWidget
        The figure of each view shown so far.
    last_error : Exception or None
        The last exception raised by a control's callback (also shown in the panel).

    Examples
    --------
    >>> from weightlens import zoo, rebasin                                     # doctest: +SKIP
    >>> from weightlens.widgets.lmc import LMCExplorer                          # doctest: +SKIP
    >>> p = zoo.load("digits-pairs", size="ci", width=128)                      # doctest: +SKIP
    >>> ev = wl.lmc.Evaluator(p.make_module(), {"test": p.data("test")})        # doctest: +SKIP
    >>> LMCExplorer(p.a, p.b, ev, rebasin.mlp_spec(wl.load(p.a)))               # doctest: +SKIP
    """

    def __init__(
        self,
        a: object,
        b: object,
        evaluate: Evaluator | Callable[[Mapping[str, Any]], Mapping[str, Any]] | None,
        spec: PermutationSpec,
        *,
        permutations: Permutations | None = None,
        results: LMCExplorerResults | None = None,
        options: LMCExplorerOptions | None = None,
        **overrides: Any,
    ) -> None:
        given, opts = _resolve(results, options, overrides)
        naive, matched = given.naive, given.matched
        if not isinstance(spec, PermutationSpec):
            raise InvalidParameterError(
                f"The 'spec' parameter must be a PermutationSpec (e.g. weightlens.rebasin.mlp_spec(a)). "
                f"Got {type(spec).__name__} instead."
            )
        if evaluate is None and (naive is None or matched is None):
            raise InvalidParameterError("LMCExplorer needs 'evaluate' unless both 'naive' and 'matched' curves "
                                        "are given.")
        from weightlens.io import load

        super().__init__()
        a_sd, b_sd = load(a), load(b)
        self.options = opts
        self._sources, self._spec, self._k = (a_sd, b_sd), spec, opts.k
        self.permutations_ = permutations if permutations is not None else weight_matching(a_sd, b_sd, spec,
                                                                                           seed=opts.seed)
        settings = {"points": opts.points, "bn_loader": opts.bn_loader, "repair": opts.repair}
        if naive is None:
            naive = curve(a_sd, b_sd, evaluate, label="naive", **settings)
        if matched is None:
            matched_b = self.permutations_.apply({key: b_sd[key] for key in b_sd})
            matched = curve(a_sd, matched_b, evaluate, label="matched", **settings)
        if not np.array_equal(naive.alphas, matched.alphas) or list(naive.splits) != list(matched.splits):
            raise InvalidParameterError("LMCExplorer: the naive and matched curves need the same alphas and "
                                        "splits.")
        self.naive_: LMCCurve = naive
        self.matched_: LMCCurve = matched
        self._distances, self._alignment = given.distances, given.alignment
        named = self._make_controls(spec)
        self.controls = Controls(named, [widgets.HBox([named["view"], named["split"]])])
        self._readout = widgets.HTML()
        self._panel = widgets.Box(layout=widgets.Layout(width="100%"))
        self.children = [widgets.HTML(self.summary_html()), self.controls, self._panel, self.status, self.errors]
        for control in self.controls.values():
            control.observe(self._on_change, names="value")
        self._show()

    # ------------------------------------------------------------------ results measured on first use
    @property
    def distances_(self) -> pd.DataFrame:
        if self._distances is None:
            self._distances = layer_distances(*self._sources, self._spec, self.permutations_)
        return self._distances

    @property
    def alignment_(self) -> SingularAlignment:
        if self._alignment is None:
            self._alignment = singular_alignment(*self._sources, self._spec, self.permutations_, k=self._k)
        return self._alignment

    # ------------------------------------------------------------------ controls
    def _make_controls(self, spec: PermutationSpec) -> dict[str, widgets.ValueWidget]:
        alphas = [float(x) for x in self.naive_.alphas]
        plain = [u for u in spec.units if u not in spec.heads]
        names = plain + [v for g in spec.heads.values() for v in (g.view("q"), g.view("v"))]
        mid = alphas[int(np.argmin(np.abs(np.asarray(alphas) - 0.5)))]
        return {
            "view": widgets.ToggleButtons(options=list(VIEWS), value=VIEWS[0], description="view"),
            "split": widgets.Dropdown(options=self.naive_.splits, value=self.naive_.splits[-1], description="split"),
            "alpha": widgets.SelectionSlider(options=[(f"{x:.3f}", x) for x in alphas], value=mid,
                                             description="alpha", continuous_update=True),
            "permutation": widgets.Dropdown(options=names, value=names[0] if names else None,
                                            description="permutation"),
            "side": widgets.ToggleButtons(options=["left", "right"], value="left", description="vectors"),
        }

    def _on_change(self, change: dict) -> None:
        with self.guarded(f"{change['owner'].description} = {change['new']!r}"):
            self._update(change["owner"])

    def _update(self, owner: widgets.ValueWidget) -> None:
        """Show what a control now asks for (no computation: figures are rebuilt from stored results)."""
        if owner is self.controls["view"]:
            self._show()
        elif owner in (self.controls["alpha"], self.controls["split"]):
            self._update_readout()
            if "interpolation" in self.figures:
                refresh(self.figures["interpolation"], self._figure("interpolation"))
        elif owner is self.controls["permutation"] and "permutations" in self.figures:
            refresh(self.figures["permutations"], self._figure("permutations"))
        elif owner is self.controls["side"] and "singular vectors" in self.figures:
            refresh(self.figures["singular vectors"], self._figure("singular vectors"))

    # ------------------------------------------------------------------ figures
    def _figure(self, view: str) -> go.Figure:
        c = self.controls
        if view == "interpolation":
            return figure_lmc([self.naive_, self.matched_], splits=[c["split"].value], alpha=c["alpha"].value,
                              title=f"naive vs matched interpolation ({c['split'].value})")
        if view == "layer distance":
            return figure_layer_distances(self.distances_, title="distance between A and B per tensor")
        if view == "permutations":
            return figure_permutations(self.permutations_, names=[c["permutation"].value], cols=1, height=460,
                                       title="permutation found for B")
        return figure_singular_alignment(self.alignment_, side=c["side"].value)

    def _widget_for(self, view: str) -> go.FigureWidget:
        if view not in self.figures:
            self.figures[view] = figure_widget(self._figure(view))  # wrapped whole: full state correct
        return self.figures[view]

    def _show(self) -> None:
        view = self.controls["view"].value
        fig = self._widget_for(view)
        extra = {"interpolation": [self.controls["alpha"], self._readout],
                 "permutations": [self.controls["permutation"]],
                 "singular vectors": [self.controls["side"]]}.get(view, [])
        if view == "interpolation":
            self._update_readout()
        self._panel.children = [widgets.VBox([*extra, fig], layout=widgets.Layout(width="100%"))]

    # ------------------------------------------------------------------ text
    def _update_readout(self) -> None:
        split, alpha = self.controls["split"].value, self.controls["alpha"].value
        i = int(np.argmin(np.abs(self.naive_.alphas - alpha)))
        parts = []
        for c in (self.naive_, self.matched_):
            loss, acc = c.loss[split][i], c.accuracy[split][i]
            parts.append(f"<b>{html.escape(c.label)}</b>: loss {loss:.4f}, accuracy {acc:.4f}")
        sep = " &nbsp;·&nbsp; "
        self._readout.value = f"alpha = {alpha:.3f} ({html.escape(split)}){sep}" + sep.join(parts)

    def summary_html(self) -> str:
        """Barrier table: naive vs matched per split (Entezari and midpoint definitions)."""
        red = relative_reduction(self.naive_, self.matched_)
        rows = "".join(
            f"<tr><td>{html.escape(s)}</td><td>{self.naive_.barrier[s]:.4f}</td><td>{self.matched_.barrier[s]:.4f}</td>"
            f"<td>{red[s]:.1%}</td><td>{self.naive_.barrier_midpoint[s]:.4f}</td>"
            f"<td>{self.matched_.barrier_midpoint[s]:.4f}</td></tr>"
            for s in self.naive_.splits
        )
        moved = sum(int((np.asarray(p) != np.arange(len(p))).sum()) for n, p in self.permutations_.perms.items()
                    if n in self.permutations_.spec.units)
        return (
            "<table><thead><tr><th>split</th><th>naive barrier</th><th>matched barrier</th><th>reduction</th>"
            "<th>naive (midpoint def.)</th><th>matched (midpoint def.)</th></tr></thead>"
            f"<tbody>{rows}</tbody></table><small>barrier: loss above the chord (Entezari et al.); midpoint "
            f"definition: max loss minus the mean of the endpoint losses (Git Re-Basin). {moved} units of B "
            "moved by the matching.</small>"
        )

    def __repr__(self) -> str:
        b = ", ".join(f"{s}: {self.naive_.barrier[s]:.3g} -> {self.matched_.barrier[s]:.3g}"
                      for s in self.naive_.splits)
        return f"LMCExplorer(barrier naive -> matched: {b})"
