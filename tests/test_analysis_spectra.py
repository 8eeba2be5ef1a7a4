"""Spectral metrics against independent float64 NumPy computations and the identities of section 2."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from weightlens.analysis.spectra import effective_rank, rank_for_energy, spectrum_metrics
from weightlens.errors import InvalidParameterError


def _matrix(m: int, n: int, decay: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((m, m)))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))
    r = min(m, n)
    s = np.exp(-decay * np.arange(r))
    return (u[:, :r] * s) @ v[:, :r].T


def _reference(a: np.ndarray) -> dict[str, float]:
    s = np.linalg.svd(a, compute_uv=False)
    e = s**2
    p = s / s.sum()
    q = e / e.sum()
    tol = max(a.shape) * np.finfo(np.float32).eps * s[0]
    return {
        "stable_rank": e.sum() / e[0],
        "erank": math.exp(-np.sum(p * np.log(p))),
        "erank_energy": math.exp(-np.sum(q * np.log(q))),
        "participation_ratio": e.sum() ** 2 / np.sum(e**2),
        "numerical_rank": int(np.sum(s > tol)),
        "energy_at_8": e[:8].sum() / e.sum(),
        "nuclear": s.sum(),
        "frob": np.linalg.norm(a),
    }


@pytest.mark.parametrize("shape, decay", [((40, 24), 0.15), ((24, 40), 0.05), ((30, 30), 0.0)])
def test_metrics_match_float64_numpy(shape, decay):
    a = _matrix(*shape, decay, seed=1)
    S = torch.linalg.svdvals(torch.from_numpy(a))
    got = spectrum_metrics(S, shape)
    want = _reference(a)
    for name in ("stable_rank", "erank", "participation_ratio", "energy_at_8", "nuclear", "frob"):
        assert got[name] == pytest.approx(want[name], rel=1e-9), name
    assert got["numerical_rank"] == want["numerical_rank"]
    assert spectrum_metrics(S, shape, entropy="energy")["erank"] == pytest.approx(want["erank_energy"], rel=1e-9)
    assert got["sigma_max"] == pytest.approx(np.linalg.norm(a, 2), rel=1e-9)


def test_erank_bounds_and_flat_spectrum():
    assert effective_rank(torch.ones(17)) == pytest.approx(17.0)
    assert effective_rank(torch.tensor([5.0, 0.0, 0.0])) == pytest.approx(1.0)
    s = torch.rand(50, dtype=torch.float64).sort(descending=True).values
    assert 1.0 <= effective_rank(s) <= 50.0
    assert math.isnan(effective_rank(torch.zeros(4)))


def _paper_rank(s: np.ndarray, eps: float) -> int:
    """Iso Eq. 6 by brute force: least k whose residual ||A - A_k||_F <= eps ||A||_F."""
    total = np.sum(s**2)
    for k in range(len(s) + 1):
        if np.sum(s[k:] ** 2) <= eps**2 * total * (1 + 1e-12):
            return k
    raise AssertionError


def _script_rank(s: np.ndarray, eps: float) -> int:
    """The released fig_3a.py rule: argmax of sqrt(cumsum(s^2)/sum(s^2)) > 1 - eps."""
    return int(np.argmax(np.sqrt(np.cumsum(s**2) / np.sum(s**2)) > 1 - eps))


def test_rank_rules_on_a_flat_spectrum_match_the_reference_numbers():
    flat = torch.ones(768)
    assert rank_for_energy(flat, 0.05, criterion="paper") == 767
    assert rank_for_energy(flat, 0.05, criterion="paper_eq6") == 767
    assert rank_for_energy(flat, 0.05, criterion="iso_script") == 693


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("eps", [0.05, 0.2])
def test_rank_rules_match_brute_force(seed, eps):
    rng = np.random.default_rng(seed)
    s = np.sort(rng.gamma(0.5, size=64))[::-1].copy()
    S = torch.from_numpy(s)
    assert rank_for_energy(S, eps, criterion="paper") == _paper_rank(s, eps)
    assert rank_for_energy(S, eps, criterion="iso_script") == _script_rank(s, eps)
    # the script keeps one fewer than the least count passing its own criterion
    passing = np.sqrt(np.cumsum(s**2) / np.sum(s**2)) > 1 - eps
    assert rank_for_energy(S, eps, criterion="iso_script") == int(np.argmax(passing))


def test_rank_for_energy_with_a_truncated_spectrum_uses_the_total():
    s = torch.linspace(10, 1, 100, dtype=torch.float64)
    total = float((s**2).sum())
    full = rank_for_energy(s, 0.3, criterion="paper")
    assert rank_for_energy(s[:full + 5], 0.3, criterion="paper", total_sq=total) == full
    assert rank_for_energy(s[: full - 5], 0.3, criterion="paper", total_sq=total) == full - 5  # lower bound
    assert rank_for_energy(torch.zeros(5), 0.05) == 0


def test_truncated_metrics_keep_exact_energies_and_refuse_full_spectrum_ones():
    a = _matrix(60, 50, 0.1, seed=3)
    s = torch.linalg.svdvals(torch.from_numpy(a))
    total = float(np.sum(a**2))
    got = spectrum_metrics(s[:10], a.shape, total_sq=total)
    assert got["truncated"] and got["n_values"] == 10
    assert got["energy_at_8"] == pytest.approx(_reference(a)["energy_at_8"], rel=1e-9)
    assert got["stable_rank"] == pytest.approx(_reference(a)["stable_rank"], rel=1e-9)
    assert math.isnan(got["erank"]) and math.isnan(got["nuclear"]) and math.isnan(got["numerical_rank"])
    assert math.isnan(got["energy_at_32"])


def test_low_rank_delta_numerical_rank():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((50, 4)) @ rng.standard_normal((4, 30))  # a LoRA-like rank-4 delta
    got = spectrum_metrics(torch.linalg.svdvals(torch.from_numpy(a).float()), a.shape)
    assert got["numerical_rank"] == 4
    assert got["rank_eps"] <= 4
    assert got["energy_at_32"] == 1.0


def test_zero_matrix_gives_nan_ratios_not_errors():
    got = spectrum_metrics(torch.zeros(5), (5, 7))
    assert got["frob"] == 0.0 and got["numerical_rank"] == 0 and got["rank_eps"] == 0
    assert all(math.isnan(got[k]) for k in ("stable_rank", "erank", "participation_ratio", "energy_at_1"))


def test_bad_parameters_raise_with_the_allowed_values():
    with pytest.raises(InvalidParameterError, match="'paper', 'iso_script'"):
        rank_for_energy(torch.ones(3), 0.05, criterion="eq6")
    with pytest.raises(InvalidParameterError, match="eps"):
        rank_for_energy(torch.ones(3), 1.5)
    with pytest.raises(InvalidParameterError, match="entropy"):
        effective_rank(torch.ones(3), entropy="l2")
    with pytest.raises(InvalidParameterError, match="2-D"):
        spectrum_metrics(torch.ones(3), (3,))
