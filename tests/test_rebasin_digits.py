"""Git Re-Basin on real pairs of independently trained digits MLPs (64-h-h-10) at the CI widths.

Loss barrier (Entezari: loss above the chord, 25 alphas) on the test split, naive vs after weight
matching: matching must cut it below 0.3x at widths 128 and 512, and the matched barrier must shrink
with width.
"""

from __future__ import annotations

import pytest

import weightlens as wl
from weightlens import lmc, rebasin

WIDTHS = (16, 128, 512)
SPLITS = ("train", "test")


def loss_barriers(pair, a, b) -> dict[str, float]:
    """``{split: barrier}`` over 25 alphas, scored by the zoo's own evaluator (one alpha at a time)."""
    evaluate = lambda sd: {s: pair.evaluate(sd, s) for s in SPLITS}  # noqa: E731
    return lmc.curve(a, b, evaluate, points=25).barrier


@pytest.fixture(scope="module")
def barriers(digits_pairs):
    """``{width: {"naive" | "weight" | "activation": {split: barrier}}}``."""
    out = {}
    for width, pair in digits_pairs.items():
        a, b = wl.load(pair.a), wl.load(pair.b)
        a, b = {k: a[k] for k in a}, {k: b[k] for k in b}
        spec = rebasin.mlp_spec(a)
        wm = rebasin.weight_matching(pair.a, pair.b, spec)
        am = rebasin.activation_matching(a, b, spec, pair.make_module, pair.data("train"))
        out[width] = {"naive": loss_barriers(pair, a, b), "weight": loss_barriers(pair, a, wm.apply(b)),
                      "activation": loss_barriers(pair, a, am.apply(b))}
    return out


@pytest.mark.slow
def test_weight_matching_removes_most_of_the_barrier(barriers):
    for width in WIDTHS:
        naive, matched = barriers[width]["naive"]["test"], barriers[width]["weight"]["test"]
        assert naive > 0.1 and matched < naive
        if width >= 128:
            assert matched < 0.3 * naive, (width, naive, matched)


@pytest.mark.slow
def test_matched_barrier_shrinks_with_width(barriers):
    matched = [barriers[w]["weight"]["test"] for w in WIDTHS]
    assert matched[0] > matched[1] >= matched[2], matched


@pytest.mark.slow
def test_activation_matching_also_reduces_the_barrier(barriers):
    for width in WIDTHS:
        assert barriers[width]["activation"]["test"] < 0.5 * barriers[width]["naive"]["test"]
