"""Pieces shared by the widgets: in-place FigureWidget updates, debounced background work, errors,
headless display.

Nothing here computes a metric. :meth:`weightlens.merge.Comparison.rescaled` applies the scaling identities of
``weightlens.merge.compare`` under a change of ``alpha`` (documented there and checked against a
fresh :func:`~weightlens.merge.compare` in ``tests/test_widgets.py``).

plotly's ``FigureWidget`` syncs its full state (``_widget_data``/``_widget_layout``) only when it is
built; later edits reach the browser as one-shot messages. A view created afterwards (a page
reload, a second view, Voila) would rebuild from the stale state, so :func:`refresh` re-syncs after
every update.
"""

from __future__ import annotations

import html
import json
import os
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from copy import deepcopy
from typing import Any

import ipywidgets as widgets
import plotly.graph_objects as go
import plotly.io as pio
import torch

from weightlens.figures._keys import short_key
from weightlens.linalg import torch_threads

__all__ = [
    "HEADLESS_ENV",
    "Background",
    "Debouncer",
    "Job",
    "Panel",
    "figure_widget",
    "headless",
    "refresh",
    "resync",
    "short_key",
]

HEADLESS_ENV = "WEIGHTLENS_HEADLESS"
_SKIP_LAYOUT = ("template",)  # every builder uses one template; re-sending it costs time and bytes


def headless() -> bool:
    """True when ``$WEIGHTLENS_HEADLESS`` is set (``weightlens tour --headless``, notebook tests)."""
    return os.environ.get(HEADLESS_ENV, "") not in ("", "0")


# ------------------------------------------------------------------------------ figures
def figure_widget(fig: go.Figure) -> go.FigureWidget:
    """Wrap a complete figure, so the widget's initial full state is right (pitfall P1)."""
    return go.FigureWidget(fig)


def resync(fw: go.FigureWidget) -> None:
    """Copy the widget's current data and layout into its synced full state (pitfall P1)."""
    fw._widget_data = deepcopy(fw._data)
    fw._widget_layout = deepcopy(fw._layout_obj._props)


def _same_structure(fw: go.FigureWidget, fig: go.Figure) -> bool:
    return len(fw.data) == len(fig.data) and all(a.type == b.type for a, b in zip(fw.data, fig.data))


def refresh(fw: go.FigureWidget, fig: go.Figure) -> None:
    """Make ``fw`` show ``fig`` in place: one batched restyle and relayout when the traces match in
    number and type, else the traces are replaced. Layout properties that ``fig`` lacks are reset,
    and the full state is re-synced afterwards."""
    new_layout = {k: v for k, v in fig.layout.to_plotly_json().items() if k not in _SKIP_LAYOUT}
    old_layout = [k for k in fw.layout.to_plotly_json() if k not in _SKIP_LAYOUT]
    if not _same_structure(fw, fig):
        fw.data = []
        fw.add_traces(list(fig.data))
        traces = []
    else:
        traces = list(zip(fw.data, fig.data))
    with fw.batch_update():
        for old, new in traces:
            props = new.to_plotly_json()
            props.pop("uid", None)
            stale = {k: None for k in old.to_plotly_json() if k not in props and k not in ("uid", "type")}
            old.update({**stale, **props}, overwrite=True)
        fw.layout.update({**{k: None for k in old_layout if k not in new_layout}, **new_layout}, overwrite=True)
    resync(fw)


