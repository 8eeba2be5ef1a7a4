"""SAR, STI, principal angles, subspace overlap and cosines against float64 references and identities."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from weightlens.analysis.alignment import (
    cosine_matrix,
    grassmann_distance,
    gram,
    overlap_chance,
    principal_angles,
    sar,
    sar_curve,
    sar_rows,
    sar_to_reference,
    sti,
    subspace_overlap,
    subspace_row,
)
from weightlens.errors import InvalidParameterError, ShapeMismatchError


def _orth(d: int, k: int, rng: np.random.Generator) -> np.ndarray:
    return np.linalg.qr(rng.standard_normal((d, k)))[0]


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


# ------------------------------------------------------------------------------------------ SAR
def test_sar_matches_the_projector_definition():
    rng = np.random.default_rng(0)
    delta = rng.standard_normal((30, 20))
    U = _orth(30, 7, rng)
    want = np.linalg.norm(U @ U.T @ delta) / np.linalg.norm(delta)  # ||Pi_k delta||_F / ||delta||_F
    assert sar(_t(delta), _t(U)) == pytest.approx(want, rel=1e-12)
    assert sar(_t(delta).float(), _t(U).float()) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("shape", [(25, 10), (10, 25), (16, 16)])
def test_sar_of_a_delta_with_itself_at_full_rank_is_one(shape):
    d = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    U = torch.linalg.svd(d, full_matrices=False).U
    assert sar(d, U) == pytest.approx(1.0, abs=1e-6)
    U64 = torch.linalg.svd(d.double(), full_matrices=False).U
    assert sar(d.double(), U64) == pytest.approx(1.0, abs=1e-12)


def test_sar_curve_gives_every_rank_and_is_monotone():
    rng = np.random.default_rng(2)
    deltas = rng.standard_normal((3, 12, 9))
    U = np.linalg.svd(deltas.sum(0), full_matrices=False)[0]
    curve = sar_curve(_t(deltas), _t(U))
    assert curve.shape == (3, 10) and curve.dtype == torch.float64
    for t in range(3):
        for k in range(10):
            want = np.linalg.norm(U[:, :k].T @ deltas[t]) / np.linalg.norm(deltas[t])
            assert float(curve[t, k]) == pytest.approx(want, abs=1e-12)
    assert bool((curve.diff(dim=1) >= -1e-12).all())
    assert math.isnan(sar(torch.zeros(12, 9, dtype=torch.float64), _t(U)))


def test_sar_rows_report_both_rank_rules_and_clip_to_available_vectors():
    rng = np.random.default_rng(3)
    deltas = _t(rng.standard_normal((2, 10, 8)))
    U = torch.linalg.svd(deltas.sum(0), full_matrices=False).U
    rows = sar_rows("w", deltas, ["a", "b"], "sum", U[:, :5], {"paper": 7, "iso_script": 4}, "paper")
    assert rows[0]["k_paper"] == 5 and rows[0]["k_iso_script"] == 4 and rows[0]["clipped"]
    assert rows[0]["sar"] == rows[0]["sar_paper"]
    want = np.linalg.norm(U[:, :4].numpy().T @ deltas[1].numpy()) / np.linalg.norm(deltas[1].numpy())
    assert rows[1]["sar_iso_script"] == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("side", ["svd", "left"])
def test_sar_to_reference_matches_the_projector_definition_from_an_svd_or_its_left_side(side):
    # compare's SAR against a merged update: from its SVD or from U S and S (linalg.left_svd), the
    # projection taken only up to the largest k of the rules; float64 projector reference per rule.
    from weightlens import linalg

    rng = np.random.default_rng(5)
    deltas = _t(rng.standard_normal((3, 40, 24)) * np.logspace(0, -3, 24))
    ref = deltas.sum(0) + 0.1 * deltas[0]
    dec = linalg.svd(ref, dtype=torch.float64) if side == "svd" else linalg.left_svd(ref, dtype=torch.float64)
    rows = sar_to_reference("w", deltas, ["a", "b", "c"], "merged", dec, eps=0.05, criterion="paper")
    U = np.linalg.svd(ref.numpy(), full_matrices=False)[0]
    for row, d in zip(rows, deltas.numpy()):
        for rule in ("paper", "iso_script"):
            k = row[f"k_{rule}"]
            assert 0 < k < 24 and not row["clipped"]
            want = np.linalg.norm(U[:, :k].T @ d) / np.linalg.norm(d)
            assert row[f"sar_{rule}"] == pytest.approx(want, rel=1e-9)


def test_sar_shape_errors_name_both_shapes():
    with pytest.raises(ShapeMismatchError, match="10 rows but U has 9"):
        sar(torch.zeros(10, 4), torch.zeros(9, 2))


# ------------------------------------------------------------------------------------------ STI
def _sti_reference(Us, Ss, Vs) -> float:
    """Literal TSV formula with explicit blockdiag(Sigma) and dense identity, float64 NumPy."""
    Uc, Vc = np.concatenate(Us, axis=1), np.concatenate(Vs, axis=1)
    Sc = scipy.linalg.block_diag(*[np.diag(s) for s in Ss])
    eye = np.eye(Uc.shape[1])
    return float(np.abs((Uc.T @ Uc - eye) @ Sc @ (Vc.T @ Vc - eye)).sum())


def _task_svds(deltas: np.ndarray, k: int):
    Us, Ss, Vs = [], [], []
    for d in deltas:
        u, s, vh = np.linalg.svd(d, full_matrices=False)
        Us.append(u[:, :k]), Ss.append(s[:k]), Vs.append(vh[:k].T)
    return Us, Ss, Vs


@pytest.mark.parametrize("k", [2, 5])
def test_sti_matches_the_literal_formula(k):
    rng = np.random.default_rng(4)
    Us, Ss, Vs = _task_svds(rng.standard_normal((3, 14, 10)), k)
    got = sti([_t(u) for u in Us], [_t(s) for s in Ss], [_t(v) for v in Vs], chunk=4)  # chunked path
    assert got == pytest.approx(_sti_reference(Us, Ss, Vs), rel=1e-10)
    norm = sti([_t(u) for u in Us], [_t(s) for s in Ss], [_t(v) for v in Vs], normalized=True)
    assert norm == pytest.approx(got / sum(s.sum() for s in Ss), rel=1e-10)


def _orthogonal_tasks(T: int, m: int, n: int, k: int, seed: int) -> np.ndarray:
    """T task matrices whose left and right singular subspaces are mutually orthogonal."""
    rng = np.random.default_rng(seed)
    Q, P = _orth(m, T * k, rng), _orth(n, T * k, rng)
    return np.stack([
        Q[:, t * k:(t + 1) * k] @ np.diag(rng.uniform(1, 3, k)) @ P[:, t * k:(t + 1) * k].T for t in range(T)
    ])


def test_sti_of_mutually_orthogonal_subspaces_is_zero():
    deltas = _orthogonal_tasks(T=3, m=20, n=16, k=4, seed=5)
    Us, Ss, Vs = _task_svds(deltas, 4)
    assert sti([_t(u) for u in Us], [_t(s) for s in Ss], [_t(v) for v in Vs]) == pytest.approx(0.0, abs=1e-10)
    overlapping = _task_svds(np.stack([deltas[0], deltas[0] + deltas[1]]), 4)
    assert sti(*[[_t(x) for x in part] for part in overlapping]) > 0.1


def _fusion_bench_sti(deltas: list[torch.Tensor]) -> torch.Tensor:
    """fusion_bench's compute_task_singular_interference, reproduced: singular vectors stacked as rows."""
    U, S, V = [], [], []
    for d in deltas:
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        U.append(u), S.append(s), V.append(vh.t())
    U, S, V = torch.cat(U, dim=0), torch.cat(S, dim=0), torch.cat(V, dim=0)
    eye = torch.eye(U.shape[1], dtype=U.dtype)
    return torch.linalg.multi_dot((U.t() @ U - eye, torch.diag(S), V.t() @ V - torch.eye(V.shape[1], dtype=V.dtype)))


