"""Traced specs of tiny Hugging Face models: BERT, GPT-2 (tied embeddings, Conv1D) and Llama (GQA, RoPE).

``torch.fx`` cannot trace them, so ``spec_from_module`` traces them with ``torch.export``. The traced
spec must keep the function under random permutations of every group it finds, find the same groups
as ``transformer_spec`` (residual stream, one MLP permutation per block, one head group per attention
block), and fail with an error naming the builder where tracing cannot work. Models are built from
configs (nothing is downloaded), randomized (norm scales and biases included) and run in float64.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from test_rebasin_builders import TinyBert, TinyLlama, canonical, randomize, tokens

from weightlens.errors import InvalidParameterError
from weightlens.rebasin import Permutations, PermutationSpec, TransformerLayout, spec_from_module, transformer_spec
from weightlens.rebasin._export_trace import builder_hint
from weightlens.rebasin.builders import LAYOUTS

transformers = pytest.importorskip("transformers")

VOCAB = 50


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(seed))


def build(cls: type, config: object, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomize(cls(config), seed).double().eval()


def bert_config(**kw: object) -> object:
    return transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64, max_position_embeddings=16, **kw)


def gpt2_config(**kw: object) -> object:
    return transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=16, bos_token_id=0,
                                   eos_token_id=0, **kw)


def llama_config(**kw: object) -> object:
    return transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, intermediate_size=48, max_position_embeddings=16,
                                    bos_token_id=0, eos_token_id=0, pad_token_id=0, **kw)


@pytest.fixture(scope="module")
def bert():
    model = build(transformers.BertModel, bert_config())
    return model, spec_from_module(model, ids())


@pytest.fixture(scope="module")
def gpt2():
    model = build(transformers.GPT2LMHeadModel, gpt2_config())
    return model, spec_from_module(model, ids())


@pytest.fixture(scope="module")
def llama():
    model = build(transformers.LlamaForCausalLM, llama_config())
    return model, spec_from_module(model, ids())


def outputs(model: torch.nn.Module, inputs: torch.Tensor | dict) -> list[torch.Tensor]:
    kwargs = inputs if isinstance(inputs, dict) else {"input_ids": inputs}
    with torch.no_grad():
        out = model(**kwargs)
    return [t for t in (out.to_tuple() if hasattr(out, "to_tuple") else out) if isinstance(t, torch.Tensor)]


def max_rel_change(model: torch.nn.Module, spec: PermutationSpec, inputs, seed: int) -> tuple[float, Permutations]:
    """Largest output change, relative to the output's scale, after random permutations from ``spec``."""
    sd = model.state_dict()
    perms = Permutations.random(spec, sd, seed=seed)
    other = copy.deepcopy(model)
    other.load_state_dict(perms.apply(sd))
    other.eval()
    pairs = zip(outputs(model, inputs), outputs(other, inputs), strict=True)
    return max(float((a - b).abs().max() / a.abs().max()) for a, b in pairs), perms


def is_identity(perm: torch.Tensor) -> bool:
    return torch.equal(perm, torch.arange(perm.shape[-1]).expand_as(perm))


def assert_everything_moves(spec: PermutationSpec, perms: Permutations) -> None:
    for name in spec.units:
        if name not in spec.heads:
            assert not is_identity(perms.perms[name]), name
    assert any(not is_identity(hp.group) or not is_identity(hp.qhead) for hp in perms.heads.values())  # query heads
    assert any(not is_identity(hp.vo) for hp in perms.heads.values())  # value dims within heads


# ------------------------------------------------------------------------------ function preservation


@pytest.mark.parametrize(
    "family, tol",
    # Llama's RMSNorm computes in float32 even in a float64 model: its outputs move by float32 rounding.
    [("bert", 1e-12), ("gpt2", 1e-12), ("llama", 1e-5)],
)
def test_traced_spec_preserves_function(family, tol, request):
    model, spec = request.getfixturevalue(family)
    change, perms = max_rel_change(model, spec, ids(1), seed=3)
    assert change < tol
    assert_everything_moves(spec, perms)


def test_bert_with_an_attention_mask_given_as_keyword_inputs(bert):
    model, spec = bert
    mask = torch.ones_like(ids())
    mask[1, 4:] = 0
    inputs = {"input_ids": ids(), "attention_mask": mask}
    assert canonical(spec_from_module(model, inputs)) == canonical(spec)
    assert max_rel_change(model, spec, inputs, seed=4)[0] < 1e-12


def test_the_spec_depends_on_rope_a_negative_control(llama):
    model, spec = llama
    no_rope = PermutationSpec(spec.axes, [dataclasses.replace(g, rope=False) for g in spec.heads.values()])
    assert max_rel_change(model, no_rope, ids(1), seed=3)[0] > 1e-3


# ------------------------------------------------------------------------------ the groups found


def heads_of(spec: PermutationSpec) -> list[tuple[int, int, bool]]:
    return [(g.n_heads, g.kv_heads, g.rope) for g in spec.heads.values()]


def test_bert_matches_transformer_spec_with_the_residual_fixed(bert):
    """BertModel returns its hidden states, so the residual stream reaches the outputs and stays put."""
    model, spec = bert
    assert canonical(spec) == canonical(transformer_spec(model.state_dict(), n_heads=4, residual=False))
    assert spec.units == ["encoder.layer.0.intermediate.dense", "encoder.layer.1.intermediate.dense",
                          "encoder.layer.0.attention.self", "encoder.layer.1.attention.self"]
    assert heads_of(spec) == [(4, 4, False)] * 2


