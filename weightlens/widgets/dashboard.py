"""``InterferenceDashboard``: spectra, alignment and sign conflicts of task vectors, by task and block.

A thin view. Every number comes from :func:`weightlens.analysis.analyze` (its decompositions are
cached in ``tv.cache``, so a second task selection reuses every per-task SVD); every figure comes
from :mod:`weightlens.figures.analysis`. Three ``FigureWidget`` objects are built once and updated
in place; controls only choose which rows of the report to draw.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import ipywidgets as widgets
import pandas as pd
import plotly.graph_objects as go

from weightlens.analysis import Report, analyze, block_of
from weightlens.errors import InvalidParameterError
from weightlens.figures._keys import ordered, spread
from weightlens.figures.analysis import (
    figure_sar_layers,
    figure_sar_matrix,
    figure_sign_conflicts,
    figure_spectra,
)
from weightlens.taskvectors import TaskVectors
from weightlens.widgets._common import Panel, figure_widget, refresh
from weightlens.widgets._controls import Controls

__all__ = ["ALL_BLOCKS", "InterferenceDashboard"]

ALL_BLOCKS = "(all layers)"
ALIGNMENT_VIEWS = ("task x reference", "per layer")
WIDTH = 1000  # px, every figure


class InterferenceDashboard(Panel):
    """Interactive interference report: pick tasks and a block; tabs for spectra, alignment, signs.

    Parameters
    ----------
    source : TaskVectors or Report
        Task vectors (analysed here, and re-analysed for each task selection: the sum and the sign
        statistics then cover the selected tasks only; cached decompositions are reused) or a
        finished :class:`~weightlens.analysis.Report` (then the selection only filters what is
        drawn; the sum and the sign conflicts stay those of all the report's tasks).
    tasks : sequence of str, optional
        Tasks selected at start (default: all). At least two.
    block : str, optional
        Block selected at start (``block_of(key)``, e.g. ``"encoder.layer.3"``); default all layers.
    max_keys : int, default=6
        Spectra drawn at most (spread over the block's matrices).
    report : Report, optional
        With task vectors: the report of all their tasks, when already computed (saves a pass).
    **analyze_options
        Passed to :func:`~weightlens.analysis.analyze` (``device``, ``sar_criterion``, ...).

    Attributes
    ----------
    report : Report
        The report behind the current selection.
    controls : Controls
        The user-facing controls: an ipywidgets ``VBox`` (the task and block rows above the tabs) and,
        by name, ``"task:<name>"`` (one checkbox per task), ``"block"``, ``"normalize"`` and
        ``"alignment_view"`` (shown in the Alignment tab); set ``.value`` to drive the dashboard.
    figures : dict of str to plotly.graph_objects.FigureWidget
        ``"spectra"``, ``"alignment"``, ``"signs"``.

    Examples
    --------
    >>> from weightlens.widgets import InterferenceDashboard      # doctest: +SKIP
    >>> dash = InterferenceDashboard(tv)                          # doctest: +SKIP
    >>> dash.block.value = "encoder.layer.5"                      # doctest: +SKIP
    """

    def __init__(
        self,
        source: TaskVectors | Report,
        *,
        tasks: Sequence[str] | None = None,
        block: str | None = None,
        max_keys: int = 6,
        report: Report | None = None,
        **analyze_options: Any,
    ) -> None:
        super().__init__()
        self._options = dict(analyze_options)
        self._max_keys = int(max_keys)
        self._reports: dict[tuple[str, ...], Report] = {}
        if isinstance(source, Report):
            self._tv: TaskVectors | None = None
            self._full = source
        elif isinstance(source, TaskVectors):
            self._tv = source
            if report is not None and list(report.tasks) != source.names:
                raise InvalidParameterError(
                    f"report= covers tasks {list(report.tasks)}, the task vectors {source.names}."
                )
            self._full = report if report is not None else analyze(source, progress=False, **self._options)
        else:
            raise InvalidParameterError(
                f"InterferenceDashboard needs TaskVectors or an analysis Report; got {type(source).__name__}."
            )
        names = list(self._full.tasks)
        self._reports[tuple(names)] = self._full
        chosen = list(tasks) if tasks is not None else names
        unknown = [t for t in chosen if t not in names]
        if unknown or len(chosen) < 2:
            raise InvalidParameterError(
                f"InterferenceDashboard(tasks=...) needs at least two of {names}; got {chosen}."
            )
        self.report = self._report_for(chosen)
        blocks = ordered(block_of(k) for k in self._full.keys)
        if block is not None and block not in blocks:
            raise InvalidParameterError(f"Unknown block {block!r}; blocks are {blocks}.")
        self._build_controls(names, chosen, blocks, block or ALL_BLOCKS)
        figs = self._figures()
        self.figures.update({name: figure_widget(fig) for name, fig in figs.items()})
        self._layout()
        self._describe(None)

    # ------------------------------------------------------------------ controls and layout
    def _build_controls(self, names: list[str], chosen: list[str], blocks: list[str], block: str) -> None:
        self.task_boxes = {t: widgets.Checkbox(value=t in chosen, description=t, indent=False,
                                               layout=widgets.Layout(width="auto")) for t in names}
        self.block = widgets.Dropdown(options=[ALL_BLOCKS, *blocks], value=block, description="block",
                                      layout=widgets.Layout(width="360px"))
        self.normalize = widgets.Checkbox(value=False, description="spectra / largest", indent=False,
                                          layout=widgets.Layout(width="auto"))
        self.alignment_view = widgets.ToggleButtons(options=ALIGNMENT_VIEWS, value=ALIGNMENT_VIEWS[0],
                                                    style={"button_width": "130px"})
        for box in self.task_boxes.values():
            box.observe(self._on_tasks, names="value")
        for control in (self.block, self.normalize, self.alignment_view):
            control.observe(self._on_view, names="value")

    def _layout(self) -> None:
        self.tabs = widgets.Tab(children=[
            self.figures["spectra"],
            widgets.VBox([self.alignment_view, self.figures["alignment"]]),
            self.figures["signs"],
        ])
        for i, title in enumerate(("Spectra", "Alignment", "Sign conflicts")):
            self.tabs.set_title(i, title)
        tasks_row = widgets.HBox([widgets.HTML("<b>tasks</b>&nbsp;"), *self.task_boxes.values()],
                                 layout=widgets.Layout(flex_flow="row wrap", grid_gap="12px"))
        named = {**{f"task:{t}": box for t, box in self.task_boxes.items()}, "block": self.block,
                 "normalize": self.normalize, "alignment_view": self.alignment_view}
        self.controls = Controls(named, [tasks_row, widgets.HBox([self.block, self.normalize],
                                                                  layout=widgets.Layout(grid_gap="16px"))])
        self.children = [
            widgets.HTML("<b>Interference dashboard</b>"),
            self.controls,
            self.status,
            self.tabs,
            self.errors,
        ]
        self.add_class("wl-dashboard")

    # ------------------------------------------------------------------ data
    @property
    def tasks(self) -> list[str]:
        """Selected tasks, in the report's order."""
        return [t for t, box in self.task_boxes.items() if box.value]

    def _report_for(self, tasks: list[str]) -> Report:
        key = tuple(tasks)
        if key not in self._reports:
            if self._tv is None:
                self._reports[key] = self._full
            else:
                self._reports[key] = analyze(self._tv, tasks=tasks, keys=list(self._full.keys),
                                             progress=False, **self._options)
        return self._reports[key]

    def _block_keys(self) -> list[str] | None:
        block = self.block.value
        if block == ALL_BLOCKS:
            return None
        return [k for k in self.report.keys if block_of(k) == block]

    def _rows(self, table: pd.DataFrame) -> pd.DataFrame:
        keys = self._block_keys()
        return table if keys is None or table.empty else table[table["key"].isin(keys)]

    def _figures(self) -> dict[str, go.Figure]:
        """The three figures for the current selection (pure builders over report rows)."""
        rep, tasks = self.report, self.tasks
        refs = [*tasks, "sum"]
        sv = self._rows(rep.singular_values)
        matrices = ordered(sv["key"]) if not sv.empty else []
        keys = spread(matrices, self._max_keys) if matrices else None
        sv = sv[sv["task"].isin(refs)] if not sv.empty else sv
        spectra = figure_spectra(sv, keys=keys, tasks=refs, normalize=self.normalize.value, cols=3)
        align = self._rows(rep.alignment)
        align = align[align["task"].isin(tasks) & align["reference"].isin(refs)] if not align.empty else align
        if self.alignment_view.value == ALIGNMENT_VIEWS[0]:
            sub = dataclasses.replace(rep, alignment=align)
            alignment = figure_sar_matrix(sub.sar_matrix().reindex(index=tasks))
        else:
            alignment = figure_sar_layers(align, reference="sum", tasks=tasks)
        where = "all layers" if self.block.value == ALL_BLOCKS else self.block.value
        alignment.update_layout(title=f"{alignment.layout.title.text} ({where})")
        by = "block" if self._block_keys() is None else "key"
        signs = figure_sign_conflicts(self._rows(rep.signs), by=by)
        spectra.update_annotations(font_size=12)  # subplot titles: long tensor keys
        figs = {"spectra": spectra, "alignment": alignment, "signs": signs}
        for fig in figs.values():  # a FigureWidget does not follow its container's width
            fig.update_layout(width=WIDTH)
        return figs

    # ------------------------------------------------------------------ callbacks
    def _update(self, what: str) -> None:
        start = time.perf_counter()
        self.set_status(f"{what}: computing ...")
        figs = self._figures()
        for name, fig in figs.items():
            refresh(self.figures[name], fig)
        self._describe(time.perf_counter() - start)

    def _on_tasks(self, change: dict[str, Any]) -> None:
        with self.guarded("task selection"):
            tasks = self.tasks
            if len(tasks) < 2:
                self.set_status("Select at least two tasks (the figures still show the last selection).",
                                error=True)
                return
            if tuple(tasks) not in self._reports:  # say so before the kernel is busy (a warm report: seconds)
                self.set_status(f"task selection: analysing {', '.join(tasks)} ...")
            self.report = self._report_for(tasks)
            self._update("task selection")

    def _on_view(self, change: dict[str, Any]) -> None:
        with self.guarded("view"):
            self._update("view")

    def _describe(self, seconds: float | None) -> None:
        where = "all layers" if self.block.value == ALL_BLOCKS else f"block {self.block.value}"
        note = "" if self._tv is not None or len(self.tasks) == len(self._full.tasks) else (
            " (from a Report: the sum and sign conflicts cover all its tasks)")
        took = "" if seconds is None else f" | updated in {seconds * 1000:.0f} ms"
        self.set_status(f"tasks {', '.join(self.tasks)} | {where} | {len(self.report.keys)} keys analysed{note}{took}")
