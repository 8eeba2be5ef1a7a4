"""``dare``'s rescale options: the paper's ``1/density``, mergekit's L1-norm rescale (``rescale: true``) and none
(``rescale: false``); mergekit run on the export: its masks' keep rate (a statistical test, mergekit draws from
torch's global generator) and, given its mask, the deterministic rest (exact up to rounding)."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

import weightlens as wl
from weightlens.merge import get_method, merge
from weightlens.merge.arithmetic import dare_mask, l1_rescaled

from _mergekit_peers import assert_recipe_reruns_bitwise, export_and_run, llama_models, mergekit  # noqa: F401
from _merge_inputs import noise_task_vectors

CPU = {"device": "cpu"}


def test_the_three_rescales_on_the_same_seeded_mask():
    tv = noise_task_vectors(2, shape=(40, 30))
    out = {r: merge(tv, method="dare", density=0.3, seed=2, rescale=r, alpha=1.0, **CPU)
           for r in ("density", "l1", "none")}
    assert out["density"].params["rescale"] == "density" and get_method("dare").defaults()["rescale"] == "density"
    for key in tv.keys:
        parts = {r: torch.zeros(tv.shape(key)) for r in out}
        for task in tv.names:
            d = tv.delta(task, key)
            m = dare_mask(tuple(d.shape), 0.3, 2, task, key)
            parts["density"] += d * m / 0.3
            parts["l1"] += l1_rescaled(d, m)
            parts["none"] += d * m
            assert float(l1_rescaled(d, m).abs().sum()) == pytest.approx(float(d.abs().sum()), rel=1e-5)
        for r in out:
            torch.testing.assert_close(out[r].update(key), parts[r])
    ties = merge(tv, method="dare", density=0.3, seed=2, rescale="none", combine="ties", **CPU)
    assert ties.params["alpha"] == 1.0 and torch.isfinite(ties.update("w")).all()


def test_the_yaml_says_rescale_and_marks_the_papers_rescale_approximate():
    mk = get_method("dare").mergekit
    for rescale, flag, approximate in (("density", True, True), ("l1", True, False), ("none", False, False)):
        got = mk({"alpha": 1.0, "density": 0.4, "seed": 0, "combine": "ties", "rescale": rescale})
        assert (got.method, got.per_model, got.parameters) == (
            "dare_ties", {"weight": 1.0, "density": 0.4}, {"lambda": 1.0, "rescale": flag, "normalize": True})
        assert any("approximate" in n for n in got.notes) is approximate
    with pytest.raises(wl.InvalidParameterError, match=r"^The 'rescale' parameter of dare must be one of 'density', "
                                                       r"'l1', 'none'\. Got True instead\.$"):
        merge(noise_task_vectors(2), method="dare", rescale=True)


def test_the_recipe_reruns_bitwise(llama_models, tmp_path):
    base, finetuned = llama_models
    tv = wl.TaskVectors(base, {n: finetuned[n] for n in ("plus1", "plus3")})
    assert_recipe_reruns_bitwise(merge(tv, method="dare", rescale="l1", seed=4, **CPU), tmp_path, base)


@pytest.mark.peers
def test_mergekit_dare_masks_keep_at_density_and_rescale_alike(mergekit, llama_models, tmp_path):
    base, finetuned = llama_models
    tv = wl.TaskVectors(base, {"far": finetuned["far"]})  # updates as large as the weights: no entry is absorbed
    density = 0.4
    merges = [merge(tv, method="dare", density=density, rescale=r, combine=c, alpha=1.0, **CPU)
              for r, c in (("none", "task_arithmetic"), ("l1", "task_arithmetic"), ("l1", "ties"))]
    runs = export_and_run(mergekit, merges, tmp_path, base)
    configs = [yaml.safe_load(text) for _, _, text in runs]
    assert [(c["merge_method"], c["parameters"]["rescale"]) for c in configs] == [
        ("dare_linear", False), ("dare_linear", True), ("dare_ties", True)]
    keys = [k for k in tv.keys if tv.shape(k)[-1] > 1]
    ours, plain = runs[0][0], runs[0][1]
    their_kept, our_kept, worst = [], [], 0.0
    for key in keys:
        d, b = tv.delta("far", key), tv.base_tensor(key).float()
        kept = plain[key].float() != b  # mergekit's mask: rescale off, lambda 1, one fine-tune
        assert torch.equal(plain[key].float()[kept], (b + d)[kept])
        their_kept.append(kept.reshape(-1))
        our_kept.append((ours[key].float() != b).reshape(-1))
        for _, theirs, _ in runs[1:]:
            t = theirs[key].float()
            want = b + l1_rescaled(d, t != b)  # the deterministic rest, given that run's mask
            worst = max(worst, float((t - want).abs().max()) / float(t.abs().max()))
    assert worst <= 1e-5
    for kept in (torch.cat(their_kept), torch.cat(our_kept)):
        n = kept.numel()
        assert abs(float(kept.float().mean()) - density) < 5 * math.sqrt(density * (1 - density) / n)
