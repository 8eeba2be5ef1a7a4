"""Tiny Hugging Face models for tests, built from configs: deterministic, well under a second each, offline.

Every builder writes a folder with ``save_pretrained`` (``model.safetensors`` + ``config.json``) and
tokenizer files made here with the ``tokenizers`` library (a WordPiece vocabulary for BERT, a
byte-level BPE for GPT-2 and Llama), so the folder opens with ``wl.load`` and with
``transformers.AutoModel*`` / ``AutoTokenizer``; nothing is downloaded. A folder argument is the
parent: each builder makes ``parent / name`` and returns it. Import this module only where
``transformers`` is installed (``pytest.importorskip("transformers")`` first).

>>> base = tiny_bert(tmp_path)                                        # BertModel, 39 keys
>>> fts = bert_classifier_finetunes(tmp_path, base, {"sst2": 2, "mnli": 3})  # keys under 'bert.' + a head
>>> chat = with_added_tokens(tiny_llama(tmp_path, gqa=True), tmp_path / "chat", ["<|user|>"], special=True)
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

__all__ = ["bert_classifier_finetunes", "body_of", "bpe_tokenizer", "finetune", "tiny_bert", "tiny_gpt2",
           "tiny_llama", "with_added_tokens", "wordpiece_tokenizer"]

HIDDEN = 16
LAYERS = 2

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()


# ------------------------------------------------------------------------------------------ tokenizers
def wordpiece_tokenizer(n_words: int = 59) -> transformers.PreTrainedTokenizerFast:
    """A BERT-style WordPiece tokenizer: 5 special tokens, then ``n_words`` words ``w0``, ``w1``, ...
    (``vocab.txt`` order; its length is the embedding's row count)."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(n_words)])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(specials)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]")


def bpe_tokenizer(specials: Sequence[str], merges: Sequence[tuple[str, str]] = (("Ġ", "t"), ("h", "e"))
                  ) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2, Llama 3 style): the 256 byte symbols, a few merges, then
    ``specials``; ``len()`` of it is the embedding's row count."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {s: i for i, s in enumerate(sorted(alphabet))}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, list(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(specials))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=specials[0], eos_token=specials[-1])


def _save(model: torch.nn.Module, tokenizer: transformers.PreTrainedTokenizerBase, folder: Path) -> Path:
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    vocab = getattr(tokenizer, "vocab", None)
    if isinstance(tokenizer.backend_tokenizer.model, models.WordPiece) and vocab:  # for WordPiece readers
        (folder / "vocab.txt").write_text("".join(t + "\n" for t, _ in sorted(vocab.items(), key=lambda x: x[1])))
    return folder


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------ models
def tiny_bert(parent: Path, *, name: str = "bert", seed: int = 0) -> Path:
    """A ``BertModel`` (2 layers, hidden 16, 2 heads, 64 tokens) with its WordPiece tokenizer."""
    tok = wordpiece_tokenizer()
    config = transformers.BertConfig(vocab_size=len(tok), hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                     num_attention_heads=2, intermediate_size=2 * HIDDEN, max_position_embeddings=32)
    _seeded(seed)
    return _save(transformers.BertModel(config).eval(), tok, Path(parent) / name)


def tiny_gpt2(parent: Path, *, name: str = "gpt2", seed: int = 0) -> Path:
    """A ``GPT2LMHeadModel`` with tied embeddings (the LM head is ``transformer.wte``, not saved) and a
    byte-level BPE tokenizer of 259 tokens ending in ``<|endoftext|>``."""
    tok = bpe_tokenizer(["<|endoftext|>"])
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    config = transformers.GPT2Config(vocab_size=len(tok), n_embd=HIDDEN, n_layer=LAYERS, n_head=2, n_positions=32,
                                     bos_token_id=eos, eos_token_id=eos, tie_word_embeddings=True)
    _seeded(seed)
    return _save(transformers.GPT2LMHeadModel(config).eval(), tok, Path(parent) / name)


