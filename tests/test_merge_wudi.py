"""``wudi`` (WUDI-Merging): the exact solver against an independent float64 least-squares solve and a zero
gradient; the adam solver against the reference's loop (``torch.optim.Adam`` back-propagating through the
``(X - tau_t) tau_t^T`` products); identities, factored task vectors, errors."""

from __future__ import annotations

import pytest
import torch

import weightlens as wl
from weightlens.errors import InvalidParameterError
from weightlens.merge import get_method, merge
from weightlens.merge.wudi import wudi_adam, wudi_exact, wudi_exact_factored, wudi_objective

from _merge_inputs import noise_task_vectors

CPU = {"device": "cpu"}
F64 = torch.float64


def _taus(T: int, m: int, n: int, seed: int = 0, scale: float = 0.01) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(T, m, n, generator=g, dtype=F64)


# ------------------------------------------------------------------------------ independent references
def _lstsq_reference(taus: torch.Tensor) -> torch.Tensor:
    """The normal equations X S = B, S = sum_t tau_t^T tau_t / ||tau_t||^2, B = sum_t tau_t S_t, stacked as
    S^T X^T = B^T and solved by torch.linalg.lstsq (gelsd: the minimum-norm solution), float64."""
    taus = taus.to(F64)
    grams = [t.mT @ t / t.square().sum() for t in taus if t.any()]
    S = sum(grams)
    B = sum(t @ G for t, G in zip([t for t in taus if t.any()], grams))
    return torch.linalg.lstsq(S.mT, B.mT, driver="gelsd", rcond=1e-12).solution.mT


