"""sweep(): normalized accuracy, NAI, choice on validation reported on test; every method on digits."""

from __future__ import annotations

import math

import pytest
import torch

import weightlens as wl
from weightlens.merge import alpha_grid, list_methods, sweep

from test_merge_methods import make_models


@pytest.fixture
def setup():
    base, fts = make_models(seed=6)
    tv = wl.TaskVectors(base, fts)
    keys = tv.keys

    def evaluate(weights, task, split):
        dist = sum(float(((weights[k].float() - fts[task][k].float()) ** 2).sum()) for k in keys)
        scale = 1.0 if split == "val" else 1.2
        return {"accuracy": 1.0 / (1.0 + scale * dist), "loss": dist}

    return tv, evaluate


def test_table_normalisation_and_choice(setup):
    tv, evaluate = setup
    sw = sweep(tv, "task_arithmetic", [0.1, 0.25, 0.5], evaluate, progress=False)
    t = sw.table
    assert len(t) == 3 * len(tv) + len(tv)  # val at every alpha, test at the chosen one
    assert set(t.loc[t["split"] == "test", "alpha"]) == {sw.best_alpha}
    assert list(t.columns) == ["alpha", "task", "split", "accuracy", "loss", "normalized_accuracy", "nai"]
    ref = sw.reference.set_index(["task", "split", "model"])["accuracy"]
    assert ref.xs("finetuned", level="model").eq(1.0).all()
    row = t.iloc[5]
    base = ref.loc[(row["task"], row["split"], "base")]
    assert row["normalized_accuracy"] == pytest.approx(row["accuracy"] / 1.0)
    assert row["nai"] == pytest.approx((row["accuracy"] - base) / (1.0 - base))
    val = sw.summary().query("split == 'val'").set_index("alpha")["normalized_accuracy"]
    assert sw.best_alpha == val.idxmax()
    assert set(sw.best["split"]) == {"test"} and set(sw.best["alpha"]) == {sw.best_alpha}
    rep = sw.report()
    assert rep["method"] == "task_arithmetic" and rep["alpha"] == sw.best_alpha
    assert rep["test_accuracy"] == pytest.approx(sw.best["accuracy"].mean())
    assert rep["finetuned_test_accuracy"] == 1.0


def test_nai_is_nan_when_the_finetune_does_not_beat_the_base(setup):
    tv, _ = setup

    def flat(weights, task, split):
        return {"accuracy": 0.5}

    sw = sweep(tv, "iso_c", [1.0], flat, progress=False)
    assert sw.table["nai"].isna().all() and math.isnan(sw.table["loss"].iloc[0])


def test_reference_is_reused_and_params_pass_through(setup):
    tv, evaluate = setup
    calls = []

    def counting(weights, task, split):
        calls.append(task)
        return evaluate(weights, task, split)

    first = sweep(tv, "ties", [1.0], counting, density=0.5, progress=False)
    n = len(calls)
    second = sweep(tv, "ties", [1.0, 1.5], counting, reference=first.reference, density=0.5, progress=False)
    assert len(calls) - n == 2 * len(tv) + len(tv)  # only merged models: val x 2 alphas, test once
    n = len(calls)
    full = sweep(tv, "ties", [1.0, 1.5], counting, reference=first.reference, density=0.5, report_all=True,
                 progress=False)
    assert len(calls) - n == 2 * len(tv) * 2 and len(full.table) == 2 * len(tv) * 2
    assert second.params == {"density": 0.5, "scope": "global", "merge_func": "mean"}


def test_argument_errors(setup):
    tv, evaluate = setup
    with pytest.raises(wl.InvalidParameterError, match="alphas"):
        sweep(tv, "tsv", [1.0], evaluate, alpha=1.0)
    with pytest.raises(wl.InvalidParameterError, match="empty grid"):
        sweep(tv, "tsv", [], evaluate, progress=False)
    with pytest.raises(wl.InvalidParameterError, match="accuracy"):
        sweep(tv, "tsv", [1.0], lambda w, t, s: {"acc": 1.0}, progress=False)
    with pytest.raises(wl.InvalidParameterError, match="Unknown merge method"):
        alpha_grid("nope", 4)


def test_alpha_grids_follow_the_reference_protocols():
    assert alpha_grid("task_arithmetic", 4) == [i / 30 for i in range(1, 31)]
    assert alpha_grid("tsv", 4)[0] == 0.1 and alpha_grid("iso_cts", 4)[-1] == 3.0 and len(alpha_grid("iso_c", 4)) == 30
    assert alpha_grid("ties", 4)[0] == 0.8 and alpha_grid("ties", 4)[-1] == 2.5
    assert alpha_grid("dare", 4) == alpha_grid("task_arithmetic", 4)
    assert alpha_grid("dare", 4, combine="ties") == alpha_grid("ties", 4)
    assert alpha_grid("star", 4)[9] == pytest.approx(1.0 / 4)


def test_progress_bar(setup, capsys):
    tv, evaluate = setup
    sweep(tv, "iso_c", [1.0], evaluate, progress=True)
    assert "sweep iso_c" in capsys.readouterr().err


DIGITS_METHODS = ["task_arithmetic", "ties", "dare", "tsv", "iso_c", "iso_cts", "star"]


@pytest.mark.slow
@pytest.mark.parametrize("method", DIGITS_METHODS)
def test_every_method_beats_the_base_on_digits(digits_zoo, method):
    """At the coefficient chosen on val, the merge's mean test accuracy beats the base's."""
    tv = digits_zoo.task_vectors()
    sw = sweep(tv, method, None, digits_zoo.evaluate, progress=False)
    rep = sw.report()
    assert rep["test_accuracy"] > rep["base_test_accuracy"], rep
    assert method in list_methods()
    base_mean = digits_zoo.manifest["mean"]["base"]["test"]["accuracy"]
    assert rep["base_test_accuracy"] == pytest.approx(base_mean, abs=1e-9)
    assert not torch.isnan(torch.tensor(rep["test_nai"]))
