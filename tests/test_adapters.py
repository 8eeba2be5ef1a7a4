"""PEFT LoRA adapters: ``wl.load`` of adapter folders and factored task vectors, against peft itself.

Adapters are trained here with peft for a few steps on tiny models built from configs
(``tests/_peft_models.py``); the reference is peft's ``merge_and_unload()`` minus the base, in float64.
fp32 rounding of the merged weight bounds the difference: ``TOL`` times the largest base or merged value.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings

import pytest

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import torch  # noqa: E402
import yaml  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import weightlens as wl  # noqa: E402
from weightlens.errors import (  # noqa: E402
    CheckpointError, InvalidParameterError, KeyMismatchError, NonFiniteError, ShapeMismatchError)
from weightlens.io.sources import AdapterCheckpoint  # noqa: E402

import _hf_models as hf  # noqa: E402
import _peft_models as pm  # noqa: E402

TOL = 4 * torch.finfo(torch.float32).eps
KeyMapWarning = wl.taskvectors.KeyMapWarning
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]

CONFIGS = {  # name: (base, LoraConfig kwargs, model class)
    "plain": ("llama", dict(r=4, lora_alpha=8, target_modules=ATTN), None),
    "rslora": ("llama", dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "embed_tokens", "lm_head"]),
               None),
    "patterns": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                               rank_pattern={"q_proj": 2, "layers.1.self_attn.v_proj": 6},
                               alpha_pattern={"v_proj": 3, "layers.0.mlp.up_proj": 16}), None),
    "gpt2": ("gpt2", dict(r=4, lora_alpha=8, fan_in_fan_out=True, target_modules=["c_attn", "c_proj", "c_fc"],
                          bias="lora_only"), None),
    "head": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]), None),
    "classifier": ("bert", dict(r=4, lora_alpha=8, task_type="SEQ_CLS", target_modules=["query", "value"],
                                bias="all"), "BertForSequenceClassification"),
}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Bases, adapters trained on them and peft's merged weights of each, built once."""
    root = tmp_path_factory.mktemp("adapters")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bases = {"llama": hf.tiny_llama(root), "gpt2": hf.tiny_gpt2(root), "bert": hf.tiny_bert(root)}
        adapters, merged = {}, {}
        for name, (base, kwargs, cls) in CONFIGS.items():
            extra = {"num_labels": 2} if cls else {}
            adapters[name] = pm.train_adapter(bases[base], root / f"{name}_lora", peft.LoraConfig(**kwargs), cls=cls,
                                              **extra)
            merged[name] = pm.merged_weights(bases[base], adapters[name], cls=cls, **extra)
        adapters["bin"] = pm.train_adapter(bases["llama"], root / "bin_lora", peft.LoraConfig(**CONFIGS["plain"][1]),
                                           seed=3, safe=False)
        merged["bin"] = pm.merged_weights(bases["llama"], adapters["bin"])
        full = hf.finetune(bases["llama"], root / "llama_ft", seed=5)
    return {"root": root, "bases": bases, "adapters": adapters, "merged": merged, "full": full}


def _check_close(got: torch.Tensor, merged: torch.Tensor, base: torch.Tensor, what: str) -> None:
    """``got`` (a delta) equals ``merged - base`` within fp32 rounding of the merged weight."""
    ref = merged.double() - base.double()
    bound = TOL * max(merged.abs().max().item(), base.abs().max().item(), 1e-30)
    err = (got.double() - ref).abs().max().item()
    assert err <= bound, f"{what}: |delta - (merged - base)| = {err:.3g} > {bound:.3g}"


_tv = hf.quiet_task_vectors  # task vectors without the KeyMapWarning of a prefix match


def _edited(zoo, name: str, dst: str, **config) -> str:
    """A copy of adapter ``name`` whose adapter_config.json has ``config`` set."""
    out = zoo["root"] / dst
    shutil.copytree(zoo["adapters"][name], out)
    path = out / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return out


