"""Sign-conflict statistics against brute-force float64 NumPy, identities and simulated chance levels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import weightlens as wl
from weightlens.analysis.signs import (
    chance_conflict,
    conflict_stats,
    global_thresholds,
    pairwise_conflicts,
    ties_threshold,
    trim,
)
from weightlens.errors import InvalidParameterError


def _ties_topk_mask(x: np.ndarray, density: float) -> np.ndarray:
    """TIES reference ``topk_values_mask`` semantics, written with np.partition."""
    d = x.size
    kth = d - int(d * density)
    if kth <= 0:
        return np.ones_like(x, dtype=bool)
    threshold = np.partition(np.abs(x).ravel(), kth - 1)[kth - 1]
    return np.abs(x) >= threshold


def _brute(x: np.ndarray) -> dict[str, float]:
    """Every statistic by loops over coordinates (float64)."""
    T, P = x.shape
    elig = conf = 0
    chance = mass_el = mass_cf = 0.0
    agree = []
    for p in range(P):
        col = x[:, p]
        npos, nneg = int(np.sum(col > 0)), int(np.sum(col < 0))
        n = npos + nneg
        agree.append(abs(npos - nneg) / n if n else 1.0)
        if n >= 2:
            elig += 1
            chance += 1 - 2.0 ** (1 - n)
            mass_el += np.abs(col).sum()
            if npos and nneg:
                conf += 1
                mass_cf += np.abs(col).sum()
    gamma = np.sign(x.sum(0))
    gamma[gamma == 0] = np.sign(gamma.sum())
    discarded = np.sum(np.abs(x) * (np.sign(x) == -gamma))
    return {
        "conflict_rate": conf / elig, "chance": chance / elig, "mass_conflict": mass_cf / mass_el,
        "discarded_mass": discarded / np.abs(x).sum(), "agreement": float(np.mean(agree)),
    }


@pytest.mark.parametrize("density", [None, 0.3])
def test_conflict_stats_match_brute_force(density):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 300))
    x[:, :20] = 0.0  # coordinates no task touched
    x[1:, 20:40] = 0.0  # coordinates only one task touched
    want_x = x if density is None else x * np.stack([_ties_topk_mask(row, density) for row in x])
    got = conflict_stats(torch.from_numpy(x), density)
    want = _brute(want_x)
    for name, value in want.items():
        assert got[name] == pytest.approx(value, rel=1e-12), name
    assert got["chance_T"] == pytest.approx(1 - 2.0 ** -3)
    assert got["n_coords"] == 300


def test_same_sign_vectors_have_no_conflict():
    rng = np.random.default_rng(1)
    x = np.abs(rng.standard_normal((5, 200))) * np.sign(rng.standard_normal(200))  # column-wise one sign
    got = conflict_stats(torch.from_numpy(x))
    assert got["conflict_rate"] == 0.0 and got["mass_conflict"] == 0.0 and got["discarded_mass"] == 0.0
    assert got["agreement"] == 1.0
    opp, both = pairwise_conflicts(torch.from_numpy(x))
    assert float(opp.sum()) == 0.0 and float(both[0, 1]) == 200


@pytest.mark.parametrize("T", [2, 3, 5, 8])
def test_chance_conflict_matches_a_simulation(T):
    g = torch.Generator().manual_seed(T)
    x = torch.randn(T, 200_000, generator=g, dtype=torch.float64)  # independent fair signs
    got = conflict_stats(x)
    assert got["conflict_rate"] == pytest.approx(chance_conflict(T), abs=0.005)
    assert got["chance"] == pytest.approx(chance_conflict(T), abs=1e-12)  # no zeros: same baseline
    opp, both = pairwise_conflicts(x)
    rates = (opp / both)[~torch.eye(T, dtype=torch.bool)]
    assert rates.numpy() == pytest.approx(0.5, abs=0.006)  # pairwise chance


def test_chance_after_trimming_matches_a_simulation():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(6, 200_000, generator=g, dtype=torch.float64)
    got = conflict_stats(x, 0.3)  # each coordinate keeps a random number of survivors
    assert got["conflict_rate"] == pytest.approx(got["chance"], abs=0.005)
    assert got["chance"] < chance_conflict(6)  # fewer survivors, lower chance


def test_pairwise_conflicts_match_numpy_and_chunks():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 1000)) * (rng.random((3, 1000)) < 0.7)
    opp, both = pairwise_conflicts(torch.from_numpy(x))
    for i in range(3):
        for j in range(3):
            prod = x[i] * x[j]
            assert float(opp[i, j]) == np.sum(prod < 0) and float(both[i, j]) == np.sum(prod != 0)


def test_ties_threshold_follows_the_reference_code():
    rng = np.random.default_rng(3)
    x = rng.standard_normal(1001)
    for density in (0.2, 0.5, 0.999):
        thr = ties_threshold(torch.from_numpy(x), density)
        assert np.array_equal(np.abs(x) >= thr, _ties_topk_mask(x, density))
    assert ties_threshold(torch.from_numpy(x), 1.0) is None  # k = 100 % is special-cased: keep all
    assert ties_threshold(torch.from_numpy(x), 1e-6) == pytest.approx(np.abs(x).max())  # keeps the max
    kept = trim(torch.from_numpy(x[None]), 0.2)
    assert int((kept != 0).sum()) == int(1001 * 0.2) + 1  # the reference keeps the kth value itself


def test_global_thresholds_pool_every_key_of_a_task():
    g = torch.Generator().manual_seed(4)
    base = {"a": torch.zeros(30, 20), "b": torch.zeros(50)}
    fts = {t: {k: torch.randn(v.shape, generator=g) * (1 + i) for i, (k, v) in enumerate(base.items())} for t in "xy"}
    tv = wl.TaskVectors(base, fts)
    got = global_thresholds(tv, 0.2)
    for task in "xy":
        flat = np.concatenate([tv.delta(task, k).numpy().ravel() for k in tv.keys])
        mask = _ties_topk_mask(flat, 0.2)
        assert np.array_equal(np.abs(flat) >= got[task], mask)


def test_bad_density_raises():
    with pytest.raises(InvalidParameterError, match="density"):
        conflict_stats(torch.ones(2, 3), 1.5)
    with pytest.raises(InvalidParameterError, match="one per task"):
        trim(torch.ones(2, 3), thresholds=[0.1])
    assert math.isnan(conflict_stats(torch.zeros(3, 4))["conflict_rate"])
