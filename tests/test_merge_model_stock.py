"""``model_stock``: identities, the paper's ratio, errors, and parity with mergekit's ``model_stock`` run on the export."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

import weightlens as wl
from weightlens.errors import InvalidParameterError
from weightlens.merge import get_method, merge

from _mergekit_peers import assert_recipe_reruns_bitwise, export_and_run, llama_models, max_relative_error, mergekit  # noqa: F401
from _merge_inputs import noise_task_vectors

CPU = {"device": "cpu"}


def _tv(T: int = 3) -> wl.TaskVectors:
    return noise_task_vectors(T)


def test_model_stock_of_identical_models_returns_them():
    tv = _tv(1)
    same = wl.TaskVectors(tv.base, {"a": tv.finetuned["t0"], "b": tv.finetuned["t0"], "c": tv.finetuned["t0"]})
    for fw in (False, True):
        merged = merge(same, method="model_stock", filter_wise=fw, **CPU)
        for key in ("w", "b"):
            torch.testing.assert_close(merged[key], tv.finetuned["t0"][key], rtol=0, atol=1e-6)


def test_the_ratio_is_the_papers_per_tensor_and_per_row():
    tv = _tv(3)
    d = tv.deltas("w").double()
    flat = d.reshape(3, -1)
    cos = sum(float(torch.nn.functional.cosine_similarity(flat[i], flat[j], dim=0))
              for i, j in ((0, 1), (0, 2), (1, 2))) / 3
    t = 3 * cos / (1 + 2 * cos)
    got = merge(tv, method="model_stock", **CPU).update("w")
    torch.testing.assert_close(got.double(), t * d.mean(0), rtol=1e-5, atol=1e-6)
    rows = merge(tv, method="model_stock", filter_wise=True, **CPU).update("w")
    for r in range(6):
        c = sum(float(torch.nn.functional.cosine_similarity(d[i, r], d[j, r], dim=0))
                for i, j in ((0, 1), (0, 2), (1, 2))) / 3
        torch.testing.assert_close(rows[r].double(), 3 * c / (1 + 2 * c) * d[:, r].mean(0), rtol=1e-5, atol=1e-6)


def test_average_angle_is_fusionbenchs_ratio():
    """FusionBench's ``compute_angle`` (degrees, ``+ 1e-8``), mean angle over pairs, ``compute_ratio`` (``+ 1e-8``)."""
    tv = _tv(3)
    d = tv.deltas("w").double().numpy()
    pairs = ((0, 1), (0, 2), (1, 2))
    angles = []
    for i, j in pairs:
        c = float(np.sum(d[i] * d[j]) / (np.sqrt(np.sum(d[i] ** 2) * np.sum(d[j] ** 2)) + 1e-8))
        angles.append(np.rad2deg(np.arccos(np.clip(c, -1, 1))))
    cos = np.cos(np.deg2rad(np.mean(angles)))
    t = 3 * cos / (2 * cos + 1 + 1e-8)
    got = merge(tv, method="model_stock", average="angle", **CPU).update("w")
    np.testing.assert_allclose(got.double().numpy(), t * d.mean(0), rtol=1e-5, atol=1e-7)
    mergekits = merge(tv, method="model_stock", **CPU).update("w")
    assert not torch.allclose(got, mergekits, rtol=1e-4)  # three fine-tunes: the two references differ
    two = tv.subset(["t0", "t1"])
    torch.testing.assert_close(merge(two, method="model_stock", average="angle", **CPU).update("w"),
                               merge(two, method="model_stock", **CPU).update("w"), rtol=1e-5, atol=1e-6)
    mk = get_method("model_stock").mergekit({"alpha": 1.0, "filter_wise": False, "average": "angle"})
    assert mk.method == "model_stock" and "approximate" in mk.notes[0]


def test_opposing_updates_keep_the_base_with_a_note_and_one_task_is_refused():
    base = {"w": torch.zeros(2, 3)}
    up = {"w": torch.ones(2, 3)}
    tv = wl.TaskVectors(base, {"a": up, "b": {"w": -torch.ones(2, 3)}})  # cos = -1: 1 + (k - 1) cos = 0
    merged = merge(tv, method="model_stock", **CPU)
    assert torch.equal(merged["w"], base["w"]) and "t = 0 there, the base is kept" in merged.notes.note[0]
    with pytest.raises(InvalidParameterError, match=r"model_stock needs the base and at least two fine-tunes .*got 1 \('a'\)"):
        merge(wl.TaskVectors(base, {"a": up}), method="model_stock")
    assert get_method("model_stock").mergekit({"alpha": 0.5, "filter_wise": False}) is None


@pytest.mark.parametrize("method, params", [("model_stock", {"filter_wise": True})])
def test_the_recipe_reruns_bitwise(llama_models, tmp_path, method, params):
    base, finetuned = llama_models
    tv = wl.TaskVectors(base, {n: finetuned[n] for n in ("plus1", "plus3", "far")})
    assert_recipe_reruns_bitwise(merge(tv, method=method, **params, **CPU), tmp_path, base)


@pytest.mark.peers
def test_mergekit_model_stock_reproduces_the_export(mergekit, llama_models, tmp_path):
    base, finetuned = llama_models
    cases = [(("plus1", "plus3", "far"), {}), (("plus1", "plus3"), {"filter_wise": True})]
    merges = [merge(wl.TaskVectors(base, {n: finetuned[n] for n in names}), method="model_stock", **p, **CPU)
              for names, p in cases]
    for params, (ours, theirs, text) in zip(cases, export_and_run(mergekit, merges, tmp_path, base)):
        config = yaml.safe_load(text)
        assert config["merge_method"] == "model_stock" and "filter_wise" in config["parameters"], params
        assert max_relative_error(ours, theirs) <= 1e-5, params
