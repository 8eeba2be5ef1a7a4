"""A plain-torch BERT encoder whose ``state_dict`` keys are those of a Hugging Face ``BertModel``.

Post-LN BERT with absolute position and token-type embeddings and exact (erf) GELU, enough for
all-MiniLM-L6-v2 (6 layers, hidden 384, 12 heads, FFN 1536). Modules are nested ``ModuleDict``s
named as in ``transformers``, so ``model.safetensors`` loads as is and fine-tunes save the same 104
keys (``pooler.*`` and the ``embeddings.position_ids`` buffer are kept but unused: the sentence
embedding is the mean over real tokens, as sentence-transformers computes it before its final L2
normalisation).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from weightlens.errors import CheckpointError

__all__ = ["BertConfig", "BertEncoder", "mean_pool", "sentence_embedding"]


@dataclass(frozen=True)
class BertConfig:
    """The ``config.json`` fields the forward uses (names as in ``transformers``)."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1

    @classmethod
    def from_file(cls, path: Path) -> BertConfig:
        """Read an HF ``config.json``; refuses architectures this forward does not implement."""
        raw = json.loads(Path(path).read_text())
        for field, want in (("hidden_act", "gelu"), ("position_embedding_type", "absolute")):
            if raw.get(field, want) != want:
                raise CheckpointError(f"{path}: {field} must be {want!r} for this forward; got {raw[field]!r}.")
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})


def _linear(n_in: int, n_out: int) -> nn.Linear:
    return nn.Linear(n_in, n_out)


def _layer(c: BertConfig) -> nn.ModuleDict:
    h, f = c.hidden_size, c.intermediate_size
    ln = lambda: nn.LayerNorm(h, eps=c.layer_norm_eps)  # noqa: E731
    return nn.ModuleDict({
        "attention": nn.ModuleDict({
            "self": nn.ModuleDict({"query": _linear(h, h), "key": _linear(h, h), "value": _linear(h, h)}),
            "output": nn.ModuleDict({"dense": _linear(h, h), "LayerNorm": ln()}),
        }),
        "intermediate": nn.ModuleDict({"dense": _linear(h, f)}),
        "output": nn.ModuleDict({"dense": _linear(f, h), "LayerNorm": ln()}),
    })


class BertEncoder(nn.Module):
    """BERT encoder; ``forward(input_ids, attention_mask) -> (batch, length, hidden)``."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        c = self.config = config
        self.embeddings = nn.ModuleDict({
            "word_embeddings": nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=0),
            "position_embeddings": nn.Embedding(c.max_position_embeddings, c.hidden_size),
            "token_type_embeddings": nn.Embedding(c.type_vocab_size, c.hidden_size),
            "LayerNorm": nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps),
        })
        self.embeddings.register_buffer("position_ids", torch.arange(c.max_position_embeddings)[None])
        self.encoder = nn.ModuleDict({"layer": nn.ModuleList(_layer(c) for _ in range(c.num_hidden_layers))})
        self.pooler = nn.ModuleDict({"dense": _linear(c.hidden_size, c.hidden_size)})

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None
    ) -> Tensor:
        """Last hidden states; padded positions are computed but attend to real tokens only."""
        c, e = self.config, self.embeddings
        drop = c.hidden_dropout_prob if self.training else 0.0
        length = input_ids.shape[1]
        types = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
        x = e["word_embeddings"](input_ids) + e["position_embeddings"](e.position_ids[:, :length])
        x = F.dropout(e["LayerNorm"](x + e["token_type_embeddings"](types)), drop, self.training)
        bias = torch.zeros(attention_mask.shape, dtype=x.dtype, device=x.device)
        bias = bias.masked_fill(attention_mask == 0, torch.finfo(x.dtype).min)[:, None, None, :]
        for layer in self.encoder["layer"]:
            x = self._block(layer, x, bias, drop)
        return x

    def _block(self, layer: nn.ModuleDict, x: Tensor, bias: Tensor, drop: float) -> Tensor:
        c, att = self.config, layer["attention"]
        b, n, h = x.shape
        heads = c.num_attention_heads
        q, k, v = (att["self"][name](x).view(b, n, heads, h // heads).transpose(1, 2)
                   for name in ("query", "key", "value"))
        p_att = c.attention_probs_dropout_prob if self.training else 0.0
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p_att)
        ctx = ctx.transpose(1, 2).reshape(b, n, h)
        out = att["output"]
        x = out["LayerNorm"](x + F.dropout(out["dense"](ctx), drop, self.training))
        ff = layer["output"]["dense"](F.gelu(layer["intermediate"]["dense"](x)))
        return layer["output"]["LayerNorm"](x + F.dropout(ff, drop, self.training))


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of the hidden states over real (mask 1) tokens: ``(batch, hidden)``."""
    m = attention_mask.to(hidden.dtype)[..., None]
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def sentence_embedding(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """all-MiniLM-L6-v2's sentence embedding: mean pooling, then L2 normalisation (its
    sentence-transformers pipeline is Transformer -> Pooling(mean) -> Normalize)."""
    return torch.nn.functional.normalize(mean_pool(hidden, attention_mask), dim=-1)

