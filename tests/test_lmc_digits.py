"""LMC on the real digits MLP pairs (CI zoo): naive barriers, batched vs the zoo's own scorer, REPAIR."""

from __future__ import annotations

import numpy as np
import pytest
import torch.nn.functional as F

from weightlens import lmc

SPLITS = ("train", "test")
WIDTHS = (128, 512)

pytestmark = pytest.mark.slow


def _evaluator(pair) -> lmc.Evaluator:
    return lmc.Evaluator(pair.make_module(), {s: pair.data(s) for s in SPLITS}, F.cross_entropy)


@pytest.fixture(scope="module")
def naive(digits_pairs):
    return {w: lmc.curve(digits_pairs[w].a, digits_pairs[w].b, _evaluator(digits_pairs[w]), label="naive")
            for w in WIDTHS}


@pytest.mark.parametrize("width", WIDTHS)
def test_naive_barrier_is_positive_and_real_on_train_and_test(digits_pairs, naive, width):
    curve, record = naive[width], digits_pairs[width].manifest["pairs"][str(width)]
    assert curve.splits == list(SPLITS) and len(curve.alphas) == 25
    for split in SPLITS:
        assert 0.1 < curve.barrier[split] < 3.0
        half_gap = abs(curve.loss[split][0] - curve.loss[split][-1]) / 2  # the two definitions differ by <= this
        assert abs(curve.barrier_midpoint[split] - curve.barrier[split]) <= half_gap + 1e-12
        # endpoints and midpoint agree with the numbers the zoo recorded when it was built
        assert curve.loss[split][0] == pytest.approx(record["a"][split]["loss"], abs=1e-5)
        assert curve.loss[split][-1] == pytest.approx(record["b"][split]["loss"], abs=1e-5)
        assert curve.loss[split][12] == pytest.approx(record["midpoint"][split]["loss"], abs=1e-5)
        assert curve.accuracy[split][12] == pytest.approx(record["midpoint"][split]["accuracy"], abs=1e-12)
        assert curve.accuracy_barrier[split] > 0.0


def test_barrier_shrinks_with_width(naive):
    for split in SPLITS:
        assert naive[512].barrier[split] < naive[128].barrier[split]


def test_batched_curve_equals_a_loop_over_the_zoo_scorer(digits_pairs, naive):
    pair = digits_pairs[128]
    looped = lmc.curve(pair.a, pair.b, lambda sd: {s: pair.evaluate(sd, s) for s in SPLITS})
    for split in SPLITS:
        assert np.abs(naive[128].loss[split] - looped.loss[split]).max() < 1e-5
        assert np.abs(naive[128].accuracy[split] - looped.accuracy[split]).max() < 1e-12


@pytest.mark.parametrize("width", WIDTHS)
def test_repair_reduces_the_naive_barrier(digits_pairs, naive, width):
    pair = digits_pairs[width]
    repaired = lmc.curve(pair.a, pair.b, _evaluator(pair), repair=pair.data("train"), label="REPAIR")
    reduction = lmc.relative_reduction(naive[width], repaired)
    for split in SPLITS:
        assert repaired.barrier[split] < 0.5 * naive[width].barrier[split]
        assert reduction[split] > 0.5
        assert repaired.loss[split][0] == pytest.approx(naive[width].loss[split][0], abs=1e-5)


def test_merge_barrier_of_a_pair_is_the_midpoint_excess(digits_pairs, naive):
    pair = digits_pairs[128]
    merged = lmc.merge_barrier({"a": pair.a, "b": pair.b}, _evaluator(pair), points=5)
    for split in SPLITS:
        assert merged.barrier[split] == pytest.approx(naive[128].midpoint_excess[split], abs=1e-5)
        assert merged.mean_pairwise_barrier[split] > 0.1
