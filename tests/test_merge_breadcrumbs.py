"""``breadcrumbs`` and ``breadcrumbs_ties``: the masks (mergekit's ``magnitude_outliers``), identities with task
arithmetic and TIES, and parity with mergekit run on the export (deterministic: exact up to rounding)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

import weightlens as wl
from weightlens.merge import get_method, merge
from weightlens.merge.breadcrumbs import breadcrumbs_mask

from _mergekit_peers import assert_recipe_reruns_bitwise, export_and_run, llama_models, max_relative_error, mergekit  # noqa: F401
from _merge_inputs import noise_task_vectors

CPU = {"device": "cpu"}


def _tv(T: int = 3) -> wl.TaskVectors:
    return noise_task_vectors(T, shape=(20, 10))


@pytest.mark.parametrize("density, gamma", [(0.9, 0.01), (0.5, 0.1), (0.3, 0.8), (1.0, 0.1), (0.01, 0.0)])
def test_the_mask_drops_the_gamma_largest_and_the_smallest(density, gamma):
    x = torch.randn(200, generator=torch.Generator().manual_seed(1))
    got = breadcrumbs_mask(x, density, gamma).numpy()
    n = 200
    if density >= 1:
        assert got.all()
        return
    keep, top = int(density * n), int(gamma * n)
    ranks = np.argsort(np.argsort(np.abs(x.numpy()), kind="stable"), kind="stable")  # 0 = smallest
    bottom = max(0, n - keep - top)
    np.testing.assert_array_equal(got, (ranks >= bottom) & (ranks < bottom + keep))
    assert got.sum() == keep


def test_breadcrumbs_without_dropping_is_task_arithmetic_and_its_ties_variant_is_ties():
    tv = _tv()
    full = {"density": 1.0, "gamma": 0.0}
    for key in ("w", "b"):
        torch.testing.assert_close(merge(tv, method="breadcrumbs", alpha=0.4, **full, **CPU).update(key),
                                   merge(tv, method="task_arithmetic", alpha=0.4, **CPU).update(key))
        torch.testing.assert_close(
            merge(tv, method="breadcrumbs_ties", normalize=True, **full, **CPU).update(key),
            merge(tv, method="ties", density=1.0, scope="tensor", **CPU).update(key))
    one = merge(_tv(1), method="breadcrumbs", density=0.5, gamma=0.1, alpha=1.0, **CPU)
    d = _tv(1).delta("t0", "w")
    torch.testing.assert_close(one.update("w"), d * breadcrumbs_mask(d, 0.5, 0.1))


def test_rescale_keeps_the_l1_norm_and_defaults_follow_normalize():
    tv = _tv(1)
    d = tv.delta("t0", "w")
    got = merge(tv, method="breadcrumbs", density=0.4, gamma=0.05, rescale=True, alpha=1.0, **CPU).update("w")
    assert float(got.abs().sum()) == pytest.approx(float(d.abs().sum()), rel=1e-5)
    assert merge(tv, method="breadcrumbs").alpha == 0.3 and merge(tv, method="breadcrumbs", normalize=True).alpha == 1.0
    mk = get_method("breadcrumbs_ties").mergekit({"alpha": 0.7, "density": 0.5, "gamma": 0.02, "normalize": True,
                                                  "rescale": False})
    assert (mk.method, mk.per_model, mk.parameters) == (
        "breadcrumbs_ties", {"weight": 1.0, "density": 0.5, "gamma": 0.02},
        {"lambda": 0.7, "normalize": True, "rescale": False})


@pytest.mark.parametrize("method, params", [("breadcrumbs", {"density": 0.5}), ("breadcrumbs_ties", {"rescale": True})])
def test_the_recipe_reruns_bitwise(llama_models, tmp_path, method, params):
    base, finetuned = llama_models
    tv = wl.TaskVectors(base, {n: finetuned[n] for n in ("plus1", "plus3")})
    assert_recipe_reruns_bitwise(merge(tv, method=method, **params, **CPU), tmp_path, base)


@pytest.mark.peers
def test_mergekit_breadcrumbs_reproduces_the_export(mergekit, llama_models, tmp_path):
    base, finetuned = llama_models
    tv = wl.TaskVectors(base, {n: finetuned[n] for n in ("plus1", "plus3")})
    cases = [("breadcrumbs", {}), ("breadcrumbs", {"density": 0.5, "gamma": 0.1, "normalize": True, "rescale": True}),
             ("breadcrumbs_ties", {"density": 0.4, "gamma": 0.05, "alpha": 0.8})]
    merges = [merge(tv, method=m, **p, **CPU) for m, p in cases]
    for (method, params), (ours, theirs, text) in zip(cases, export_and_run(mergekit, merges, tmp_path, base)):
        config = yaml.safe_load(text)
        assert config["merge_method"] == method and set(config["models"][0]["parameters"]) == {"weight", "density", "gamma"}
        assert max_relative_error(ours, theirs) <= 1e-5, (method, params)
