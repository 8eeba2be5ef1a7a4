"""``consensus_ta`` and ``consensus_ties`` (TALL masks): against a float64 re-implementation of the paper's
formulas and the reference code's steps (``nik-dim/tall_masks``), planted coordinates, identities, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import weightlens as wl
from weightlens.errors import InvalidParameterError
from weightlens.merge import get_method, merge
from weightlens.merge.consensus import tall_masks

from _merge_inputs import flat_deltas, noise_task_vectors, unflat

CPU = {"device": "cpu"}


# ------------------------------------------------------------------------------ float64 reference
def _stack(tv: wl.TaskVectors, key: str) -> np.ndarray:
    return np.stack([tv.delta(t, key).double().numpy() for t in tv.names])


def _ref_masks(taus: np.ndarray, multi: np.ndarray, lams, strict: bool) -> np.ndarray:
    """m_t = |tau_t| > lambda_t |tau_MTL - tau_t| (>= when not strict), float64."""
    lams = np.asarray(lams, dtype=np.float64).reshape(-1, *([1] * (taus.ndim - 1)))
    lhs, rhs = np.abs(taus), lams * np.abs(multi[None] - taus)
    return lhs > rhs if strict else lhs >= rhs


def _ref_ties(tv: wl.TaskVectors, density: float) -> dict[str, np.ndarray]:
    """The reference's ties_merging(reset_thresh=density, merge_func="dis-sum") on the flattened model:
    per task keep |tau| >= its (d - int(d * density))-th smallest; elect sgn(sum), zeros get sgn(sum of signs);
    sum the entries of the elected sign."""
    keys = list(tv.keys)
    flat = flat_deltas(tv, keys)
    d = flat.shape[1]
    kth = np.sort(np.abs(flat), axis=1)[:, d - int(d * density) - 1][:, None]
    trimmed = flat * (np.abs(flat) >= kth)
    sign = np.sign(trimmed.sum(0))
    sign[sign == 0] = np.sign(sign.sum())
    agree = np.where(sign[None] > 0, trimmed > 0, trimmed < 0)
    return unflat(tv, keys, (trimmed * agree).sum(0))


def _ref_update(tv: wl.TaskVectors, key: str, lam, k: int, strict: bool, multi: np.ndarray | None = None) -> np.ndarray:
    taus = _stack(tv, key)
    multi = taus.sum(0) if multi is None else multi
    keep = _ref_masks(taus, multi, [lam] * len(tv) if np.isscalar(lam) else lam, strict).sum(0) >= k
    return multi * keep


def _close(got: torch.Tensor, want: np.ndarray) -> None:
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=1e-6 * max(1.0, float(np.abs(want).max())))


# ------------------------------------------------------------------------------ the reference
@pytest.mark.parametrize("lam, k, strict", [(0.6, 2, True), (0.2, 2, True), (0.4, 3, False), (0.5, 1, True),
                                            (0.3, 4, True)])
def test_consensus_ta_matches_the_float64_formulas(lam, k, strict):
    tv = noise_task_vectors(4, shape=(30, 20), seed=3)
    got = merge(tv, method="consensus_ta", k=k, tall_mask_lambda=lam, strict=strict, alpha=1.0, **CPU)
    for key in tv.keys:
        _close(got.update(key), _ref_update(tv, key, lam, k, strict))
    assert get_method("consensus_ta").alpha_grid({}, 4) == pytest.approx([0.1 * i for i in range(1, 11)])


@pytest.mark.parametrize("lam, k", [(0.6, 2), (0.3, 3)])
def test_consensus_ties_matches_the_reference_steps_in_float64(lam, k):
    tv = noise_task_vectors(3, shape=(30, 20), seed=4)
    ties = _ref_ties(tv, 0.2)
    got = merge(tv, method="consensus_ties", k=k, tall_mask_lambda=lam, alpha=1.0, **CPU)
    assert got.params["merge_func"] == "sum" and got.params["scope"] == "global"
    for key in tv.keys:
        _close(got.update(key), _ref_update(tv, key, lam, k, True, multi=ties[key]))


def test_tall_masks_are_the_formulas_with_one_lambda_per_task():
    tv = noise_task_vectors(3, shape=(12, 8), seed=5)
    lams = {"t0": 0.2, "t1": 0.6, "t2": 0.4}
    got = tall_masks(tv, tall_mask_lambda=lams, k=2)
    assert got.lambdas == (0.2, 0.6, 0.4) and got.tasks == ("t0", "t1", "t2")
    for key in tv.keys:
        taus = _stack(tv, key)
        want = _ref_masks(taus, taus.sum(0), [0.2, 0.6, 0.4], True)
        np.testing.assert_array_equal(got.masks[key].numpy(), want)
        np.testing.assert_array_equal(got.counts[key].numpy(), np.bincount(want.sum(0).ravel(), minlength=4))
    table = got.table()
    assert list(table.key) == list(tv.keys)
    row = table.set_index("key").loc["w"]
    assert row.numel == 96 and row.kept == row.claimed_2 + row.claimed_3 and row.selfish == row.claimed_1
    counts_only = tall_masks(tv, tall_mask_lambda=[0.2, 0.6, 0.4], keys=["b"], keep_masks=False)
    assert counts_only.masks == {} and counts_only.counts["b"].tolist() == got.counts["b"].tolist()


def test_tall_masks_of_consensus_ties_compare_against_the_ties_vector():
    tv = noise_task_vectors(3, shape=(30, 20), seed=4)
    ties = _ref_ties(tv, 0.2)
    got = tall_masks(tv, method="consensus_ties", tall_mask_lambda=0.4)
    for key in tv.keys:
        np.testing.assert_array_equal(got.masks[key].numpy(), _ref_masks(_stack(tv, key), ties[key], [0.4] * 3, True))


# ------------------------------------------------------------------------------ planted answers
def _planted() -> wl.TaskVectors:
    """Coordinates: 0 only t0 uses; 1 all share (1 each); 2 nobody; 3 t0 and t1; 4 t1 alone, large."""
    base = {"v": torch.zeros(5)}
    fts = {"t0": {"v": torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0])},
           "t1": {"v": torch.tensor([0.0, 1.0, 0.0, 1.0, 5.0])},
           "t2": {"v": torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0])}}
    return wl.TaskVectors(base, fts)


def test_selfish_and_unused_coordinates_go_shared_ones_stay():
    tv = _planted()
    got = merge(tv, method="consensus_ta", tall_mask_lambda=0.4, alpha=1.0, **CPU).update("v")
    assert got.tolist() == [0.0, 3.0, 0.0, 2.0, 0.0]  # claimed by 1, 3, 0, 2, 1 tasks
    masks = tall_masks(tv, tall_mask_lambda=0.4)
    assert masks.masks["v"].int().tolist() == [[1, 1, 0, 1, 0], [0, 1, 0, 1, 1], [0, 1, 0, 0, 0]]
    assert masks.counts["v"].tolist() == [1, 2, 1, 1]
    assert merge(tv, method="consensus_ta", k=3, tall_mask_lambda=0.4, alpha=1.0, **CPU).update("v").tolist() == [
        0.0, 3.0, 0.0, 0.0, 0.0]
    # lambda = 0.6: 1 > 0.6 * 2 fails, so three equal shares are no one's (the reference's unscaled tau_MTL)
    assert tall_masks(tv, tall_mask_lambda=0.6).counts["v"].tolist() == [2, 2, 1, 0]
    # the paper's >=: a coordinate nobody changed is claimed by every task (0 >= 0); its update stays 0
    assert tall_masks(tv, tall_mask_lambda=0.4, strict=False).masks["v"][:, 2].tolist() == [True] * 3


def test_a_tensor_with_no_consensus_is_zero_and_noted():
    base = {"v": torch.zeros(3)}
    tv = wl.TaskVectors(base, {"a": {"v": torch.tensor([1.0, 0.0, 0.0])}, "b": {"v": torch.tensor([0.0, 2.0, 0.0])}})
    got = merge(tv, method="consensus_ta", **CPU)
    assert got.update("v").tolist() == [0.0, 0.0, 0.0]
    assert got.notes.note.tolist() == [
        "Consensus: no coordinate of this tensor is claimed by k=2 tasks' TALL masks (tall_mask_lambda=0.6): "
        "its update is 0."]


# ------------------------------------------------------------------------------ identities
def test_k_zero_and_lambda_zero_are_task_arithmetic_and_ties():
    tv = noise_task_vectors(3, shape=(20, 10))
    for key in tv.keys:
        ta = merge(tv, method="task_arithmetic", alpha=0.4, **CPU).update(key)
        assert torch.equal(merge(tv, method="consensus_ta", k=0, alpha=0.4, **CPU).update(key), ta)
        lam0 = merge(tv, method="consensus_ta", k=1, tall_mask_lambda=0.0, alpha=0.4, **CPU)
        assert torch.equal(lam0.update(key), ta)
        assert torch.equal(merge(tv, method="consensus_ties", k=0, alpha=1.0, **CPU).update(key),
                           merge(tv, method="ties", merge_func="sum", **CPU).update(key))
        assert torch.equal(merge(tv, method="consensus_ties", k=0, merge_func="mean", scope="tensor", density=0.5,
                                 **CPU).update(key),
                           merge(tv, method="ties", scope="tensor", density=0.5, **CPU).update(key))


def test_one_task_keeps_its_task_vector():
    tv = noise_task_vectors(1, shape=(8, 4))
    for key in tv.keys:  # tau_MTL = tau: every nonzero entry is claimed by its only task
        assert torch.equal(merge(tv, method="consensus_ta", k=1, alpha=1.0, **CPU).update(key), tv.delta("t0", key))
    assert tall_masks(tv, k=1, tall_mask_lambda=5.0).counts["b"].tolist() == [0, 4]


def test_masks_are_deterministic_and_stream_key_by_key():
    tv = noise_task_vectors(3, shape=(20, 10), seed=7)
    a = merge(tv, method="consensus_ties", **CPU)
    b = merge(noise_task_vectors(3, shape=(20, 10), seed=7), method="consensus_ties", **CPU)
    assert all(torch.equal(a.update(k), b.update(k)) for k in ("b", "w"))  # other order, other object
    one = tall_masks(tv, keys=["b"])
    assert list(one.counts) == ["b"] and torch.equal(one.masks["b"], tall_masks(tv).masks["b"])


# ------------------------------------------------------------------------------ parameters
def test_bad_parameters_are_named():
    tv = noise_task_vectors(3)
    with pytest.raises(InvalidParameterError) as err:
        merge(tv, method="consensus_ta", k=4)
    assert str(err.value) == ("The 'k' parameter of consensus_ta must be in [0, 3] (at most the number of tasks "
                              "merged, 3; a larger k keeps no coordinate: the base model). Got 4 instead.")
    with pytest.raises(InvalidParameterError, match=r"^The 'k' parameter of consensus_ties must be in \[0, 3\]"):
        merge(tv, method="consensus_ties", k=5)
    with pytest.raises(InvalidParameterError) as err:
        merge(tv, method="consensus_ties", tall_mask_lambda=-0.2)
    assert str(err.value) == "The 'tall_mask_lambda' parameter of consensus_ties must be in [0, inf). Got -0.2 instead."
    with pytest.raises(InvalidParameterError, match=r"^The 'k' parameter of consensus_ta must be in \[0, inf\)"):
        merge(tv, method="consensus_ta", k=-1)
    with pytest.raises(InvalidParameterError) as err:
        tall_masks(tv, tall_mask_lambda=[0.2, -0.1, 0.3])
    assert str(err.value) == ("The 'tall_mask_lambda' parameter of consensus_ta must be a number >= 0 or one per "
                              "task (3). Got [0.2, -0.1, 0.3] instead.")
    with pytest.raises(InvalidParameterError, match=r"one per task \(3\)"):
        tall_masks(tv, tall_mask_lambda=[0.2, 0.3])
    with pytest.raises(InvalidParameterError, match=r"one value per task \(t0, t1, t2\)"):
        tall_masks(tv, tall_mask_lambda={"t0": 0.2})
    with pytest.raises(InvalidParameterError, match=r"^The 'method' parameter of tall_masks"):
        tall_masks(tv, method="ties")
    with pytest.raises(InvalidParameterError, match=r"^The 'k' parameter of consensus_ta must be in \[0, 3\]"):
        tall_masks(tv, k=4)


def test_alpha_defaults_and_grids():
    tv = noise_task_vectors(2)
    assert merge(tv, method="consensus_ta").alpha == 0.3
    assert merge(tv, method="consensus_ties", merge_func="mean").alpha == 1.0
    assert get_method("consensus_ties").alpha_grid({"merge_func": "mean"}, 2)[0] == 0.8
    assert get_method("consensus_ties").alpha_grid({}, 2)[-1] == 1.0
