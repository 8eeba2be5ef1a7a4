"""Exact SVDs from low-rank factors against float64 dense SVDs of the product (linear algebra only)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from weightlens.errors import ShapeMismatchError
from weightlens.linalg.factored import concat_factors, factored_svd


def _lora(m: int, n: int, r: int, seed: int, decay: float = 0.7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(m, r, generator=g) * decay ** torch.arange(r)  # a spread-out spectrum, like trained adapters
    A = torch.randn(r, n, generator=g) / n**0.5
    return B, A


def _principal_cosines(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    return np.linalg.svd(X.T @ Y, compute_uv=False)


@pytest.mark.parametrize("m, n, r", [(384, 1536, 16), (1536, 384, 8), (64, 48, 5)])
def test_one_product_matches_the_dense_float64_svd(m, n, r):
    B, A = _lora(m, n, r, seed=m + r)
    got = factored_svd(B, A, scale=2.0, device="cpu")
    dense = 2.0 * (B.double() @ A.double()).numpy()
    U, S, Vh = np.linalg.svd(dense, full_matrices=False)
    assert got.U.shape == (m, r) and got.S.shape == (r,) and got.Vh.shape == (r, n)
    np.testing.assert_allclose(got.S.double().numpy(), S[:r], rtol=1e-6)
    assert S[r] < 1e-12 * S[0]  # the product has rank r: nothing is left out
    for k in (1, r // 2, r):  # subspaces agree (well-separated spectrum): principal cosines 1
        np.testing.assert_allclose(_principal_cosines(got.U[:, :k].double().numpy(), U[:, :k]), 1.0, atol=1e-5)
        np.testing.assert_allclose(_principal_cosines(got.Vh[:k].double().numpy().T, Vh[:k].T), 1.0, atol=1e-5)
    recon = (got.U.double() * got.S.double()) @ got.Vh.double()
    np.testing.assert_allclose(recon.numpy(), dense, atol=1e-6 * S[0])
    assert got.U.dtype == torch.float32
    # signs as linalg.svd: the largest-magnitude entry of every U column is positive
    cols = got.U.abs().argmax(0)
    assert (got.U[cols, torch.arange(r)] > 0).all()


def test_a_sum_of_adapters_is_one_product_of_concatenated_factors():
    parts = [(*reversed(_lora(200, 300, r, seed=s)), scale) for s, r, scale in ((1, 4, 2.0), (2, 8, 0.5), (3, 6, -1.0))]
    B, A = concat_factors(parts)
    assert B.shape == (200, 18) and A.shape == (18, 300)
    total = sum(scale * (Bi.double() @ Ai.double()) for Ai, Bi, scale in parts)
    got = factored_svd(B, A, device="cpu", dtype=torch.float64)
    S = np.linalg.svd(total.numpy(), compute_uv=False)
    np.testing.assert_allclose(got.S.numpy(), S[:18], rtol=1e-10)
    np.testing.assert_allclose(((got.U * got.S) @ got.Vh).numpy(), total.numpy(), atol=1e-12 * S[0])


def test_full_rank_factors_fall_back_to_the_dense_svd():
    B, A = _lora(20, 12, 16, seed=4)
    got = factored_svd(B, A, device="cpu")
    S = np.linalg.svd((B.double() @ A.double()).numpy(), compute_uv=False)
    assert got.S.shape == (12,)
    np.testing.assert_allclose(got.S.double().numpy(), S, rtol=1e-5)


def test_bad_factors_are_refused_naming_the_key():
    B, A = _lora(20, 12, 4, seed=5)
    with pytest.raises(ShapeMismatchError, match="'q.weight'.*B \\(20, 4\\) @ A \\(3, 12\\)"):
        factored_svd(B, A[:3], name="q.weight")
    with pytest.raises(ShapeMismatchError, match="factors\\[1\\]"):
        concat_factors([(A, B, 1.0), (A[:, :5], B, 1.0)])