def _reference_adam(taus: torch.Tensor, steps: int, lr: float) -> torch.Tensor:
    """The reference's get_merge_vector, on CPU: Adam on the loss written as the reference writes it."""
    vectors = taus.to(torch.float32)
    merging = torch.nn.Parameter(vectors.sum(0).clone())
    opt = torch.optim.Adam([merging], lr=lr, weight_decay=0)
    l2 = torch.square(torch.norm(vectors.reshape(vectors.shape[0], -1), p=2, dim=-1))
    for _ in range(steps):
        inner = torch.matmul(merging.unsqueeze(0) - vectors, vectors.transpose(1, 2))
        loss = torch.sum(torch.square(inner) / l2.unsqueeze(-1).unsqueeze(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return merging.detach()


def _grad(X: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
    X = X.detach().to(F64).requires_grad_(True)
    wudi_objective(X, taus.to(F64)).backward()
    return X.grad


# ------------------------------------------------------------------------------ the exact solver
@pytest.mark.parametrize("T, m, n", [(4, 30, 20), (3, 5, 40), (2, 12, 12), (5, 7, 60)])
def test_exact_matches_a_float64_lstsq_of_the_normal_equations_and_zeroes_the_gradient(T, m, n):
    taus = _taus(T, m, n, seed=T + m + n)
    X = wudi_exact(taus)
    want = _lstsq_reference(taus)
    torch.testing.assert_close(X, want, rtol=1e-8, atol=1e-12)
    assert _grad(X, taus).abs().max() < 1e-12 * max(1.0, float(taus.abs().max()))
    # a minimum: any perturbation raises the objective (or leaves it, along the null space)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        assert wudi_objective(X + 1e-4 * torch.randn(m, n, generator=g, dtype=F64), taus) >= wudi_objective(X, taus)
    assert wudi_objective(X, taus) < wudi_objective(taus.sum(0), taus)


def test_singular_case_is_the_minimum_norm_solution_which_is_the_one_closest_to_the_sum():
    taus = _taus(3, 4, 50, seed=5)  # rows span 12 of 50 input directions
    X = wudi_exact(taus)
    rows = taus.reshape(-1, 50)
    P = torch.linalg.pinv(rows) @ rows  # projector onto the tasks' row space
    torch.testing.assert_close(X @ P, X, rtol=0, atol=1e-14)  # rows in that span: minimum norm
    torch.testing.assert_close(taus.sum(0) @ P, taus.sum(0), rtol=0, atol=1e-14)  # the init lies there too
    torch.testing.assert_close(X, _lstsq_reference(taus), rtol=1e-8, atol=1e-12)


def test_identities_one_task_and_orthogonal_row_spaces():
    tau = _taus(1, 8, 6, seed=2)
    torch.testing.assert_close(wudi_exact(tau), tau[0], rtol=1e-10, atol=1e-14)
    # tasks on disjoint input coordinates: no interference, the minimiser is the sum
    taus = torch.zeros(3, 8, 9, dtype=F64)
    for t in range(3):
        taus[t, :, 3 * t:3 * t + 3] = _taus(1, 8, 3, seed=10 + t)[0]
    torch.testing.assert_close(wudi_exact(taus), taus.sum(0), rtol=1e-10, atol=1e-14)
    # the same after a rotation of the input space
    Q, _ = torch.linalg.qr(torch.randn(9, 9, generator=torch.Generator().manual_seed(3), dtype=F64))
    torch.testing.assert_close(wudi_exact(taus @ Q), (taus @ Q).sum(0), rtol=1e-10, atol=1e-14)
    # identical tasks: X = tau
    same = tau.expand(4, -1, -1)
    torch.testing.assert_close(wudi_exact(same), tau[0], rtol=1e-10, atol=1e-14)


def test_rcond_cuts_the_small_directions():
    taus = _taus(3, 10, 8, seed=8)
    torch.testing.assert_close(wudi_exact(taus, rcond=0.0), wudi_exact(taus), rtol=1e-10, atol=1e-14)
    N = (taus / taus.reshape(3, -1).norm(dim=1)[:, None, None]).reshape(-1, 8)
    S = torch.linalg.svdvals(N)
    rcond = float(S[3] / S[0]) * 1.0001  # keeps the top 3 directions
    V = torch.linalg.svd(N, full_matrices=False).Vh[:3].mT
    X = wudi_exact(taus, rcond=rcond)
    torch.testing.assert_close(X @ V @ V.mT, X, rtol=0, atol=1e-14)  # rows in the kept directions
    B = sum(t @ (t.mT @ t) / t.square().sum() for t in taus)
    torch.testing.assert_close(X, B @ V @ torch.diag(S[:3] ** -2) @ V.mT, rtol=1e-8, atol=1e-12)  # B S_3^+
    tv = noise_task_vectors(3, shape=(10, 8), scale=0.01, seed=8)
    got = merge(tv, method="wudi", solver="exact", rcond=0.5, **CPU).update("w").double()
    torch.testing.assert_close(got, wudi_exact(tv.deltas("w"), rcond=0.5), rtol=1e-5, atol=1e-9)


def test_factored_solver_equals_the_dense_one():
    g = torch.Generator().manual_seed(4)
    factors = [(torch.randn(r, 40, generator=g, dtype=F64), torch.randn(30, r, generator=g, dtype=F64), s)
               for r, s in [(3, 0.5), (2, 2.0), (4, 1.0)]]
    dense = torch.stack([s * B @ A for A, B, s in factors])
    torch.testing.assert_close(wudi_exact_factored(factors), wudi_exact(dense), rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(wudi_exact_factored(factors[:1]), dense[0], rtol=1e-8, atol=1e-12)
    # the dense product rounded to fp32 (a task vector as TaskVectors holds it): its rounding noise, far below
    # the fp32 rank cut, is not inverted
    rounded = wudi_exact(dense.float())
    assert (rounded - wudi_exact_factored(factors)).abs().max() < 1e-5 * dense.sum(0).abs().max()


# ------------------------------------------------------------------------------ the adam solver
def test_adam_equals_the_reference_loop_and_decreases_the_objective():
    taus = _taus(3, 12, 10, seed=6).float()
    got = wudi_adam(taus, steps=50, lr=1e-5)
    want = _reference_adam(taus, 50, 1e-5)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    losses = [float(wudi_objective(wudi_adam(taus, steps=k, lr=1e-5).double(), taus)) for k in (0, 10, 100, 300)]
    assert losses == sorted(losses, reverse=True) and losses[-1] < losses[0]
    assert torch.equal(wudi_adam(taus, steps=0), taus.sum(0))
    assert torch.equal(wudi_adam(taus, steps=30), wudi_adam(taus, steps=30))  # deterministic


def test_adam_approaches_the_exact_minimum():
    taus = _taus(4, 30, 20, seed=0)
    exact = wudi_exact(taus)
    X = wudi_adam(taus, steps=3000, lr=1e-3).double()
    l_exact, l_adam, l_sum = (float(wudi_objective(x, taus)) for x in (exact, X, taus.sum(0)))
    assert l_adam - l_exact < 1e-4 * (l_sum - l_exact)
    assert (X - exact).norm() < 0.02 * (taus.sum(0) - exact).norm()


# ------------------------------------------------------------------------------ the method
def test_merge_solves_matrices_and_averages_the_rest():
    tv = noise_task_vectors(3, shape=(12, 8), scale=0.01, seed=1)
    got = merge(tv, method="wudi", solver="exact", alpha=1.0, **CPU)
    taus = torch.stack([tv.delta(t, "w") for t in tv.names]).double()
    torch.testing.assert_close(got.update("w").double(), wudi_exact(taus), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(got.update("b"), tv.deltas("b").mean(0))
    assert torch.equal(merge(tv, method="wudi", others="sum", **CPU).update("b"), tv.deltas("b").sum(0))
    default = merge(tv, method="wudi", **CPU)
    assert default.params["solver"] == "adam" and torch.equal(default.update("w"), wudi_adam(tv.deltas("w")))
    adam = merge(tv, method="wudi", solver="adam", steps=20, **CPU)
    assert torch.equal(adam.update("w"), wudi_adam(tv.deltas("w"), steps=20, lr=1e-5))
    assert merge(tv, method="wudi", solver="adam", steps=0, **CPU).update("w").equal(tv.deltas("w").sum(0))
    assert get_method("wudi").alpha_grid({}, 3) == pytest.approx([0.05 * i for i in range(1, 31)])


def test_a_zero_task_is_left_out_and_noted():
    base = {"w": torch.zeros(6, 5)}
    g = torch.Generator().manual_seed(2)
    d = torch.randn(6, 5, generator=g)
    tv = wl.TaskVectors(base, {"a": {"w": d}, "b": {"w": torch.zeros(6, 5)}})
    got = merge(tv, method="wudi", solver="exact", **CPU)
    torch.testing.assert_close(got.update("w"), d, rtol=1e-5, atol=1e-6)
    assert any("'b' has an all-zero matrix" in n for n in got.notes["note"])
    none = wl.TaskVectors(base, {"a": {"w": torch.zeros(6, 5)}, "b": {"w": torch.zeros(6, 5)}})
    assert not merge(none, method="wudi", **CPU).update("w").any()


@pytest.mark.parametrize("params, name", [({"solver": "lbfgs"}, "solver"), ({"steps": -1}, "steps"),
                                          ({"lr": 0.0}, "lr"), ({"lr": -1e-5}, "lr"), ({"others": "max"}, "others"),
                                          ({"steps": 1.5}, "steps"), ({"rcond": 1.0}, "rcond"),
                                          ({"rcond": -0.1}, "rcond")])
def test_errors_name_the_parameter(params, name):
    tv = noise_task_vectors(2)
    with pytest.raises(InvalidParameterError, match=rf"The '{name}' parameter of wudi"):
        merge(tv, method="wudi", **params, **CPU)


def test_the_studio_keeps_the_learning_rate():
    pytest.importorskip("ipywidgets")
    from weightlens.widgets import MergeStudio

    studio = MergeStudio(noise_task_vectors(2, shape=(6, 4), scale=0.01), method="wudi")
    assert studio.wait(60) and studio.last_error is None
    assert studio.params["wudi"]["lr"].value == 1e-5 and studio.params["wudi"]["steps"].value == 300
