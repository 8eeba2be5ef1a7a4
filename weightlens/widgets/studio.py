"""``MergeStudio``: choose a merge method and its parameters, see what each task keeps, export.

A thin view over :func:`weightlens.merge.merge` and :func:`weightlens.merge.compare`; the
parameter controls are built from the registry's schemas (:func:`weightlens.merge.get_method`).
Figures come from :mod:`weightlens.figures.merge` and :mod:`weightlens.figures.task_accuracy`.
The widget holds the controls, the layout and their wiring; the rest is outside the class:

* which comparison to show: a :class:`weightlens.merge.comparisons.ComparisonCache` (the cached
  one, rescaled to a new ``alpha``, or a fresh :func:`~weightlens.merge.compare`);
* background work: :class:`weightlens.widgets._common.Background` (debounced, superseded by a
  newer change, with a progress bar); accuracy: :func:`score_merge`; export: :func:`export_merge`.

Speed: merges are lazy and their unscaled updates cached in ``tv.cache``; a comparison is computed
once per (tasks, method, parameters other than ``alpha``) and a move of ``alpha`` rescales it
(:meth:`~weightlens.merge.Comparison.rescaled`), so the slider never recomputes an SVD or
re-reads a tensor. A new method or parameter value is merged at once and the shown key's spectrum
drawn from a one-key comparison; the whole-model comparison behind the other panels, then the
accuracy (when ``evaluate`` is given), run on a background thread once the controls have been
still for ``debounce`` seconds, with a progress bar. A newer change supersedes that work: a
finished comparison is kept in the cache, scoring stops early.

"Why?" diagnoses the current merge (:func:`weightlens.diagnosis.diagnose`, from the weights alone unless
"measure restoration" is ticked) on a second :class:`~weightlens.widgets._common.Background` with its own
progress bar; the chosen task's blocks are drawn by :func:`weightlens.figures.diagnosis.figure_block_costs`,
and "Apply suggestion" sets the method and parameters to the diagnosis' suggestion and merges again.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import html

import ipywidgets as widgets
import pandas as pd
import plotly.graph_objects as go
import torch

from weightlens._options import resolve_options
from weightlens.errors import InvalidParameterError
from weightlens.figures.diagnosis import culprit, diagnosis_section, figure_block_costs
from weightlens.figures.merge import figure_merge_conflicts, figure_merge_spectrum, figure_retained_alignment
from weightlens.figures.task_accuracy import figure_task_accuracy
from weightlens.merge import Comparison, MergeResult, alpha_grid, get_method, list_methods, merge
from weightlens.merge.comparisons import ComparisonCache
from weightlens.merge.registry import Param
from weightlens.taskvectors import TaskVectors
from weightlens.widgets._controls import Controls
from weightlens.widgets._common import (
    Background,
    Job,
    Panel,
    background_threads,
    figure_widget,
    refresh,
    short_key,
)

__all__ = [
    "METRICS",
    "PANELS",
    "MergeStudio",
    "StudioOptions",
    "export_merge",
    "method_controls",
    "param_control",
    "score_merge",
]

METRICS = ("sar", "kept", "cos", "agreement")
Evaluate = Callable[[Mapping[str, torch.Tensor], str, str], Mapping[str, float]]
_CACHE_SIZE = 8  # comparisons kept per studio (whole-model ones; as many one-key ones)
PANELS = ("spectrum", "retained", "conflicts")
_HEIGHT, _WIDTH = 420, 600  # px, every panel (a FigureWidget does not follow its container's width)


@dataclass(frozen=True)
class StudioOptions:
    """Settings of :class:`MergeStudio` that are rarely changed (all have defaults).

    Attributes
    ----------
    split : split passed to ``evaluate`` (``"val"``).
    debounce : seconds the controls must be still before the background work starts (0.5).
    out_dir : initial export folder (``"merged-model"``).
    keys : restrict the comparison to these keys (None: every task-vector key).
    data : the ``MergeData`` of data-based methods (``regmean``, ``fisher``; e.g. ``zoo.merge_data()``): they are
        offered only when it is given (None).
    """

    split: str = "val"
    debounce: float = 0.5
    out_dir: str = "merged-model"
    keys: tuple[str, ...] | None = None
    data: Any = None

    def __post_init__(self) -> None:
        if isinstance(self.debounce, bool) or not isinstance(self.debounce, (int, float)) or not self.debounce >= 0:
            raise InvalidParameterError(
                f"The 'debounce' parameter must be a number >= 0. Got {self.debounce!r} instead."
            )
        if self.keys is not None:
            object.__setattr__(self, "keys", tuple(self.keys))


def _panel_style(fig: go.Figure) -> go.Figure:
    """Size, small title, legend below: four panels side by side in pairs."""
    return fig.update_layout(height=_HEIGHT, width=_WIDTH, title_font_size=13,
                             margin={"l": 55, "r": 15, "t": 45, "b": 85},
                             legend={"orientation": "h", "yanchor": "top", "y": -0.25, "x": 0})


def _step(low: float, high: float) -> float:
    return 10.0 ** math.floor(math.log10((high - low) / 100.0))


def param_control(p: Param, *, method: str, n_tasks: int) -> widgets.ValueWidget:
    """The control for one registry parameter: slider (ranged float), dropdown (options),
    checkbox (bool), integer box (int), text (str). ``alpha`` spans the method's validation grid."""
    style = {"description_width": "110px"}
    width = widgets.Layout(width="420px")
    if p.options is not None:
        return widgets.Dropdown(options=list(p.options), value=p.default, description=p.name, style=style)
    if p.kind is bool:
        return widgets.Checkbox(value=bool(p.default), description=p.name, indent=False)
    if p.nullable and p.default is None and p.name != "alpha":
        return widgets.Text(value="", placeholder="None", description=p.name, style=style)
    if p.kind is int:
        return widgets.IntText(value=int(p.default or 0), description=p.name, style=style,
                               layout=widgets.Layout(width="220px"))
    if p.kind is str:
        return widgets.Text(value=str(p.default or ""), description=p.name, style=style)
    if p.name == "alpha":
        default = float(get_method(method).resolve({}, n_tasks)["alpha"])
        high = max(max(alpha_grid(method, n_tasks)), 2 * default)
        return widgets.FloatSlider(value=default, min=0.0, max=round(high, 2), step=0.01, description="alpha",
                                   readout_format=".2f", continuous_update=True, style=style, layout=width)
    interval = p.interval
    if interval is None or interval.low is None or interval.high is None:
        return widgets.FloatText(value=float(p.default), description=p.name, style=style)
    step = _step(interval.low, interval.high)
    low = interval.low if interval.closed in ("both", "left") else interval.low + step
    high = interval.high if interval.closed in ("both", "right") else interval.high - step
    return widgets.FloatSlider(value=float(p.default), min=low, max=high, step=step, description=p.name,
                               readout_format=".2f" if step < 1 else ".0f", continuous_update=False,
                               style=style, layout=width)