def test_row_stacking_bug_gives_a_different_wrong_answer():
    orth = _orthogonal_tasks(T=2, m=12, n=12, k=6, seed=6)  # two rank-6 tasks in orthogonal subspaces
    same = np.stack([orth[0], orth[0]])
    for deltas in (orth, same):
        # Row stacking makes U^T U = sum_i U_i^T U_i = T * I whatever the subspaces are ...
        Us = [np.linalg.svd(d, full_matrices=False)[0] for d in deltas]
        stacked = np.concatenate(Us, axis=0)
        np.testing.assert_allclose(stacked.T @ stacked, 2 * np.eye(12), atol=1e-10)
    # ... so it cannot tell orthogonal tasks (true STI 0) from identical ones (true STI > 0),
    right = [sti(*[[_t(x) for x in part] for part in _task_svds(d, 6)]) for d in (orth, same)]
    assert right[0] == pytest.approx(0.0, abs=1e-10) and right[1] > 1.0
    # and the function as published does not even run for T >= 2 (Sigma has T*r rows, the Grams r).
    with pytest.raises(RuntimeError):
        _fusion_bench_sti([_t(d) for d in orth])
    # With T = 1 it runs and agrees with the column-concatenated definition (0: nothing to interfere with).
    assert float(_fusion_bench_sti([_t(orth[0])]).abs().sum()) == pytest.approx(0.0, abs=1e-9)


