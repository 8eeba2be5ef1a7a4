"""TaskVectors on tiny Hugging Face models: heads and prefixes (BERT classifiers, Llama bodies), tied
embeddings with added tokens (GPT-2), GQA with a resized vocabulary (Llama); vocab='base' and 'union',
and the union tokenizer. References are read straight from the safetensors files, in float64."""

from __future__ import annotations


import pytest
import torch

import weightlens as wl

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

KeyMapWarning = wl.taskvectors.KeyMapWarning


# ---------------------------------------------------------------------------------------- BERT heads
@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert")
    base = tiny_bert(root)
    return base, bert_classifier_finetunes(root, base, {"sst2": 2, "mnli": 3})


def test_bert_classifiers_align_to_the_base_and_keep_their_heads(bert):
    base, fts = bert
    with pytest.warns(KeyMapWarning) as record:
        tv = wl.TaskVectors(base, fts)
    assert len(record) == 1 and "'bert.' + base key" in str(record[0].message)
    b, refs = _tensors(base), {t: _tensors(p) for t, p in fts.items()}
    assert len(tv.keys) == len(b) == 39 and set(tv.keys) == set(b)
    for task, ft in refs.items():
        for key in tv.keys:
            want = ft["bert." + key].double() - b[key].double()
            torch.testing.assert_close(tv.delta(task, key).double(), want, rtol=0, atol=1e-6)
        assert tv.key_maps[task] == {"bert." + k: k for k in b}
    assert {t: sorted(keys) for t, keys in tv.extras.items()} == {t: ["classifier.bias", "classifier.weight"]
                                                                   for t in fts}
    assert torch.equal(tv.extra("mnli", "classifier.weight"), refs["mnli"]["classifier.weight"])
    assert tv.extra("sst2", "classifier.weight").shape == (2, 16)
    merged = wl.merge(tv, method="task_arithmetic", alpha=0.5)
    model = transformers.BertModel(transformers.BertConfig.from_pretrained(base))
    assert model.load_state_dict({k: merged[k] for k in merged}, strict=True)  # the base's keys, all of them
    # issue 14, item 1: the advice 'exclude the heads' works, and leaves them out of the extras too
    tv = _quiet(base, fts, exclude=["classifier.*"])
    assert tv.extras == {"sst2": [], "mnli": []} and len(tv.keys) == 39


