"""``linear`` (model soup): identities, errors, and parity with mergekit's ``linear`` run on the exported YAML."""

from __future__ import annotations

import pytest
import torch
import yaml

import weightlens as wl
from weightlens.errors import InvalidParameterError
from weightlens.merge import get_method, merge, sweep

from _mergekit_peers import assert_recipe_reruns_bitwise, export_and_run, llama_models, max_relative_error, mergekit  # noqa: F401
from _merge_inputs import noise_task_vectors

CPU = {"device": "cpu"}


def _tv(T: int = 3) -> wl.TaskVectors:
    return noise_task_vectors(T)


def test_linear_is_the_weighted_average_of_the_finetuned_weights():
    tv = _tv()
    fts = [tv.finetuned[t] for t in tv.names]
    merged = merge(tv, method="linear", weights="1,2,5", **CPU)
    for key in ("w", "b"):
        want = (1 * fts[0][key] + 2 * fts[1][key] + 5 * fts[2][key]) / 8
        torch.testing.assert_close(merged[key], want, rtol=1e-6, atol=1e-6)
    plain = merge(tv, method="linear", weights="1,2,5", normalize=False, **CPU)
    torch.testing.assert_close(plain["w"], 1 * fts[0]["w"] + 2 * fts[1]["w"] + 5 * fts[2]["w"], rtol=1e-6, atol=1e-5)
    uniform = merge(tv, method="linear", **CPU)
    torch.testing.assert_close(uniform["w"], sum(f["w"] for f in fts) / 3, rtol=1e-6, atol=1e-6)
    half = merge(tv, method="linear", alpha=0.5, **CPU)  # halfway from the base to the soup
    torch.testing.assert_close(half["w"], (tv.base["w"] + uniform["w"]) / 2, rtol=1e-6, atol=1e-6)


def test_linear_of_identical_models_and_of_one_model_returns_it():
    tv = _tv(1)
    torch.testing.assert_close(merge(tv, method="linear", **CPU)["w"], tv.finetuned["t0"]["w"], rtol=0, atol=1e-6)
    same = wl.TaskVectors(tv.base, {"a": tv.finetuned["t0"], "b": tv.finetuned["t0"]})
    torch.testing.assert_close(merge(same, method="linear", weights="0.3,0.9", **CPU)["w"], tv.finetuned["t0"]["w"],
                               rtol=0, atol=1e-6)


def test_bad_weights_are_refused_before_any_key_is_read():
    tv = _tv()
    with pytest.raises(InvalidParameterError, match=r"'weights' parameter of linear must be 3 comma-separated .*'t0', 't1', 't2'"):
        merge(tv, method="linear", weights="1,2")
    with pytest.raises(InvalidParameterError, match="must be 3 comma-separated"):
        merge(tv, method="linear", weights="1,x,2")
    with pytest.raises(InvalidParameterError, match="sum of the weights, which is 0.0"):
        merge(tv, method="linear", weights="1,-1,0")
    assert merge(tv, method="linear", weights="1,-1,0", normalize=False, **CPU)["w"].isfinite().all()


def test_the_mergekit_translation_names_linear_and_its_parameters():
    mk = get_method("linear").mergekit
    assert mk({"alpha": 1.0, "normalize": True, "weights": None}).method == "linear"
    got = mk({"alpha": 1.0, "normalize": True, "weights": "1,3"})
    assert got.per_task == ({"weight": 1.0}, {"weight": 3.0}) and got.parameters == {"weight": 0.0, "normalize": True}
    got = mk({"alpha": 0.5, "normalize": True, "weights": "1,3"})
    assert got.per_task == ({"weight": 0.125}, {"weight": 0.375}) and got.parameters == {"weight": 0.5, "normalize": False}


@pytest.mark.parametrize("method, params", [("linear", {"weights": "0.3,1.2", "alpha": 0.8})])
def test_the_recipe_reruns_bitwise(llama_models, tmp_path, method, params):
    base, finetuned = llama_models
    tv = wl.TaskVectors(base, {n: finetuned[n] for n in ("plus1", "plus3")})
    assert_recipe_reruns_bitwise(merge(tv, method=method, **params, **CPU), tmp_path, base)


@pytest.mark.peers
def test_mergekit_linear_reproduces_the_export(mergekit, llama_models, tmp_path):
    base, finetuned = llama_models
    tv = wl.TaskVectors(base, {k: finetuned[k] for k in ("plus1", "plus3")})
    cases = [{}, {"weights": "0.3,1.2"}, {"weights": "0.3,1.2", "normalize": False}, {"alpha": 0.6}]
    runs = export_and_run(mergekit, [merge(tv, method="linear", **p, **CPU) for p in cases], tmp_path, base)
    for params, (ours, theirs, text) in zip(cases, runs):
        config = yaml.safe_load(text)
        assert config["merge_method"] == "linear" and "normalize" in config["parameters"], params
        assert all("weight" in m["parameters"] for m in config["models"]), params
        assert max_relative_error(ours, theirs) <= 1e-5, params


@pytest.mark.parametrize("method", ["linear", "slerp", "model_stock", "breadcrumbs", "breadcrumbs_ties", "della",
                                    "della_linear"])
def test_the_mergekit_methods_sweep_their_default_grid(method):
    tv = _tv(2)

    def evaluate(weights, task, split):  # closer to the fine-tune is better
        dist = sum(float(((weights[k] - tv.finetuned[task][k]) ** 2).sum()) for k in tv.keys)
        return {"accuracy": 1.0 / (1.0 + dist)}

    sw = sweep(tv, method, None, evaluate, progress=False)
    grid = get_method(method).alpha_grid({}, len(tv))
    assert sorted(set(sw.table["alpha"])) == sorted(grid) and sw.best_alpha in grid