def method_controls(n_tasks: int) -> dict[str, dict[str, widgets.ValueWidget]]:
    """:func:`param_control` for every parameter of every registered method, by method and name."""
    return {m: {p.name: param_control(p, method=m, n_tasks=n_tasks) for p in get_method(m).params.values()}
            for m in list_methods()}


def _coerce(p: Param, value: Any) -> Any:
    """A text box of a nullable parameter: empty is None, anything else the parameter's type."""
    if isinstance(value, str) and p.kind is not str:
        return None if value.strip() in ("", "None") else p.kind(value)
    return value


class MergeStudio(Panel):
    """Interactive merging: method, parameters and tasks in; before/after panels, accuracy, export out.

    Parameters
    ----------
    task_vectors : TaskVectors
        What to merge (its cache is shared with analysis and other widgets).
    evaluate : callable, optional
        ``evaluate(state_dict, task, split) -> {"accuracy": ...}`` (e.g. ``TaskZoo.evaluate``). When
        given, a panel shows the merged model's accuracy per task next to each fine-tune's.
    method : str, default="task_arithmetic"
        Method shown first (any of ``weightlens.merge.list_methods()``; a data-based one needs ``data=``).
    tasks : sequence of str, optional
        Tasks ticked at start (default: all).
    key : str, optional
        Matrix key whose spectrum is shown (default: a matrix in the middle of the model).
    metric : {"sar", "kept", "cos", "agreement"}, default="sar"
        Per-task column of the retained-alignment panel.
    options : StudioOptions, optional
        ``split`` (of ``evaluate``), ``debounce`` (seconds of still controls before background work),
        ``out_dir`` (initial export folder), ``keys`` (compare only these keys); see :class:`StudioOptions`.
    **overrides
        Any of those by name, over ``options``: ``MergeStudio(tv, debounce=0.3, split="test")``.

    Attributes
    ----------
    merged : MergeResult
        The current merge (lazy: keys are computed when read; updates cached).
    comparison : Comparison
        Its comparison with task arithmetic (None while the whole model is compared in the background).
    diagnosis : Diagnosis or None
        The latest "Why?" (:meth:`why`): a diagnosis of the merge named in the Why status line.
    scores : DataFrame
        Latest accuracy table (``task, model, accuracy``), empty without ``evaluate``.
    options : StudioOptions
        The settings in use.
    """

    def __init__(
        self,
        task_vectors: TaskVectors,
        evaluate: Evaluate | None = None,
        *,
        method: str = "task_arithmetic",
        tasks: Sequence[str] | None = None,
        key: str | None = None,
        metric: str = "sar",
        options: StudioOptions | None = None,
        **overrides: Any,
    ) -> None:
        super().__init__()
        if not isinstance(task_vectors, TaskVectors):
            raise InvalidParameterError(f"MergeStudio needs TaskVectors; got {type(task_vectors).__name__}.")
        self.options = resolve_options(StudioOptions, options, overrides, caller="MergeStudio")
        self.tv, self._evaluate, self.split = task_vectors, evaluate, self.options.split
        if get_method(method).needs_data and self.options.data is None:
            raise InvalidParameterError(
                f"MergeStudio: method {method!r} needs data= ({get_method(method).needs_data}); pass "
                "MergeStudio(tv, data=zoo.merge_data()) to offer the data-based methods."
            )
        self._keys = list(self.options.keys) if self.options.keys is not None else None
        self._comparisons = ComparisonCache(_CACHE_SIZE)  # whole model (or options.keys)
        self._key_comparisons = ComparisonCache(_CACHE_SIZE)  # the shown key alone
        self._references: dict[tuple[str, str], float] = {}  # fine-tuned accuracy per (task, split)
        self._lock = threading.RLock()  # the panels' state: callbacks vs background thread
        self.scores = pd.DataFrame(columns=["task", "model", "accuracy"])
        self._background = Background(self, self._settle, self.options.debounce)
        self.progress, self.eval_status = self._background.progress, self._background.status
        self.diagnosis, self._diagnosed, self._quiet = None, None, False
        self._why = Background(self, self._diagnose, 0.0)
        self._build_controls(*_choices(self.tv, method, tasks, key, metric, self._keys), method, key, metric)
        self._panels = _Panels()
        start = time.perf_counter()
        self._recompute()
        if self.comparison is None:  # the first comparison is made here, before anything is shown
            self.comparison = self._key_comparison = self._comparisons.compare(self.merged, self._keys)
        figs = self._panels.draw(PANELS, self.comparison, self._key_comparison, **self._view)
        if evaluate is not None:
            figs["accuracy"] = figure_task_accuracy(self.scores, split=self.split)
        self.figures.update({name: figure_widget(fig) for name, fig in figs.items()})
        self._wire_clicks()
        self.last_update_s = time.perf_counter() - start
        self._layout()
        self._describe()
        self._schedule()

    # ------------------------------------------------------------------ controls
    def _build_controls(self, chosen: list[str], matrices: list[str], method: str, key: str | None,
                        metric: str) -> None:
        style = {"description_width": "110px"}
        offered = [m for m in list_methods() if self.options.data is not None or not get_method(m).needs_data]
        self.method = widgets.Dropdown(options=[(get_method(m).pretty_name, m) for m in offered],
                                       value=method, description="method", style=style)
        self.params = method_controls(len(chosen))
        self.task_boxes = {t: widgets.Checkbox(value=t in chosen, description=t, indent=False,
                                               layout=widgets.Layout(width="auto")) for t in self.tv.names}
        self.key = widgets.Dropdown(options=[(short_key(k), k) for k in matrices],
                                    value=key or matrices[len(matrices) // 2], description="spectrum of",
                                    style=style, layout=widgets.Layout(width="520px"))
        self.metric = widgets.Dropdown(options=METRICS, value=metric, description="per task", style=style)
        self.param_box = widgets.VBox(list(self.params[method].values()))
        self.out_path = widgets.Text(value=self.options.out_dir, description="export to", style=style,
                                     layout=widgets.Layout(width="420px"))
        self.overwrite = widgets.Checkbox(value=False, description="overwrite", indent=False,
                                          layout=widgets.Layout(width="auto"))
        self.export_button = widgets.Button(description="Export", icon="download", button_style="primary")
        self.export_status = widgets.HTML()
        self.method.observe(self._on_method, names="value")
        for controls in self.params.values():
            for name, control in controls.items():
                control.observe(partial(self._on_param, what="alpha" if name == "alpha" else "parameters"),
                                names="value")
        for box in self.task_boxes.values():
            box.observe(self._on_param, names="value")
        self.key.observe(partial(self._on_view, what="spectrum key", names=("spectrum",)), names="value")
        self.metric.observe(partial(self._on_view, what="metric", names=("retained",)), names="value")
        self.export_button.on_click(lambda _: self.export())
        self.why_button = widgets.Button(description="Why?", icon="question", tooltip="diagnose the current merge")
        self.measure = widgets.Checkbox(value=False, description="measure restoration", indent=False,
                                        disabled=self._evaluate is None, layout=widgets.Layout(width="auto"))
        self.whatif = widgets.Checkbox(value=False, description="what-if: every method", indent=False,
                                       layout=widgets.Layout(width="auto"))
        self.why_task = widgets.Dropdown(options=list(self.tv.names), value=chosen[0], description="why task",
                                         style=style)
        self.apply_button = widgets.Button(description="Apply suggestion", icon="check", disabled=True)
        self.why_text, self.whatif_table = widgets.HTML(), widgets.HTML()
        self.why_figure = widgets.Box()
        self.why_button.on_click(lambda _: self.why())
        self.apply_button.on_click(lambda _: self.apply_suggestion())
        self.why_task.observe(self._on_why_task, names="value")

    def _layout(self) -> None:
        figs = self.figures
        grid = [figs["spectrum"], figs["retained"], figs["conflicts"]]
        if "accuracy" in figs:
            grid.append(figs["accuracy"])
        tasks_row = widgets.HBox([widgets.HTML("<b>tasks</b>&nbsp;"), *self.task_boxes.values()],
                                 layout=widgets.Layout(flex_flow="row wrap", grid_gap="12px"))
        export_row = widgets.HBox([self.out_path, self.overwrite, self.export_button],
                                  layout=widgets.Layout(grid_gap="12px", align_items="center"))
        why_row = [self.why_button, *([self.measure] if self._evaluate is not None else []), self.whatif, self.why_task,
                   self.apply_button]
        self.why_box = widgets.VBox([
            widgets.HBox(why_row, layout=widgets.Layout(grid_gap="12px", align_items="center")),
            widgets.HBox([self._why.progress, self._why.status], layout=widgets.Layout(grid_gap="12px")),
            self.why_text,
            widgets.HBox([self.why_figure, self.whatif_table], layout=widgets.Layout(grid_gap="12px")),
        ])
        named = {"method": self.method, **{f"task:{t}": box for t, box in self.task_boxes.items()},
                 **{f"{m}.{name}": c for m, controls in self.params.items() for name, c in controls.items()},
                 "key": self.key, "metric": self.metric, "out_path": self.out_path, "overwrite": self.overwrite,
                 "why_task": self.why_task, "measure": self.measure, "whatif": self.whatif}
        self.controls = Controls(named, [
            widgets.HBox([self.method, tasks_row], layout=widgets.Layout(grid_gap="24px")),
            self.param_box,
            widgets.HBox([self.key, self.metric], layout=widgets.Layout(grid_gap="12px")),
        ])
        self.children = [
            widgets.HTML("<b>Merge studio</b>"),
            self.controls,
            self.status,
            widgets.GridBox(grid, layout=widgets.Layout(grid_template_columns="repeat(2, minmax(0, 1fr))",
                                                        grid_gap="8px")),
            widgets.HBox([self.progress, self.eval_status], layout=widgets.Layout(grid_gap="12px")),
            self.why_box,
            export_row,
            self.export_status,
            self.errors,
        ]
        self.add_class("wl-studio")

    # ------------------------------------------------------------------ state
    @property
    def tasks(self) -> list[str]:
        """Ticked tasks, in the task vectors' order."""
        return [t for t, box in self.task_boxes.items() if box.value]

    @property
    def method_params(self) -> dict[str, Any]:
        """Parameters of the current method as set in its controls (``alpha`` included)."""
        spec = get_method(self.method.value)
        return {name: _coerce(spec.params[name], c.value) for name, c in self.params[self.method.value].items()}

    @property
    def state(self) -> dict[str, Any]:
        """What the panels show now: method, parameters, tasks, key and the headline numbers.

        ``pending`` is True while the whole-model comparison runs in the background (then only the
        spectrum is current and the per-task numbers are absent).
        """
        return _state(self.merged, self.comparison, self._key_comparison, key=self.key.value,
                      metric=self.metric.value)

    def _recompute(self) -> None:
        """Merge (lazy) and ask the cache for its comparison (a known one rescaled to this ``alpha``);
        without one, the shown key's now and the whole model's later (:meth:`_settle`, in the background)."""
        tasks = self.tasks
        tv = self.tv if tasks == self.tv.names else self.tv.subset(tasks)
        self.merged = merge(tv, method=self.method.value, lazy=True, data=self.options.data, **self.method_params)
        self.comparison = self._comparisons.get(self.merged, self._keys)
        self._key_comparison = self.comparison if self.comparison is not None else self._key_only()

    def _key_only(self) -> Comparison:
        """Comparison restricted to the shown key (cheap: one key's update, SVD and signs)."""
        return self._key_comparisons.compare(self.merged, [self.key.value])

    @property
    def _view(self) -> dict[str, str]:
        return {"key": self.key.value, "metric": self.metric.value}

    def _redraw(self, names: Sequence[str]) -> None:
        """Update in place the panels among ``names`` whose inputs changed."""
        figs = self._panels.draw(names, self.comparison, self._key_comparison, changed_only=True, **self._view)
        for name, fig in figs.items():
            refresh(self.figures[name], fig)

    # ------------------------------------------------------------------ callbacks
    def _update(self, what: str, names: Sequence[str], *, recompute: bool = False) -> None:
        start = time.perf_counter()
        with self.guarded(what), self._lock:
            if recompute:
                if len(self.tasks) < 2:
                    self.set_status("Tick at least two tasks (the panels still show the last merge).", error=True)
                    return
                self.set_status(f"{what}: merging ...")
                self._recompute()
            elif self.comparison is None and "spectrum" in names:
                self._key_comparison = self._key_only()
            self._redraw(names)
            self.last_update_s = time.perf_counter() - start
            self._describe()
            if recompute:
                self._schedule()
                self._why_said()

    def _on_param(self, change: dict[str, Any], what: str = "parameters") -> None:
        """A method parameter (``what`` names it in the status line) or a task box changed: merge again.
        A move of ``alpha`` alone finds the cached comparison and rescales it (:meth:`_recompute`): no SVD."""
        if not self._quiet:
            self._update(what, PANELS, recompute=True)

    def _on_method(self, change: dict[str, Any]) -> None:
        self.param_box.children = list(self.params[self.method.value].values())
        if not self._quiet:
            self._update("method", PANELS, recompute=True)

    def _on_view(self, change: dict[str, Any], what: str, names: Sequence[str]) -> None:
        """The spectrum's key or the per-task metric changed: redraw that panel (nothing is merged)."""
        self._update(what, names)

    def _describe(self) -> None:
        self.set_status(_status_line(self.state, self.metric.value, self.last_update_s))

    # ------------------------------------------------------------------ background work
    def _schedule(self) -> None:
        """After the controls settle: the whole-model comparison if missing, then accuracy."""
        if self.comparison is None or self._evaluate is not None:
            what = "whole model" if self.comparison is None else "accuracy"
            self._background.schedule(f"{what}: waiting for the controls to settle ...", self.merged)

    def _settle(self, job: Job, merged: MergeResult) -> None:
        """Background thread: compare the whole model (kept in the cache), show it if the merge on
        screen still lacks it (rescaled to the current alpha), then score accuracy."""
        if self._comparisons.get(merged, self._keys) is None:
            job.say("whole model: comparing with task arithmetic ...", busy=True)
            job.start(1)
            comp = self._comparisons.compare(merged, self._keys)
            job.advance()
            with self._lock:
                if self.comparison is None:  # the cache's answer for the merge on screen, if any
                    found = self._comparisons.get(self.merged, self._keys)
                    self.comparison = comp if found is None and self.merged is merged else found
                    if self.comparison is not None:
                        self._key_comparison = self.comparison
                        self._redraw(PANELS)
                        self._describe()
            if self._evaluate is None:
                job.say("whole model compared")
        if self._evaluate is None or not job.current:
            return
        with background_threads():  # model forwards: keep one OpenMP team off the kernel's
            scores = score_merge(self._evaluate, merged, self.split, self._references, job)
        with self._lock:
            if scores is None or not job.current:
                return
            self.scores, label = scores, _label(merged)
            refresh(self.figures["accuracy"], _panel_style(figure_task_accuracy(scores, split=self.split, label=label)))
            self._wire_clicks()
            mean = scores[scores["model"] == "merged"]["accuracy"].mean()
            job.say(f"accuracy ({self.split}) of {label}: mean {mean:.4f}")

    def wait(self, timeout: float | None = 600.0) -> bool:
        """Block until the latest background work (whole-model comparison, accuracy, the "Why?" diagnosis)
        has finished; False if ``timeout`` seconds passed first."""
        return self._background.wait(timeout) and self._why.wait(timeout)

    def _before_snapshot(self) -> None:
        self.wait()

    def _snapshot_html(self) -> str:
        """The headless snapshot's text: the latest diagnosis (sentences, worst blocks), when there is one."""
        d = self.diagnosis
        return "" if d is None else diagnosis_section(d, figures=False, heading=f"Why? ({_label(self._diagnosed)})")

    # ------------------------------------------------------------------ why
    def why(self, diagnosis: Any = None) -> None:
        """The "Why?" button: diagnose the merge on screen (:func:`weightlens.diagnosis.diagnose`) on a
        background thread and show it; :meth:`wait` blocks until it is shown. From the weights alone, unless
        the studio has ``evaluate`` and "measure restoration" is ticked (then the restoration tests score on
        ``split``). "what-if: every method" adds the what-if of every registered method (``whatif="all"``),
        scored with ``evaluate`` when the studio has one, and so a suggestion to apply. With ``diagnosis`` (a diagnosis of the merge on screen, e.g. with a what-if), show that
        one instead, at once."""
        if diagnosis is not None:
            with self.guarded("why"), self._lock:
                self._show_diagnosis(diagnosis, self.merged)
            return
        measure, whatif = self.measure.value, self.whatif.value
        evaluate = self._evaluate if measure or whatif else None
        self._why.schedule(f"why: diagnosing {_label(self.merged)} ...", self.merged, evaluate, measure, whatif)

    def _diagnose(self, job: Job, merged: MergeResult, evaluate: Evaluate | None, measure: bool = True,
                  whatif: bool = False) -> None:
        """Background thread: diagnose ``merged``; show it unless a newer "Why?" superseded this one. Not on
        half the threads (:func:`background_threads`): the per-task SVDs it caches are reused by merges."""
        from weightlens.diagnosis import diagnose

        how = "with restoration tests" if evaluate is not None and measure else "from the weights"
        how += ", every method's what-if" if whatif else ""
        job.say(f"why: diagnosing {_label(merged)} {how} ...", busy=True)
        job.start(1)
        tests = {} if measure else {"restore": 0, "controls": 0}  # evaluate for the what-if alone
        d = diagnose(merged.task_vectors, merged, evaluate=evaluate, split=self.split, progress=False,
                     whatif="all" if whatif else None, **tests)
        job.advance()
        with self._lock:
            if not job.current:
                return
            self._show_diagnosis(d, merged)
            job.say(f"why: {_label(merged)} diagnosed {how}")

    def _show_diagnosis(self, d: Any, merged: MergeResult) -> None:
        """Keep ``d`` and show the chosen task (kept when ``d`` has it, else its costliest task)."""
        self.diagnosis, self._diagnosed = d, merged
        tasks = d.tasks.sort_values("predicted_cost", ascending=False, na_position="last")["task"].tolist()
        task = self.why_task.value
        self.why_task.options = list(d.tasks["task"])
        self.why_task.value = task if task in tasks else tasks[0]
        self.apply_button.disabled = d.suggestion is None
        self._draw_why()

    def _on_why_task(self, change: dict[str, Any]) -> None:
        with self.guarded("why"), self._lock:
            self._draw_why()

    def _draw_why(self) -> None:
        """The chosen task's blocks (figure and table), who crowds and opposes it, the what-if and suggestion."""
        d, task = self.diagnosis, self.why_task.value
        if d is None or task not in set(d.tasks["task"]):
            return
        fig = _panel_style(figure_block_costs(d, task, top=_WHY_TOP))
        if "why" in self.figures:
            refresh(self.figures["why"], fig)
        else:
            self.figures["why"] = figure_widget(fig)
            self.why_figure.children = [self.figures["why"]]
        self._why_said()
        self.whatif_table.value = _whatif_html(d.whatif, task)

    def _why_said(self) -> None:
        """The Why view's text, which says when the diagnosis is of an earlier merge than the one on screen."""
        d, task = self.diagnosis, self.why_task.value
        if d is not None and task in set(d.tasks["task"]):
            stale = self._diagnosed is not self.merged
            self.why_text.value = _why_html(d, task, _label(self._diagnosed), stale=stale)

    def _wire_clicks(self) -> None:
        """A click on a task's bar (or mark) in the accuracy panel picks that task for "Why?"."""
        fw = self.figures.get("accuracy")
        for trace in fw.data if fw is not None else ():
            trace.on_click(self._on_accuracy_click)

    def _on_accuracy_click(self, trace: Any, points: Any, state: Any) -> None:
        if not points.xs:
            return
        task = points.xs[0]
        if task in self.why_task.options:
            self.why_task.value = task
            if self.diagnosis is None:
                self._why.say(f"why: {task} chosen; press Why? to diagnose the merge on screen")
        else:
            self._why.say(f"why: {task} is not in the diagnosed merge; press Why? to diagnose the merge on screen")

    def apply_suggestion(self) -> bool:
        """The "Apply suggestion" button: set the method, its parameters (``alpha`` included) and the tasks to
        the diagnosis' :class:`~weightlens.diagnosis.Suggestion`, then merge again (once). False (the reason in
        the status line) when there is none to apply."""
        applied = False
        with self.guarded("apply suggestion"):
            d = self.diagnosis
            s = None if d is None else d.suggestion
            if s is None:
                raise InvalidParameterError("No suggestion to apply: diagnose a merge with a what-if first (Why?).")
            if s.method not in self.params:
                raise InvalidParameterError(f"The suggested method {s.method!r} is not one of the studio's "
                                            f"{list(self.params)}.")
            controls, values = self.params[s.method], {**s.params, "alpha": s.alpha}
            unknown = sorted(set(values) - set(controls))
            if unknown:
                raise InvalidParameterError(f"The suggestion sets {unknown}, which {s.method} does not have; its "
                                            f"parameters are {list(controls)}.")
            self._quiet = True  # one merge at the end, not one per control
            try:
                self.method.value = s.method
                for name, value in values.items():
                    _set_control(controls[name], value)
                tasks = set(d.tasks["task"])
                for task, box in self.task_boxes.items():
                    box.value = task in tasks
            finally:
                self._quiet = False
            applied = True
        if applied:
            self._update("suggestion", PANELS, recompute=True)
        return applied

    # ------------------------------------------------------------------ export
    def export(self, out_dir: str | Path | None = None, *, overwrite: bool | None = None) -> Path | None:
        """Write the current merge to ``out_dir`` (default: the path box) with :func:`export_merge`
        (safetensors shards, config, card, recipe) and report in the export status line. Returns the
        folder, or None when it failed (the reason is shown there and kept in ``last_error``)."""
        path = Path(out_dir if out_dir is not None else self.out_path.value).expanduser()
        overwrite = self.overwrite.value if overwrite is None else overwrite
        label, written, start = _label(self.merged), None, time.perf_counter()
        self.export_status.value = f"<i>exporting {label} to {path} ...</i>"
        with self.guarded("export"):
            written, what = export_merge(self.merged, path, overwrite=overwrite)
        if written is None:
            self.export_status.value = f"<span style='color:#b00020'>export failed: {self.last_error}</span>"
            return None
        self.export_status.value = (f"<span class='wl-export-ok'>Exported {label} to {written} ({what}) "
                                    f"in {time.perf_counter() - start:.1f} s</span>")
        return written


def _label(merged: MergeResult) -> str:
    return f"{merged.method} alpha={merged.alpha:.2f}"


_WHY_TOP = 12  # blocks drawn and listed for one task (highest predicted cost first)
_WHY_COLUMNS = ["rank", "block", "predicted_cost", "energy_share", "kept", "sign_lost", "crowded_by", "crowding",
                "opposed_by", "opposition", "measured_gain", "cost_to_others"]
_WHATIF_SHOWN = ["method", "alpha", "kept", "normalized_accuracy", "chosen", "report_normalized_accuracy"]


def _table(df: pd.DataFrame) -> str:
    return df.to_html(index=False, float_format=lambda v: f"{v:.3g}", na_rep="", escape=True, border=0,
                      classes="wl-table")


def _why_html(d: Any, task: str, label: str, *, stale: bool) -> str:
    """The Why view's text for ``task``: what was diagnosed, the task's sentence, its worst blocks and who
    crowds or opposes it there, and the suggestion."""
    source = "with restoration tests" if d.measured else "from the weights alone"
    head = f"Why? {label}, {source}" + (" (an earlier merge: press Why? again for the one on screen)" if stale else "")
    sentences = [line for line in d.summary().splitlines() if line.startswith(f"{task} loses")]
    rows = d.ranking(task).head(_WHY_TOP)
    who = sorted({c for c in (culprit(r) for _, r in rows.iterrows()) if c})
    parts = [f"<b>{html.escape(head)}</b>", *(f"<p>{html.escape(line)}</p>" for line in sentences)]
    if who:
        parts.append(f"<p>In its blocks: {html.escape('; '.join(who))}.</p>")
    parts.append(_table(rows[_WHY_COLUMNS]))
    if d.suggestion is not None:
        parts.append(f"<p><b>{html.escape(d.suggestion.sentence())}</b></p>")
    return "".join(parts)


def _whatif_html(whatif: pd.DataFrame, task: str) -> str:
    """The what-if rows of ``task`` (each method at its chosen coefficient when it has one); empty without."""
    rows = whatif[whatif["task"] == task] if not whatif.empty else whatif
    if rows.empty:
        return ""
    chosen = rows[rows["chosen"].fillna(False).astype(bool)]
    rows = (chosen if not chosen.empty else rows).sort_values(["method", "alpha"])
    return f"<b>What if ({html.escape(task)})</b>" + _table(rows[[c for c in _WHATIF_SHOWN if c in rows]])


def _set_control(control: widgets.ValueWidget, value: Any) -> None:
    """Set a parameter control to ``value``: a slider widened to hold it, a None text box emptied."""
    if isinstance(control, widgets.Text):
        control.value = "" if value is None else str(value)
        return
    if isinstance(control, (widgets.FloatSlider, widgets.IntSlider)):
        control.max, control.min = max(control.max, value), min(control.min, value)
    control.value = value


def _state(merged: MergeResult, comparison: Comparison | None, key_comparison: Comparison, *, key: str,
           metric: str) -> dict[str, Any]:
    """:attr:`MergeStudio.state`: the merge, its largest singular value at ``key``, per-task ``metric``."""
    spec = (comparison if comparison is not None else key_comparison).spectrum
    rows = spec[(spec["key"] == key) & (spec["which"] == "merged")]
    out = {
        "method": merged.method,
        "params": dict(merged.params),
        "tasks": list(merged.task_vectors.names),
        "key": key,
        "sigma1": float(rows["sigma"].max()) if not rows.empty else math.nan,
        "pending": comparison is None,
    }
    if comparison is not None:
        per_task = comparison.per_task
        rows = per_task[per_task["which"] == "merged"]
        out[metric] = dict(zip(rows["task"], rows[metric].astype(float)))
    return out


def _status_line(state: dict[str, Any], metric: str, seconds: float) -> str:
    """The studio's status line: method, parameters, tasks, sigma1, the whole model's mean ``metric``."""
    shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in state["params"].items())
    if state["pending"]:
        whole = "whole model: comparing in the background ..."
    else:
        values = [v for v in state[metric].values() if not math.isnan(v)]
        whole = f"mean {metric}={sum(values) / len(values) if values else math.nan:.4f}"
    return (f"{state['method']}: {shown} | tasks {', '.join(state['tasks'])} | sigma1={state['sigma1']:.6g} "
            f"| {whole} | updated in {seconds * 1000:.0f} ms")