def test_a_body_base_and_causal_lm_fine_tunes_with_a_resized_vocabulary(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama_body")
    full = tiny_llama(root, gqa=True)
    base = body_of(full, root / "body")  # LlamaModel: keys without 'model.', no lm_head
    chat = with_added_tokens(full, root / "chat", ["<|user|>"], special=True)
    with pytest.raises(wl.ShapeMismatchError, match="'embed_tokens.weight'.*vocab='base'.*vocab='union'"):
        _quiet(base, {"chat": chat})
    with pytest.warns(KeyMapWarning, match="'model.' \\+ base key"):
        tv = wl.TaskVectors(base, {"chat": chat}, vocab="union")
    assert tv.extras == {"chat": ["lm_head.weight"]} and tv.vocab.keys == ("embed_tokens.weight",)
    ft, b = _tensors(chat), _tensors(base)
    torch.testing.assert_close(tv.delta("chat", "layers.1.self_attn.k_proj.weight"),
                               ft["model.layers.1.self_attn.k_proj.weight"] - b["layers.1.self_attn.k_proj.weight"])
    assert tv.extra("chat", "lm_head.weight").shape == (261, 16)  # a head keeps its own rows


# ---------------------------------------------------------------------------------------- GPT-2, tied
@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2")
    base = tiny_gpt2(root)
    return base, {
        "chat": with_added_tokens(base, root / "chat", ["<|user|>", "<|bot|>"], special=True, seed=11),
        "code": with_added_tokens(base, root / "code", ["<|bot|>", "<code>"], seed=12),  # <|bot|> at another id
        "plain": finetune(base, root / "plain", seed=13),
    }


def test_gpt2_added_tokens_are_refused_by_default_naming_both_options(gpt2):
    base, fts = gpt2
    with pytest.raises(wl.ShapeMismatchError) as err:
        wl.TaskVectors(base, fts)
    msg = str(err.value)
    assert "'transformer.wte.weight'" in msg and "(259, 16)" in msg and "(261, 16)" in msg
    assert "vocab='base'" in msg and "vocab='union'" in msg


def test_gpt2_vocab_base_merges_the_shared_rows(gpt2):
    base, fts = gpt2
    tv = wl.TaskVectors(base, fts, vocab="base")
    assert tv.vocab.keys == ("transformer.wte.weight",) and tv.shape("transformer.wte.weight") == (259, 16)
    assert dict(tv.vocab.task_rows) == {"chat": 261, "code": 261, "plain": 259} and tv.vocab.set_aside == 2
    b = _tensors(base)["transformer.wte.weight"].double()
    for task, folder in fts.items():
        want = _tensors(folder)["transformer.wte.weight"].double()[:259] - b
        torch.testing.assert_close(tv.delta(task, "transformer.wte.weight").double(), want, rtol=0, atol=1e-6)
    assert wl.merge(tv, method="ties")["transformer.wte.weight"].shape == (259, 16)


def test_gpt2_vocab_union_merges_each_row_over_the_tasks_that_have_it(gpt2, tmp_path):
    base, fts = gpt2
    tv = wl.TaskVectors(base, fts, vocab="union")
    info = tv.vocab
    assert dict(info.added) == {"<|user|>": 259, "<|bot|>": 260, "<code>": 261} and info.rows == 262
    wte = {t: _tensors(p)["transformer.wte.weight"].double() for t, p in fts.items()}
    b = _tensors(base)["transformer.wte.weight"].double()
    bot = (wte["chat"][260] + wte["code"][259]) / 2  # the same string at different ids: one row, their mean
    torch.testing.assert_close(tv.base_tensor("transformer.wte.weight")[260].double(), bot, rtol=0, atol=1e-6)
    d = tv.deltas("transformer.wte.weight").double()
    torch.testing.assert_close(d[0, :259], wte["chat"][:259] - b, rtol=0, atol=1e-6)
    torch.testing.assert_close(d[1, 260], wte["code"][259] - bot, rtol=0, atol=1e-6)
    assert torch.equal(d[2, 259:], torch.zeros(3, 16, dtype=torch.float64))  # 'plain' has no added token
    assert torch.equal(d[1, 259], torch.zeros(16, dtype=torch.float64))  # 'code' lacks <|user|>
    merged = wl.merge(tv, method="task_arithmetic", alpha=0.3)
    emb = merged["transformer.wte.weight"].double()
    torch.testing.assert_close(emb[259], wte["chat"][259], rtol=0, atol=1e-6)  # one task has it: its row
    torch.testing.assert_close(emb[261], wte["code"][260], rtol=0, atol=1e-6)
    torch.testing.assert_close(emb[260], bot, rtol=0, atol=1e-6)
    # analysis reads the shared rows and can say how many were set aside
    shared = tv.shared_rows()
    assert shared.shape("transformer.wte.weight") == (259, 16) and info.set_aside == 3
    torch.testing.assert_close(shared.delta("code", "transformer.wte.weight").double(),
                               wte["code"][:259] - b, rtol=0, atol=1e-6)
    # the union tokenizer round-trips every added token, and the merged weights run with it
    out = tmp_path / "union"
    info.write_tokenizer(out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert len(tok) == 262
    for text, row in info.added.items():
        assert tok.convert_tokens_to_ids(text) == row
        assert tok.encode(text, add_special_tokens=False) == [row]
        assert tok.decode([row]) == text
    config = transformers.GPT2Config.from_pretrained(base, vocab_size=info.rows)
    model = transformers.GPT2LMHeadModel(config).eval()
    result = model.load_state_dict({k: merged[k] for k in merged}, strict=False)
    assert result.missing_keys == ["lm_head.weight"] and not result.unexpected_keys  # tied to wte: not saved
    ids = tok("he<|bot|> the<code>", return_tensors="pt")["input_ids"]
    assert 260 in ids[0].tolist() and 261 in ids[0].tolist()
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_analysis_reads_the_shared_rows_and_says_how_many_were_set_aside(gpt2, tmp_path):
    base, fts = gpt2
    tv = wl.TaskVectors(base, fts, vocab="union")
    merged = wl.merge(tv, method="task_arithmetic", alpha=0.3)
    report = wl.analyze(tv, merged=merged, device="cpu", progress=False)
    assert len(report.notes) == 1 and "sets 3 aside" in report.notes[0]
    wte = report.spectra.query("key == 'transformer.wte.weight' and task == 'chat'").iloc[0]
    assert (wte["m"], wte["n"]) == (259, 16)  # the base's rows only
    b = _tensors(base)["transformer.wte.weight"].double()
    chat = _tensors(fts["chat"])["transformer.wte.weight"].double()[:259] - b
    s = torch.linalg.svdvals(chat)
    assert wte["energy_at_1"] == pytest.approx(float(s[0] ** 2 / (s**2).sum()), rel=1e-5)
    refs = set(report.alignment.query("key == 'transformer.wte.weight'")["reference"])
    assert "merged" not in refs and "sum" in refs  # the merge has the union's rows there
    assert "sets 3 aside" in report.to_html(tmp_path / "r.html").read_text()


# ---------------------------------------------------------------------------------------- Llama, GQA
@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    base = tiny_llama(root, gqa=True)
    return base, {
        "chat": with_added_tokens(base, root / "chat", ["<|im_start|>", "<|im_end|>"], special=True, seed=21,
                                  pad_to_multiple_of=8),  # 262 tokens on 264 rows: two rows of padding
        "math": finetune(base, root / "math", seed=22),
    }


def test_llama_gqa_with_a_resized_vocabulary(llama, tmp_path):
    base, fts = llama
    b, chat, math = _tensors(base), _tensors(fts["chat"]), _tensors(fts["math"])
    assert b["model.layers.0.self_attn.k_proj.weight"].shape == (8, 16)  # 2 key/value heads of 4
    with pytest.raises(wl.ShapeMismatchError, match="'lm_head.weight'|'model.embed_tokens.weight'"):
        wl.TaskVectors(base, fts)
    tv = wl.TaskVectors(base, fts, vocab="base")
    assert tv.vocab.keys == ("lm_head.weight", "model.embed_tokens.weight")  # untied: both have rows
    for key in tv.vocab.keys:
        torch.testing.assert_close(tv.delta("chat", key).double(), chat[key][:260].double() - b[key].double(),
                                   rtol=0, atol=1e-6)
    torch.testing.assert_close(tv.delta("math", "model.layers.1.self_attn.v_proj.weight"),
                               math["model.layers.1.self_attn.v_proj.weight"] - b["model.layers.1.self_attn.v_proj.weight"])
    tv = wl.TaskVectors(base, fts, vocab="union")
    info = tv.vocab
    assert dict(info.added) == {"<|im_start|>": 260, "<|im_end|>": 261} and info.rows == 262
    assert dict(info.dropped) == {"chat": 2, "math": 0}  # rows past the tokenizer: padding
    for key in info.keys:
        d = tv.deltas(key).double()
        assert d.shape == (2, 262, 16)
        torch.testing.assert_close(d[0, 260:], torch.zeros(2, 16, dtype=torch.float64))  # one task: its own row
        torch.testing.assert_close(d[1, :260], math[key].double() - b[key].double(), rtol=0, atol=1e-6)
        torch.testing.assert_close(tv.base_tensor(key)[260:].double(), chat[key][260:262].double(), rtol=0, atol=0)
    merged = wl.merge(tv, method="task_arithmetic", alpha=1.0)
    torch.testing.assert_close(merged["lm_head.weight"][:260].double(),
                               (chat["lm_head.weight"][:260].double() + math["lm_head.weight"].double()
                                - b["lm_head.weight"].double()), rtol=0, atol=1e-5)
    out = tmp_path / "tok"
    info.write_tokenizer(out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    for text, row in info.added.items():
        assert tok.encode(text, add_special_tokens=False) == [row] and tok.decode([row]) == text
    config = transformers.LlamaConfig.from_pretrained(base, vocab_size=info.rows)
    model = transformers.LlamaForCausalLM(config).eval()
    model.load_state_dict({k: merged[k] for k in merged}, strict=True)
    with torch.no_grad():
        assert model(tok("<|im_start|>he<|im_end|>", return_tensors="pt")["input_ids"]).logits.shape[-1] == 262
