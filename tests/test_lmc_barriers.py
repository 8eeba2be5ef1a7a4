"""Barrier definitions against hand-computed values and independent formulas (no models needed)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from weightlens import lmc
from weightlens.errors import InvalidParameterError, KeyMismatchError, NonFiniteError, ShapeMismatchError
from weightlens.lmc import LMCCurve


def _entezari(alphas, values):
    """Independent reference: loop over the grid, excess over the chord through the endpoints."""
    return max(v - ((1 - a) * values[0] + a * values[-1]) for a, v in zip(alphas, values))


def _git_rebasin(values):
    return max(values) - (values[0] + values[-1]) / 2


def _curve(alphas, loss, acc=None, split="test"):
    metrics = {"loss": np.asarray(loss, float)}
    if acc is not None:
        metrics["accuracy"] = np.asarray(acc, float)
    return LMCCurve(np.asarray(alphas, float), {split: metrics})


def test_hand_computed_asymmetric_curve():
    # chord 2*alpha; excess 0, .5, 0, -.5, 0 -> Entezari 0.5; max 2 - (0 + 2)/2 -> Git Re-Basin 1.0
    c = _curve([0, 0.25, 0.5, 0.75, 1], [0.0, 1.0, 1.0, 1.0, 2.0], acc=[1.0, 0.5, 0.6, 0.7, 0.8])
    assert c.barrier["test"] == pytest.approx(0.5, abs=1e-15)
    assert c.barrier_midpoint["test"] == pytest.approx(1.0, abs=1e-15)
    assert c.barrier_alpha["test"] == 0.25
    assert c.midpoint_excess["test"] == pytest.approx(0.0, abs=1e-15)
    # accuracy chord 1 - 0.2 alpha: .95 - .5 = .45 at alpha .25; midpoint: .9 - .5 = .4
    assert c.accuracy_barrier["test"] == pytest.approx(0.45, abs=1e-12)
    assert c.accuracy_barrier_midpoint["test"] == pytest.approx(0.4, abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_equal_endpoints_make_both_definitions_agree(seed):
    rng = np.random.default_rng(seed)
    alphas = np.linspace(0, 1, 11)
    loss = rng.uniform(0, 3, size=11)
    loss[-1] = loss[0]
    c = _curve(alphas, loss)
    assert c.barrier["test"] == pytest.approx(_entezari(alphas, loss), abs=1e-12)
    assert c.barrier_midpoint["test"] == pytest.approx(_git_rebasin(loss), abs=1e-12)
    assert c.barrier["test"] == pytest.approx(c.barrier_midpoint["test"], abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_random_curves_match_independent_formulas(seed):
    rng = np.random.default_rng(100 + seed)
    alphas = np.concatenate([[0.0], np.sort(rng.uniform(0.01, 0.99, 7)), [1.0]])
    loss, acc = rng.uniform(0, 3, 9), rng.uniform(0, 1, 9)
    c = _curve(alphas, loss, acc)
    assert c.barrier["test"] == pytest.approx(_entezari(alphas, loss), abs=1e-12)
    assert c.barrier_midpoint["test"] == pytest.approx(_git_rebasin(loss), abs=1e-12)
    assert c.accuracy_barrier["test"] == pytest.approx(_entezari(alphas, 1 - acc), abs=1e-12)
    assert c.accuracy_barrier_midpoint["test"] == pytest.approx(_git_rebasin(1 - acc), abs=1e-12)


def test_convex_curve_reports_zero_and_a_negative_midpoint_excess_raw():
    alphas = np.linspace(0, 1, 25)
    loss = 1.0 + 2.0 * (alphas - 0.5) ** 2 - 0.25 * alphas  # strictly convex, below its chord inside
    c = _curve(alphas, loss)
    assert c.barrier["test"] == 0.0  # excess is 0 at the endpoints and negative inside: raw, not clipped
    # Git Re-Basin: max is L(0) = 1.5, mean of endpoints (1.5 + 1.25) / 2 -> 0.125 = (L(0) - L(1)) / 2
    assert c.barrier_midpoint["test"] == pytest.approx(0.125, abs=1e-12)
    sym = _curve(alphas, 1.0 + 2.0 * (alphas - 0.5) ** 2)  # symmetric convex: both definitions give 0
    assert sym.barrier["test"] == 0.0 and sym.barrier_midpoint["test"] == pytest.approx(0.0, abs=1e-15)
    # hand: L(.5) = 0.875, endpoints 1.5 and 1.25 -> 0.875 - 1.375
    assert c.midpoint_excess["test"] == pytest.approx(-0.5, abs=1e-12)
    assert c.summary().loc["test", "midpoint_excess"] == pytest.approx(-0.5, abs=1e-12)


def test_barrier_functions_and_validation():
    alphas = np.array([0.0, 0.5, 1.0])
    assert lmc.barrier(alphas, [1.0, 3.0, 2.0]) == pytest.approx(1.5)
    assert lmc.barrier_midpoint(alphas, [1.0, 3.0, 2.0]) == pytest.approx(1.5)
    assert lmc.accuracy_barrier(alphas, [1.0, 0.5, 0.8]) == pytest.approx(0.4)
    with pytest.raises(InvalidParameterError, match="from 0 to 1"):
        lmc.barrier([0.1, 0.5, 1.0], [1, 2, 3])
    with pytest.raises(InvalidParameterError, match="equal length"):
        lmc.barrier([0.0, 1.0], [1, 2, 3])


def test_relative_reduction():
    assert lmc.relative_reduction(0.5, 0.1) == pytest.approx(0.8)
    assert lmc.relative_reduction(0.5, -0.05) == pytest.approx(1.1)  # raw: a negative barrier is > 100 %
    assert math.isnan(lmc.relative_reduction(0.0, 0.1))
    got = lmc.relative_reduction({"train": 1.0, "test": 0.4}, {"train": 0.25, "test": 0.1})
    assert got == pytest.approx({"train": 0.75, "test": 0.75})
    alphas = [0, 0.5, 1]
    naive, fixed = _curve(alphas, [0, 1, 0]), _curve(alphas, [0, 0.25, 0])
    assert lmc.relative_reduction(naive, fixed) == pytest.approx({"test": 0.75})
    with pytest.raises(InvalidParameterError):
        lmc.relative_reduction({"test": 1.0}, 0.5)


def test_to_frame_and_summary():
    c = _curve([0, 0.5, 1], [1.0, 2.0, 3.0], acc=[0.9, 0.5, 0.7]).with_label("naive")
    frame = c.to_frame()
    assert list(frame.columns) == ["label", "split", "metric", "alpha", "value", "chord"]
    assert len(frame) == 6 and set(frame["label"]) == {"naive"}
    loss = frame[frame.metric == "loss"]
    assert loss["chord"].tolist() == pytest.approx([1.0, 2.0, 3.0])
    summary = c.summary()
    assert summary.loc["test", "loss_mid"] == 2.0 and summary.loc["test", "accuracy_a"] == 0.9
    assert "naive" in repr(c)


def test_curve_rejects_missing_loss_and_bad_grid():
    with pytest.raises(InvalidParameterError, match="no 'loss'"):
        LMCCurve(np.array([0.0, 1.0]), {"test": {"accuracy": np.array([1.0, 1.0])}})
    with pytest.raises(InvalidParameterError, match="from 0 to 1"):
        _curve([0.0, 0.7, 0.5, 1.0], [1, 2, 3, 4])


# ---------------------------------------------------------------- curve() with plain callables


def _concave(sd):
    """Loss -||w||^2: along a line the excess over the chord is alpha (1 - alpha) ||a - b||^2."""
    w = sd["w"].double()
    return {"loss": float(-(w * w).sum()), "accuracy": 0.5}


def test_curve_with_a_callable_follows_the_straight_line():
    gen = torch.Generator().manual_seed(0)
    a, b = {"w": torch.randn(3, 4, generator=gen)}, {"w": torch.randn(3, 4, generator=gen)}
    c = lmc.curve(a, b, _concave, points=5)
    assert c.splits == ["default"] and c.alphas.tolist() == [0, 0.25, 0.5, 0.75, 1]
    for alpha, value in zip(c.alphas, c.loss["default"]):
        w = ((1 - alpha) * a["w"].double() + alpha * b["w"].double())
        assert value == pytest.approx(float(-(w * w).sum()), rel=1e-6)
    gap = float(((a["w"] - b["w"]).double() ** 2).sum())
    assert c.barrier["default"] == pytest.approx(gap / 4, rel=1e-5)  # max of alpha(1-alpha) at 1/2


def test_curve_accepts_split_dicts_and_explicit_alphas():
    a, b = {"w": torch.ones(2)}, {"w": -torch.ones(2)}

    def evaluate(sd):
        return {"train": _concave(sd), "test": {"loss": 2 * _concave(sd)["loss"]}}

    c = lmc.curve(a, b, evaluate, points=[0.0, 0.5, 1.0], label="toy")
    assert c.splits == ["train", "test"] and c.label == "toy"
    assert c.barrier["test"] == pytest.approx(2 * c.barrier["train"]) == pytest.approx(4.0)
    assert np.isnan(c.accuracy["test"]).all()


def test_curve_errors():
    a, b = {"w": torch.ones(2)}, {"w": torch.ones(3)}
    with pytest.raises(ShapeMismatchError, match="shape"):
        lmc.curve(a, b, _concave)
    with pytest.raises(KeyMismatchError, match="same keys"):
        lmc.curve({"w": torch.ones(2)}, {"v": torch.ones(2)}, _concave)
    with pytest.raises(InvalidParameterError, match="must return"):
        lmc.curve({"w": torch.ones(2)}, {"w": torch.zeros(2)}, lambda sd: 1.0)
    with pytest.raises(InvalidParameterError, match="Evaluator"):
        lmc.curve({"w": torch.ones(2)}, {"w": torch.zeros(2)}, _concave, repair=torch.ones(4, 2))
    with pytest.raises(InvalidParameterError, match="points"):
        lmc.curve({"w": torch.ones(2)}, {"w": torch.zeros(2)}, _concave, points=1)
    with pytest.raises(NonFiniteError, match="NaN or Inf"):
        lmc.curve({"w": torch.ones(2)}, {"w": torch.tensor([1.0, float("nan")])}, _concave)


def test_merge_barrier_and_curve_many_match_closed_forms():
    gen = torch.Generator().manual_seed(1)
    thetas = {f"m{i}": {"w": torch.randn(6, generator=gen)} for i in range(3)}
    w = [t["w"].double() for t in thetas.values()]
    mb = lmc.merge_barrier(thetas, _concave, samples=4, seed=3)
    centroid = sum(w) / 3
    expected = float(-(centroid ** 2).sum() + sum((x ** 2).sum() for x in w) / 3)
    assert mb.names == ["m0", "m1", "m2"]
    assert mb.barrier["default"] == pytest.approx(expected, rel=1e-5)
    pair = [float(((w[i] - w[j]) ** 2).sum()) / 4 for i, j in [(0, 1), (0, 2), (1, 2)]]
    assert mb.mean_pairwise_barrier["default"] == pytest.approx(np.mean(pair), rel=1e-5)
    assert mb.sample_weights.shape == (4, 3) and np.allclose(mb.sample_weights.sum(1), 1)
    assert mb.max_sampled_barrier["default"] > 0
    assert mb.accuracy_barrier["default"] == pytest.approx(0.0)
    assert list(mb.summary().columns)[:2] == ["barrier", "accuracy_barrier"]
    many = lmc.curve_many(thetas, _concave, points=5)
    assert list(many) == [("m0", "m1"), ("m0", "m2"), ("m1", "m2")]
    assert many[("m0", "m2")].barrier["default"] == pytest.approx(pair[1], rel=1e-5)
    with pytest.raises(InvalidParameterError, match="summing to 1"):
        lmc.merge_barrier(thetas, _concave, weights=[0.5, 0.5, 0.5])