def tiny_llama(parent: Path, *, name: str = "llama", seed: int = 0, gqa: bool = True) -> Path:
    """A ``LlamaForCausalLM`` (4 query heads; 2 key/value heads when ``gqa``) with an untied LM head
    (``lm_head.weight``) and a byte-level BPE tokenizer of 260 tokens (``<s>``, ``</s>``)."""
    tok = bpe_tokenizer(["<s>", "</s>"])
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2 if gqa else 4, max_position_embeddings=32,
        bos_token_id=tok.convert_tokens_to_ids("<s>"), eos_token_id=tok.convert_tokens_to_ids("</s>"),
        tie_word_embeddings=False)
    _seeded(seed)
    return _save(transformers.LlamaForCausalLM(config).eval(), tok, Path(parent) / name)


def _load(src: Path) -> tuple[torch.nn.Module, transformers.PreTrainedTokenizerBase]:
    config = transformers.AutoConfig.from_pretrained(src)
    model = getattr(transformers, config.architectures[0]).from_pretrained(src).eval()
    return model, transformers.AutoTokenizer.from_pretrained(src)


def _perturb(model: torch.nn.Module, seed: int, scale: float) -> None:
    """Add seeded Gaussian noise (std ``scale``) to every parameter, as a stand-in for training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # a tied weight is one parameter: perturbed once
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * scale)


def finetune(src: Path, out: Path, *, seed: int, scale: float = 0.02) -> Path:
    """``src``'s model with every weight moved by seeded noise (same class, keys and tokenizer)."""
    model, tok = _load(Path(src))
    _perturb(model, seed, scale)
    return _save(model, tok, Path(out))


def body_of(src: Path, out: Path) -> Path:
    """The body of ``src``'s model alone (``model.base_model``: ``BertModel`` of a classifier, ``LlamaModel``
    of a ``LlamaForCausalLM``), so its keys lack the head and the ``bert.``/``model.`` prefix."""
    model, tok = _load(Path(src))
    return _save(model.base_model, tok, Path(out))


def bert_classifier_finetunes(parent: Path, base: Path, labels: Mapping[str, int], *, seed: int = 1,
                              scale: float = 0.02) -> dict[str, Path]:
    """``{task: folder}`` of ``BertForSequenceClassification`` fine-tunes of ``base`` (a ``BertModel``
    folder): the base's weights under ``bert.`` plus noise, and a new ``classifier`` of ``labels[task]``
    outputs, so each fine-tune has the base's keys prefixed and two keys only it has."""
    out = {}
    for i, (task, n_labels) in enumerate(labels.items()):
        config = transformers.BertConfig.from_pretrained(base, num_labels=n_labels)
        _seeded(seed + i)
        model = transformers.BertForSequenceClassification(config).eval()
        model.bert = transformers.BertModel.from_pretrained(base, add_pooling_layer=True).eval()
        _perturb(model, seed + i, scale)
        out[task] = _save(model, transformers.AutoTokenizer.from_pretrained(base), Path(parent) / task)
    return out


def with_added_tokens(src: Path, out: Path, tokens: Sequence[str], *, special: bool = False, seed: int = 7,
                      scale: float = 0.02, pad_to_multiple_of: int | None = None) -> Path:
    """A fine-tune of ``src`` whose tokenizer gained ``tokens`` (in order, special or not) and whose
    embeddings and LM head gained their rows (``resize_token_embeddings``, padded to a multiple of
    ``pad_to_multiple_of`` when given: rows past the tokenizer are padding), every weight then moved
    by seeded noise."""
    model, tok = _load(Path(src))
    added = [AddedToken(t, special=special, normalized=not special) for t in tokens]
    n = tok.add_special_tokens({"additional_special_tokens": added}) if special else tok.add_tokens(added)
    assert n == len(tokens), f"{n} of {list(tokens)} were new to the tokenizer of {src}"
    _seeded(seed)
    model.resize_token_embeddings(len(tok), pad_to_multiple_of=pad_to_multiple_of, mean_resizing=False)
    _perturb(model, seed, scale)
    return _save(model, tok, Path(out))


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of ``folder/model.safetensors``, read directly (an independent reader for checks)."""
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def quiet_task_vectors(*args, **kwargs):
    """``wl.TaskVectors(*args, **kwargs)`` without the ``KeyMapWarning`` a prefix match gives."""
    import weightlens as wl

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", wl.taskvectors.KeyMapWarning)
        return wl.TaskVectors(*args, **kwargs)
