"""Exports of merges of tiny Hugging Face models load with ``from_pretrained``, nothing missing or unexpected:
BERT classifiers with and without a head (every merge method), GPT-2 with tied embeddings and Llama with GQA
and a resized vocabulary (vocab='base' and 'union', the union tokenizer); recipes carry vocab, key map and
head, record paths relative to the export, and a moved export re-runs bitwise with ``sources=``."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import weightlens as wl
from weightlens.errors import CheckpointError, InvalidParameterError, ReproducibilityError, ShapeMismatchError
from weightlens.io import load_recipe
from weightlens.io.recipe import relative_path
from weightlens.merge import get_method, list_methods, run_recipe

#: The methods that need no data= (regmean and fisher read a MergeData: tests/test_merge_regmean.py, _fisher.py).
DATA_FREE = [m for m in list_methods() if not get_method(m).needs_data]

transformers = pytest.importorskip("transformers", reason="the test extra installs transformers")
from _hf_models import (  # noqa: E402  (needs transformers)
    bert_classifier_finetunes,
    body_of,
    finetune,
    quiet_task_vectors as _quiet,
    tensors as _tensors,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    with_added_tokens,
)

RECIPE = "weightlens_recipe.yaml"


def _loaded(cls, folder: Path):
    """``cls.from_pretrained(folder)``, asserting transformers found every key it expects and no other."""
    model, info = cls.from_pretrained(folder, output_loading_info=True)
    problems = {k: v for k, v in info.items() if k != "error_msgs" and v}
    assert not problems and not info["error_msgs"], (folder, problems)
    return model.eval()


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def _front(folder: Path) -> dict:
    text = (folder / "README.md").read_text()
    return yaml.safe_load(text.split("---\n")[1])


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------- BERT heads
@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert") / "project"
    base = tiny_bert(root / "models")
    fts = bert_classifier_finetunes(root / "models", base, {"sst2": 2, "mnli": 3})
    return root, base, fts, _quiet(base, fts)


@pytest.mark.parametrize("method", DATA_FREE)
def test_every_method_exports_the_base_model_or_one_classifier_head(bert, method):
    root, base, fts, tv = bert
    merged = wl.merge(tv, method=method, lazy=True)
    plain = wl.export(merged, root / method, progress=False)
    model = _loaded(transformers.BertModel, plain)  # head=None: the base's keys and config
    assert _config(plain)["architectures"] == ["BertModel"]
    state = model.state_dict()
    assert all(torch.equal(state[k], merged[k]) for k in merged)
    for task, labels in (("sst2", 2), ("mnli", 3)):
        out = wl.export(merged.with_head(task), root / f"{method}-{task}", progress=False)
        clf = _loaded(transformers.BertForSequenceClassification, out)
        assert _config(out)["architectures"] == ["BertForSequenceClassification"] and clf.config.num_labels == labels
        own = _tensors(fts[task])
        assert torch.equal(clf.classifier.weight, own["classifier.weight"])  # that fine-tune's head, bitwise
        assert torch.equal(clf.classifier.bias, own["classifier.bias"])
        assert all(torch.equal(clf.state_dict()["bert." + k], merged[k]) for k in merged)  # the shared merge
        card = (out / "README.md").read_text()
        assert f"Carries the head of fine-tune {task}" in card
        for other in ("sst2", "mnli"):  # heads are reported per task
            carried = "yes" if other == task else "no"
            assert f"| {other} | classifier.bias, classifier.weight | {carried} |" in card
    assert "Carries no head" in (plain / "README.md").read_text()


def test_the_card_names_an_input_by_its_hub_id_when_known(bert):
    root, base, fts, _ = bert
    snapshot = root / "hub" / "models--org--tiny-bert" / "snapshots" / "0123abc"  # a Hugging Face cache folder
    shutil.copytree(base, snapshot)
    named = root / "named"  # a config.json that says where it came from (older transformers write it)
    shutil.copytree(fts["mnli"], named)
    config = _config(named)
    (named / "config.json").write_text(json.dumps({**config, "_name_or_path": "someone/bert-mnli"}))
    merged = wl.merge(_quiet(snapshot, {"sst2": fts["sst2"], "mnli": named}), method="task_arithmetic")
    out = wl.export(merged, root / "hub-merge", progress=False)
    assert _front(out)["base_model"] == ["org/tiny-bert", "../models/sst2", "someone/bert-mnli"]


def test_a_head_that_is_not_a_task_is_refused_naming_the_tasks_and_their_heads(bert):
    merged = wl.merge(bert[3], method="task_arithmetic")
    with pytest.raises(InvalidParameterError, match=r"'qnli'.*'sst2': classifier.bias, classifier.weight"):
        merged.with_head("qnli")
    assert merged.with_head("sst2").head == "sst2" and merged.head is None  # a copy: the result is unchanged


def test_a_key_map_function_is_recorded_as_the_mapping_it_made_and_reruns(bert):
    root, base, fts, _ = bert
    tv = wl.TaskVectors(base, fts, key_map=lambda k: k.removeprefix("bert."))
    first = wl.export(wl.merge(tv, method="task_arithmetic", alpha=0.4).with_head("mnli"), root / "fn",
                      progress=False)
    recipe = load_recipe(first / RECIPE)
    assert recipe.key_map == tv.key_maps and recipe.head == "mnli" and recipe.vocab is None
    assert recipe.base == "../models/bert/model.safetensors"  # relative: the inputs share the project folder
    again = run_recipe(recipe, root / "fn-again", progress=False)  # verifies the recorded sha256
    assert _sha(again / "model.safetensors") == _sha(first / "model.safetensors")
    _loaded(transformers.BertForSequenceClassification, again)


# ---------------------------------------------------------------------------------------- GPT-2, tied
@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2")
    base = tiny_gpt2(root)
    return root, base, {
        "chat": with_added_tokens(base, root / "chat", ["<|user|>", "<|bot|>"], special=True, seed=11),
        "code": with_added_tokens(base, root / "code", ["<|bot|>", "<code>"], seed=12),
        "plain": finetune(base, root / "plain", seed=13),
    }


@pytest.mark.parametrize("vocab, rows", [("union", 262), ("base", 259)])
def test_gpt2_tied_embeddings_export_loads_as_a_language_model(gpt2, vocab, rows):
    root, base, fts = gpt2
    tv = wl.TaskVectors(base, fts, vocab=vocab)
    merged = wl.merge(tv, method="ties", density=0.5)
    for head in (None, "chat"):  # chat's config says 261 tokens: the export sets the merged rows
        out = wl.export(merged.with_head(head), root / f"{vocab}-{head}", progress=False)
        # The LM head is tied to transformer.wte: like transformers' own GPT-2 files, the export holds no
        # lm_head.weight, and from_pretrained ties it again without calling it missing.
        assert "lm_head.weight" not in wl.load(out)
        model = _loaded(transformers.GPT2LMHeadModel, out)
        assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
        assert _config(out)["vocab_size"] == rows == model.transformer.wte.weight.shape[0]
        assert torch.equal(model.transformer.wte.weight, merged["transformer.wte.weight"])
        tok = transformers.AutoTokenizer.from_pretrained(out)
        assert len(tok) == rows
        for text, row in (tv.vocab.added.items() if vocab == "union" else []):
            assert tok.encode(text, add_special_tokens=False) == [row] and tok.decode([row]) == text
        ids = tok("he<|bot|> the<code>", return_tensors="pt")["input_ids"]
        assert int(ids.max()) < rows
        with torch.no_grad():
            assert torch.isfinite(model(ids).logits).all()


def test_a_union_tokenizer_needs_the_bases_tokenizer_and_like_can_give_it(gpt2):
    root, base, fts = gpt2
    bare = root / "bare"  # the base's weights and config, no tokenizer files
    bare.mkdir()
    for name in ("model.safetensors", "config.json"):
        shutil.copyfile(base / name, bare / name)
    merged = wl.merge(wl.TaskVectors(bare, fts, vocab="union"), method="task_arithmetic")
    with pytest.raises(CheckpointError, match=r"union tokenizer extends the base's tokenizer.json.*like="):
        wl.export(merged, root / "no-tokenizer", progress=False)
    assert not (root / "no-tokenizer").exists()
    out = wl.export(merged, root / "given", like=base, progress=False)
    assert len(transformers.AutoTokenizer.from_pretrained(out)) == 262 == _config(out)["vocab_size"]
    _loaded(transformers.GPT2LMHeadModel, out)


# ---------------------------------------------------------------------------------------- Llama, GQA
@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    base = tiny_llama(root, gqa=True)
    return root, base, {
        "chat": with_added_tokens(base, root / "chat", ["<|im_start|>", "<|im_end|>"], special=True, seed=21,
                                  pad_to_multiple_of=8),  # 262 tokens on 264 rows: two rows of padding
        "math": finetune(base, root / "math", seed=22),
    }


@pytest.mark.parametrize("vocab, rows", [("union", 262), ("base", 260)])
def test_llama_gqa_with_a_resized_vocabulary_exports_and_loads(llama, vocab, rows):
    root, base, fts = llama
    merged = wl.merge(wl.TaskVectors(base, fts, vocab=vocab), method="tsv", lazy=True)
    out = wl.export(merged, root / vocab, progress=False)
    model = _loaded(transformers.LlamaForCausalLM, out)
    assert model.config.num_key_value_heads == 2 and model.model.layers[0].self_attn.k_proj.weight.shape == (8, 16)
    assert _config(out)["vocab_size"] == rows
    assert model.lm_head.weight.shape[0] == model.model.embed_tokens.weight.shape[0] == rows
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert len(tok) == rows
    if vocab == "union":
        for text, row in (("<|im_start|>", 260), ("<|im_end|>", 261)):
            assert tok.encode(text, add_special_tokens=False) == [row] and tok.decode([row]) == text
        assert sorted(n for n in ("tokenizer.json", "tokenizer_config.json") if (out / n).is_file()) == [
            "tokenizer.json", "tokenizer_config.json"]
        assert "Written by weightlens: the union tokenizer" in (out / "README.md").read_text()
    with torch.no_grad():
        logits = model(tok("<|im_start|>he<|im_end|>", return_tensors="pt")["input_ids"]).logits
    assert logits.shape[-1] == rows and torch.isfinite(logits).all()


def test_an_lm_head_is_carried_only_onto_its_own_vocabulary_rows(tmp_path):
    full = tiny_llama(tmp_path, gqa=True)
    base = body_of(full, tmp_path / "body")  # LlamaModel: the fine-tune's lm_head is its extra
    chat = with_added_tokens(full, tmp_path / "chat", ["<|user|>"], special=True)
    merged = wl.merge(_quiet(base, {"chat": chat}, vocab="union"), method="task_arithmetic")
    _loaded(transformers.LlamaModel, wl.export(merged, tmp_path / "body-out", progress=False))
    # the union is the base's rows and chat's added token, in chat's order: its lm_head fits
    lm = _loaded(transformers.LlamaForCausalLM, wl.export(merged.with_head("chat"), tmp_path / "lm", progress=False))
    assert torch.equal(lm.lm_head.weight, _tensors(chat)["lm_head.weight"]) and lm.config.vocab_size == 261
    cut = wl.merge(_quiet(base, {"chat": chat}, vocab="base"), method="task_arithmetic")  # 260 rows
    with pytest.raises(ShapeMismatchError, match=r"head='chat' carries 'lm_head.weight' with one row per token"):
        wl.export(cut.with_head("chat"), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------- recipes that move
def test_a_moved_union_vocabulary_export_with_a_head_reruns_bitwise(tmp_path, capsys):
    project = tmp_path / "project"
    base = tiny_bert(project / "models")
    fts = bert_classifier_finetunes(project / "models", base, {"sst2": 2, "mnli": 3})
    fts["sst2"] = with_added_tokens(fts["sst2"], project / "models" / "sst2x", ["[E1]", "[E2]"], special=True)
    tv = _quiet(base, fts, vocab="union")
    first = wl.export(wl.merge(tv, method="ties", density=0.5).with_head("sst2"), project / "merged", progress=False)
    clf = _loaded(transformers.BertForSequenceClassification, first)
    assert clf.config.vocab_size == 66 and clf.config.num_labels == 2
    tok = transformers.AutoTokenizer.from_pretrained(first)
    assert tok.convert_tokens_to_ids(["[E1]", "[E2]"]) == [64, 65] and tok.decode([64]) == "[E1]"
    # Nothing written names this machine's folders: the inputs are in the export's project folder.
    for name in (RECIPE, "mergekit_config.yml", "README.md"):
        assert str(tmp_path) not in (first / name).read_text(), name
    recipe = load_recipe(first / RECIPE)
    assert recipe.vocab == "union" and recipe.head == "sst2" and recipe.like is None and recipe.output == "."
    assert recipe.finetuned == {"sst2": "../models/sst2x/model.safetensors", "mnli": "../models/mnli/model.safetensors"}
    assert recipe.key_map["sst2"]["bert.embeddings.word_embeddings.weight"] == "embeddings.word_embeddings.weight"
    assert "Run from this folder" in (first / "mergekit_config.yml").read_text().splitlines()[0]
    front = _front(first)
    assert front["base_model"] == ["../models/bert", "../models/sst2x", "../models/mnli"]
    assert front["base_model_relation"] == "merge" and front["library_name"] == "transformers"
    assert front["tags"] == ["weightlens", "merge", "ties"]
    want = {p.name: p.read_bytes() for p in first.iterdir() if p.suffix in (".json", ".txt", ".safetensors")}

    def same(folder: Path) -> None:  # bitwise weights (verified against 'expect' too), same config and tokenizer
        got = {p.name: p.read_bytes() for p in folder.iterdir() if p.suffix in (".json", ".txt", ".safetensors")}
        assert sorted(got) == sorted(want) and all(got[n] == want[n] for n in want), folder

    # the whole project moves: the relative paths follow it
    moved = tmp_path / "moved"
    project.rename(moved)
    same(run_recipe(moved / "merged" / RECIPE, moved / "again", progress=False))
    # the export alone moves: the inputs are named with sources=, and their fingerprints still checked
    (tmp_path / "elsewhere" / "deep").mkdir(parents=True)
    recipe_file = (moved / "merged").rename(tmp_path / "elsewhere" / "deep" / "merged") / RECIPE
    with pytest.raises(CheckpointError, match=r"'base' input .* is not there.*sources=\{'base': <its path now>\}"):
        run_recipe(recipe_file, tmp_path / "lost", progress=False)
    models = moved / "models"
    sources = {"base": models / "bert", "sst2": models / "sst2x", "mnli": str(models / "mnli" / "model.safetensors")}
    third = run_recipe(recipe_file, tmp_path / "third", sources=sources, progress=False)
    same(third)
    assert load_recipe(third / RECIPE).base == "../moved/models/bert"  # where the inputs are now, as given
    with pytest.raises(ReproducibilityError, match="'sst2' input changed"):
        run_recipe(recipe_file, tmp_path / "swapped", sources={**sources, "sst2": models / "sst2"}, progress=False)
    with pytest.raises(InvalidParameterError, match=r"sources names 'qnli'.*base, sst2, mnli, like"):
        run_recipe(recipe_file, tmp_path / "bad", sources={"qnli": models / "mnli"}, progress=False)
    # the command line: --source NAME=PATH
    from weightlens.cli import main

    args = ["merge", str(recipe_file), "--out", str(tmp_path / "cli"), "-q"]
    args += [a for name, path in sources.items() for a in ("--source", f"{name}={path}")]
    assert main(args) == 0 and "reproduced bitwise" in capsys.readouterr().err
    same(tmp_path / "cli")
    # and a merge by flags with --vocab and --head records them
    flags = ["merge", "--base", str(models / "bert"), "--ft", f"sst2={models / 'sst2x'}", "--ft",
             f"mnli={models / 'mnli'}", "--method", "ties", "--param", "density=0.5", "--vocab", "union",
             "--head", "sst2", "--out", str(tmp_path / "flags"), "-q"]
    with pytest.warns(wl.taskvectors.KeyMapWarning):  # by flags: the 'bert.' prefix is found again
        assert main(flags) == 0
    same(tmp_path / "flags")


def test_paths_are_relative_inside_a_project_folder_and_absolute_otherwise(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    project = tmp_path / "work" / "proj"
    assert relative_path(project / "models" / "base", project / "merged") == "../models/base"
    assert relative_path(project / "merged", project / "merged") == "."
    assert relative_path("/opt/base", project / "merged") == "/opt/base"  # only the root in common
    assert relative_path("/tmp/a", "/tmp/b") == "/tmp/a"  # a top-level folder is no project
    home = tmp_path / "home"
    assert relative_path(home / "a" / "base", home / "b") == str(home / "a" / "base")  # only home in common
    assert relative_path(home / "p" / "base", home / "p" / "out") == "../base"


# ------------------------------------------------------------------ every family: analysis and every method
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_analysis_and_every_method_export_a_loadable_model(request, family):
    """The BERT heads test above covers BertModel; here GPT-2 (tied, added tokens) and Llama (GQA, resized)."""
    root, base, fts = request.getfixturevalue(family)
    tv = wl.TaskVectors(base, fts, vocab="union")
    report = wl.analyze(tv, device="cpu", progress=False)
    assert set(report.spectra["task"]) >= set(tv.names) and "set" in report.notes[0] and not report.signs.empty
    cls = transformers.GPT2LMHeadModel if family == "gpt2" else transformers.LlamaForCausalLM
    for method in DATA_FREE:
        merged = wl.merge(tv, method=method, lazy=True)
        model = _loaded(cls, wl.export(merged, root / f"all-{method}", progress=False))
        state = model.state_dict()
        assert all(torch.equal(state[k], merged[k]) for k in merged if k in state), method