# -------------------------------------------------------------------------------------------- loading
def test_load_reads_an_adapter_folder_from_headers(zoo):
    ad = wl.load(zoo["adapters"]["plain"])
    assert isinstance(ad, AdapterCheckpoint)
    assert wl.load(ad.folder / "adapter_model.safetensors").lora_keys == ad.lora_keys  # the file alone too
    assert len(ad.lora_keys) == 2 * len(ATTN) and not ad.full_keys
    assert ad.base_model_name_or_path == str(zoo["bases"]["llama"]) and ad.base_path == zoo["bases"]["llama"]
    assert all(k.startswith("base_model.model.") for k in ad)  # the Mapping is the file's tensors

    def boom(key):
        raise AssertionError(f"read {key}")

    ad._reader = boom  # header facts read no tensor
    base = wl.load(zoo["bases"]["llama"])
    for key in ad.lora_keys:
        m = ad.lora(key)
        assert m.shape == base.shape(key) and (m.rank, m.alpha, m.scale) == (4, 8.0, 2.0), key
    with pytest.raises(KeyMismatchError, match="no LoRA update of key 'model.layers.0.mlp.up_proj.weight'"):
        ad.lora("model.layers.0.mlp.up_proj.weight")


def test_scales_follow_rslora_and_the_patterns(zoo):
    rs = wl.load(zoo["adapters"]["rslora"])
    assert {rs.lora(k).scale for k in rs.lora_keys} == {8 / math.sqrt(4)}
    pat = wl.load(zoo["adapters"]["patterns"])
    got = {k.removeprefix("model.layers.").removesuffix(".weight"): (pat.lora(k).rank, pat.lora(k).alpha)
           for k in pat.lora_keys}
    assert got == {"0.self_attn.q_proj": (2, 8), "1.self_attn.q_proj": (2, 8),
                   "0.self_attn.v_proj": (4, 3), "1.self_attn.v_proj": (6, 3),
                   "0.mlp.up_proj": (4, 16), "1.mlp.up_proj": (4, 8)}
    assert all(pat.lora(k).scale == pat.lora(k).alpha / pat.lora(k).rank for k in pat.lora_keys)


# ---------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("name", ["plain", "rslora", "patterns", "gpt2", "head", "bin"])
def test_delta_is_merge_and_unload_minus_base(zoo, name):
    base_dir = zoo["bases"][CONFIGS.get(name, CONFIGS["plain"])[0]]
    tv = _tv(base_dir, {name: zoo["adapters"][name]})
    ad, base, merged = tv.finetuned[name], wl.load(base_dir), zoo["merged"][name]
    changed = set(ad.lora_keys) | set(ad.full_keys)
    for key in tv.keys:
        d = tv.delta(name, key)
        assert d.dtype == torch.float32 and tuple(d.shape) == base.shape(key)
        if key in changed:
            _check_close(d, merged[key], base[key], f"{name} {key}")
        else:
            assert not d.any(), f"{name} {key}: the adapter does not change it, its delta must be exactly zero"
        f = tv.factors(name, key)
        if f is not None:
            assert f.A.shape[0] == f.B.shape[1]
            torch.testing.assert_close(f.dense().reshape(d.shape), d, rtol=0, atol=0)  # the same product
    assert torch.equal(tv.deltas(tv.keys[0])[0], tv.delta(name, tv.keys[0]))


def test_gpt2_conv1d_updates_keep_the_stored_orientation(zoo):
    tv = _tv(zoo["bases"]["gpt2"], {"a": zoo["adapters"]["gpt2"]})
    key = "transformer.h.0.attn.c_attn.weight"
    assert tv.shape(key) == (16, 48)  # Conv1D stores (in, out)
    A, B, scale = tv.factors("a", key)
    assert (tuple(A.shape), tuple(B.shape), scale) == ((4, 48), (16, 4), 2.0)
    assert "transformer.h.0.attn.c_attn.bias" in tv.finetuned["a"].full_keys  # bias="lora_only": trained


def test_factors_and_is_factored(zoo):
    tv = _tv(zoo["bases"]["llama"], {n: zoo["adapters"][n] for n in ("plain", "rslora", "head")})
    untouched = "model.layers.0.mlp.up_proj.weight"
    A, B, scale = tv.factors("plain", untouched)  # not targeted: rank 0, an exact zero
    assert (tuple(A.shape), tuple(B.shape)) == ((0, 16), (32, 0))
    assert tv.factors("plain", "model.norm.weight") is None  # 1-D
    # rsLoRA targets the embedding and LM head: peft stores their (unchanged) weights beside the LoRA
    assert tv.factors("rslora", "lm_head.weight") is not None and tv.is_factored("rslora")
    emb = tv.factors("rslora", "model.embed_tokens.weight")
    assert tuple(emb.B.shape) == (260, 4) and tuple(emb.A.shape) == (4, 16)
    # modules_to_save: a trained LM head stored whole is not low-rank
    assert tv.factors("head", "lm_head.weight") is None and not tv.is_factored("head")
    assert tv.is_factored("plain")