def test_gpt2_matches_a_gpt2_layout_with_tied_embeddings_and_stacked_qkv(gpt2):
    model, spec = gpt2
    assert model.lm_head.weight is model.transformer.wte.weight
    assert canonical(spec) == canonical(transformer_spec(model.state_dict(), n_heads=4, layout="gpt2"))
    lay = LAYOUTS["gpt2"]  # a custom layout of plain dicts works too
    custom = TransformerLayout(lay.block, dict(lay.block_rules), dict(lay.global_rules))
    assert canonical(spec) == canonical(transformer_spec(model.state_dict(), n_heads=4, layout=custom))
    assert "n_heads=4, layout='gpt2')" in builder_hint(model)  # what a failed trace of GPT-2 suggests
    assert spec.units == ["transformer.wte", "transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc",
                          "transformer.h.0.attn", "transformer.h.1.attn"]
    ax = spec.axes
    assert ax["lm_head.weight"] == ax["transformer.wte.weight"] == (None, (ax["transformer.wte.weight"][1][0],))
    assert [s.name for s in ax["transformer.h.0.attn.c_attn.weight"][1]] == [
        "transformer.h.0.attn.q", "transformer.h.0.attn.k", "transformer.h.0.attn.v"]
    assert heads_of(spec) == [(4, 4, False)] * 2


def test_llama_matches_transformer_spec_with_gqa_and_rope(llama):
    model, spec = llama
    built = transformer_spec(model.state_dict(), n_heads=4)
    assert canonical(spec) == canonical(built)
    assert heads_of(spec) == heads_of(built) == [(4, 2, True)] * 2
    assert spec.units == ["model.embed_tokens", "model.layers.0.mlp.gate_proj", "model.layers.1.mlp.gate_proj",
                          "model.layers.0.self_attn", "model.layers.1.self_attn"]
    hp = Permutations.random(spec, model.state_dict(), seed=3).heads["model.layers.1.self_attn"]
    assert hp.qhead.shape == (2, 2) and torch.equal(hp.qk, torch.arange(8).expand(2, 8))


def test_a_classifier_head_gives_a_finer_spec_than_the_builder():
    """The pooler's outputs only feed the classifier, so the trace permutes them; the builder keeps them."""
    model = build(transformers.BertForSequenceClassification, bert_config(num_labels=3))
    spec = spec_from_module(model, ids())
    built = transformer_spec(model.state_dict(), n_heads=4, extra={"classifier.weight": (None, None),
                                                                   "classifier.bias": (None,)})
    extra = canonical(spec) - canonical(built)
    assert canonical(built) <= canonical(spec)  # residual stream, MLPs and heads as the builder's
    assert extra == {frozenset({("bert.pooler.dense.weight", 0, 1), ("bert.pooler.dense.bias", 0, 1),
                                ("classifier.weight", 1, 1)})}
    assert max_rel_change(model, spec, ids(1), seed=2)[0] < 1e-12


def test_export_follows_hand_written_attention_that_fx_rejects():
    for model, built in ((randomize(TinyBert(), 0), lambda sd: transformer_spec(sd, n_heads=4, residual=False)),
                         (randomize(TinyLlama(kv=2), 0), lambda sd: transformer_spec(sd, n_heads=4))):
        with pytest.raises(InvalidParameterError, match="tracer='export'"):
            spec_from_module(model, tokens())
        spec = spec_from_module(model, tokens(), tracer="export")
        assert canonical(spec) == canonical(built(model.state_dict()))
        assert heads_of(spec) == heads_of(built(model.state_dict()))


def test_trace_leaves_modes_and_weights_alone(gpt2):
    model, _ = gpt2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    try:
        spec_from_module(model, ids())
        assert all(m.training for m in model.modules())
    finally:
        model.eval()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------ errors


class BranchyBert(transformers.BertModel):
    """Data-dependent control flow: neither torch.fx nor torch.export can trace it."""

    def forward(self, input_ids, **kwargs):  # noqa: ANN001, ANN003, ANN201
        return super().forward(input_ids if input_ids.sum() > 0 else input_ids + 1, **kwargs)


class BranchyLlama(transformers.LlamaForCausalLM):
    def forward(self, input_ids, **kwargs):  # noqa: ANN001, ANN003, ANN201
        return super().forward(input_ids if input_ids.sum() > 0 else input_ids + 1, **kwargs)


@pytest.mark.parametrize("cls, config, call", [
    (BranchyBert, bert_config, r"transformer_spec\(model\.state_dict\(\), n_heads=4, layout='bert'\)"),
    (BranchyLlama, llama_config, r"transformer_spec\(model\.state_dict\(\), n_heads=4, n_kv_heads=2, layout='llama'\)"),
], ids=["bert", "llama"])
def test_untraceable_models_name_the_builder_to_use(cls, config, call):
    model = cls(config()).eval()
    with pytest.raises(InvalidParameterError, match=rf"{cls.__name__}.*torch\.export cannot trace.*{call}"):
        spec_from_module(model, ids())


def test_attention_weights_returned_per_head_are_refused():
    model = build(transformers.BertModel, bert_config(attn_implementation="eager"))
    with pytest.raises(InvalidParameterError, match=r"attention weights of head group 'encoder\.layer\.0\."):
        spec_from_module(model, {"input_ids": ids(), "output_attentions": True})


def test_fx_only_names_export_and_the_builder(bert):
    model, _ = bert
    with pytest.raises(InvalidParameterError, match=r"torch\.fx cannot trace BertModel.*tracer='export'.*layout='bert'"):
        spec_from_module(model, ids(), tracer="fx")
    with pytest.raises(InvalidParameterError, match="The 'tracer' parameter of spec_from_module"):
        spec_from_module(model, ids(), tracer="jit")
