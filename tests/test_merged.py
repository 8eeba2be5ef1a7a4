"""One meaning of ``merged``: a merge result or full merged weights, its update taken in one place.

``analyze(merged=)``, ``alignment_to_merged`` and ``compare`` are checked to agree on the digits task
zoo (real trained MLPs), and against a float64 SAR computed here with numpy.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import weightlens as wl
from weightlens.analysis import alignment_to_merged, analyze
from weightlens.errors import KeyMismatchError, ShapeMismatchError
from weightlens.merge import compare, merge
from weightlens.merged import MergedWeights, check_merged, merged_keys, merged_update


@pytest.fixture(scope="module")
def tv(digits_zoo):
    return digits_zoo.task_vectors()


@pytest.fixture(scope="module")
def ties(tv):
    return merge(tv, method="ties", alpha=0.6, device="cpu")


def _sar64(delta: np.ndarray, update: np.ndarray, k: int) -> float:
    U = np.linalg.svd(update, full_matrices=False)[0][:, :k]
    return float(np.linalg.norm(U.T @ delta) / np.linalg.norm(delta))


def test_a_merge_result_is_merged_weights_and_hands_over_its_own_update(tv, ties):
    assert isinstance(ties, MergedWeights)
    assert merged_keys(tv, ties) == ties.updated_keys
    for key in tv.keys:
        assert torch.equal(merged_update(tv, ties, key, caller="test"), ties.update(key))


def test_plain_weights_give_merged_minus_base_in_float32(tv, ties):
    weights = {k: ties[k].clone() for k in ties}  # what a user has after wl.load(folder)
    assert merged_keys(tv, weights) == list(tv.keys)
    for key in tv.keys:
        want = weights[key].double() - tv.base_tensor(key).double()
        got = merged_update(tv, weights, key, caller="test")
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)


def test_analyze_alignment_and_compare_agree_on_sar_against_the_merge(tv, ties):
    weights = {k: ties[k].clone() for k in ties}
    by_result = analyze(tv, merged=ties, device="cpu", progress=False).alignment.query("reference == 'merged'")
    by_weights = analyze(tv, merged=weights, device="cpu", progress=False).alignment.query("reference == 'merged'")
    table = alignment_to_merged(tv, ties, device="cpu")
    cmp = compare(tv, ties, device="cpu").alignment.query("which == 'merged'")
    keys = tv.keys_of_kind("matrix")
    assert set(by_result["key"]) == set(table["key"]) == set(cmp["key"]) == set(keys)
    a = by_result.set_index(["key", "task"])["sar"].sort_index()
    b = table.set_index(["key", "task"])["sar"].sort_index()
    c = cmp.set_index(["key", "task"])["sar"].sort_index()
    w = by_weights.set_index(["key", "task"])["sar"].sort_index()
    np.testing.assert_allclose(a.to_numpy(), b.to_numpy(), rtol=1e-6)
    np.testing.assert_allclose(a.to_numpy(), c.to_numpy(), rtol=1e-6)
    np.testing.assert_allclose(a.to_numpy(), w.to_numpy(), rtol=1e-4)  # weights were cast to the base dtype
    ks = table.set_index(["key", "task"])["k"]
    for key in keys:
        update = ties.update(key).double().numpy()
        for t, task in enumerate(tv.names):
            want = _sar64(tv.delta(task, key).double().numpy(), update, int(ks[(key, task)]))
            assert a[(key, task)] == pytest.approx(want, rel=1e-5, abs=1e-7)


def test_only_updated_keys_of_a_partial_merge_count(tv):
    key = tv.keys_of_kind("matrix")[0]
    partial = {key: tv.base_tensor(key) + tv.deltas(key).sum(0)}
    rep = analyze(tv, merged=partial, device="cpu", progress=False)
    assert set(rep.alignment.query("reference == 'merged'")["key"]) == {key}
    assert set(alignment_to_merged(tv, partial, device="cpu")["key"]) == {key}


def test_weights_of_another_model_are_refused_naming_the_key_and_caller(tv, digits_zoo):
    key = tv.keys_of_kind("matrix")[0]
    wrong = {key: torch.zeros(3, 3)}
    with pytest.raises(ShapeMismatchError, match=rf"analyze\(merged=\.\.\.\): key '{key}' has shape \(3, 3\)"):
        analyze(tv, merged=wrong, progress=False)
    with pytest.raises(ShapeMismatchError, match=rf"alignment_to_merged\(\): key '{key}'"):
        alignment_to_merged(tv, wrong)
    with pytest.raises(KeyMismatchError, match=r"compare\(\): key .* is missing from the merged weights"):
        compare(tv, wrong)
    with pytest.raises(KeyMismatchError, match="received no update"):
        check_merged(tv, merge(digits_zoo.task_vectors(exclude=[key]), method="task_arithmetic"), [key], caller="test")