def test_conv_adapters(tmp_path):
    base, adapter, merged = pm.conv_adapter(tmp_path)
    tv = wl.TaskVectors(base, {"cnn": adapter})
    b = wl.load(base)
    for key in tv.keys:
        _check_close(tv.delta("cnn", key), merged[key], b[key], key)
    A, B, _ = tv.factors("cnn", "conv.weight")
    assert (tuple(A.shape), tuple(B.shape)) == ((2, 27), (6, 2))


def test_classifier_adapter_heads_are_extras_and_biases_deltas(zoo):
    body = zoo["bases"]["bert"]  # a BertModel: the adapter's keys carry 'bert.' and a classifier head
    with pytest.warns(KeyMapWarning, match="classifier.weight"):
        tv = wl.TaskVectors(body, {"cls": zoo["adapters"]["classifier"]})
    merged, base = zoo["merged"]["classifier"], wl.load(body)
    assert sorted(tv.extras["cls"]) == ["classifier.bias", "classifier.weight"]
    torch.testing.assert_close(tv.extra("cls", "classifier.weight").double(), merged["classifier.weight"])
    for key in tv.keys:  # LoRA on query/value, every bias trained (bias="all")
        _check_close(tv.delta("cls", key), merged["bert." + key], base[key], key)
    assert tv.delta("cls", "encoder.layer.0.output.dense.bias").any()
    assert not tv.delta("cls", "encoder.layer.0.output.dense.weight").any()
    assert tv.is_factored("cls")


def test_mix_of_adapter_and_full_finetune(zoo):
    base = zoo["bases"]["llama"]
    tv = wl.TaskVectors(base, {"lora": zoo["adapters"]["plain"], "full": zoo["full"]})
    b, ft = wl.load(base), wl.load(zoo["full"])
    key = "model.layers.0.self_attn.q_proj.weight"
    stacked = tv.deltas(key)
    _check_close(stacked[0], zoo["merged"]["plain"][key], b[key], "lora")
    assert torch.equal(stacked[1], ft[key].float() - b[key].float())
    assert tv.factors("full", key) is None and not tv.is_factored("full") and tv.is_factored("lora")
    merged = wl.merge(tv, method="task_arithmetic", alpha=0.5)
    want = b[key].double() + 0.5 * stacked.double().sum(0)
    torch.testing.assert_close(merged[key].double(), want, rtol=0, atol=1e-6)


def test_union_vocabulary_pads_adapter_rows_with_zeros(zoo):
    llama = zoo["bases"]["llama"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        chat = hf.with_added_tokens(llama, zoo["root"] / "chat", ["<|user|>", "<|bot|>"], special=True)
    tv = wl.TaskVectors(llama, {"lora": zoo["adapters"]["rslora"], "chat": chat}, vocab="union")
    key = "model.embed_tokens.weight"
    d = tv.delta("lora", key)
    assert tuple(d.shape) == (262, 16) and not d[260:].any()
    _check_close(d[:260], zoo["merged"]["rslora"][key], wl.load(llama)[key], key)
    f = tv.factors("lora", key)
    assert torch.equal(f.dense(), d) and tv.shared_rows().delta("lora", key).shape == (260, 16)


# ---------------------------------------------------------------------------------------- the base
def test_base_none_takes_the_adapters_local_base(zoo, tmp_path):
    tv = wl.TaskVectors(None, [zoo["adapters"]["plain"], zoo["adapters"]["patterns"]])
    assert tv.base.source == str(zoo["bases"]["llama"] / "model.safetensors") and len(tv) == 2
    with pytest.raises(InvalidParameterError, match="different bases"):
        wl.TaskVectors(None, [zoo["adapters"]["plain"], zoo["adapters"]["gpt2"]])
    hub = _edited(zoo, "plain", "hub_lora", base_model_name_or_path="meta-llama/Llama-3.2-1B")
    with pytest.raises(CheckpointError, match="'meta-llama/Llama-3.2-1B', which is not a local folder"):
        wl.TaskVectors(None, [hub])
    with pytest.raises(InvalidParameterError, match="none of the fine-tunes"):
        wl.TaskVectors(None, [zoo["full"]])


def test_wrong_base_is_refused(zoo):
    with pytest.raises(KeyMismatchError, match="changes 10 key.s. that base"):
        _tv(zoo["bases"]["gpt2"], [zoo["adapters"]["plain"]])
    flipped = _edited(zoo, "gpt2", "flipped_lora", fan_in_fan_out=False)
    with pytest.raises(ShapeMismatchError, match="fan_in_fan_out=False does not fit"):
        _tv(zoo["bases"]["gpt2"], [flipped])


# ---------------------------------------------------------------------------------------- refusals
def test_dora_is_refused(zoo):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dora = pm.train_adapter(zoo["bases"]["llama"], zoo["root"] / "dora",
                                peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), steps=1)
    with pytest.raises(CheckpointError, match=r"DoRA \(use_dora=True\) rescales .*merge_and_unload"):
        wl.load(dora)