class _Panels:
    """The comparison panels (spectrum, retained, conflicts), drawn by the pure builders.

    A panel is drawn again only when what it is drawn from changed. The legend names the method
    (``alpha`` is in the spectrum's title and the status line), so the per-task and sign panels
    change with ``alpha`` only where their numbers do (``kept``). While the whole-model comparison
    is pending only the spectrum is drawn, from the shown key's comparison.
    """

    def __init__(self) -> None:
        self._drawn: dict[str, tuple] = {}
        self._held: dict[str, Comparison] = {}  # holding a drawn comparison keeps the ids in _drawn valid

    def draw(self, names: Sequence[str], comparison: Comparison | None, key_comparison: Comparison, *,
             key: str, metric: str, changed_only: bool = False) -> dict[str, go.Figure]:
        """The figures among ``names``; with ``changed_only``, only those whose inputs changed."""
        out: dict[str, go.Figure] = {}
        for name in names:
            comp = comparison if comparison is not None else key_comparison if name == "spectrum" else None
            if comp is None:
                continue
            sig = _signature(name, comp, key=key, metric=metric)
            if changed_only and self._drawn.get(name) == sig:
                continue
            self._drawn[name], self._held[name] = sig, comp
            out[name] = _panel(name, comp, key=key, metric=metric)
        return out


