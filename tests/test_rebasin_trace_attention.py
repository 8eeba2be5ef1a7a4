"""Traced specs of small multi-head transformers (``nn.MultiheadAttention``, embeddings, broadcast adds).

The traced spec must agree with ``transformer_spec`` on the same model, keep the function within
1e-5 under random head-structured permutations, and let weight matching recover a planted one.
"""

from __future__ import annotations

import pytest
import torch
from test_rebasin_builders import ATOL, ClipBlock, TinyBert, canonical, check_preserved, randomize, tokens
from test_rebasin_matching import assert_recovers
from torch import nn

from weightlens.errors import InvalidParameterError
from weightlens.rebasin import Permutations, spec_from_module, transformer_spec


class TracedText(nn.Module):
    """open_clip-like text tower with a Linear head: token embedding, positional parameter, MHA blocks."""

    def __init__(self, d: int = 16, h: int = 4, layers: int = 2, vocab: int = 20, n: int = 8,
                 classes: int = 3, pool: str = "first") -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, d)
        self.positional_embedding = nn.Parameter(torch.zeros(n, d))
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(ClipBlock(d, h) for _ in range(layers))
        self.ln_final = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)
        self.pool = pool

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]
        for block in self.transformer.resblocks:
            x = block(x)
        x = self.ln_final(x)
        return self.head(x[:, 0] if self.pool == "first" else x.mean(1))


class CrossAttention(nn.Module):
    """Queries from one stream, keys and values (other width) from another: q/k/v_proj_weight."""

    def __init__(self) -> None:
        super().__init__()
        self.q_in, self.kv_in = nn.Linear(5, 12), nn.Linear(7, 10)
        self.attn = nn.MultiheadAttention(12, 3, kdim=10, vdim=10, batch_first=True)
        self.out = nn.Linear(12, 2)

    def forward(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        q, kv = torch.relu(self.q_in(x)), torch.relu(self.kv_in(m))
        return self.out(self.attn(q, kv, kv)[0] + q)


@pytest.mark.parametrize("pool", ["first", "mean"])
def test_traced_transformer_matches_the_builder_and_preserves_function(pool):
    model = randomize(TracedText(pool=pool), 0)
    ids = tokens()
    spec = spec_from_module(model, ids)
    assert set(spec.heads) == {"transformer.resblocks.0.attn", "transformer.resblocks.1.attn"}
    assert all(g.n_heads == 4 and not g.rope for g in spec.heads.values())
    built = transformer_spec(model.state_dict(), n_heads=4, layout="open_clip",
                             extra={"head.weight": (None, "res"), "head.bias": (None,)})
    assert canonical(spec) == canonical(built)
    perms = check_preserved(model, spec, ids, seed=3)
    assert any(not torch.equal(hp.group, torch.arange(4)) for hp in perms.heads.values())  # heads really move


def test_weight_matching_recovers_a_planted_permutation_with_a_traced_transformer_spec():
    model = randomize(TracedText(), 1)
    sd = model.state_dict()
    assert_recovers(sd, spec_from_module(model, tokens()), seed=5)


def test_traced_cross_attention_keeps_separate_streams():
    model = randomize(CrossAttention(), 0)
    x, m = torch.randn(2, 4, 5), torch.randn(2, 6, 7)
    spec = spec_from_module(model, (x, m))
    ax = spec.axes
    assert [s.name for s in ax["attn.q_proj_weight"][0]] == ["attn.q"]
    assert ax["attn.k_proj_weight"][1] == ax["kv_in.weight"][0] and ax["attn.q_proj_weight"][1] == ax["q_in.weight"][0]
    assert ax["attn.out_proj.weight"][0] == ax["q_in.weight"][0]  # the residual ties them
    perms = Permutations.random(spec, model.state_dict(), seed=2)
    assert not perms.heads["attn"].group.equal(torch.arange(3)) or not perms.perms["q_in"].equal(torch.arange(12))
    other = type(model)()
    other.load_state_dict(perms.apply(model.state_dict()))
    with torch.no_grad():
        assert float((model(x, m) - other.eval()(x, m)).abs().max()) < ATOL


def test_manual_attention_with_head_reshapes_is_rejected_naming_the_node():
    with pytest.raises(InvalidParameterError, match=r"cannot follow node .*view|cannot follow node .*reshape"):
        spec_from_module(randomize(TinyBert(), 0), tokens())


def test_attention_with_bias_kv_is_rejected():
    block = ClipBlock(16, 4)
    block.attn = nn.MultiheadAttention(16, 4, add_bias_kv=True, batch_first=True)
    with pytest.raises(InvalidParameterError, match="add_bias_kv"):
        spec_from_module(block.eval(), torch.randn(2, 3, 16))