@pytest.mark.parametrize("option, value, match", [
    ("lora_bias", True, "lora_bias=True trains a bias"),
    ("trainable_token_indices", [3, 4], "trainable_token_indices stores"),
    ("init_lora_weights", "pissa_niter_4", "init_lora_weights='pissa_niter_4' changed the base's weights"),
    ("layer_replication", [[0, 2]], "layer_replication changes"),
    ("target_parameters", ["experts.gate_up_proj"], "target_parameters puts LoRA"),
    ("peft_type", "IA3", "peft_type is 'IA3'"),
])
def test_unmodelled_options_are_refused_naming_them(zoo, option, value, match):
    with pytest.raises(CheckpointError, match=match):
        wl.load(_edited(zoo, "plain", f"refused_{option}", **{option: value}))


def test_unknown_adapter_tensors_and_non_finite_factors(zoo):
    src = zoo["adapters"]["plain"]
    tensors = load_file(src / "adapter_model.safetensors")
    odd = _edited(zoo, "plain", "odd_lora")
    save_file({**tensors, "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(16)},
              odd / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="lora_magnitude_vector"):
        wl.load(odd)
    nan = _edited(zoo, "plain", "nan_lora")
    a_key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    save_file({**tensors, a_key: torch.full_like(tensors[a_key], math.nan)}, nan / "adapter_model.safetensors")
    tv = wl.TaskVectors(zoo["bases"]["llama"], {"nan": nan})
    with pytest.raises(NonFiniteError, match="LoRA factors"):
        tv.delta("nan", "model.layers.0.self_attn.q_proj.weight")


def test_folder_with_weights_and_adapter_is_ambiguous(zoo):
    both = _edited(zoo, "plain", "both_lora")
    shutil.copy(zoo["bases"]["llama"] / "model.safetensors", both / "model.safetensors")
    with pytest.raises(CheckpointError, match="both full weights"):
        wl.load(both)
    assert isinstance(wl.load(both / "adapter_model.safetensors"), AdapterCheckpoint)


def test_finetuned_weights_of_an_adapter_are_what_merge_and_unload_gives(zoo):
    base_dir = zoo["bases"]["llama"]
    tv = wl.TaskVectors(base_dir, {"lora": zoo["adapters"]["plain"], "full": zoo["full"]})
    assert tv.finetuned_weights("full") is tv.finetuned["full"]  # a full fine-tune is scored as given
    applied, merged, base = tv.finetuned_weights("lora"), zoo["merged"]["plain"], wl.load(base_dir)
    assert list(applied) == list(base) and len(applied) == len(base)
    for key in base:
        assert applied[key].dtype == base[key].dtype
        _check_close(applied[key].double() - base[key].double(), merged[key], base[key], key)


def test_a_recipe_notices_a_changed_adapter_config(zoo, tmp_path):
    # lora_alpha scales the update without touching a tensor file: the recipe fingerprints adapter_config.json.
    from weightlens.errors import ReproducibilityError
    from weightlens.io.recipe import RECIPE

    adapter = _edited(zoo, "plain", "recipe_lora")
    tv = _tv(zoo["bases"]["llama"], {"a": adapter})
    out = wl.export(wl.merge(tv, method="task_arithmetic", alpha=0.5, device="cpu"), tmp_path / "merged",
                    progress=False)
    recipe = yaml.safe_load((out / RECIPE).read_text())
    assert "adapter_config.json" in recipe["fingerprints"]["finetuned"]["a"]
    config = adapter / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "lora_alpha": 4}))
    with pytest.raises(ReproducibilityError, match=r"fine-tune 'a' input changed.*adapter_config\.json"):
        wl.run_recipe(out / RECIPE, tmp_path / "again", progress=False)