def test_sti_rejects_inconsistent_parts():
    with pytest.raises(InvalidParameterError, match="one \\(U, S, V\\) per task"):
        sti([torch.eye(3)], [], [])
    with pytest.raises(ShapeMismatchError, match="V = Vh.T"):
        sti([torch.eye(3)[:, :2]], [torch.ones(2)], [torch.eye(3)[:2]])


# ------------------------------------------------------------------------------- principal angles
@pytest.mark.parametrize("p, q", [(5, 5), (6, 3), (2, 7)])
def test_principal_angles_match_scipy(p, q):
    rng = np.random.default_rng(7)
    A, B = _orth(20, p, rng), _orth(20, q, rng)
    got = principal_angles(_t(A), _t(B)).numpy()
    want = np.sort(scipy.linalg.subspace_angles(A, B))
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert grassmann_distance(torch.from_numpy(got)) == pytest.approx(np.linalg.norm(want), abs=1e-12)


def test_small_angles_stay_accurate():
    theta = 1e-9
    A = np.eye(4)[:, :2]
    B = np.stack([[1, 0, 0, 0], [0, math.cos(theta), math.sin(theta), 0]], axis=1)
    got = principal_angles(_t(A), _t(B)).numpy()
    np.testing.assert_allclose(got, [0.0, theta], atol=1e-20, rtol=1e-6)  # arccos would give 0 or ~1e-8


@pytest.mark.parametrize("theta", [1e-7, 3e-3, 0.05, 1.2])
def test_planted_angles_are_recovered_on_both_sides_of_the_small_angle_switch(theta):
    rng = np.random.default_rng(11)
    Q = _orth(9, 4, rng)  # A = span(q0, q1); B = span(q0, cos t q1 + sin t q2)
    A = Q[:, :2]
    B = np.stack([Q[:, 0], math.cos(theta) * Q[:, 1] + math.sin(theta) * Q[:, 2]], axis=1)
    got = principal_angles(_t(A), _t(B)).numpy()
    np.testing.assert_allclose(got, [0.0, theta], rtol=1e-7, atol=1e-12)


def test_subspace_row_matches_scipy_on_both_sides():
    rng = np.random.default_rng(12)
    Ua, Ub, Va, Vb = _orth(30, 5, rng), _orth(30, 5, rng), _orth(20, 5, rng), _orth(20, 5, rng)
    row = subspace_row(_t(Ua), _t(Ub), _t(Va), _t(Vb))
    for side, a, b in (("left", Ua, Ub), ("right", Va, Vb)):
        angles = scipy.linalg.subspace_angles(a, b)
        assert row[f"overlap_{side}"] == pytest.approx(np.mean(np.cos(angles) ** 2), rel=1e-12)
        assert row[f"grassmann_{side}"] == pytest.approx(np.linalg.norm(angles), rel=1e-12)
        assert row[f"chance_{side}"] == 5 / a.shape[0]
    assert row["k_sub"] == 5


def test_subspace_overlap_matches_mean_squared_cosine():
    rng = np.random.default_rng(8)
    A, B = _orth(30, 4, rng), _orth(30, 6, rng)
    cos = np.cos(scipy.linalg.subspace_angles(A, B))
    assert subspace_overlap(_t(A), _t(B)) == pytest.approx(np.mean(cos**2), rel=1e-12)
    assert subspace_overlap(_t(A), _t(A)) == pytest.approx(1.0)
    assert subspace_overlap(_t(np.eye(5)[:, :2]), _t(np.eye(5)[:, 2:4])) == 0.0


@pytest.mark.parametrize("d, p, q", [(40, 5, 5), (60, 3, 9)])
def test_overlap_chance_matches_a_simulation(d, p, q):
    rng = np.random.default_rng(9)
    draws = [subspace_overlap(_t(_orth(d, p, rng)), _t(_orth(d, q, rng))) for _ in range(3000)]
    assert np.mean(draws) == pytest.approx(overlap_chance(p, q, d), rel=0.03)
    assert overlap_chance(5, 5, 40) == 5 / 40  # the k/d baseline


# ------------------------------------------------------------------------------------------ cosines
def test_cosine_matrix_matches_numpy_and_handles_zero_vectors():
    rng = np.random.default_rng(10)
    x = rng.standard_normal((3, 4, 5))
    flat = x.reshape(3, -1)
    want = (flat @ flat.T) / np.outer(np.linalg.norm(flat, axis=1), np.linalg.norm(flat, axis=1))
    np.testing.assert_allclose(cosine_matrix(gram(_t(x))).numpy(), want, atol=1e-12)
    x[1] = 0
    c = cosine_matrix(gram(_t(x)))
    assert math.isnan(float(c[0, 1])) and float(c[0, 2]) == pytest.approx(want[0, 2])
