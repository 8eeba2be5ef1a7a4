"""``wl.diagnose(..., evaluate=)``: restoration tests that measure what a block costs a task.

The identity: a restored block holds the task's own fine-tuned tensors, bit for bit, and nothing else
changes (an ``evaluate`` that records the state dicts it receives). The planted conflict of the digits zoo
(``rot90_swap``, trained against ``rot90``'s labels in ``fc2`` alone): restoring ``fc2`` for ``rot90`` must
win back most of what the merge lost, the control block ``fc1`` much less. ``max_evals`` bounds the calls;
a failing ``evaluate`` is named with its task and block.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import weightlens as wl
from weightlens.diagnosis import DiagnoseOptions, RestorationError, diagnose
from weightlens.errors import InvalidParameterError


@pytest.fixture(scope="module")
def tv(digits_zoo):
    """Three digits tasks without ``fc2.weight`` (fast SVDs): blocks ``fc1`` (matrix and bias) and ``fc2`` (bias)."""
    return digits_zoo.task_vectors(["rot90", "hflip", "invert"], exclude="fc2.weight")


@pytest.fixture(scope="module")
def merged(tv):
    return wl.merge(tv, method="task_arithmetic", alpha=0.5)


class Recorder:
    """An ``evaluate`` that keeps every state dict it receives and scores a fixed number per call."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.calls: list[tuple[dict, str, str]] = []
        self.fail_on = fail_on

    def __call__(self, state, task, split):
        self.calls.append((dict(state), task, split))
        if self.fail_on is not None and len(self.calls) == self.fail_on:
            raise ValueError("the scorer broke")
        return {"accuracy": 0.5 + 0.01 * len(self.calls), "loss": 1.0}


def test_a_restored_block_holds_the_tasks_own_weights_and_nothing_else_changes(digits_zoo, tv, merged):
    rec = Recorder()
    d = diagnose(tv, merged, evaluate=rec, restore=1, controls=1, split="test", progress=False)
    T = len(tv.names)
    assert all(split == "test" for _, _, split in rec.calls)
    assert [task for _, task, _ in rec.calls[:T]] == tv.names  # the merge itself, once per task
    full = {k: merged[k] for k in merged}
    for state, _, _ in rec.calls[:T]:
        assert state.keys() == full.keys() and all(torch.equal(state[k], full[k]) for k in full)
    by_rank = d.blocks.set_index(["task", "rank"])["block"]  # every task's rank 1 first, then the controls
    tests = [(t, by_rank[t, r]) for r in (1, 2) for t in tv.names]
    for i, (task, block) in enumerate(tests):
        group = rec.calls[T * (i + 1): T * (i + 2)]
        assert [t for _, t, _ in group] == tv.names
        state = group[0][0]
        ft = wl.load(digits_zoo.finetuned[task])  # the fine-tune's tensors, as stored
        for key in full:
            want = ft[key] if (key in tv.keys and key.startswith(f"{block}.")) else full[key]
            assert torch.equal(state[key], want), (task, block, key)
    assert d.measured["evaluations"] == T * (len(tests) + 1) == len(rec.calls)


def test_restore_by_weight_merges_again_with_the_tasks_vector_scaled_in_that_block(tv, merged):
    """Task arithmetic is linear: raising ``t``'s weight to ``w`` in block ``b`` adds ``alpha (w - 1) tau_t``
    to ``b``'s keys and changes nothing else (checked in float64 against the recorded state dicts)."""
    rec = Recorder()
    d = diagnose(tv, merged, evaluate=rec, restore=1, controls=0, restore_by="weight", weight=3.0, progress=False)
    T, alpha = len(tv.names), merged.params["alpha"]
    full = {k: merged[k] for k in merged}
    by_rank = d.blocks.set_index(["task", "rank"])["block"]
    for i, task in enumerate(tv.names):
        block, state = by_rank[task, 1], rec.calls[T * (i + 1)][0]
        for key in full:
            if key in tv.keys and key.startswith(f"{block}."):
                want = full[key].double() + alpha * 2.0 * tv.delta(task, key).double()
                assert torch.allclose(state[key].double(), want, atol=1e-6), (task, block, key)
            else:
                assert torch.equal(state[key], full[key]), (task, block, key)
    assert d.measured["restore_by"] == "weight" and d.measured["weight"] == 3.0


def test_restore_by_weight_one_gives_back_the_merge_even_with_whole_model_thresholds(tv):
    """TIES' global thresholds are whole-model statistics: the merge made again (weight 1) must equal it,
    so the view keeps every key, not the block's alone."""
    ties = wl.merge(tv, method="ties", density=0.3)
    rec = Recorder()
    diagnose(tv, ties, evaluate=rec, restore=1, controls=0, restore_by="weight", weight=1.0, progress=False)
    full = {k: ties[k] for k in ties}
    for state, _, _ in rec.calls:
        assert all(torch.equal(state[k], full[k]) for k in full)
    with pytest.raises(InvalidParameterError, match="restore_by='weight'.*needs the merge result"):
        diagnose(tv, dict(full), evaluate=Recorder(), restore_by="weight", progress=False)


