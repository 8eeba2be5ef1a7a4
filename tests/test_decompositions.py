"""weightlens.decompositions: three cached operations on a task's matrix or a sum of tasks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import weightlens as wl
from weightlens import decompositions


@pytest.fixture()
def tv() -> wl.TaskVectors:
    g = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(7, 5, generator=g), "b": torch.randn(5, generator=g)}
    fts = {t: {k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for t in "abc"}
    return wl.TaskVectors(base, fts)


def _delta(tv: wl.TaskVectors, *tasks: str) -> np.ndarray:
    return sum(tv.delta(t, "w").double().numpy() for t in tasks)


def test_a_str_is_one_task_and_a_sequence_is_their_sum(tv):
    for of, want in (("b", _delta(tv, "b")), (["a", "c"], _delta(tv, "a", "c"))):
        U, S, Vh = decompositions.svd(tv, "w", of, device="cpu")
        np.testing.assert_allclose((U * S @ Vh).double().numpy(), want, atol=1e-5)
        s = np.linalg.svd(want, compute_uv=False)
        np.testing.assert_allclose(decompositions.svdvals(tv, "w", of, device="cpu").numpy(), s, rtol=1e-5)
        top = decompositions.topk_svd(tv, "w", of, 2, device="cpu")
        np.testing.assert_allclose(top.S.numpy(), s[:2], rtol=1e-5)


def test_cache_keys_name_the_operation_and_the_subject(tv):
    decompositions.svd(tv, "w", "a", device="cpu")
    decompositions.svd(tv, "w", ("a", "b"), device="cpu")
    decompositions.svdvals(tv, "w", "b", device="cpu")
    decompositions.topk_svd(tv, "w", ["b", "c"], 2, device="cpu")
    tag = ("cpu", "torch.float32")
    assert set(tv.cache._entries) == {
        ("svd", "a", "w", *tag), ("svd_sum", ("a", "b"), "w", *tag),
        ("svdvals", "b", "w", *tag), ("topk_svd_sum", ("b", "c"), "w", 2, *tag),
    }


def test_is_cached_answers_for_the_entry_a_later_call_would_reuse(tv):
    assert not decompositions.is_cached(tv, "w", "a", "svd", device="cpu")
    decompositions.svd(tv, "w", "a", device="cpu")
    decompositions.topk_svd(tv, "w", "b", 2, device="cpu", method="eigh")
    assert decompositions.is_cached(tv, "w", "a", "svd", device="cpu")
    assert not decompositions.is_cached(tv, "w", ("a", "b"), "svd", device="cpu")  # the sum is another subject
    assert decompositions.is_cached(tv, "w", "b", "topk_svd_eigh", 2, device="cpu")
    assert not decompositions.is_cached(tv, "w", "b", "topk_svd_eigh", 3, device="cpu")  # another k
    assert not decompositions.is_cached(tv, "w", "a", "svd", device="cpu", dtype=torch.float64)


def test_a_cached_full_svd_serves_values_and_top_k(tv):
    full = decompositions.svd(tv, "w", tv.names, device="cpu")
    misses = tv.cache.misses
    assert decompositions.svdvals(tv, "w", tv.names, device="cpu") is full.S
    top = decompositions.topk_svd(tv, "w", tv.names, 3, device="cpu")
    assert tv.cache.misses == misses and torch.equal(top.S, full.S[:3]) and torch.equal(top.U, full.U[:, :3])


def test_a_held_delta_is_used_on_a_miss(tv):
    held = torch.zeros(7, 5)
    held[0, 0] = 2.0
    assert decompositions.svd(tv, "w", "a", device="cpu", delta=held).S[0].item() == 2.0


@pytest.mark.parametrize("key, of", [("b", "a"), ("w", []), ("w", "")])
def test_a_vector_key_or_no_task_is_refused(tv, key, of):
    with pytest.raises(wl.InvalidParameterError):
        decompositions.svd(tv, key, of, device="cpu")


def test_left_svd_reuses_a_cached_svd_else_is_cached_apart(tv):
    """``left_svd`` is ``U S`` of a cached full SVD (no new entry); without one, an eigensolve cached under
    ``"left_svd"`` whose projections equal the SVD's."""
    left = decompositions.left_svd(tv, "w", "a", device="cpu")
    assert ("left_svd", "a", "w", "cpu", "torch.float32") in tv.cache
    U, S, Vh = decompositions.svd(tv, "w", "a", device="cpu")
    np.testing.assert_allclose(left.S.numpy(), S.numpy(), rtol=1e-5)
    np.testing.assert_allclose((left.US @ left.US.mT).numpy(), ((U * S) @ (U * S).mT).numpy(), atol=1e-4)
    misses = tv.cache.misses
    again = decompositions.left_svd(tv, "w", "a", device="cpu")
    assert tv.cache.misses == misses and torch.equal(again.US, U * S) and again.S is S