# ------------------------------------------------------------------------------ debouncing
def background_threads() -> AbstractContextManager[int]:
    """Half of torch's intra-op threads (at least one) for work on a background thread, restored after.

    A second OpenMP team started from a background thread contends with the kernel's (measured on 2
    cores: 1.5-2.5x slower SVDs); keeping half also leaves the kernel responsive. Only for work whose
    results are not cached for merges (model forwards when scoring): LAPACK's results depend on the
    thread count in the last bits, and a merge must come out bitwise the same whatever ran before it.
    """
    return torch_threads(max(1, torch.get_num_threads() // 2))


class Debouncer:
    """Run ``fn(*args)`` on a background thread ``delay`` seconds after the last :meth:`schedule`.

    Each call supersedes the previous one: a pending timer is cancelled, and a running ``fn`` can
    ask :meth:`current` whether its generation is still the latest and stop early.
    """

    def __init__(self, fn: Callable[..., None], delay: float) -> None:
        self._fn = fn
        self.delay = float(delay)
        self._cond = threading.Condition()
        self._gen = 0
        self._finished = 0
        self._timer: threading.Timer | None = None

    def schedule(self, *args: Any) -> int:
        """Start a new generation; returns its number (passed to ``fn`` as the first argument)."""
        with self._cond:
            self._gen += 1
            gen = self._gen
            if self._timer is not None:
                self._timer.cancel()
            self._timer = threading.Timer(self.delay, self._run, args=(gen, *args))
            self._timer.daemon = True
            self._timer.start()
        return gen

    def current(self, gen: int) -> bool:
        """True while ``gen`` is the latest generation."""
        return gen == self._gen

    def _run(self, gen: int, *args: Any) -> None:
        try:
            if self.current(gen):
                self._fn(gen, *args)
        finally:
            with self._cond:
                self._finished = max(self._finished, gen)
                self._cond.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the latest generation has run; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._finished >= self._gen, timeout)


class Job:
    """What a :class:`Background` function is handed: is it still the latest, and how to report."""

    def __init__(self, runner: Background, gen: int) -> None:
        self._runner = runner
        self.gen = gen

    @property
    def current(self) -> bool:
        """True while no newer :meth:`Background.schedule` superseded this job (else stop early)."""
        return self._runner.current(self.gen)

    def say(self, text: str, *, busy: bool = False) -> None:
        """Show ``text`` in the background status line (in italics while ``busy``)."""
        self._runner.say(text, busy=busy)

    def start(self, steps: int) -> None:
        """Reset the progress bar to ``steps`` steps."""
        self._runner.progress.max, self._runner.progress.value = max(1, int(steps)), 0

    def advance(self) -> None:
        """One step done."""
        self._runner.progress.value += 1


class Background:
    """Debounced work of a panel on a worker thread, with its own progress bar and status line.

    ``fn(job, *args)`` runs on a :class:`Debouncer` thread ``delay`` seconds after the last
    :meth:`schedule`; ``job`` (:class:`Job`) reports progress and tells whether a newer schedule
    superseded it. An exception is shown in ``panel`` (:meth:`Panel.guarded`) like a callback's.

    Attributes
    ----------
    progress : ipywidgets.IntProgress
    status : ipywidgets.HTML
    """

    def __init__(self, panel: Panel, fn: Callable[..., None], delay: float) -> None:
        self._panel = panel
        self._fn = fn
        self._debouncer = Debouncer(self._run, delay)
        self.progress = widgets.IntProgress(value=0, min=0, max=1, description="background")
        self.status = widgets.HTML()

    def schedule(self, note: str, *args: Any) -> int:
        """Say ``note`` (italics) now and run ``fn`` once the schedules stop for ``delay`` seconds."""
        self.say(note, busy=True)
        return self._debouncer.schedule(*args)

    def current(self, gen: int) -> bool:
        return self._debouncer.current(gen)

    def say(self, text: str, *, busy: bool = False) -> None:
        text = html.escape(text)
        self.status.value = f"<i>{text}</i>" if busy else text

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the latest scheduled work has finished; False on timeout."""
        return self._debouncer.wait(timeout)

    def _run(self, gen: int, *args: Any) -> None:
        with self._panel.guarded("background work"):
            self._fn(Job(self, gen), *args)


# ------------------------------------------------------------------------------ base panel
class Panel(widgets.VBox):
    """A ``VBox`` with a status line, an error ``Output`` and a headless display.

    Subclasses register their figure widgets in ``self.figures`` (name -> FigureWidget) and wrap
    callbacks in :meth:`guarded`: an exception is shown in the panel (status line and traceback in
    the ``Output``) and kept in :attr:`last_error`, so the UI stays usable.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.figures: dict[str, go.FigureWidget] = {}
        self.last_error: BaseException | None = None
        self.status = widgets.HTML(layout=widgets.Layout(min_height="1.6em"))
        self.errors = widgets.Output()

    def set_status(self, text: str, *, error: bool = False) -> None:
        """Show one line of text (escaped) in the status line."""
        color = "#b00020" if error else "#333"
        self.status.value = f"<span class='wl-status' style='color:{color}'>{html.escape(text)}</span>"

    @contextmanager
    def guarded(self, what: str) -> Iterator[None]:
        """Run a callback body; show any exception in the panel instead of losing it."""
        try:
            yield
        except Exception as err:  # noqa: BLE001  (shown to the user, kept in last_error)
            self.last_error = err
            self.set_status(f"{what} failed: {type(err).__name__}: {err}", error=True)
            self.errors.clear_output()
            with self.errors:
                traceback.print_exc()

    def snapshot(self) -> dict[str, go.Figure]:
        """Static copies of the figures as they are now (``go.Figure``), by name."""
        return {name: go.Figure(fw) for name, fw in self.figures.items()}

    def _ipython_display_(self) -> None:
        from IPython.display import HTML, display

        if not headless():
            display(self._repr_mimebundle_(), raw=True)
            return
        self._before_snapshot()
        display(HTML(f"<p><i>{html.escape(type(self).__name__)}: static snapshot (headless run); open the "
                     "notebook in JupyterLab for the interactive widget.</i></p>" + self.status.value
                     + self._snapshot_html()))
        for name, fig in self.snapshot().items():
            spec = json.loads(pio.to_json(fig, validate=False))
            display({"application/vnd.plotly.v1+json": spec, "text/plain": f"<{name} figure>"}, raw=True)

    def _before_snapshot(self) -> None:
        """Hook: finish pending background work before a headless snapshot."""

    def _snapshot_html(self) -> str:
        """Hook: HTML shown after the status line in a headless snapshot (before the figures)."""
        return ""

