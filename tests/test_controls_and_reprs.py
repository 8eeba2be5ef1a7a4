"""Issue 14 item 8 edges: every widget has ``.controls`` (an ipywidgets container, and the controls by
name); ``SweepResult.summary()`` is a method like ``Report.summary()``; ``MergeManyResult``'s repr is short."""

from __future__ import annotations

import ipywidgets as widgets
import pandas as pd
import pytest
import torch

import weightlens as wl
from weightlens import rebasin
from weightlens.widgets import InterferenceDashboard, LMCExplorer
from weightlens.widgets._controls import Controls


def _check_controls(w, names):
    c = w.controls
    assert isinstance(c, Controls) and isinstance(c, widgets.Box)
    assert c in w.children, "the controls are part of the widget's layout"
    assert list(c) == c.names == list(names) == [k for k, _ in c.items()]
    assert all(isinstance(v, widgets.ValueWidget) for v in c.values())
    assert all(name in c for name in names) and "nope" not in c
    shown = _descendants(c)
    assert any(v in shown for v in c.values())
    with pytest.raises(KeyError, match="the controls are"):
        c["nope"]
    return c


def _descendants(box):
    out = []
    for child in getattr(box, "children", ()):
        out += [child, *_descendants(child)]
    return out


def test_the_dashboard_has_controls_that_drive_it(digits_zoo):
    tv = digits_zoo.task_vectors()
    dash = InterferenceDashboard(tv)
    names = [f"task:{t}" for t in tv.names] + ["block", "normalize", "alignment_view"]
    c = _check_controls(dash, names)
    assert c["block"] is dash.block and c[f"task:{tv.names[0]}"] is dash.task_boxes[tv.names[0]]
    c[f"task:{tv.names[0]}"].value = False
    assert dash.tasks == tv.names[1:] and list(dash.report.tasks) == tv.names[1:]
    assert "Controls(task:" in repr(c)


def test_the_lmc_explorer_has_controls_that_drive_it():
    g = torch.Generator().manual_seed(0)
    make = lambda: torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))  # noqa: E731
    x, y = torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g)
    a, b = make().state_dict(), make().state_dict()
    ev = wl.lmc.Evaluator(make(), {"test": (x, y)})
    explorer = LMCExplorer(a, b, ev, rebasin.mlp_spec(a), points=5, k=2)
    c = _check_controls(explorer, ["view", "split", "alpha", "permutation", "side"])
    c["view"].value = "layer distance"
    assert "layer distance" in explorer.figures


def test_the_merge_studio_has_controls_that_drive_it(digits_zoo):
    from weightlens.merge import list_methods
    from weightlens.widgets import MergeStudio

    tv = digits_zoo.task_vectors()
    studio = MergeStudio(tv, debounce=0.0)
    params = [f"{m}.{name}" for m in list_methods() for name in studio.params[m]]
    names = ["method", *(f"task:{t}" for t in tv.names), *params, "key", "metric", "out_path", "overwrite",
             "why_task", "measure", "whatif"]
    c = _check_controls(studio, names)
    assert c["method"] is studio.method and c["task_arithmetic.alpha"] is studio.params["task_arithmetic"]["alpha"]
    c["method"].value = "ties"
    assert studio.merged.method == "ties"


def test_sweep_summary_is_a_method_like_report_summary(digits_zoo):
    tv = digits_zoo.task_vectors(["rot90", "hflip"])
    sw = wl.sweep(tv, "task_arithmetic", [0.3, 0.6], digits_zoo.evaluate, progress=False)
    assert callable(sw.summary) and callable(wl.analyze(tv, progress=False).summary)
    s = sw.summary()
    assert isinstance(s, pd.DataFrame) and list(s.columns[:2]) == ["alpha", "split"]
    assert set(zip(s["alpha"], s["split"], strict=True)) == {(0.3, "val"), (0.6, "val"), (sw.best_alpha, "test")}


def test_a_near_tie_on_validation_picks_the_smaller_alpha_whatever_the_table_holds():
    """Means equal but for rounding (summed in another order) are ties: the choice cannot flip once
    the report split's rows join the table (it did, and ``report()`` then raised KeyError)."""
    from weightlens.merge.sweep import SweepResult

    a = [0.969697, 0.974747, 0.974874, 0.994949]
    b = [0.974747, 0.984848, 0.974874, 0.979798]
    rows = [{"alpha": al, "task": f"t{i}", "split": "val", "accuracy": v, "loss": 0.0, "normalized_accuracy": v,
             "nai": 0.0} for al, vals in ((0.5, a), (1.0, b)) for i, v in enumerate(vals)]
    table = pd.DataFrame(rows)
    sw = SweepResult("ties", {}, table, pd.DataFrame())
    assert sw.best_alpha == 0.5
    more = pd.concat([table, table.assign(split="test")[table["alpha"] == 0.5]], ignore_index=True)
    assert SweepResult("ties", {}, more, pd.DataFrame()).best_alpha == 0.5


def test_merge_many_result_repr_is_short():
    g = torch.Generator().manual_seed(0)
    models = [{"fc1.weight": torch.randn(64, 8, generator=g), "fc1.bias": torch.randn(64, generator=g),
               "fc2.weight": torch.randn(3, 64, generator=g), "fc2.bias": torch.randn(3, generator=g)}
              for _ in range(3)]
    result = rebasin.merge_many(models, rebasin.mlp_spec(models[0]), progress=False)
    text = repr(result)
    assert text.startswith("MergeManyResult(3 models averaged, 4 keys, 771 values, ")
    assert "tensor" not in text and len(text) < 120 and "\n" not in text