def test_the_gain_and_the_cost_to_the_others_are_differences_of_the_scores(tv, merged):
    scores = {"rot90": 0.5, "hflip": 0.8, "invert": 0.9}
    restored = {"rot90": 0.7, "hflip": 0.75, "invert": 0.8}

    def evaluate(state, task, split):  # the merged model scores `scores`; any restoration `restored`
        same = all(state[k] is merged[k] for k in merged)
        return {"accuracy": scores[task] if same else restored[task], "loss": 1.0 if same else 2.0}

    d = diagnose(tv, merged, evaluate=evaluate, restore=2, controls=0, progress=False)
    rot = d.blocks.set_index(["task", "block"]).loc["rot90"]
    assert rot["measured_gain"].tolist() == pytest.approx([0.2, 0.2])
    assert rot["cost_to_others"].tolist() == pytest.approx([0.075, 0.075])  # mean of 0.05 and 0.1
    assert d.tasks["spearman"].isna().all() and math.isnan(d.spearman)  # two blocks per task: too few
    assert d.measured["merged_scores"] == pytest.approx(scores)
    by_loss = diagnose(tv, merged, evaluate=evaluate, restore=1, controls=0, metric="loss", progress=False)
    assert by_loss.blocks["measured_gain"].dropna().tolist() == pytest.approx([-1.0] * 3)  # the loss rose by 1
    text = d.summary()
    first = d.ranking("rot90")["block"].iloc[0]
    assert f"restoring {first} (rank 1) recovers +20.0 points of rot90's accuracy for -7.5 points on the others" in text
    page = d.to_html()
    assert "cost_to_others" in page and "spearman" in page


@pytest.mark.slow
def test_the_planted_conflict_is_found_and_its_restoration_recovers_the_loss():
    from weightlens import zoo

    z = zoo.load("digits-tasks", size="ci", planted=True)
    tv5 = z.task_vectors()
    d = diagnose(tv5, wl.merge(tv5, method="task_arithmetic", alpha=0.5), evaluate=z.evaluate, restore=1,
                 controls=1, split="test", progress=False)
    rot90 = d.blocks[d.blocks["task"] == "rot90"].set_index("block")
    assert rot90.loc["fc2", "rank"] == 1
    record = z.manifest["planted"]["metrics"]
    lost = record["merged_without"]["rot90"]["accuracy"] - record["merged_with"]["rot90"]["accuracy"]
    assert d.measured["merged_scores"]["rot90"] == pytest.approx(record["merged_with"]["rot90"]["accuracy"], abs=1e-6)
    gain = rot90.loc["fc2", "measured_gain"]
    assert gain >= 0.75 * lost  # most of what the planted conflict took (0.938 -> 0.598) comes back
    assert gain == pytest.approx(record["merged_with_block_restored"]["rot90"]["accuracy"]
                                 - record["merged_with"]["rot90"]["accuracy"], abs=1e-6)
    assert rot90.loc["fc1", "measured_gain"] < 0.25 * gain  # the control block: much less
    assert "restoring fc2 (rank 1) recovers +36.2 points of rot90's accuracy" in d.summary()


def test_max_evals_bounds_the_calls_and_leaves_the_rest_nan(tv, merged):
    rec = Recorder()
    d = diagnose(tv, merged, evaluate=rec, restore=2, controls=0, max_evals=10, progress=False)
    assert len(rec.calls) == 9 == d.measured["evaluations"]  # the merge (3) and two tests of 3; a third needs 12
    assert d.blocks["measured_gain"].notna().sum() == 2 and d.blocks["cost_to_others"].notna().sum() == 2
    assert "max_evals=10 reached after 2 of 6 restoration tests" in d.summary()
    none = Recorder()
    d0 = diagnose(tv, merged, evaluate=none, max_evals=2, progress=False)
    assert not none.calls and d0.blocks["measured_gain"].isna().all()
    assert "no restoration test was run" in d0.summary()


def test_a_failing_evaluate_is_named_with_its_task_and_block(tv, merged):
    first = diagnose(tv, merged, progress=False).ranking("rot90")["block"].iloc[0]  # the first block restored
    with pytest.raises(RestorationError, match=r"evaluate\(state_dict, 'hflip', 'val'\) raised ValueError: "
                                               r"the scorer broke \(scoring task 'hflip' on the merge with block "
                                               rf"'{first}' restored to task 'rot90''s own weights\)"):
        diagnose(tv, merged, evaluate=Recorder(fail_on=5), progress=False)
    with pytest.raises(RestorationError, match="must return a mapping with the metric 'f1'"):
        diagnose(tv, merged, evaluate=Recorder(), metric="f1", progress=False)


def test_options_and_their_errors(tv, merged):
    assert DiagnoseOptions() == DiagnoseOptions(criterion="paper", eps=0.05, device="auto", restore=3, controls=1,
                                                split="val", metric="accuracy", max_evals=None)
    a = diagnose(tv, merged, options=DiagnoseOptions(eps=0.1), progress=False)
    b = diagnose(tv, merged, eps=0.1, progress=False)
    assert np.allclose(a.blocks["kept"], b.blocks["kept"], equal_nan=True) and a.eps == 0.1
    with pytest.raises(InvalidParameterError, match="'evaluate' parameter of diagnose must be None or a callable"):
        diagnose(tv, merged, evaluate=1.0)
    with pytest.raises(InvalidParameterError, match="restoration tests need a merge"):
        diagnose(tv, None, evaluate=Recorder())
    with pytest.raises(InvalidParameterError, match=r"unknown option\(s\) \['restores'\]"):
        diagnose(tv, merged, restores=2)
    for bad, name in (({"restore": -1}, "'restore'"), ({"max_evals": 1.5}, "'max_evals'"),
                      ({"split": ""}, "'split'"), ({"controls": True}, "'controls'"),
                      ({"restore_by": "raise"}, "'restore_by'"), ({"weight": 0.0}, "'weight'")):
        with pytest.raises(InvalidParameterError, match=name):
            DiagnoseOptions(**bad)
