"""The studio's "Why?" view on the digits zoo's planted conflict: it shows the diagnosis of the merge on
screen (the same as ``wl.diagnose`` of the same merge, computed apart), the chosen task's blocks, and
"Apply suggestion" merges what the suggestion's own ``merge(tv)`` does.

``rot90_swap`` is trained against ``rot90``'s labels in ``fc2``: task arithmetic at alpha 0.5 ranks fc2 first
for rot90, opposed by rot90_swap (``tests/test_diagnosis.py``). The what-if and the suggestion are hand-made
(their columns are ``WHATIF_COLUMNS``): the studio only shows them and applies the suggestion.
"""

from __future__ import annotations

import dataclasses
import math
import threading

import numpy as np
import pandas as pd
import pytest
import torch

import weightlens as wl
from weightlens.diagnosis import Suggestion, diagnose
from weightlens.diagnosis._result import WHATIF_COLUMNS
from weightlens.widgets import MergeStudio

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def planted():
    from weightlens import zoo

    return zoo.load("digits-tasks", size="ci", planted=True)


@pytest.fixture(scope="module")
def reference(planted):
    """The diagnosis of task arithmetic at alpha 0.5, on task vectors of their own (an empty cache)."""
    tv = planted.task_vectors()
    return diagnose(tv, wl.merge(tv, method="task_arithmetic", alpha=0.5), progress=False)


@pytest.fixture(scope="module")
def studio(planted):
    """A studio at task arithmetic, alpha 0.5, with a scorer that answers at once (clicks need the accuracy panel)."""
    s = MergeStudio(planted.task_vectors(), evaluate=lambda w, task, split: {"accuracy": 0.5}, debounce=0.0)
    s.params["task_arithmetic"]["alpha"].value = 0.5
    assert s.wait(300)
    return s


def _suggestion(**kw) -> Suggestion:
    return Suggestion(**{"method": "ties", "alpha": 0.8, "params": {"density": 0.3}, "worst_task": "rot90",
                         "worst": 0.9, "mean": 0.95, "report_worst": math.nan, "report_mean": math.nan,
                         "select_on": "val", "report_on": "test", **kw})


def test_why_shows_the_chosen_tasks_blocks(studio, reference):
    seen = []
    studio._why._debouncer._fn = (lambda fn: lambda gen, *a: (seen.append(threading.current_thread()), fn(gen, *a)))(
        studio._why._debouncer._fn)
    assert studio.diagnosis is None and "why" not in studio.figures and studio.apply_button.disabled
    studio.why()
    assert studio.wait(300) and studio.last_error is None
    assert seen and seen[0] is not threading.main_thread()  # diagnosed on the background thread
    d = studio.diagnosis
    assert d.measured is None  # "measure restoration" not ticked: the weights alone
    pd.testing.assert_frame_equal(d.blocks[["task", "block", "rank", "crowded_by", "opposed_by"]],
                                  reference.blocks[["task", "block", "rank", "crowded_by", "opposed_by"]])
    assert studio.why_task.value == "rot90"  # the costliest task first
    bars = studio.figures["why"].data[0]
    ranking = reference.ranking("rot90")
    assert list(bars.x) == ranking["block"].tolist() and bars.x[0] == "fc2"
    np.testing.assert_allclose(bars.y, ranking["predicted_cost"], rtol=1e-5)
    assert "opposed by rot90_swap" in studio.why_text.value and "rot90 loses most in fc2" in studio.why_text.value
    assert "diagnosed from the weights" in studio._why.status.value
    assert studio.why_figure.children == (studio.figures["why"],)
    assert studio.whatif_table.value == "" and studio.apply_button.disabled  # no what-if, no suggestion

    studio.why_task.value = "hflip"  # the dropdown
    assert list(studio.figures["why"].data[0].x) == reference.ranking("hflip")["block"].tolist()
    assert "hflip loses most" in studio.why_text.value
    accuracy = studio.figures["accuracy"]  # a click on a task's bar in the accuracy panel
    from plotly.callbacks import InputDeviceState, Points

    accuracy.data[0]._dispatch_on_click(Points([2], ["invert"], [0.5], 0), InputDeviceState())
    assert studio.why_task.value == "invert"
    np.testing.assert_allclose(studio.figures["why"].data[0].y, reference.ranking("invert")["predicted_cost"],
                               rtol=1e-5)
    assert studio.last_error is None


