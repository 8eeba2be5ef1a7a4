"""``wl.diagnose(..., whatif=)``: every other method's kept share, and with ``evaluate`` the suggested merge.

Identities: task arithmetic of orthogonal tasks keeps 100% of each; the what-if's ``kept`` of a method is
the ``kept`` its own diagnosis reports. With ``evaluate`` (the digits zoo with its planted conflict): the
scores in the table are what ``evaluate`` gives the re-made merges, the baseline is task arithmetic at the
coefficient ``sweep`` validates, and the suggestion's worst task is at least the baseline's on the
selection split (it is chosen there among candidates that include the baseline).
"""

from __future__ import annotations

import math

import pytest
import torch

import weightlens as wl
from weightlens.diagnosis import DiagnoseOptions, diagnose
from weightlens.diagnosis._result import WHATIF_COLUMNS
from weightlens.diagnosis._whatif import candidate_alphas
from weightlens.errors import InvalidParameterError
from weightlens.merge.registry import register_merge, unregister


@pytest.fixture(scope="module")
def tv(digits_zoo):
    """Three digits tasks without ``fc2.weight`` (fast SVDs)."""
    return digits_zoo.task_vectors(["rot90", "hflip", "invert"], exclude="fc2.weight")


def test_orthogonal_tasks_keep_everything_under_task_arithmetic():
    base = {"layer.0.w": torch.zeros(6, 6)}
    tv = wl.TaskVectors(base, {"a": {"layer.0.w": torch.diag(torch.tensor([3.0, 1, 0, 0, 0, 0]))},
                               "b": {"layer.0.w": torch.diag(torch.tensor([0.0, 0, 2, 1, 0, 0]))}})
    d = diagnose(tv, wl.merge(tv, method="tsv", alpha=1.0), whatif=["ties"], progress=False)
    assert list(d.whatif.columns) == WHATIF_COLUMNS
    assert list(dict.fromkeys(d.whatif["method"])) == ["task_arithmetic", "tsv", "ties"]
    ta = d.whatif[d.whatif["method"] == "task_arithmetic"].set_index("task")
    assert ta["kept"].to_dict() == pytest.approx({"a": 1.0, "b": 1.0}, abs=1e-6)
    assert ta["alpha"].tolist() == [0.3, 0.3]  # its default coefficient, nothing scored
    assert d.whatif["accuracy"].isna().all() and d.suggestion is None
    assert "What-if from the weights" in d.summary()


def test_each_methods_kept_is_what_its_own_diagnosis_reports(tv):
    d = diagnose(tv, wl.merge(tv, method="task_arithmetic", alpha=0.5), whatif=["ties"], progress=False)
    for method in ("task_arithmetic", "ties"):
        own = diagnose(tv, wl.merge(tv, method=method), progress=False).tasks.set_index("task")["kept"]
        got = d.whatif[d.whatif["method"] == method].set_index("task")["kept"]
        assert got.to_dict() == pytest.approx(own.to_dict(), rel=1e-9)
    assert d.whatif.loc[d.whatif["method"] == "task_arithmetic", "alpha"].eq(0.5).all()  # the given one


def test_a_method_that_does_not_fit_is_skipped_with_a_note(tv):
    @register_merge("broken_for_test", alpha=1.0)
    def broken(ctx, key):
        raise InvalidParameterError("this method needs something these task vectors lack.")

    try:
        d = diagnose(tv, wl.merge(tv, method="task_arithmetic"), whatif=["broken_for_test"], progress=False)
    finally:
        unregister("broken_for_test")
    assert set(d.whatif["method"]) == {"task_arithmetic"}
    assert d.notes == ("What-if: broken_for_test skipped: merge(method='broken_for_test') on key 'fc1.bias': this "
                       "method needs something these task vectors lack.",)
    assert d.notes[0] in d.summary()


@pytest.mark.slow
def test_the_suggestion_is_scored_like_a_fresh_merge_and_beats_the_baseline_on_its_worst_task():
    from weightlens import zoo

    planted = zoo.load("digits-tasks", size="ci", planted=True)
    tv5 = planted.task_vectors()
    merged = wl.merge(tv5, method="task_arithmetic", alpha=0.5)
    d = diagnose(tv5, merged, evaluate=planted.evaluate, whatif=["ties", "emr"], whatif_points=2, restore=0,
                 controls=0, progress=False)
    w, s = d.whatif, d.suggestion
    assert set(w["method"]) == {"task_arithmetic", "ties", "emr"} and w["accuracy"].notna().all()
    # EMR (one model per task, each scored on its own) keeps the worst task best, but is not one merged model
    emr_worst = w[w["method"] == "emr"]["normalized_accuracy"].min()
    assert s.method != "emr" and emr_worst > s.worst
    assert (w[w["method"] != "emr"].groupby("method")["alpha"].nunique() >= 2).all()  # EMR's grid is {1.0}
    assert (w[w["chosen"]].groupby("method")["alpha"].nunique() == 1).all()
    # the baseline: task arithmetic at the coefficient sweep validates over the same candidates
    grid = candidate_alphas("task_arithmetic", 5, 2, {}, 0.5)
    ta = wl.sweep(tv5, "task_arithmetic", grid, planted.evaluate, progress=False)
    assert s.baseline["alpha"] == ta.best_alpha
    at = ta.table[(ta.table["alpha"] == ta.best_alpha) & (ta.table["split"] == "val")]
    assert s.baseline["worst"] == pytest.approx(at["normalized_accuracy"].min())
    assert s.worst >= s.baseline["worst"]
    # its scores are what evaluate gives the suggested merge made afresh
    again = s.merge(tv5)
    rows = w[(w["method"] == s.method) & (w["alpha"] == s.alpha)].set_index("task")
    for task in tv5.names:
        assert planted.evaluate(again, task, "val")["accuracy"] == pytest.approx(rows.loc[task, "accuracy"])
        assert planted.evaluate(again, task, "test")["accuracy"] == pytest.approx(rows.loc[task, "report_accuracy"])
    assert s.worst == pytest.approx(rows["normalized_accuracy"].min()) and s.worst_task == rows[
        "normalized_accuracy"].idxmin()
    assert not math.isnan(s.report_worst) and "Suggested:" in d.summary()
    assert "What-if across methods" in d.to_html()


def test_whatif_options_are_checked():
    with pytest.raises(InvalidParameterError, match="Unknown merge method 'nope'"):
        DiagnoseOptions(whatif=["nope"])
    with pytest.raises(InvalidParameterError, match="'whatif_points' parameter of diagnose must be a positive int"):
        DiagnoseOptions(whatif_points=0)
    with pytest.raises(InvalidParameterError, match="'whatif' parameter of diagnose must be None, 'all'"):
        DiagnoseOptions(whatif=[1, 2])
    assert DiagnoseOptions(whatif="tsv").whatif == ("tsv",)
