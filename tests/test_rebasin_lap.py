"""LAP solvers: the torch auction against SciPy's exact solver, and their use in matching."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from test_rebasin_builders import make_mlp

from weightlens.errors import InvalidParameterError
from weightlens.rebasin import Permutations, activation_matching, merge_many, mlp_spec, weight_matching
from weightlens.rebasin.lap import auction, solve


def value(c: np.ndarray, col: np.ndarray) -> float:
    return float(c[np.arange(len(col)), col].sum())


def brute_force(c: np.ndarray) -> float:
    return max(value(c, np.array(p)) for p in itertools.permutations(range(c.shape[0])))


@pytest.mark.parametrize("n", [1, 2, 3, 6])
def test_both_solvers_reach_the_brute_force_optimum(n):
    rng = np.random.default_rng(n)
    for c in (rng.standard_normal((n, n)), rng.integers(0, 5, (n, n)).astype(float), np.ones((n, n))):
        want = brute_force(c)  # independent: every permutation tried
        for solver in ("scipy", "auction"):
            col = solve(c, solver)
            assert col.dtype == np.int64 and sorted(col.tolist()) == list(range(n))
            assert value(c, col) == pytest.approx(want, rel=1e-12, abs=1e-12), solver


@pytest.mark.parametrize("n", [40, 257])
def test_auction_matches_scipy_on_larger_matrices(n):
    rng = np.random.default_rng(10 + n)
    low_rank = rng.standard_normal((n, 6)) @ rng.standard_normal((6, n))  # many near-ties
    integers = rng.integers(-1000, 1000, (n, n)).astype(float)  # exact for integer costs
    for c in (low_rank, integers):
        best = value(c, solve(c, "scipy"))
        assert value(c, solve(c, "auction")) == pytest.approx(best, rel=1e-9)
    torch_col = auction(torch.from_numpy(integers))
    assert torch_col.dtype == torch.int64 and value(integers, torch_col.numpy()) == best


def test_solve_validates_its_input():
    with pytest.raises(InvalidParameterError, match="'lap' parameter must be one of 'scipy', 'auction'"):
        solve(np.eye(3), "hungarian")
    with pytest.raises(InvalidParameterError, match=r"square matrix; got shape \(2, 3\)"):
        solve(np.zeros((2, 3)), "auction")
    with pytest.raises(InvalidParameterError, match="NaN or Inf"):
        solve(np.array([[1.0, np.nan], [0.0, 1.0]]), "auction")
    assert solve(np.zeros((0, 0)), "auction").shape == (0,)


def test_weight_matching_and_merge_many_with_the_auction_agree_with_scipy():
    sd = make_mlp(sizes=(20, 64, 48, 32, 5)).state_dict()
    spec = mlp_spec(sd)
    planted = Permutations.random(spec, sd, seed=5)
    found = weight_matching(sd, planted.apply(sd), spec, lap="auction")
    assert found.compose(planted).is_identity()
    a, b = make_mlp(0).state_dict(), make_mlp(1).state_dict()
    spec = mlp_spec(a)
    assert weight_matching(a, b, spec, seed=3, lap="auction").equals(weight_matching(a, b, spec, seed=3))
    many = [make_mlp(s).state_dict() for s in (0, 1, 2)]
    ours, ref = merge_many(many, spec, lap="auction"), merge_many(many, spec)
    assert all(x.equals(y) for x, y in zip(ours.permutations, ref.permutations))
    with pytest.raises(InvalidParameterError, match="'lap'"):
        weight_matching(a, b, spec, lap="greedy")


def test_activation_matching_with_the_auction_recovers_a_planted_permutation():
    model = make_mlp(sizes=(12, 32, 24, 5))
    a = model.state_dict()
    spec = mlp_spec(a)
    planted = Permutations.random(spec, a, seed=2)
    x = torch.randn(300, 12, generator=torch.Generator().manual_seed(0))
    found = activation_matching(a, planted.apply(a), spec, lambda: make_mlp(sizes=(12, 32, 24, 5)), (x, None),
                                lap="auction")
    assert found.compose(planted).is_identity()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auction_on_cuda_matches_scipy():
    rng = np.random.default_rng(3)
    c = rng.standard_normal((512, 8)) @ rng.standard_normal((8, 512))
    col = solve(torch.from_numpy(c).cuda(), "auction")
    assert value(c, col) == pytest.approx(value(c, solve(c, "scipy")), rel=1e-9)
    sd = make_mlp(sizes=(20, 64, 48, 32, 5)).state_dict()
    spec = mlp_spec(sd)
    planted = Permutations.random(spec, sd, seed=5)
    found = weight_matching(sd, planted.apply(sd), spec, lap="auction", device="cuda")
    assert found.compose(planted).is_identity()