def test_apply_suggestion_merges_what_the_suggestion_does(planted, reference):
    tv = planted.task_vectors()
    studio = MergeStudio(tv, debounce=0.0)
    assert not studio.apply_suggestion() and "No suggestion to apply" in studio.status.value
    studio.last_error = None
    whatif = pd.DataFrame([
        {"method": m, "params": {}, "alpha": a, "task": t, "kept": 0.9, "accuracy": 0.8, "normalized_accuracy": n,
         "chosen": a == c, "report_accuracy": math.nan, "report_normalized_accuracy": math.nan}
        for m, c in (("task_arithmetic", 0.3), ("ties", 0.8)) for a in (0.3, 0.8) for t, n in (("rot90", 0.6),
                                                                                                 ("hflip", 0.9))
    ], columns=WHATIF_COLUMNS)
    s = _suggestion(alpha=2.5, params={"density": 0.3})  # beyond the alpha slider's range: it widens
    studio.why(dataclasses.replace(reference, whatif=whatif, suggestion=s))
    assert not studio.apply_button.disabled and "Suggested: ties at alpha=2.5" in studio.why_text.value
    table = studio.whatif_table.value
    assert "What if (rot90)" in table and table.count("<tr>") == 2  # each method at its chosen alpha
    assert "(an earlier merge" not in studio.why_text.value
    assert studio.apply_suggestion() and studio.last_error is None
    assert studio.method.value == "ties" and studio.param_box.children == tuple(studio.params["ties"].values())
    assert studio.method_params["alpha"] == 2.5 and studio.method_params["density"] == 0.3
    assert studio.state["method"] == "ties" and studio.merged.alpha == 2.5
    expected = s.merge(tv)
    assert list(studio.merged) == list(expected)
    for key in expected:
        torch.testing.assert_close(studio.merged[key], expected[key], rtol=0, atol=0)
    assert "(an earlier merge: press Why? again" in studio.why_text.value  # said as soon as it merged
    assert studio.wait(300) and studio.last_error is None


def test_measure_restoration_scores_with_the_studios_evaluate(planted):
    calls = []
    lock = threading.Lock()

    def evaluate(weights, task, split):
        with lock:
            calls.append((task, split))
        return {"accuracy": 0.5}

    tv = planted.task_vectors(["rot90", "rot90_swap"])
    plain = MergeStudio(tv, debounce=0.0)
    assert plain.measure.disabled and plain.measure not in plain.why_box.children[0].children
    studio = MergeStudio(tv, evaluate=evaluate, debounce=0.0, split="test")
    assert studio.wait(300) and not studio.measure.disabled
    studio.measure.value = True
    calls.clear()
    studio.why()
    assert studio.wait(300) and studio.last_error is None
    d = studio.diagnosis
    assert d.measured is not None and d.measured["split"] == "test" and calls and {s for _, s in calls} == {"test"}
    assert d.blocks["measured_gain"].notna().any()
    assert studio.figures["why"].data[-1].name == "measured gain (accuracy on test)"


def test_the_headless_snapshot_shows_the_diagnosis(studio, reference, monkeypatch):
    import IPython.display

    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda obj, **kw: shown.append(obj))
    monkeypatch.setenv("WEIGHTLENS_HEADLESS", "1")
    studio.why(reference)
    studio._ipython_display_()
    text = shown[0].data
    assert "Why? (task_arithmetic alpha=0.50)" in text and "rot90 loses most in fc2" in text
    specs = [o["application/vnd.plotly.v1+json"] for o in shown if isinstance(o, dict)]
    assert len(specs) == len(studio.figures) and list(specs[-1]["data"][0]["x"]) == list(
        studio.figures["why"].data[0].x)


@pytest.mark.slow
def test_what_if_ticked_suggests_a_merge_and_apply_makes_it(planted):
    # a real what-if (every method, scored by the zoo's own evaluate on val) behind "Why?", then "Apply"
    tv = planted.task_vectors(["rot90", "hflip"], exclude="fc2.weight")
    studio = MergeStudio(tv, evaluate=planted.evaluate, debounce=0.0, split="val")
    assert studio.wait(300)
    studio.whatif.value = True
    studio.why()
    assert studio.wait(600) and studio.last_error is None
    d = studio.diagnosis
    assert d.measured is not None and d.blocks["measured_gain"].isna().all()  # no restoration tests: not ticked
    from weightlens.merge import get_method, list_methods

    unfed = {m for m in list_methods() if get_method(m).needs_data}  # no data=: left out, with one note
    skipped = {note.split(" ")[1] for note in d.notes if note.startswith("What-if: ") and " left out: " not in note}
    assert set(d.whatif["method"]) | skipped == set(list_methods()) - unfed and len(skipped) < 3
    assert f"What-if: {', '.join(sorted(unfed, key=list_methods().index))} left out: they need data=" in " ".join(d.notes)
    s = d.suggestion
    assert s is not None and not studio.apply_button.disabled and s.worst >= s.baseline["worst"]
    assert studio.apply_suggestion() and studio.wait(300) and studio.last_error is None
    expected = s.merge(tv)
    for key in expected:
        torch.testing.assert_close(studio.merged[key], expected[key], rtol=0, atol=0)