def _signature(name: str, comp: Comparison, *, key: str, metric: str) -> tuple:
    """What panel ``name`` is drawn from; an unchanged signature means an unchanged figure."""
    if name == "spectrum":
        return ("spectrum", key, comp.params["alpha"], id(comp.spectrum))
    if name == "retained":
        rows = comp.per_task[["task", "which", metric]]
        return ("retained", comp.method, metric, tuple(map(tuple, rows.astype(str).to_numpy())))
    return ("conflicts", comp.method, id(comp.signs))


def _panel(name: str, comp: Comparison, *, key: str, metric: str) -> go.Figure:
    """Panel ``name`` of one comparison."""
    comps = {comp.method: comp}
    if name == "spectrum":
        fig = figure_merge_spectrum(comps, key)
        fig.update_layout(title=f"Spectrum of the update ({comp.method} alpha={comp.params['alpha']:.2f}): "
                                f"{short_key(key)}")
    elif name == "retained":
        fig = figure_retained_alignment(comps, metric=metric)
    else:
        fig = figure_merge_conflicts(comps)
    return _panel_style(fig)


def _choices(tv: TaskVectors, method: str, tasks: Sequence[str] | None, key: str | None, metric: str,
             keys: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """Check the studio's starting choices; the tasks ticked and the matrix keys offered."""
    get_method(method)
    if metric not in METRICS:
        raise InvalidParameterError(f"The 'metric' parameter must be one of {METRICS}. Got {metric!r} instead.")
    chosen = list(tasks) if tasks is not None else tv.names
    if [t for t in chosen if t not in tv.names] or len(chosen) < 2:
        raise InvalidParameterError(f"MergeStudio(tasks=...) needs at least two of {tv.names}; got {chosen}.")
    matrices = [k for k in (keys or tv.keys) if tv.kind(k) == "matrix"]
    if not matrices:
        raise InvalidParameterError("MergeStudio needs at least one matrix key to show a spectrum.")
    if key is not None and key not in matrices:
        raise InvalidParameterError(f"key={key!r} is not a matrix key of the task vectors.")
    return chosen, matrices


def score_merge(evaluate: Evaluate, merged: MergeResult, split: str, references: dict[tuple[str, str], float],
                job: Job) -> pd.DataFrame | None:
    """Accuracy of ``merged`` on each of its tasks next to the task's fine-tune (``task, model, accuracy``).

    Fine-tunes are scored once per ``(task, split)`` and kept in ``references``; the merge is
    materialised once for every task (a merge with per-task models, EMR: each task's own model, for it). Reports on ``job``; returns None as soon as ``job`` is
    superseded.
    """
    tv, tasks = merged.task_vectors, merged.task_vectors.names
    todo = [t for t in tasks if (t, split) not in references]
    job.start(len(tasks) + len(todo))
    job.say(f"accuracy: scoring {len(tasks)} tasks on {split} ...", busy=True)
    for task in todo:
        if not job.current:
            return None
        references[task, split] = float(evaluate(tv.finetuned_weights(task), task, split)["accuracy"])
        job.advance()
    per_task = getattr(merged, "has_task_models", False)  # EMR: each task scored on its own model
    state = None if per_task else {k: merged[k] for k in merged}
    rows = []
    for task in tasks:
        if not job.current:
            return None
        score = evaluate({k: v for k, v in merged.for_task(task).items()} if per_task else state, task, split)
        rows += [{"task": task, "model": "merged", "accuracy": float(score["accuracy"])},
                 {"task": task, "model": "fine-tuned", "accuracy": references[task, split]}]
        job.advance()
    return pd.DataFrame(rows, columns=["task", "model", "accuracy"])


def export_merge(merged: Mapping[str, torch.Tensor], path: str | Path, *, overwrite: bool = False) -> tuple[Path, str]:
    """Write ``merged`` with :func:`weightlens.io.export` (safetensors shards, config, card and the
    merge's recipe); returns the folder and what a status line says of it (writer and size)."""
    from weightlens.io import export

    written = Path(export(merged, path, overwrite=overwrite, progress=False))
    size = sum(f.stat().st_size for f in written.rglob("*") if f.is_file()) / 1e6
    return written, f"weightlens.io.export, {size:.1f} MB"
