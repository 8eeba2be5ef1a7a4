"""Widgets without a browser: set control values as a user would, compare the figures' data with
what the analysis and merge functions compute on their own (a fresh cache, so nothing is shared
with the widget's shortcuts)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

import weightlens as wl
from weightlens.analysis import analyze, block_of
from weightlens.figures.analysis import figure_sar_layers, figure_sign_conflicts
from weightlens.merge import compare, get_method, list_methods, merge
from weightlens.widgets import InterferenceDashboard, MergeStudio
from weightlens.widgets._common import refresh, resync

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def tv(digits_zoo):
    return digits_zoo.task_vectors()


def fresh(zoo_, tasks=None):
    """Task vectors with their own empty cache: the independent reference."""
    return zoo_.task_vectors(tasks)


def trace(fw, name, *, xaxis=None):
    hits = [t for t in fw.data if t.name == name and (xaxis is None or t.xaxis == xaxis)]
    assert len(hits) == 1, [t.name for t in fw.data]
    return hits[0]


def merged_sigma(comparison, key):
    s = comparison.spectrum
    return s[(s["key"] == key) & (s["which"] == "merged")]["sigma"].to_numpy()


def assert_in_sync(fw):
    """Pitfall P1: the synced full state equals the figure (a reloaded page shows the current one)."""
    from plotly.utils import PlotlyJSONEncoder

    def js(x):
        return json.dumps(x, cls=PlotlyJSONEncoder, sort_keys=True)

    assert js(fw._widget_data) == js(fw._data)
    assert js(fw._widget_layout) == js(fw._layout_obj._props)


def test_import_stays_light():
    code = ("import sys, weightlens, weightlens.widgets; "
            "print(any(m in sys.modules for m in ('plotly', 'ipywidgets')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_lmc_explorer_is_exported_lazily():
    import weightlens.widgets as w

    assert {"InterferenceDashboard", "MergeStudio", "LMCExplorer"} <= set(dir(w))
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        w.Nope  # noqa: B018


# ------------------------------------------------------------------------------ dashboard
def test_dashboard_says_it_is_analysing_before_a_new_task_set(tv, monkeypatch):
    dash = InterferenceDashboard(tv)
    seen, original = [], dash._report_for
    monkeypatch.setattr(dash, "_report_for", lambda tasks: (seen.append(dash.status.value), original(tasks))[1])
    dash.task_boxes[dash.tasks[0]].value = False
    assert len(seen) == 1 and "analysing" in seen[0]
    assert "updated in" in dash.status.value


def test_dashboard_spectra_follow_tasks_and_block(tv, digits_zoo):
    dash = InterferenceDashboard(tv)
    ref = analyze(fresh(digits_zoo), progress=False)
    key = ref.spectra["key"].iloc[0]
    sv = ref.singular_values
    for task in [*ref.tasks, "sum"]:
        expected = sv[(sv["key"] == key) & (sv["task"] == task)].sort_values("index")["sigma"].to_numpy()
        np.testing.assert_allclose(trace(dash.figures["spectra"], task, xaxis="x").y, expected, rtol=1e-6)

    dropped, kept = ref.tasks[0], list(ref.tasks[1:])
    dash.task_boxes[dropped].value = False
    sub = analyze(fresh(digits_zoo, kept), progress=False)
    names = {t.name for t in dash.figures["spectra"].data}
    assert dropped not in names and set(kept) | {"sum"} <= names
    sv = sub.singular_values
    expected = sv[(sv["key"] == key) & (sv["task"] == "sum")].sort_values("index")["sigma"].to_numpy()
    np.testing.assert_allclose(trace(dash.figures["spectra"], "sum", xaxis="x").y, expected, rtol=1e-5)

    signs = figure_sign_conflicts(sub.signs, by="block")
    np.testing.assert_allclose(dash.figures["signs"].data[0].y, signs.data[0].y, rtol=1e-9)

    block = block_of(key)
    dash.block.value = block
    titles = [a.text for a in dash.figures["spectra"].layout.annotations]
    assert titles and all(block_of(t) == block for t in titles)
    assert list(dash.figures["signs"].data[0].x) == [k.removesuffix(".weight") for k in sub.keys
                                                    if block_of(k) == block]
    dash.alignment_view.value = "per layer"
    rows = sub.alignment[sub.alignment["block"] == block]
    expected = figure_sar_layers(rows, reference="sum", tasks=kept).data[0].z
    np.testing.assert_allclose(np.asarray(dash.figures["alignment"].data[0].z, float), np.asarray(expected, float))
    assert dash.last_error is None
    for fw in dash.figures.values():
        assert_in_sync(fw)


def test_dashboard_from_report_filters_rows(tv):
    report = analyze(tv, progress=False)
    dash = InterferenceDashboard(report, tasks=list(report.tasks[:3]))
    names = {t.name for t in dash.figures["spectra"].data}
    assert report.tasks[3] not in names and "sum" in names
    assert "sum and sign conflicts cover all" in dash.status.value
    dash.task_boxes[report.tasks[0]].value = False
    dash.task_boxes[report.tasks[1]].value = False
    assert "at least two tasks" in dash.status.value
    assert report.tasks[1] in {t.name for t in dash.figures["spectra"].data}  # last selection kept
    with pytest.raises(wl.InvalidParameterError, match="at least two"):
        InterferenceDashboard(report, tasks=[report.tasks[0]])


# ------------------------------------------------------------------------------ studio
def test_controls_come_from_the_registry(tv):
    studio = MergeStudio(tv)
    assert [o[1] for o in studio.method.options] == [m for m in list_methods() if not get_method(m).needs_data]
    for method in list_methods():
        assert list(studio.params[method]) == list(get_method(method).params)
    ties = studio.params["ties"]
    assert ties["density"].value == 0.2 and ties["scope"].options == ("global", "tensor")
    assert studio.params["star"]["alpha"].value == pytest.approx(1 / len(tv))


def test_alpha_slider_updates_every_panel(tv, digits_zoo):
    studio = MergeStudio(tv, metric="kept")
    key = studio.key.value
    slider = studio.params["task_arithmetic"]["alpha"]
    before = np.array(trace(studio.figures["spectrum"], "task_arithmetic").y)
    slider.value = 0.55
    ref = compare(fresh(digits_zoo), merge(fresh(digits_zoo), method="task_arithmetic", alpha=0.55))
    after = np.array(trace(studio.figures["spectrum"], "task_arithmetic").y)
    want = merged_sigma(ref, key)  # float32 SVDs agree to ~eps * sigma_1 (thread counts change the rounding)
    np.testing.assert_allclose(after, want, rtol=1e-5, atol=1e-6 * want.max())
    np.testing.assert_allclose(after / before, 0.55 / 0.3, rtol=1e-5)
    kept = ref.per_task[ref.per_task["which"] == "merged"]["kept"].to_numpy()
    np.testing.assert_allclose(trace(studio.figures["retained"], "task_arithmetic").y, kept, rtol=1e-5)
    assert "alpha=0.55" in studio.figures["spectrum"].layout.title.text
    assert f"sigma1={merged_sigma(ref, key).max():.6g}" in studio.status.value
    assert studio.last_error is None
    for fw in studio.figures.values():
        assert_in_sync(fw)


@pytest.mark.parametrize("method, params", [
    ("ties", {"density": 0.4}), ("dare", {"density": 0.7}), ("tsv", {}), ("iso_c", {}),
    ("iso_cts", {"common_fraction": 0.6}), ("star", {"eta": 60.0}),
])
def test_method_switch_and_parameters(tv, digits_zoo, method, params):
    studio = MergeStudio(tv)
    studio.method.value = method
    for name, value in params.items():
        studio.params[method][name].value = value
    alpha = round(studio.params[method]["alpha"].value * 0.5, 2)
    studio.params[method]["alpha"].value = alpha
    assert studio.wait(300) and not studio.state["pending"]
    ref = compare(fresh(digits_zoo), merge(fresh(digits_zoo), method=method, alpha=alpha, **params))
    y = trace(studio.figures["spectrum"], method).y
    np.testing.assert_allclose(y, merged_sigma(ref, studio.key.value), rtol=1e-4, atol=1e-7)
    sar = ref.per_task[ref.per_task["which"] == "merged"]["sar"].to_numpy()
    np.testing.assert_allclose(trace(studio.figures["retained"], method).y, sar, rtol=1e-5)
    conflicts = ref.conflicts().set_index("which").loc["merged"]
    zeroed = trace(studio.figures["conflicts"], "zeroed").y[1]
    assert zeroed == pytest.approx(float(conflicts["zeroed"]), rel=1e-6, abs=1e-12)
    assert studio.state["params"] == {**get_method(method).resolve({}, len(tv)), **params, "alpha": alpha}
    assert studio.last_error is None


def test_task_selection_and_key(tv, digits_zoo):
    studio = MergeStudio(tv, method="tsv")
    studio.task_boxes[tv.names[1]].value = False
    kept = [t for t in tv.names if t != tv.names[1]]
    other = [k for k in studio.key.options if k[1] != studio.key.value][0][1]
    studio.key.value = other  # while the whole model is compared: the shown key alone, now
    ref = compare(fresh(digits_zoo, kept), merge(fresh(digits_zoo, kept), method="tsv"))
    want = merged_sigma(ref, other)
    np.testing.assert_allclose(trace(studio.figures["spectrum"], "tsv").y, want, rtol=1e-5, atol=1e-6 * want.max())
    assert studio.wait(300)
    want = merged_sigma(ref, other)
    np.testing.assert_allclose(trace(studio.figures["spectrum"], "tsv").y, want, rtol=1e-5, atol=1e-6 * want.max())
    assert list(trace(studio.figures["retained"], "tsv").x) == kept
    for t in kept[:-1]:
        studio.task_boxes[t].value = False
    assert "at least two tasks" in studio.status.value
    assert studio.wait(300)
    assert studio.state["tasks"] == kept[-2:]  # the last merge with two tasks is still shown


def test_accuracy_is_debounced_and_matches_evaluate(tv, digits_zoo):
    calls: list[float] = []
    lock = threading.Lock()

    def evaluate(weights, task, split):
        with lock:
            calls.append(task)
        return digits_zoo.evaluate(weights, task, split)

    studio = MergeStudio(tv, evaluate=evaluate, debounce=0.3)
    slider = studio.params["task_arithmetic"]["alpha"]
    for value in (0.4, 0.5, 0.6):  # quicker than the debounce: only the last one is scored
        slider.value = value
    assert studio.wait(120)
    merged = merge(fresh(digits_zoo), method="task_arithmetic", alpha=0.6)
    for task in tv.names:
        got = studio.scores.query("task == @task and model == 'merged'")["accuracy"].item()
        assert got == pytest.approx(digits_zoo.evaluate(merged, task, "val")["accuracy"])
    assert len(calls) == 2 * len(tv)  # fine-tuned references once, then the final merge once
    y = trace(studio.figures["accuracy"], "task_arithmetic alpha=0.60").y
    np.testing.assert_allclose(y, studio.scores.query("model == 'merged'")["accuracy"])
    assert studio.progress.value == studio.progress.max and studio.last_error is None


def test_export_writes_the_current_merge(tv, digits_zoo, tmp_path):
    studio = MergeStudio(tv, method="ties")
    studio.params["ties"]["alpha"].value = 0.8
    out = studio.export(tmp_path / "m")
    assert out is not None and "Exported ties alpha=0.80" in studio.export_status.value
    expected = merge(fresh(digits_zoo), method="ties", alpha=0.8)
    back = wl.load(out)
    for key in expected:
        torch.testing.assert_close(back[key], expected[key])
    assert studio.export(tmp_path / "m") is None and "export failed" in studio.export_status.value


def test_refresh_replaces_traces_and_resyncs():
    import plotly.graph_objects as go

    from weightlens.widgets._common import figure_widget

    fw = figure_widget(go.Figure(go.Scatter(y=[1, 2], name="a"), layout={"title": "one", "height": 300}))
    refresh(fw, go.Figure([go.Bar(y=[3], name="b"), go.Bar(y=[4], name="c")], layout={"title": "two"}))
    assert [t.name for t in fw.data] == ["b", "c"] and fw.layout.title.text == "two"
    assert fw.layout.height is None
    assert_in_sync(fw)
    fw._widget_data = []
    resync(fw)
    assert_in_sync(fw)


def test_headless_display_shows_static_figures(tv, monkeypatch):
    import IPython.display

    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda obj, **kw: shown.append(obj))
    monkeypatch.setenv("WEIGHTLENS_HEADLESS", "1")
    studio = MergeStudio(tv)
    studio._ipython_display_()
    specs = [o["application/vnd.plotly.v1+json"] for o in shown if isinstance(o, dict)]
    assert len(specs) == len(studio.figures) and all(s["data"] for s in specs)
    monkeypatch.delenv("WEIGHTLENS_HEADLESS")
    shown.clear()
    studio._ipython_display_()
    assert len(shown) == 1 and "application/vnd.jupyter.widget-view+json" in shown[0]


def test_background_work_runs_on_a_worker_thread_and_scoring_on_half_the_threads():
    from weightlens.widgets._common import Debouncer, background_threads

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    seen = []

    def work(gen):
        seen.append((threading.current_thread() is threading.main_thread(), torch.get_num_threads()))
        with background_threads():
            seen.append(torch.get_num_threads())
        seen.append(torch.get_num_threads())

    try:
        debouncer = Debouncer(work, delay=0.0)
        debouncer.schedule()
        assert debouncer.wait(30)
        assert seen == [(False, 2), 1, 2]  # a worker thread; one of two threads inside, restored after
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_studio_options_and_the_keyword_forms(tv):
    from weightlens.widgets.studio import StudioOptions

    keys = [k for k in tv.keys if tv.kind(k) == "matrix"][:2]
    old = MergeStudio(tv, split="test", debounce=0.0, out_dir="here", keys=keys)
    new = MergeStudio(tv, options=StudioOptions(split="test", debounce=0.0, out_dir="here", keys=tuple(keys)))
    for studio in (old, new):
        assert studio.options == StudioOptions("test", 0.0, "here", tuple(keys))
        assert studio.split == "test" and studio.out_path.value == "here"
        assert set(studio.comparison.signs["key"]) == set(keys)
    assert MergeStudio(tv, options=StudioOptions(debounce=0.0), split="test").options.split == "test"
    with pytest.raises(wl.InvalidParameterError, match=r"unknown option\(s\) \['debounse'\].*StudioOptions"):
        MergeStudio(tv, debounse=0.1)
    with pytest.raises(wl.InvalidParameterError, match="must be a StudioOptions"):
        MergeStudio(tv, options={"debounce": 0.0})
    with pytest.raises(wl.InvalidParameterError, match="debounce"):
        StudioOptions(debounce=-1)


def test_alpha_zero_shows_the_whole_model_once_compared(tv, digits_zoo):
    studio = MergeStudio(tv, debounce=0.0)
    studio.params["task_arithmetic"]["alpha"].value = 0.0
    assert studio.wait(120) and not studio.state["pending"]  # a comparison at alpha 0 is not cached
    assert studio.state["params"]["alpha"] == 0.0 and studio.state["sigma1"] == 0.0
    studio.params["task_arithmetic"]["alpha"].value = 0.45  # the cached alpha-0.3 comparison, rescaled
    assert not studio.state["pending"] and studio.comparison.params["alpha"] == 0.45
    ref = compare(fresh(digits_zoo), merge(fresh(digits_zoo), method="task_arithmetic", alpha=0.45))
    sar = ref.per_task[ref.per_task["which"] == "merged"]["sar"].to_numpy()
    np.testing.assert_allclose(trace(studio.figures["retained"], "task_arithmetic").y, sar, rtol=1e-5)
    assert studio.last_error is None


def test_background_work_reports_and_shows_its_errors():
    from weightlens.widgets._common import Background, Panel

    panel, seen = Panel(), []

    def work(job, value):
        job.start(2)
        job.advance()
        seen.append((value, job.current))
        if value == "boom":
            raise RuntimeError("boom")
        job.say("done <ok>")

    runner = Background(panel, work, delay=0.0)
    runner.schedule("waiting ...", "fine")
    assert runner.wait(30) and seen == [("fine", True)]
    assert runner.status.value == "done &lt;ok&gt;" and (runner.progress.value, runner.progress.max) == (1, 2)
    runner.schedule("waiting ...", "boom")
    assert runner.wait(30)
    assert isinstance(panel.last_error, RuntimeError) and "background work failed" in panel.status.value
