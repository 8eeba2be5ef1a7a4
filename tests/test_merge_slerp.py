"""``slerp``: identities (endpoints, colinear fallback), mergekit's layer-wise ``t``, and parity with mergekit's
``slerp`` run on the exported YAML (a near fine-tune: the linear branch; a far one: the spherical branch)."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

import weightlens as wl
from weightlens.errors import InvalidParameterError
from weightlens.merge import get_method, merge
from weightlens.merge.slerp import gradient_t, slerp_tensors

from _mergekit_peers import assert_recipe_reruns_bitwise, export_and_run, llama_models, max_relative_error, mergekit  # noqa: F401
from _merge_inputs import noise_task_vectors

CPU = {"device": "cpu"}


def _tv(T: int = 1, scale: float = 1.0) -> wl.TaskVectors:
    return noise_task_vectors(T, scale=scale)


def test_slerp_at_t0_and_t1_returns_the_endpoints():
    tv = _tv()
    ft = tv.finetuned["t0"]
    for key in ("w", "b"):
        assert torch.equal(merge(tv, method="slerp", t=0.0, **CPU)[key], tv.base[key])
        torch.testing.assert_close(merge(tv, method="slerp", t=1.0, **CPU)[key], ft[key], rtol=0, atol=1e-6)


def test_slerp_follows_the_great_circle_and_falls_back_to_linear_when_colinear():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    upd, dot = slerp_tensors(0.5, a, b)  # unit vectors at 90 degrees: sin(pi/4)/sin(pi/2) each
    c = math.sin(math.pi / 4)
    torch.testing.assert_close(a + upd, c * a + c * b)
    assert dot is None
    upd, dot = slerp_tensors(0.25, a, 3 * a)  # colinear: linear interpolation
    torch.testing.assert_close(a + upd, 0.75 * a + 0.25 * 3 * a)
    assert dot == pytest.approx(1.0)
    near = merge(_tv(scale=1e-3), method="slerp", **CPU)
    assert all("colinear" in n for n in near.notes.note) and len(near.notes) == 2


def test_mergekit_gradient_values_and_layer_positions():
    assert gradient_t([0.0, 1.0], 0.25) == 0.25
    assert gradient_t([0.0, 0.5, 1.0, 0.0], 1.0) == 0.0 and gradient_t([0.0, 0.5, 1.0, 0.0], 0.5) == 0.75
    base = {f"model.layers.{i}.w": torch.ones(3) for i in range(3)} | {"model.norm.weight": torch.ones(3)}
    tv = wl.TaskVectors(base, {"a": {k: 2 * v for k, v in base.items()}})
    merged = merge(tv, method="slerp", t_gradient="0.2,1", **CPU)  # colinear: t * tau with t per layer
    got = {k: float(merged.update(k)[0]) for k in base}
    assert got == pytest.approx({"model.layers.0.w": 0.2, "model.layers.1.w": 0.6, "model.layers.2.w": 1.0,
                                 "model.norm.weight": 0.2})


def test_slerp_with_several_finetunes_uses_the_named_or_the_first_with_a_note():
    tv = _tv(2)
    first = merge(tv, method="slerp", **CPU)
    assert any("used 't0', the first of 2" in n for n in first.notes.note)
    one = merge(tv.subset(["t1"]), method="slerp", **CPU)
    torch.testing.assert_close(merge(tv, method="slerp", task="t1", **CPU)["w"], one["w"], rtol=0, atol=0)
    with pytest.raises(InvalidParameterError, match="'task' parameter of slerp must be one of the fine-tunes 't0', 't1'"):
        merge(tv, method="slerp", task="x")
    with pytest.raises(InvalidParameterError, match="'t_gradient' parameter of slerp"):
        merge(tv, method="slerp", t_gradient="0,2")
    assert get_method("slerp").mergekit({"alpha": 1.0, "t": 0.3, "task": "t1"}) is None  # several fine-tunes
    assert get_method("slerp").mergekit({"alpha": 0.5, "t": 0.3}) is None


@pytest.mark.parametrize("method, params", [("slerp", {"t_gradient": "0,0.5,1"})])
def test_the_recipe_reruns_bitwise(llama_models, tmp_path, method, params):
    base, finetuned = llama_models
    tv = wl.TaskVectors(base, {n: finetuned[n] for n in ("far",)})
    assert_recipe_reruns_bitwise(merge(tv, method=method, **params, **CPU), tmp_path, base)


@pytest.mark.peers
def test_mergekit_slerp_reproduces_the_export(mergekit, llama_models, tmp_path):
    base, finetuned = llama_models
    cases = [("plus1", {"t": 0.3}), ("far", {"t": 0.7}), ("far", {"t_gradient": "0.2,0.8"})]
    merges = [merge(wl.TaskVectors(base, {n: finetuned[n]}), method="slerp", **p, **CPU) for n, p in cases]
    runs = export_and_run(mergekit, merges, tmp_path, base)
    for (name, params), m, (ours, theirs, text) in zip(cases, merges, runs):
        config = yaml.safe_load(text)
        assert config["merge_method"] == "slerp" and "t" in config["parameters"], params
        assert max_relative_error(ours, theirs) <= 1e-5, (name, params)
        colinear = len(m.notes)  # both branches are compared: plus1 has colinear keys, far none
        assert (colinear == 0) == (name == "far") and colinear < len(m.updated_keys), (name, colinear)
