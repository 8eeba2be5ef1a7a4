"""Export as an adapter (issue 15 item 3): a low-rank merged update written as a PEFT LoRA folder that peft loads.

Adapters trained with peft on a tiny Llama (and GPT-2, Conv1D with fan_in_fan_out) are merged by task
arithmetic; the adapter export at full rank reproduces the full-weight export's outputs in peft, reads back
through weightlens as the merged update, a truncated rank is the best rank-k approximation with its discarded
energy reported, and a merge that changes a 1-D key is refused.
"""

from __future__ import annotations

import json
import warnings

import pytest

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import torch  # noqa: E402

import weightlens as wl  # noqa: E402
from weightlens.errors import CheckpointError, InvalidParameterError  # noqa: E402

import _hf_models as hf  # noqa: E402
import _peft_models as pm  # noqa: E402


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter_export")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        llama = hf.tiny_llama(root)
        gpt2 = hf.tiny_gpt2(root)
        cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
        a = pm.train_adapter(llama, root / "a", peft.LoraConfig(**cfg), seed=1)
        b = pm.train_adapter(llama, root / "b", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"]),
                             seed=2)
        g = pm.train_adapter(gpt2, root / "g", peft.LoraConfig(r=3, lora_alpha=6, fan_in_fan_out=True,
                                                               target_modules=["c_attn", "c_fc"]), seed=1)
        g2 = pm.train_adapter(gpt2, root / "g2", peft.LoraConfig(r=2, lora_alpha=6, fan_in_fan_out=True,
                                                                 target_modules=["c_attn"]), seed=2)
        full = hf.finetune(llama, root / "full", seed=5)
    return {"root": root, "llama": llama, "gpt2": gpt2, "a": a, "b": b, "g": g, "g2": g2, "full": full}


