"""``MergeStudio``: choose a merge method and its parameters, see what each task keeps, export.

A thin view over :func:`weightlens.merge.merge` and :func:`weightlens.merge.compare`; the
parameter controls are built from the registry's schemas (:func:`weightlens.merge.get_method`).
Figures come from :mod:`weightlens.figures.merge` and :mod:`weightlens.figures.task_accuracy`.

Speed: merges are lazy and their unscaled updates cached in ``tv.cache``; a comparison is computed
once per (tasks, method, parameters other than ``alpha``) and a move of ``alpha`` rescales it
(:meth:`~weightlens.merge.Comparison.rescaled`), so the slider never recomputes an SVD or
re-reads a tensor. A new method or parameter value is merged at once and the shown key's spectrum
drawn from a one-key comparison; the whole-model comparison behind the other panels, then the
accuracy (when ``evaluate`` is given), run on a background thread once the controls have been
still for ``debounce`` seconds, with a progress bar. A newer change supersedes that work: a
finished comparison is kept in the cache, scoring stops early.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import ipywidgets as widgets
import pandas as pd
import plotly.graph_objects as go
import torch

from weightlens.errors import InvalidParameterError
from weightlens.figures.merge import figure_merge_conflicts, figure_merge_spectrum, figure_retained_alignment
from weightlens.figures.task_accuracy import figure_task_accuracy
from weightlens.merge import alpha_grid, compare, get_method, list_methods, merge
from weightlens.merge.registry import Param
from weightlens.taskvectors import TaskVectors
from weightlens.widgets._common import (
    Debouncer,
    Panel,
    background_threads,
    figure_widget,
    refresh,
    short_key,
)

__all__ = ["METRICS", "PANELS", "MergeStudio", "param_control"]

METRICS = ("sar", "kept", "cos", "agreement")
Evaluate = Callable[[Mapping[str, torch.Tensor], str, str], Mapping[str, float]]
_CACHE_SIZE = 8  # comparisons kept per studio
PANELS = ("spectrum", "retained", "conflicts")
_HEIGHT, _WIDTH = 420, 600  # px, every panel (a FigureWidget does not follow its container's width)


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
        Method shown first (any of ``weightlens.merge.list_methods()``).
    tasks : sequence of str, optional
        Tasks ticked at start (default: all).
    key : str, optional
        Matrix key whose spectrum is shown (default: a matrix in the middle of the model).
    metric : {"sar", "kept", "cos", "agreement"}, default="sar"
        Per-task column of the retained-alignment panel.
    split : str, default="val"
        Split passed to ``evaluate``.
    debounce : float, default=0.5
        Seconds the controls must be still before accuracy is re-evaluated.
    out_dir : str, default="merged-model"
        Initial export folder.
    keys : sequence of str, optional
        Restrict the comparison to these keys (all task-vector keys by default).

    Attributes
    ----------
    merged : MergeResult
        The current merge (lazy: keys are computed when read; updates cached).
    comparison : Comparison
        Its comparison with task arithmetic.
    scores : DataFrame
        Latest accuracy table (``task, model, accuracy``), empty without ``evaluate``.
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
        split: str = "val",
        debounce: float = 0.5,
        out_dir: str = "merged-model",
        keys: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(task_vectors, TaskVectors):
            raise InvalidParameterError(f"MergeStudio needs TaskVectors; got {type(task_vectors).__name__}.")
        self.tv = task_vectors
        self._evaluate = evaluate
        self.split = split
        self._keys = list(keys) if keys is not None else None
        self._comparisons: OrderedDict[tuple, Any] = OrderedDict()
        self._key_comparisons: OrderedDict[tuple, Any] = OrderedDict()
        self._references: dict[tuple[str, str], float] = {}
        self._lock = threading.RLock()  # the panels' state: callbacks vs background thread
        self._compare_lock = threading.Lock()  # one whole-model compare at a time
        self.scores = pd.DataFrame(columns=["task", "model", "accuracy"])
        self._build_controls(method, tasks, key, metric, out_dir)
        self._drawn: dict[str, tuple] = {}
        self._held: dict[str, tuple] = {}
        start = time.perf_counter()
        self._recompute()
        if self.comparison is None:  # the first comparison is made here, before anything is shown
            self.comparison = compare(self.merged.task_vectors, self.merged, keys=self._keys)
            self._key_comparison = self.comparison
            self._store(self._comparisons, self._tag, self.comparison)
        figs = self._figures()
        self.figures.update({name: figure_widget(fig) for name, fig in figs.items()})
        self.last_update_s = time.perf_counter() - start
        self._debouncer = Debouncer(self._settle, debounce)
        self._layout()
        self._describe()
        self._schedule()

    # ------------------------------------------------------------------ controls
    def _build_controls(self, method: str, tasks: Sequence[str] | None, key: str | None, metric: str,
                        out_dir: str) -> None:
        get_method(method)
        if metric not in METRICS:
            raise InvalidParameterError(f"The 'metric' parameter must be one of {METRICS}. Got {metric!r} instead.")
        names = self.tv.names
        chosen = list(tasks) if tasks is not None else names
        if [t for t in chosen if t not in names] or len(chosen) < 2:
            raise InvalidParameterError(f"MergeStudio(tasks=...) needs at least two of {names}; got {chosen}.")
        matrices = [k for k in (self._keys or self.tv.keys) if self.tv.kind(k) == "matrix"]
        if not matrices:
            raise InvalidParameterError("MergeStudio needs at least one matrix key to show a spectrum.")
        if key is not None and key not in matrices:
            raise InvalidParameterError(f"key={key!r} is not a matrix key of the task vectors.")
        style = {"description_width": "110px"}
        self.method = widgets.Dropdown(options=[(get_method(m).pretty_name, m) for m in list_methods()],
                                       value=method, description="method", style=style)
        self.params: dict[str, dict[str, widgets.ValueWidget]] = {
            m: {p.name: param_control(p, method=m, n_tasks=len(chosen)) for p in get_method(m).params.values()}
            for m in list_methods()
        }
        self.task_boxes = {t: widgets.Checkbox(value=t in chosen, description=t, indent=False,
                                               layout=widgets.Layout(width="auto")) for t in names}
        self.key = widgets.Dropdown(options=[(short_key(k), k) for k in matrices],
                                    value=key or matrices[len(matrices) // 2], description="spectrum of",
                                    style=style, layout=widgets.Layout(width="520px"))
        self.metric = widgets.Dropdown(options=METRICS, value=metric, description="per task", style=style)
        self.param_box = widgets.VBox(list(self.params[method].values()))
        self.progress = widgets.IntProgress(value=0, min=0, max=1, description="background")
        self.eval_status = widgets.HTML()
        self.out_path = widgets.Text(value=out_dir, description="export to", style=style,
                                     layout=widgets.Layout(width="420px"))
        self.overwrite = widgets.Checkbox(value=False, description="overwrite", indent=False,
                                          layout=widgets.Layout(width="auto"))
        self.export_button = widgets.Button(description="Export", icon="download", button_style="primary")
        self.export_status = widgets.HTML()
        self.method.observe(self._on_method, names="value")
        for m, controls in self.params.items():
            for name, control in controls.items():
                control.observe(partial(self._on_param, what="alpha" if name == "alpha" else "parameters"),
                                names="value")
        for box in self.task_boxes.values():
            box.observe(self._on_param, names="value")
        self.key.observe(self._on_key, names="value")
        self.metric.observe(self._on_metric, names="value")
        self.export_button.on_click(lambda _: self.export())

    def _layout(self) -> None:
        figs = self.figures
        grid = [figs["spectrum"], figs["retained"], figs["conflicts"]]
        if "accuracy" in figs:
            grid.append(figs["accuracy"])
        tasks_row = widgets.HBox([widgets.HTML("<b>tasks</b>&nbsp;"), *self.task_boxes.values()],
                                 layout=widgets.Layout(flex_flow="row wrap", gap="12px"))
        export_row = widgets.HBox([self.out_path, self.overwrite, self.export_button],
                                  layout=widgets.Layout(gap="12px", align_items="center"))
        self.children = [
            widgets.HTML("<b>Merge studio</b>"),
            widgets.HBox([self.method, tasks_row], layout=widgets.Layout(gap="24px")),
            self.param_box,
            widgets.HBox([self.key, self.metric], layout=widgets.Layout(gap="12px")),
            self.status,
            widgets.GridBox(grid, layout=widgets.Layout(grid_template_columns="repeat(2, minmax(0, 1fr))",
                                                        grid_gap="8px")),
            widgets.HBox([self.progress, self.eval_status], layout=widgets.Layout(gap="12px")),
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
        shown = self.comparison if self.comparison is not None else self._key_comparison
        spec = shown.spectrum
        rows = spec[(spec["key"] == self.key.value) & (spec["which"] == "merged")]
        out = {
            "method": self.merged.method,
            "params": dict(self.merged.params),
            "tasks": list(self.merged.task_vectors.names),
            "key": self.key.value,
            "sigma1": float(rows["sigma"].max()) if not rows.empty else math.nan,
            "pending": self.comparison is None,
        }
        if self.comparison is not None:
            per_task = self.comparison.per_task
            merged = per_task[per_task["which"] == "merged"]
            out[self.metric.value] = dict(zip(merged["task"], merged[self.metric.value].astype(float)))
        return out

    def _selected_tv(self) -> TaskVectors:
        tasks = self.tasks
        return self.tv if tasks == self.tv.names else self.tv.subset(tasks)

    def _cached(self, table: OrderedDict, tag: tuple, alpha: float) -> Any:
        """A cached comparison under ``tag`` rescaled to ``alpha``, or None."""
        comp = table.get(tag)
        if comp is None or alpha <= 0:
            return None
        table.move_to_end(tag)
        return comp.rescaled(alpha)

    def _store(self, table: OrderedDict, tag: tuple, comp: Any) -> None:
        if float(comp.params["alpha"]) > 0:
            table[tag] = comp
            while len(table) > _CACHE_SIZE:
                table.popitem(last=False)

    def _recompute(self) -> None:
        """Merge (lazy) and find the comparison: cached and rescaled when known, else the shown key's
        now and the whole model's later (:meth:`_settle`, in the background)."""
        tv = self._selected_tv()
        self.merged = merge(tv, method=self.method.value, lazy=True, **self.method_params)
        alpha = self.merged.alpha
        frozen = tuple(sorted((k, v) for k, v in self.merged.params.items() if k != "alpha"))
        self._tag = (tuple(tv.names), self.method.value, frozen, tuple(self._keys or ()))
        self.comparison = self._cached(self._comparisons, self._tag, alpha)
        self._key_comparison = self.comparison
        if self.comparison is None:
            self._key_comparison = self._key_only()

    def _key_only(self) -> Any:
        """Comparison restricted to the shown key (cheap: one key's update, SVD and signs)."""
        tag = (*self._tag, self.key.value)
        comp = self._cached(self._key_comparisons, tag, self.merged.alpha)
        if comp is None:
            comp = compare(self.merged.task_vectors, self.merged, keys=[self.key.value])
            self._store(self._key_comparisons, tag, comp)
        return comp

    def _label(self) -> str:
        return f"{self.merged.method} alpha={self.merged.alpha:.2f}"

    def _inputs(self, name: str, comp: Any) -> tuple:
        """What figure ``name`` is drawn from; an unchanged signature means an unchanged figure."""
        if name == "spectrum":
            return ("spectrum", self.key.value, comp.params["alpha"], id(comp.spectrum))
        if name == "retained":
            rows = comp.per_task[["task", "which", self.metric.value]]
            return ("retained", comp.method, self.metric.value, tuple(map(tuple, rows.astype(str).to_numpy())))
        return ("conflicts", comp.method, id(comp.signs))

    def _figures(self, names: Sequence[str] = ("spectrum", "retained", "conflicts", "accuracy"),
                 *, changed_only: bool = False) -> dict[str, go.Figure]:
        """Figures from the pure builders; with ``changed_only``, only those whose inputs changed.

        The legend names the method (``alpha`` is in the spectrum's title and the status line), so
        the per-task and sign panels change with ``alpha`` only where their numbers do (``kept``).
        While the whole-model comparison is pending only the spectrum is drawn.
        """
        out: dict[str, go.Figure] = {}
        for name in names:
            if name == "accuracy":
                if self._evaluate is not None and not changed_only:
                    out[name] = figure_task_accuracy(self.scores, split=self.split)
                continue
            comp = self.comparison if self.comparison is not None else (
                self._key_comparison if name == "spectrum" else None)
            if comp is None:
                continue
            sig = self._inputs(name, comp)
            if changed_only and self._drawn.get(name) == sig:
                continue
            self._drawn[name], self._held[name] = sig, comp  # holding comp keeps the ids in sig valid
            comps = {self.merged.method: comp}
            if name == "spectrum":
                fig = figure_merge_spectrum(comps, self.key.value)
                fig.update_layout(title=f"Spectrum of the update ({self._label()}): {short_key(self.key.value)}")
            elif name == "retained":
                fig = figure_retained_alignment(comps, metric=self.metric.value)
            else:
                fig = figure_merge_conflicts(comps)
            out[name] = _panel_style(fig)
        return out

    def _redraw(self, names: Sequence[str]) -> None:
        for name, fig in self._figures(names, changed_only=True).items():
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

    def _on_param(self, change: dict[str, Any], what: str = "parameters") -> None:
        """A method parameter (``what`` names it in the status line) or a task box changed: merge again.
        A move of ``alpha`` alone finds the cached comparison and rescales it (:meth:`_recompute`): no SVD."""
        self._update(what, PANELS, recompute=True)

    def _on_method(self, change: dict[str, Any]) -> None:
        self.param_box.children = list(self.params[self.method.value].values())
        self._update("method", PANELS, recompute=True)

    def _on_key(self, change: dict[str, Any]) -> None:
        self._update("spectrum key", ("spectrum",))

    def _on_metric(self, change: dict[str, Any]) -> None:
        self._update("metric", ("retained",))

    def _describe(self) -> None:
        s = self.state
        shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in s["params"].items())
        if s["pending"]:
            whole = "whole model: comparing in the background ..."
        else:
            values = [v for v in s[self.metric.value].values() if not math.isnan(v)]
            whole = f"mean {self.metric.value}={sum(values) / len(values) if values else math.nan:.4f}"
        self.set_status(f"{s['method']}: {shown} | tasks {', '.join(s['tasks'])} | sigma1={s['sigma1']:.6g} "
                        f"| {whole} | updated in {self.last_update_s * 1000:.0f} ms")

    # ------------------------------------------------------------------ background work
    def _schedule(self) -> None:
        """After the controls settle: the whole-model comparison if missing, then accuracy."""
        if self.comparison is None:
            self.eval_status.value = "<i>whole model: waiting for the controls to settle ...</i>"
        elif self._evaluate is not None:
            self.eval_status.value = "<i>accuracy: waiting for the controls to settle ...</i>"
        else:
            return
        self._debouncer.schedule(self.merged, self._tag)

    def _settle(self, gen: int, merged: Any, tag: tuple) -> None:
        """Background thread: compare the whole model (one compare at a time), show it if it is still
        the merge on screen (rescaled to the current alpha), then score accuracy."""
        with self.guarded("background work"):
            if tag not in self._comparisons:
                self.eval_status.value = "<i>whole model: comparing with task arithmetic ...</i>"
                self.progress.max, self.progress.value = 1, 0
                with self._compare_lock:
                    if tag not in self._comparisons:
                        self._store(self._comparisons, tag, compare(merged.task_vectors, merged, keys=self._keys))
                self.progress.value = 1
                with self._lock:
                    if self._tag == tag and self.comparison is None and self.merged.alpha > 0:
                        self.comparison = self._cached(self._comparisons, tag, self.merged.alpha)
                        self._key_comparison = self.comparison
                        self._redraw(PANELS)
                        self._describe()
                if self._evaluate is None:
                    self.eval_status.value = "whole model compared"
            if self._evaluate is not None and self._debouncer.current(gen):
                with background_threads():  # model forwards: keep one OpenMP team off the kernel's
                    self._score(gen, merged, tuple(merged.task_vectors.names))

    def _score(self, gen: int, merged: Any, tasks: tuple[str, ...]) -> None:
        """Fine-tuned references once, then the merged model on every task (stops when superseded)."""
        todo = [t for t in tasks if (t, self.split) not in self._references]
        self.progress.max, self.progress.value = len(tasks) + len(todo), 0
        self.eval_status.value = f"<i>accuracy: scoring {len(tasks)} tasks on {self.split} ...</i>"
        for task in todo:
            if not self._debouncer.current(gen):
                return
            score = self._evaluate(self.tv.finetuned[task], task, self.split)
            self._references[task, self.split] = float(score["accuracy"])
            self.progress.value += 1
        state = {k: merged[k] for k in merged}  # materialise once for every task
        rows = []
        for task in tasks:
            if not self._debouncer.current(gen):
                return
            score = self._evaluate(state, task, self.split)
            rows += [{"task": task, "model": "merged", "accuracy": float(score["accuracy"])},
                     {"task": task, "model": "fine-tuned", "accuracy": self._references[task, self.split]}]
            self.progress.value += 1
        with self._lock:
            if not self._debouncer.current(gen):
                return
            self.scores = pd.DataFrame(rows, columns=["task", "model", "accuracy"])
            label = f"{merged.method} alpha={merged.alpha:.2f}"
            fig = figure_task_accuracy(self.scores, split=self.split, label=label)
            refresh(self.figures["accuracy"], _panel_style(fig))
            mean = self.scores[self.scores["model"] == "merged"]["accuracy"].mean()
            self.eval_status.value = f"accuracy ({self.split}) of {label}: mean {mean:.4f}"

    def wait(self, timeout: float | None = 600.0) -> bool:
        """Block until the latest background work (whole-model comparison, accuracy) has finished;
        False if ``timeout`` seconds passed first."""
        return self._debouncer.wait(timeout)

    def _before_snapshot(self) -> None:
        self.wait()

    # ------------------------------------------------------------------ export
    def export(self, out_dir: str | Path | None = None, *, overwrite: bool | None = None) -> Path | None:
        """Write the current merge to ``out_dir`` (default: the path box) and report in the status line.

        Uses ``weightlens.io.export`` (safetensors shards, config, card, recipe). Returns the folder,
        or None when it failed (the reason is shown in the export status line and kept in
        ``last_error``).
        """
        path = Path(out_dir if out_dir is not None else self.out_path.value).expanduser()
        overwrite = self.overwrite.value if overwrite is None else overwrite
        self.export_status.value = f"<i>exporting {self._label()} to {path} ...</i>"
        start = time.perf_counter()
        written: Path | None = None
        with self.guarded("export"):
            written, how = _write(self.merged, path, overwrite=overwrite)
        if written is None:
            self.export_status.value = f"<span style='color:#b00020'>export failed: {self.last_error}</span>"
            return None
        size = sum(f.stat().st_size for f in written.rglob("*") if f.is_file()) / 1e6
        self.export_status.value = (f"<span class='wl-export-ok'>Exported {self._label()} to {written} "
                                    f"({how}, {size:.1f} MB) in {time.perf_counter() - start:.1f} s</span>")
        return written


def _write(merged: Mapping[str, torch.Tensor], path: Path, *, overwrite: bool) -> tuple[Path, str]:
    """Export with ``weightlens.io.export``; also name the writer, for the status line."""
    from weightlens.io import export

    return Path(export(merged, path, overwrite=overwrite, progress=False)), "weightlens.io.export"
