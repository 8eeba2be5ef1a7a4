"""``wl.diagnose`` from the weights alone: identities, planted crowding and sign stories, the tables and page.

References are independent: a merge equal to one task's update (it keeps all of it), tasks on mutually
orthogonal subspaces (nothing crowds), a planted cancellation (the lost directions are the canceller's),
a merge that is one task's negation (every coordinate lost, won by that task), and sums recomputed in
float64 from the deltas. The digits zoo gives real weights; random tensors only for the linear-algebra
identities.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

import weightlens as wl
from weightlens.diagnosis import Diagnosis, diagnose
from weightlens.errors import InvalidParameterError

EPS = 0.05


@pytest.fixture(scope="module")
def tv(digits_zoo):
    """Three digits tasks without ``fc2.weight`` (512 x 512 SVDs are the slow part on a shared CPU): blocks
    ``fc1`` (a 512 x 64 matrix and its bias) and ``fc2`` (its bias alone: no subspace figures)."""
    return digits_zoo.task_vectors(["rot90", "hflip", "invert"], exclude="fc2.weight")


@pytest.fixture(scope="module")
def ta(tv):
    """Task arithmetic of three digits tasks, and its diagnosis."""
    merged = wl.merge(tv, method="task_arithmetic", alpha=0.5)
    return merged, diagnose(tv, merged, progress=False)


def _weights(tv: wl.TaskVectors, update) -> dict[str, torch.Tensor]:
    """Full weights ``base + update(key)`` of every task-vector key."""
    return {k: tv.base_tensor(k).to(torch.float32) + update(k) for k in tv.keys}


def _orthonormal(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0].to(torch.float32)


# ------------------------------------------------------------------------------------------ identities
def test_a_merge_equal_to_one_tasks_update_keeps_all_of_it(tv):
    d = diagnose(tv, _weights(tv, lambda k: tv.delta("rot90", k)), progress=False)
    mine = d.blocks[d.blocks["task"] == "rot90"].set_index("block")
    assert mine.loc["fc1", "kept"] >= math.sqrt(1 - EPS**2) - 1e-6  # the "paper" rule's guarantee
    assert mine.loc["fc1", "lost_energy"] <= EPS**2 + 1e-6 and mine.loc["fc1", "coef"] == pytest.approx(1, abs=1e-5)
    assert math.isnan(mine.loc["fc2", "kept"])  # a bias alone: no subspace figures, signs only
    assert (mine["sign_lost"] == 0).all() and (mine["predicted_cost"] <= EPS**2 * mine["energy_share"] + 1e-9).all()
    assert d.method == "weights" and d.tasks.set_index("task").loc["rot90", "sign_lost"] == 0


def test_orthogonal_tasks_crowd_nothing():
    """Tasks on mutually orthogonal left subspaces, spectra (3, 2, 0.05) x (1, 2) per key: the rank rule
    drops each task's 0.05 direction, and that lost part lies in no other task's subspace."""
    left, right = _orthonormal(12, 6, 0), _orthonormal(10, 6, 1)
    s = torch.tensor([3.0, 2.0, 0.05])
    base = {"enc.0.w": torch.zeros(12, 10), "enc.1.w": torch.zeros(12, 10)}
    tasks = {name: {k: left[:, i:i + 3] @ torch.diag(s * (1 + j)) @ right[:, i:i + 3].mT
                    for j, k in enumerate(base)} for i, name in ((0, "a"), (3, "b"))}
    tv = wl.TaskVectors(base, tasks)
    d = diagnose(tv, wl.merge(tv, method="task_arithmetic", alpha=1.0), progress=False)
    lost = 0.05**2 / float(s.square().sum())
    assert np.allclose(d.blocks["lost_energy"], lost, rtol=0, atol=2e-6)  # SAR is float32
    assert np.allclose(d.blocks["crowding"], 0.0, atol=1e-6) and d.blocks["crowded_by"].isna().all()
    assert sorted(d.blocks["block"].unique()) == ["enc.0", "enc.1"]


def test_a_cancelled_direction_is_crowded_by_the_task_that_cancelled_it():
    """a = e1 x1^T; b = -0.99 e1 x1^T + 5 e2 x2^T; c = 5 e3 x3^T. The sum keeps 0.01 e1 x1^T, which the
    rank rule drops: a loses its whole update, along b's top subspace (overlap 1), none along c's."""
    e, x = _orthonormal(8, 3, 2), _orthonormal(6, 3, 3)
    outer = [e[:, i:i + 1] @ x[:, i:i + 1].mT for i in range(3)]
    tv = wl.TaskVectors({"l.0.w": torch.zeros(8, 6)}, {
        "a": {"l.0.w": outer[0]}, "b": {"l.0.w": -0.99 * outer[0] + 5 * outer[1]}, "c": {"l.0.w": 5 * outer[2]}})
    d = diagnose(tv, wl.merge(tv, method="task_arithmetic", alpha=1.0), progress=False)
    a = d.blocks.set_index("task").loc["a"]
    assert a["kept"] == pytest.approx(0.0, abs=1e-3) and a["lost_energy"] == pytest.approx(1.0, abs=1e-6)
    assert a["crowded_by"] == "b" and a["crowding"] == pytest.approx(1.0, abs=1e-5)
    # the merge sits ||a - (a + b + c)|| = ||-0.99 e1 x1^T + 5 e2 x2^T + 5 e3 x3^T|| from a's own weights (||a|| = 1)
    assert a["predicted_cost"] == pytest.approx(math.sqrt(0.99**2 + 50), rel=1e-6)
    assert d.tasks.set_index("task").loc["c", "crowding"] == pytest.approx(0.0, abs=1e-10)


def test_a_merge_that_negates_a_task_loses_all_its_signs_to_its_negation(tv):
    """Tasks rot90, its negation and hflip; merged = base - tau_rot90: rot90's every non-zero coordinate
    is opposed, all won by the negation, which loses nothing; the pre-merge sign check fires."""
    base = {k: tv.base_tensor(k) for k in tv.keys}
    rot = {k: tv.delta("rot90", k) for k in tv.keys}
    plant = wl.TaskVectors(base, {"rot90": _weights(tv, rot.get), "neg": _weights(tv, lambda k: -rot[k]),
                                  "hflip": _weights(tv, lambda k: tv.delta("hflip", k))})
    d = diagnose(plant, _weights(tv, lambda k: -rot[k]), progress=False)
    blocks = d.blocks.set_index(["task", "block"])
    assert np.allclose(blocks.loc["rot90", "sign_lost"], 1.0)
    assert (blocks.loc["rot90", "sign_won_by"] == "neg").all() and np.allclose(blocks.loc["rot90", "sign_won"], 1.0)
    assert np.allclose(blocks.loc["neg", "sign_lost"], 0.0) and blocks.loc["neg", "sign_won_by"].isna().all()
    assert np.allclose(blocks.loc["neg", "sign_won"], 0.0)
    fired = d.checks[d.checks["fired"] & (d.checks["check"] == "sign_conflict")]
    assert sorted(fired["block"]) == ["fc1", "fc2"]


# ------------------------------------------------------------------------------------------ the tables
def test_block_figures_are_ratios_of_float64_sums_over_keys(tv, ta):
    merged, d = ta
    by_key = diagnose(tv, merged, blocks="key", progress=False).blocks.set_index(["task", "block"])
    M = {k: merged.update(k).double() for k in tv.keys}
    for task in tv.names:
        energy = {k: float(tv.delta(task, k).double().square().sum()) for k in tv.keys}
        total = sum(energy.values())
        for key in tv.keys:
            row, tau = by_key.loc[(task, key)], tv.delta(task, key).double()
            assert row["energy_share"] == pytest.approx(energy[key] / total, rel=1e-9)
            opposed = (tau.abs() * (tau.sign() * M[key].sign() < 0)).sum() / tau.abs().sum()
            assert row["sign_lost"] == pytest.approx(float(opposed), rel=1e-5)
            if tv.kind(key) == "matrix":
                assert row["coef"] == pytest.approx(float((tau * M[key]).sum()) / energy[key], rel=1e-4)
    blocks = d.blocks
    assert np.allclose(blocks.groupby("task")["energy_share"].sum(), 1.0)
    # predicted cost: how far the merge is from the task's own weights, relative to them, over the block
    for task in tv.names:
        miss = {k: float((tv.delta(task, k).double() - M[k]).square().sum()) for k in tv.keys}
        own = {k: float((tv.base[k].double() + tv.delta(task, k).double()).square().sum()) for k in tv.keys}
        for block in set(blocks["block"]):
            keys = [k for k in tv.keys if k.startswith(block + ".")]
            want = math.sqrt(sum(miss[k] for k in keys) / sum(own[k] for k in keys))
            got = blocks[(blocks["task"] == task) & (blocks["block"] == block)]["predicted_cost"].item()
            assert got == pytest.approx(want, rel=1e-6)
        whole = math.sqrt(sum(miss.values()) / sum(own.values()))
        assert d.tasks.set_index("task").loc[task, "predicted_cost"] == pytest.approx(whole, rel=1e-6)
    assert np.allclose(blocks["lost_energy"], 1 - blocks["kept"] ** 2, equal_nan=True)
    assert blocks["measured_gain"].isna().all() and d.suggestion is None
    assert list(d.whatif.columns) == wl.diagnosis._result.WHATIF_COLUMNS


def test_kept_is_compares_sar_and_the_crowding_denominator_agrees_with_it(tv, ta):
    merged, d = ta
    rows = wl.compare(tv, merged, criterion="paper", progress=False).alignment
    rows = rows[rows["which"] == "merged"].set_index(["task", "key"])
    by_key = diagnose(tv, merged, blocks="key", progress=False).blocks.set_index(["task", "block"])
    for (task, key), row in rows.iterrows():
        assert by_key.loc[(task, key), "kept"] == pytest.approx(row["sar"], rel=1e-9)
    crowd = by_key["crowding"]
    assert ((crowd >= 0) & (crowd <= 1 + 1e-9)).all() and len(crowd) == 3 * len(tv.names)
    vectors = by_key.loc[(slice(None), ["fc1.bias", "fc2.bias"]), :]
    assert (vectors["crowding"] == 0).all() and vectors["kept"].isna().all()  # subspaces: matrices only
    assert set(by_key["crowded_by"].dropna()) <= set(tv.names)


def test_the_ranking_puts_each_tasks_costliest_block_first(ta):
    _, d = ta
    for task in d.tasks["task"]:
        ranked = d.ranking(task)
        assert list(ranked["rank"]) == list(range(1, len(ranked) + 1))
        assert ranked["predicted_cost"].is_monotonic_decreasing
        assert d.tasks.set_index("task").loc[task, "worst_block"] == ranked["block"].iloc[0]
    with pytest.raises(InvalidParameterError, match="no task 'nope'"):
        d.ranking("nope")


def test_summary_and_html_say_where_each_task_loses_most(ta, tmp_path):
    _, d = ta
    text = d.summary()
    for task in d.tasks["task"]:
        worst = d.ranking(task).iloc[0]
        kept = "" if math.isnan(worst["kept"]) else f"kept {worst['kept']:.0%} of its update there, "
        assert (f"{task} loses most in {worst['block']} (the merged block is {worst['predicted_cost']:.1%} of the "
                f"task's own weights away from them: predicted cost {worst['predicted_cost']:.3f}; {kept}which holds "
                f"{worst['energy_share']:.0%}") in text
    page = d.to_html(tmp_path / "d.html")
    assert (tmp_path / "d.html").read_text() == page and page.startswith("<!DOCTYPE html>")
    assert "Pre-merge checks" in page and "predicted_cost" in page and "<script" not in page
    with pytest.raises(InvalidParameterError, match="that is a folder"):
        d.to_html(tmp_path)


def test_the_public_api_and_its_errors(tv, ta):
    merged, _ = ta
    assert wl.diagnose is diagnose and wl.Diagnosis is Diagnosis
    with pytest.raises(InvalidParameterError, match="'evaluate' parameter of diagnose must be None or a callable"):
        diagnose(tv, merged, evaluate=1.0)
    with pytest.raises(InvalidParameterError, match="'blocks' parameter"):
        diagnose(tv, merged, blocks="layers")
    with pytest.raises(InvalidParameterError, match="'eps' parameter"):
        diagnose(tv, merged, eps=1.5)
    with pytest.raises(InvalidParameterError, match="'criterion' parameter"):
        diagnose(tv, merged, criterion="nope")
    with pytest.raises(InvalidParameterError, match="merge was made from tasks"):
        diagnose(tv.subset(["rot90", "hflip"]), merged)
    one = diagnose(tv, merged, blocks=lambda key: "all", progress=False)
    assert list(one.blocks["block"].unique()) == ["all"]
    assert np.allclose(one.blocks.set_index("task")["predicted_cost"], one.tasks.set_index("task")["predicted_cost"])


def test_without_a_merge_only_the_checks_are_computed(tv):
    d = diagnose(tv, None, progress=False)
    assert d.blocks.empty and list(d.blocks.columns)[:3] == ["task", "block", "energy_share"]
    assert set(d.checks["check"]) == {"dominant_task", "foreign_base", "low_rank", "sign_conflict"}
    assert not d.checks["fired"].any() and "No pre-merge check fired." in d.summary()
    assert d.tasks["worst_block"].isna().all() and d.tasks["predicted_cost"].isna().all()
    assert d.tasks["crowded_by"].isna().all() and (d.tasks["norm"] > 0).all()


def test_lora_adapters_are_diagnosed_as_their_dense_deltas(tmp_path):
    """Two peft adapters on a tiny Llama (decompositions from their factors) against the same deltas given
    as full fine-tunes in float64: the same tables, and the rank check fires for the adapters only."""
    pytest.importorskip("peft")
    import warnings

    import _hf_models as hf
    import _peft_models as pm
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        llama = hf.tiny_llama(tmp_path)
        config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "up_proj"])
        adapters = {f"t{i}": pm.train_adapter(llama, tmp_path / f"t{i}", config, seed=i, steps=2) for i in range(2)}
        tv = wl.TaskVectors(llama, adapters)
    assert all(tv.is_factored(t) for t in tv.names)
    base = {k: tv.base[k].double() for k in tv.base}
    dense = wl.TaskVectors(base, {t: {k: base[k] + tv.delta(t, k).double() if k in tv.keys else base[k]
                                      for k in base} for t in tv.names})
    # task arithmetic: the same update from factors and densely (TSV's dense update would depend on the
    # arbitrary directions a dense SVD returns past the adapters' rank)
    got = diagnose(tv, wl.merge(tv, method="task_arithmetic", alpha=1.0), progress=False)
    want = diagnose(dense, wl.merge(dense, method="task_arithmetic", alpha=1.0), progress=False)
    live = got.blocks[got.blocks["energy_share"] > 0]
    assert len(live) and live["kept"].notna().all()
    columns = ["energy_share", "kept", "coef", "crowding", "sign_lost", "predicted_cost"]
    pd.testing.assert_frame_equal(got.blocks[columns], want.blocks[columns], atol=1e-4, rtol=1e-3)
    assert list(got.blocks["crowded_by"].fillna("")) == list(want.blocks["crowded_by"].fillna(""))
    fired = got.checks[(got.checks["check"] == "low_rank") & got.checks["fired"]]
    assert sorted(fired["task"]) == ["t0", "t1"]


# ------------------------------------------------------------------------------------ planted conflict
@pytest.mark.slow
def test_the_planted_conflict_is_found_in_its_block_and_named(digits_zoo):
    # digits-tasks' planted fine-tune rot90_swap is trained against rot90's labels in fc2 alone: a merge of all
    # five loses rot90 there (the zoo measures it, restoring fc2 gives rot90 back). From the weights alone the
    # diagnosis must rank fc2 first for rot90 and name rot90_swap: it opposes rot90 there and wins its signs.
    # (Sign-blind subspace crowding cannot: rot90_swap spans rot90's directions with the opposite sign.)
    from weightlens import zoo

    planted = zoo.load("digits-tasks", size="ci", planted=True)
    tv5 = planted.task_vectors()
    d = diagnose(tv5, wl.merge(tv5, method="task_arithmetic", alpha=0.5), progress=False)
    rot90 = d.blocks[d.blocks["task"] == "rot90"].set_index("block")
    # the merge moved fc2 about five times as far from rot90's own weights as fc1 (relative to each block's size)
    assert rot90.loc["fc2", "rank"] == 1 and rot90.loc["fc2", "predicted_cost"] > 4 * rot90.loc["fc1", "predicted_cost"]
    assert rot90.loc["fc2", "opposed_by"] == "rot90_swap" and rot90.loc["fc2", "opposition"] > 0.5
    assert rot90.loc["fc2", "sign_won_by"] == "rot90_swap"
    assert rot90.loc["fc1", "opposed_by"] != "rot90_swap"  # its update leaves fc1 alone
    # the opposition is -<tau_rot90, tau_swap> / ||tau_rot90||^2 over fc2's keys, recomputed in float64
    dot = sum(float(tv5.delta("rot90", k).double().flatten() @ tv5.delta("rot90_swap", k).double().flatten())
              for k in tv5.keys if k.startswith("fc2."))
    energy = sum(float(tv5.delta("rot90", k).double().square().sum()) for k in tv5.keys if k.startswith("fc2."))
    assert rot90.loc["fc2", "opposition"] == pytest.approx(-dot / energy, rel=1e-6)
    assert "opposed by rot90_swap" in next(line for line in d.summary().splitlines() if line.startswith("rot90 "))
    worst = d.tasks.set_index("task").loc["rot90"]
    assert worst["worst_block"] == "fc2" and worst["opposed_by"] == "rot90_swap"


def test_one_pass_reads_each_key_once_and_decomposes_each_matrix_once(tv, monkeypatch):
    """diagnose walks compare's pass: every key's task vectors are read once (not again by the walk, nor
    by a task decomposition); the merged update is decomposed once (compare's side of task arithmetic is
    not computed) and each task's left side is one Gram eigensolve, not an SVD."""
    tv.cache.clear()
    merged = wl.merge(tv, method="task_arithmetic", alpha=0.5).materialize(progress=False)
    reads, svds = [], []
    deltas, delta = wl.TaskVectors.deltas, wl.TaskVectors.delta
    monkeypatch.setattr(wl.TaskVectors, "deltas", lambda self, key: reads.append(key) or deltas(self, key))
    monkeypatch.setattr(wl.TaskVectors, "delta", lambda self, t, key: reads.append(key) or delta(self, t, key))
    svd, eigh, eighs = torch.linalg.svd, torch.linalg.eigh, []
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: svds.append(1) or svd(*a, **k))
    monkeypatch.setattr(torch.linalg, "eigh", lambda *a, **k: eighs.append(1) or eigh(*a, **k))
    d = diagnose(tv, merged, progress=False)
    assert sorted(reads) == sorted(tv.keys)
    matrices = [k for k in tv.keys if tv.kind(k) == "matrix"]
    assert len(svds) == len(matrices)  # the update's (the task sum's), once
    assert len(eighs) == len(matrices) * len(tv)  # each task's left side
    assert d.blocks["kept"].notna().any()