def _merge(base, tasks, method="task_arithmetic", **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tv = wl.TaskVectors(base, tasks)
        return wl.merge(tv, method=method, **{"alpha": 0.7, **kwargs})


def _logits(model, seed=0):
    ids = torch.randint(5, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


def _peft_logits(base, adapter):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(base)
        return _logits(peft.PeftModel.from_pretrained(model, adapter).eval())


def _full_logits(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _logits(transformers.AutoModelForCausalLM.from_pretrained(folder).eval())


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_a_full_rank_adapter_export_reproduces_the_full_weight_export_in_peft(zoo, tmp_path, name):
    tasks = {"a": zoo["a"], "b": zoo["b"]} if name == "llama" else {"g": zoo["g"], "g2": zoo["g2"]}
    merged = _merge(zoo[name], tasks)
    full = wl.export(merged, tmp_path / "full", progress=False, recipe=False)
    out = wl.export(merged, tmp_path / "adapter", as_adapter=True, progress=False)
    assert {p.name for p in out.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["fan_in_fan_out"] == (name == "gpt2")
    got, want = _peft_logits(zoo[name], out), _full_logits(full)
    assert (got - want).abs().max().item() <= 1e-4
    report = json.loads((out / "weightlens_adapter.json").read_text())
    ranks = {k: m["rank"] for k, m in report["modules"].items()}
    sums = 8 if name == "llama" else 5
    assert all(1 <= r <= sums for r in ranks.values()) and report["discarded_fraction"] < 1e-10
    assert "Truncation error" in (out / "README.md").read_text()

    # read back through weightlens: the adapter's task vector is the merged update
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = wl.TaskVectors(zoo[name], {"m": out})
    for key in merged.updated_keys:
        ref = merged.update(key).double()
        err = (back.delta("m", key).double() - ref).abs().max().item()
        assert err <= 1e-5 * max(1.0, ref.abs().max().item()), key


def test_a_truncated_adapter_is_the_best_rank_k_approximation_and_reports_what_it_drops(zoo, tmp_path):
    merged = _merge(zoo["llama"], {"a": zoo["a"], "b": zoo["b"]})
    out = wl.io.export_adapter(merged, tmp_path / "r2", rank=2, progress=False)
    report = json.loads((out / "weightlens_adapter.json").read_text())
    config = json.loads((out / "adapter_config.json").read_text())
    assert report["rank"] == 2 and config["r"] == 2 and report["discarded_fraction"] > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = wl.TaskVectors(zoo["llama"], {"m": out})
    total = dropped = 0.0
    for key, m in report["modules"].items():
        ref = merged.update(key).double()
        S = torch.linalg.svdvals(ref)
        tail = float((S[2:] ** 2).sum())  # Eckart-Young: the best rank-2 error
        err = float(((back.delta("m", key).double() - ref) ** 2).sum())
        assert m["rank"] == min(2, m["full_rank"])
        assert abs(err - tail) <= 1e-5 * float((S ** 2).sum()) + 1e-12, key
        assert abs(m["discarded"] - tail) <= 1e-5 * float((S ** 2).sum()) + 1e-12, key
        total += float((S ** 2).sum())
        dropped += tail
    assert abs(report["discarded_fraction"] - dropped / total) <= 1e-5
    card = (out / "README.md").read_text()
    assert "at most 2 per key" in card and f"{report['discarded_fraction']:.3e}" in card


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts", "star"])
def test_spectral_merges_of_adapters_export_as_adapters_exactly(zoo, tmp_path, method):
    merged = _merge(zoo["llama"], {"a": zoo["a"], "b": zoo["b"]}, method=method)
    out = wl.io.export_adapter(merged, tmp_path / method, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = wl.TaskVectors(zoo["llama"], {"m": out})
    report = json.loads((out / "weightlens_adapter.json").read_text())
    assert report["discarded_fraction"] < 1e-10
    for key in merged.updated_keys:
        ref = merged.update(key).double()
        err = (back.delta("m", key).double() - ref).abs().max().item()
        assert err <= 1e-5 * max(1.0, ref.abs().max().item()), (method, key)


def test_a_merge_that_changes_a_1d_key_is_refused_with_the_keys_named(zoo, tmp_path):
    merged = _merge(zoo["llama"], {"a": zoo["a"], "full": zoo["full"]})
    with pytest.raises(CheckpointError, match=r"cannot carry .*norm\.weight \[\d+\]"):
        wl.export(merged, tmp_path / "bad", as_adapter=True, progress=False)
    assert not (tmp_path / "bad").exists()
    # a full fine-tune's merge restricted to its linear layers, truncated to a rank: the error is reported
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tv = wl.TaskVectors(zoo["llama"], {"a": zoo["a"], "full": zoo["full"]}, include="*_proj.weight")
        merged = wl.merge(tv, method="task_arithmetic", alpha=0.5)
    out = wl.export(merged, tmp_path / "r3", as_adapter=True, rank=3, progress=False)
    assert json.loads((out / "weightlens_adapter.json").read_text())["discarded_fraction"] > 0.01


def test_adapter_export_refuses_bad_settings(zoo, tmp_path):
    merged = _merge(zoo["llama"], {"a": zoo["a"]})
    with pytest.raises(InvalidParameterError, match="'rank'"):
        wl.export(merged, tmp_path / "x", as_adapter=True, rank=0)
    with pytest.raises(InvalidParameterError, match=r"\['dtype'\]"):
        wl.export(merged, tmp_path / "x", as_adapter=True, dtype="bf16")
    with pytest.raises(InvalidParameterError, match="merge result"):
        wl.io.export_adapter({"w": torch.ones(2, 2)}, tmp_path / "x")
    out = wl.io.export_adapter(merged, tmp_path / "once", progress=False)
    assert wl.io.export_adapter(merged, out, overwrite=True, progress=False) == out  # its own export is replaceable


@pytest.mark.parametrize("method, rank", [("task_arithmetic", None), ("tsv", 3)])
def test_an_adapter_export_writes_a_recipe_that_remakes_it_bitwise(zoo, tmp_path, method, rank):
    import yaml

    from weightlens.errors import ReproducibilityError
    from weightlens.io.recipe import RECIPE
    from weightlens.merge import run_recipe

    merged = _merge(zoo["llama"], {"a": zoo["a"], "b": zoo["b"]}, method=method)
    out = wl.export(merged, tmp_path / "adapter", as_adapter=True, rank=rank, progress=False)
    recipe = yaml.safe_load((out / RECIPE).read_text())
    assert recipe["adapter"] == {"rank": rank} and recipe["method"] == method and recipe["like"] is False
    sha = recipe["expect"]["adapter_model.safetensors"]
    from weightlens.io._fingerprint import sha256_file

    assert sha == sha256_file(out / "adapter_model.safetensors")  # hashed while written: the file's own sha256
    assert not (out / "mergekit_config.yml").exists()  # mergekit writes full weights, not adapters
    assert "weightlens merge weightlens_recipe.yaml" in (out / "README.md").read_text()

    again = run_recipe(out / RECIPE, tmp_path / "again", progress=False)  # verified against 'expect'
    assert (again / "adapter_config.json").read_text() == (out / "adapter_config.json").read_text()
    assert yaml.safe_load((again / RECIPE).read_text())["expect"]["adapter_model.safetensors"] == sha

    edited = yaml.safe_load((out / RECIPE).read_text())
    edited["adapter"] = {"rank": 1}  # another rank: other tensors, refused by the recorded sha256
    (out / "edited.yaml").write_text(yaml.safe_dump(edited))
    with pytest.raises(ReproducibilityError, match="adapter_model.safetensors differs"):
        run_recipe(out / "edited.yaml", tmp_path / "third", progress=False)
    assert not (tmp_path / "third").exists()
    edited["adapter"] = {"rank": 0}
    (out / "edited.yaml").write_text(yaml.safe_dump(edited))
    with pytest.raises(InvalidParameterError, match="'adapter' must be null"):
        run_recipe(out / "edited.yaml", tmp_path / "third", progress=False)


def test_an_adapter_export_of_merged_weights_in_memory_says_why_it_has_no_recipe(zoo, tmp_path):
    base = wl.load(zoo["llama"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tv = wl.TaskVectors({k: base[k] for k in base}, {"a": zoo["a"]})
    out = wl.export(wl.merge(tv, method="task_arithmetic"), tmp_path / "mem", as_adapter=True, progress=False)
    assert not (out / "weightlens_recipe.yaml").exists()
    assert "No recipe was written" in (out / "README.md").read_text()
    with pytest.raises(InvalidParameterError, match="no card extras"):
        wl.export(wl.merge(tv, method="task_arithmetic"), tmp_path / "c", as_adapter=True, card={"title": "x"})


def test_a_gpt2_full_finetune_exports_with_conv1d_orientation_from_its_model_type(zoo, tmp_path):
    # No adapter among the inputs says fan_in_fan_out: the base's model_type (gpt2: Conv1D) decides.
    full = hf.finetune(zoo["gpt2"], tmp_path / "gpt2_ft", seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tv = wl.TaskVectors(zoo["gpt2"], {"f": full}, include=["*.attn.c_attn.weight", "*.mlp.c_fc.weight"])
    merged = wl.merge(tv, method="task_arithmetic", alpha=0.5)
    whole = wl.export(merged, tmp_path / "whole", progress=False, recipe=False)
    out = wl.export(merged, tmp_path / "adapter", as_adapter=True, progress=False)
    assert json.loads((out / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    assert (_peft_logits(zoo["gpt2"], out) - _full_logits(whole)).abs().max().item() <= 1e-4
