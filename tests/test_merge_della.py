"""``della`` and ``della_linear``: keep probabilities by magnitude rank, seeded masks, the paper's and mergekit's
rescaling, and mergekit run on the export: its masks' keep rates per rank band (a statistical test, mergekit
draws from torch's global generator) and, given its mask, the deterministic rest (exact up to rounding)."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

import weightlens as wl
from weightlens.errors import InvalidParameterError
from weightlens.merge import get_method, merge
from weightlens.merge.breadcrumbs import l1_rescaled
from weightlens.merge.della import keep_probabilities

from _mergekit_peers import assert_recipe_reruns_bitwise, export_and_run, llama_models, mergekit  # noqa: F401
from _merge_inputs import noise_task_vectors

CPU = {"device": "cpu"}
BANDS = 4


def _tv(T: int = 2, shape=(64, 200)) -> wl.TaskVectors:
    return noise_task_vectors(T, shape=shape)


def _band_rates(kept: torch.Tensor, probs: torch.Tensor) -> list[tuple[float, float, float]]:
    """Per band of keep probability: (kept fraction, expected fraction, binomial standard error)."""
    lo, hi = float(probs.min()), float(probs.max())
    band = ((probs - lo) / max(hi - lo, 1e-12) * BANDS).clamp(max=BANDS - 1).long()
    out = []
    for b in range(BANDS):
        sel = band == b
        n, p = int(sel.sum()), float(probs[sel].mean())
        out.append((float(kept[sel].float().mean()), p, math.sqrt(p * (1 - p) / n)))
    return out


def test_keep_probabilities_rise_with_the_magnitude_rank_per_row():
    x = torch.tensor([[0.1, -3.0, 2.0, 0.0], [5.0, 1.0, -2.0, 4.0]])
    p = keep_probabilities(x, 0.5, 0.15)
    torch.testing.assert_close(p, torch.tensor([[0.45, 0.65, 0.55, 0.35], [0.65, 0.35, 0.45, 0.55]]))
    assert keep_probabilities(torch.tensor([1.0, -2.0, 0.5]), 0.5, 0.1).tolist() == pytest.approx([0.5, 0.6, 0.4])


def test_seeded_masks_keep_at_the_ranked_rates_and_repeat_bitwise():
    tv = _tv(1)
    merged = merge(tv, method="della_linear", density=0.4, epsilon=0.2, rescale="none", alpha=1.0, **CPU)
    d, upd = tv.delta("t0", "w"), merged.update("w")
    assert torch.equal(upd[upd != 0], d[upd != 0])  # kept entries unchanged without rescaling
    for rate, want, se in _band_rates(upd != 0, keep_probabilities(d, 0.4, 0.2)):
        assert abs(rate - want) < 5 * se, (rate, want)
    again = merge(tv, method="della_linear", density=0.4, epsilon=0.2, rescale="none", alpha=1.0, **CPU)
    assert torch.equal(again.update("w"), upd)
    other = merge(tv, method="della_linear", density=0.4, epsilon=0.2, rescale="none", alpha=1.0, seed=1, **CPU)
    assert not torch.equal(other.update("w"), upd)


def test_the_papers_rescale_keeps_every_entry_in_expectation_and_mergekits_keeps_the_l1_norm():
    tv = _tv(1)
    d = tv.delta("t0", "w")
    paper = merge(tv, method="della_linear", density=0.5, epsilon=0.1, rescale="probability", alpha=1.0, **CPU)
    p = keep_probabilities(d, 0.5, 0.1)
    kept = paper.update("w") != 0
    torch.testing.assert_close(paper.update("w")[kept], (d / p)[kept])
    l1 = merge(tv, method="della_linear", density=0.5, epsilon=0.1, alpha=1.0, **CPU).update("w")
    assert float(l1.abs().sum()) == pytest.approx(float(d.abs().sum()), rel=1e-5)
    full = merge(_tv(2), method="della", density=1.0, **CPU)  # nothing dropped: TIES at density 1 (tensor scope)
    torch.testing.assert_close(full.update("w"), merge(_tv(2), method="ties", density=1.0, scope="tensor", **CPU).update("w"))


def test_probabilities_outside_0_1_are_refused_and_the_yaml_names_della():
    with pytest.raises(InvalidParameterError, match=r"della: keep probabilities range over density -/\+ epsilon = \[-0.05, 0.25\]"):
        merge(_tv(), method="della", density=0.1, epsilon=0.15)
    mk = get_method("della").mergekit({"alpha": 1.0, "density": 0.5, "epsilon": 0.1, "rescale": "probability",
                                       "normalize": True, "seed": 0})
    assert (mk.method, mk.per_model, mk.parameters) == (
        "della", {"weight": 1.0, "density": 0.5, "epsilon": 0.1}, {"lambda": 1.0, "normalize": True, "rescale": True})
    assert any("approximate" in n for n in mk.notes)


@pytest.mark.parametrize("method, params", [("della", {"seed": 3}), ("della_linear", {"rescale": "probability"})])
def test_the_recipe_reruns_bitwise(llama_models, tmp_path, method, params):
    base, finetuned = llama_models
    tv = wl.TaskVectors(base, {n: finetuned[n] for n in ("plus1", "plus3")})
    assert_recipe_reruns_bitwise(merge(tv, method=method, **params, **CPU), tmp_path, base)


@pytest.mark.peers
def test_mergekit_della_masks_keep_at_the_same_rates_and_rescale_alike(mergekit, llama_models, tmp_path):
    base, finetuned = llama_models
    tv = wl.TaskVectors(base, {"far": finetuned["far"]})  # updates as large as the weights: no entry is absorbed
    params = {"density": 0.5, "epsilon": 0.2, "alpha": 1.0}
    merges = [merge(tv, method="della_linear", rescale=r, **params, **CPU) for r in ("none", "l1")]
    (ours, plain, text), (_, scaled, _) = export_and_run(mergekit, merges, tmp_path, base)
    config = yaml.safe_load(text)
    assert config["merge_method"] == "della_linear" and config["models"][0]["parameters"]["epsilon"] == 0.2
    keys = [k for k in tv.keys if tv.shape(k)[-1] > 1]
    their_kept, our_kept, probs, worst = [], [], [], 0.0
    for key in keys:
        d, b = tv.delta("far", key), tv.base_tensor(key).float()
        kept = plain[key].float() != b  # mergekit's mask: rescale off, lambda 1, one fine-tune
        their_kept.append(kept.reshape(-1))
        our_kept.append((ours[key].float() != b).reshape(-1))
        probs.append(keep_probabilities(d, 0.5, 0.2).reshape(-1))
        want = b + l1_rescaled(d, scaled[key].float() != b)  # the deterministic rest, given that run's mask
        worst = max(worst, float((scaled[key].float() - want).abs().max()) / float(scaled[key].float().abs().max()))
    assert worst <= 1e-5
    probs_all = torch.cat(probs)
    for kept in (torch.cat(their_kept), torch.cat(our_kept)):
        for rate, want, se in _band_rates(kept, probs_all):
            assert abs(rate - want) < 5 * se, (rate, want, se)
