"""Permutation specs for common architectures, built from a state dict's keys and shapes.

* :func:`mlp_spec` and :func:`vgg_spec`: a chain of Linear/Conv layers (with norms between them);
  one permutation per hidden layer output, the last layer's output left alone.
* :func:`resnet_spec`: torchvision-style names (``conv1``, ``bn1``, ``layer<L>.<B>.conv<k>``,
  ``downsample``/``shortcut``, ``fc``); one permutation per residual stream, a private one per
  inner block output.
* :func:`transformer_spec`: one residual permutation, one MLP permutation per block and a
  head-structured :class:`~weightlens.rebasin.spec.HeadGroup` per attention block, for HF BERT/MiniLM,
  LLaMA-style (RoPE, GQA), open_clip and ``torch.nn.TransformerEncoder`` names.

Every builder checks the spec against the state dict before returning it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from weightlens.errors import InvalidParameterError, KeyMismatchError, ShapeMismatchError
from weightlens.rebasin.spec import HeadGroup, PermutationSpec, Seg, shape_of

__all__ = ["TransformerLayout", "mlp_spec", "resnet_spec", "transformer_spec", "vgg_spec"]

StateDict = Mapping[str, torch.Tensor]


def _dtype(sd: StateDict, key: str) -> torch.dtype:
    dtype = getattr(sd, "dtype", None)
    return dtype(key) if callable(dtype) else sd[key].dtype


def _modules(sd: StateDict, keys: Sequence[str] | None = None) -> dict[str, dict[str, str]]:
    """``{module path: {param name: key}}`` in state-dict order."""
    mods: dict[str, dict[str, str]] = {}
    for key in keys if keys is not None else sd:
        path, _, name = key.rpartition(".")
        mods.setdefault(path, {})[name] = key
    return mods


def _kind(sd: StateDict, params: Mapping[str, str]) -> str:
    """``"writer"`` (Linear/Conv weight), ``"norm"`` (1-D weight or running stats) or ``"other"``."""
    if "weight" in params:
        ndim = len(shape_of(sd, params["weight"]))
        if ndim >= 2:
            return "writer"
        if ndim == 1:
            return "norm"
    return "norm" if "running_mean" in params else "other"


@dataclass
class _Chain:
    """Walks modules in forward order, tracking the permutation of the current channel axis."""

    sd: StateDict
    axes: dict[str, tuple] = field(default_factory=dict)
    perm: str | None = None
    channels: int | None = None

    def writer(self, path: str, params: Mapping[str, str], out: str | None) -> None:
        w = params["weight"]
        shape = shape_of(self.sd, w)
        inner = 1
        if self.channels is not None:
            if len(shape) > 2 and shape[1] != self.channels or shape[1] % self.channels:
                raise ShapeMismatchError(
                    f"{w!r} has {shape[1]} input features but the layer before it outputs {self.channels} "
                    f"channels: the modules are not a chain in this order (or use groups). Pass the layers "
                    f"in forward order, or use spec_from_module."
                )
            inner = shape[1] // self.channels
        inp = None if self.perm is None else (Seg(self.perm, inner) if inner > 1 else self.perm)
        self.axes[w] = (out, inp) + (None,) * (len(shape) - 2)
        self._vectors(params, exclude="weight", perm=out)
        self.perm, self.channels = out, shape[0]

    def norm(self, path: str, params: Mapping[str, str]) -> None:
        for key in params.values():
            shape = shape_of(self.sd, key)
            if len(shape) == 1 and self.channels is not None and shape[0] != self.channels:
                raise ShapeMismatchError(
                    f"{key!r} has {shape[0]} entries but the layer before it outputs {self.channels} channels."
                )
        self._vectors(params, exclude=None, perm=self.perm)

    def walk(self, mods: Mapping[str, Mapping[str, str]], paths: Sequence[str], last: str | None,
             *, shared: bool = False) -> None:
        """Run ``paths`` in order: writers through :meth:`writer`, the rest through :meth:`norm`.

        The last writer's outputs get permutation ``last`` and the other writers' their own path
        (every writer's ``last`` when ``shared``).
        """
        writers = [p for p in paths if _kind(self.sd, mods[p]) == "writer"]
        for p in paths:
            if _kind(self.sd, mods[p]) == "writer":
                self.writer(p, mods[p], last if shared or p == writers[-1] else p)
            else:
                self.norm(p, mods[p])

    def _vectors(self, params: Mapping[str, str], exclude: str | None, perm: str | None) -> None:
        for name, key in params.items():
            if name != exclude:
                ndim = len(shape_of(self.sd, key))
                self.axes[key] = (perm,) if ndim == 1 else (None,) * ndim


def _chain_spec(sd: StateDict, layers: Sequence[str] | None, what: str, max_ndim: int) -> PermutationSpec:
    mods = _modules(sd)
    order = list(layers) if layers is not None else list(mods)
    unknown = [p for p in order if p not in mods]
    if unknown:
        raise KeyMismatchError(f"{what}: no parameters under module(s) {unknown}; modules: {list(mods)[:10]}.")
    kinds = {p: _kind(sd, mods[p]) for p in order}
    writers = [p for p in order if kinds[p] == "writer"]
    for p in order:
        ndim = len(shape_of(sd, mods[p]["weight"])) if "weight" in mods[p] else 0
        if kinds[p] == "other" or ndim > max_ndim:
            raise InvalidParameterError(
                f"{what}: module {p!r} (keys {list(mods[p].values())}) is not a layer this builder knows; "
                f"use {'vgg_spec' if ndim > max_ndim else 'spec_from_module'} or pass layers=."
            )
    if not writers:
        raise KeyMismatchError(f"{what}: no Linear/Conv weights found among {order[:10]}.")
    chain = _Chain(sd)
    chain.walk(mods, order, None)
    spec = PermutationSpec(chain.axes)
    spec.sizes(sd)
    return spec


def mlp_spec(state_dict: StateDict, *, layers: Sequence[str] | None = None) -> PermutationSpec:
    """Spec of an MLP: Linear layers (and 1-D norms between them) in forward order.

    Parameters
    ----------
    state_dict : the model's state dict (or a ``Checkpoint``).
    layers : module paths in forward order (default: every module, in state-dict order).

    Returns
    -------
    PermutationSpec
        Permutation ``<path>`` on the outputs of every Linear layer but the last (and on the next
        layer's inputs and the norms in between).

    Examples
    --------
    >>> import torch
    >>> sd = {"fc1.weight": torch.zeros(8, 4), "fc1.bias": torch.zeros(8), "fc2.weight": torch.zeros(2, 8)}
    >>> print(mlp_spec(sd).describe())
    fc1.weight: (fc1, -)
    fc1.bias: (fc1)
    fc2.weight: (-, fc1)
    """
    return _chain_spec(state_dict, layers, "mlp_spec", max_ndim=2)


def vgg_spec(state_dict: StateDict, *, layers: Sequence[str] | None = None) -> PermutationSpec:
    """Spec of a VGG-like CNN: convolutions, norms and a Linear classifier in forward order.

    One permutation per conv output (shared by its bias and the norm after it, and by the next
    conv's input); the first Linear layer's input is the flattened ``C*H*W`` features, permuted in
    blocks of ``H*W``. ``layers`` as in :func:`mlp_spec`.
    """
    return _chain_spec(state_dict, layers, "vgg_spec", max_ndim=5)


_BLOCK = re.compile(r"^(?P<block>(?:.*\.)?layer\d+\.\d+)\.(?P<local>.+)$")
_SHORTCUT = ("downsample", "shortcut")


def _resnet_parts(sd: StateDict, prefix: str) -> tuple[list[str], dict[str, list[str]], list[str]]:
    mods = _modules(sd, [k for k in sd if k.startswith(prefix)])
    stem: list[str] = []
    blocks: dict[str, list[str]] = {}
    head: list[str] = []
    for path in mods:
        m = _BLOCK.match(path)
        if m:
            if head:
                raise InvalidParameterError(f"resnet_spec: block module {path!r} comes after head modules {head}.")
            blocks.setdefault(m["block"], []).append(path)
        else:
            (head if blocks else stem).append(path)
    if not blocks:
        raise KeyMismatchError(
            f"resnet_spec: no keys named like 'layer<L>.<B>.conv1.weight' under prefix {prefix!r}; use "
            f"spec_from_module for other naming."
        )
    return stem, blocks, head


def resnet_spec(state_dict: StateDict, *, prefix: str = "") -> PermutationSpec:
    """Spec of a ResNet with torchvision-style names (basic or bottleneck blocks, BatchNorm).

    All tensors on one residual stream share a permutation ``stage<s>`` (the stem's output is
    ``stage0``; each block with a projection shortcut starts the next). Inner block outputs get
    ``<block>.<conv>``. BatchNorm weight, bias and running statistics follow their channels;
    ``num_batches_tracked`` is not permuted. The classifier's outputs are left alone.

    Parameters
    ----------
    state_dict : the model's state dict (or a ``Checkpoint``).
    prefix : only keys starting with it are covered (e.g. ``"backbone."``).
    """
    sd = state_dict
    stem, blocks, head = _resnet_parts(sd, prefix)
    mods = _modules(sd, [k for k in sd if k.startswith(prefix)])
    chain = _Chain(sd)
    stage = 0
    chain.walk(mods, stem, "stage0")
    for block, paths in blocks.items():
        local = {p: p[len(block) + 1:] for p in paths}
        short = [p for p in paths if local[p].split(".")[0] in _SHORTCUT]
        main = [p for p in paths if p not in short]
        stream, channels = chain.perm, chain.channels
        new = f"stage{stage + 1}" if short else stream
        chain.walk(mods, main, new)
        end_channels = chain.channels
        if short:
            chain.perm, chain.channels = stream, channels
            chain.walk(mods, short, new, shared=True)
            stage += 1
        chain.perm, chain.channels = new, end_channels
    chain.walk(mods, head, None)
    spec = PermutationSpec(chain.axes)
    spec.sizes(sd)
    return spec


# ------------------------------------------------------------------------------------ transformers


@dataclass(frozen=True)
class TransformerLayout:
    """Key patterns of a transformer family.

    Templates give one entry per axis: ``None``, ``"res"`` (residual stream), ``"mlp"`` (the block's
    hidden MLP units), ``"q"``, ``"k"``, ``"v"``, ``"o"`` (head-group views), or a tuple of those
    (stacked axes such as ``in_proj_weight``).

    Attributes
    ----------
    block : regex matching a block's key prefix, with one group capturing the block index.
    block_rules : ``{regex of the rest of the key: template}``.
    global_rules : ``{regex of the key after any leading module path: template}``.
    rope : whether the family uses rotary embeddings by default.
    """

    block: str
    block_rules: Mapping[str, tuple]
    global_rules: Mapping[str, tuple]
    rope: bool = False


_RES, _LN = ("res",), r"\.(weight|bias)"
_QKV = ("q", "k", "v")
LAYOUTS: dict[str, TransformerLayout] = {
    "bert": TransformerLayout(
        r"encoder\.layer\.(\d+)\.",
        {r"attention\.self\.query\.weight": ("q", "res"), r"attention\.self\.query\.bias": ("q",),
         r"attention\.self\.key\.weight": ("k", "res"), r"attention\.self\.key\.bias": ("k",),
         r"attention\.self\.value\.weight": ("v", "res"), r"attention\.self\.value\.bias": ("v",),
         r"attention\.output\.dense\.weight": ("res", "o"), r"attention\.output\.dense\.bias": _RES,
         r"attention\.output\.LayerNorm" + _LN: _RES, r"intermediate\.dense\.weight": ("mlp", "res"),
         r"intermediate\.dense\.bias": ("mlp",), r"output\.dense\.weight": ("res", "mlp"),
         r"output\.dense\.bias": _RES, r"output\.LayerNorm" + _LN: _RES},
        {r"embeddings\.(word|position|token_type)_embeddings\.weight": (None, "res"),
         r"embeddings\.LayerNorm" + _LN: _RES, r"pooler\.dense\.weight": (None, "res"),
         r"pooler\.dense\.bias": (None,)},
    ),
    "llama": TransformerLayout(
        r"layers\.(\d+)\.",
        {r"self_attn\.q_proj\.weight": ("q", "res"), r"self_attn\.q_proj\.bias": ("q",),
         r"self_attn\.k_proj\.weight": ("k", "res"), r"self_attn\.k_proj\.bias": ("k",),
         r"self_attn\.v_proj\.weight": ("v", "res"), r"self_attn\.v_proj\.bias": ("v",),
         r"self_attn\.o_proj\.weight": ("res", "o"), r"self_attn\.o_proj\.bias": _RES,
         r"(input|post_attention)_layernorm\.weight": _RES,
         r"mlp\.(gate|up)_proj\.weight": ("mlp", "res"), r"mlp\.(gate|up)_proj\.bias": ("mlp",),
         r"mlp\.down_proj\.weight": ("res", "mlp"), r"mlp\.down_proj\.bias": _RES,
         r"self_attn\.rotary_emb\.inv_freq": (None,)},
        {r"embed_tokens\.weight": (None, "res"), r"norm\.weight": _RES, r"lm_head\.weight": (None, "res")},
        rope=True,
    ),
    "open_clip": TransformerLayout(
        r"resblocks\.(\d+)\.",
        {r"ln_[12]" + _LN: _RES, r"attn\.in_proj_weight": (_QKV, "res"), r"attn\.in_proj_bias": (_QKV,),
         r"attn\.out_proj\.weight": ("res", "o"), r"attn\.out_proj\.bias": _RES, r"ls_[12]\.gamma": _RES,
         r"mlp\.c_fc\.weight": ("mlp", "res"), r"mlp\.c_fc\.bias": ("mlp",),
         r"mlp\.c_proj\.weight": ("res", "mlp"), r"mlp\.c_proj\.bias": _RES},
        {r"conv1\.weight": ("res", None, None, None), r"class_embedding": _RES,
         r"positional_embedding": (None, "res"), r"ln_(pre|post|final)" + _LN: _RES,
         r"(proj|text_projection)": ("res", None), r"token_embedding\.weight": (None, "res"),
         r"logit_scale": ()},
    ),
    # GPT-2 stores its Linear layers as Conv1D, weights (in, out): output units are axis 1.
    "gpt2": TransformerLayout(
        r"h\.(\d+)\.",
        {r"ln_[12]" + _LN: _RES, r"attn\.c_attn\.weight": ("res", _QKV), r"attn\.c_attn\.bias": (_QKV,),
         r"attn\.c_proj\.weight": ("o", "res"), r"attn\.c_proj\.bias": _RES,
         r"mlp\.c_fc\.weight": ("res", "mlp"), r"mlp\.c_fc\.bias": ("mlp",),
         r"mlp\.c_proj\.weight": ("mlp", "res"), r"mlp\.c_proj\.bias": _RES},
        {r"w[tp]e\.weight": (None, "res"), r"ln_f" + _LN: _RES, r"lm_head\.weight": (None, "res")},
    ),
    "torch": TransformerLayout(
        r"layers\.(\d+)\.",
        {r"self_attn\.in_proj_weight": (_QKV, "res"), r"self_attn\.in_proj_bias": (_QKV,),
         r"self_attn\.out_proj\.weight": ("res", "o"), r"self_attn\.out_proj\.bias": _RES,
         r"norm[12]" + _LN: _RES, r"linear1\.weight": ("mlp", "res"), r"linear1\.bias": ("mlp",),
         r"linear2\.weight": ("res", "mlp"), r"linear2\.bias": _RES},
        {r"norm" + _LN: _RES},
    ),
}
_DETECT = (("bert", "attention.self.query.weight"), ("llama", "self_attn.q_proj.weight"),
           ("open_clip", "attn.in_proj_weight"), ("torch", "self_attn.in_proj_weight"), ("gpt2", "attn.c_attn.weight"))


def _detect(keys: Sequence[str]) -> str:
    for name, marker in _DETECT:
        if any(k.endswith(marker) and (name != "open_clip" or "resblocks." in k) for k in keys):
            return name
    raise InvalidParameterError(
        f"transformer_spec cannot tell the layout of keys like {list(keys)[:4]}; pass layout= one of "
        f"{sorted(LAYOUTS)} or a TransformerLayout."
    )


def _template(sd: StateDict, layout: TransformerLayout, key: str) -> tuple[tuple, int | None] | None:
    """``(template, block index or None)`` of a key, or ``None`` when no rule matches."""
    m = re.match(r"(?:.*?\.)?" + layout.block, key)
    if m:
        rest = key[m.end():]
        for pattern, tmpl in layout.block_rules.items():
            if re.fullmatch(pattern, rest):
                return tmpl, int(m.group(1))
        return None
    for pattern, tmpl in layout.global_rules.items():
        if re.fullmatch(r"(?:.*\.)?" + pattern, key):
            return tmpl, None
    return None


def _resolve(tmpl: tuple, block: int | None, names: Mapping[str, str | None]) -> tuple:
    def one(token: object) -> object:
        if isinstance(token, tuple):
            return tuple(one(t) for t in token)
        if token is None:
            return None
        if token == "res":
            return names["res"]
        return f"{names['blk']}{block}.{'mlp' if token == 'mlp' else 'attn.' + str(token)}"

    return tuple(one(t) for t in tmpl)


def _transformer_axes(sd: StateDict, keys: Sequence[str], lay: TransformerLayout, names: Mapping[str, str | None],
                      prefix: str, layout: object) -> tuple[dict[str, tuple], dict[int, dict[str, str]]]:
    """Axes of every covered key, and per block the keys of its Q and K (for GQA inference)."""
    axes: dict[str, tuple] = {}
    blocks: dict[int, dict[str, str]] = {}
    unmatched = []
    for key in keys:
        found = _template(sd, lay, key[len(prefix):])
        if found is None:
            if _dtype(sd, key).is_floating_point:
                unmatched.append(key)
            continue
        tmpl, block = found
        axes[key] = _resolve(tmpl, block, names)
        if block is not None and tmpl and tmpl[0] in ("q", "k", _QKV):
            blocks.setdefault(block, {})[str(tmpl[0])] = key
    if unmatched:
        raise KeyMismatchError(
            f"transformer_spec ({layout if isinstance(layout, str) else 'custom'} layout): no rule covers "
            f"{len(unmatched)} key(s): {', '.join(unmatched[:6])}{' ...' if len(unmatched) > 6 else ''}. Give "
            f"their axes in extra=, or narrow the keys with prefix=."
        )
    return axes, blocks


def transformer_spec(
    state_dict: StateDict,
    n_heads: int,
    *,
    n_kv_heads: int | None = None,
    layout: str | TransformerLayout = "auto",
    rope: bool | None = None,
    residual: bool = True,
    prefix: str = "",
    extra: Mapping[str, Sequence[object]] | None = None,
) -> PermutationSpec:
    """Spec of a transformer: residual permutation, per-block MLP permutation, head-structured attention.

    Parameters
    ----------
    state_dict : the model's state dict (or a ``Checkpoint``).
    n_heads : query heads per attention block.
    n_kv_heads : key/value heads (GQA/MQA); ``None`` infers it from the K and Q shapes.
    layout : ``"auto"``, ``"bert"`` (HF BERT/MiniLM), ``"llama"``, ``"gpt2"`` (HF GPT-2, Conv1D), ``"open_clip"``, ``"torch"``
        (``nn.TransformerEncoder``) or a :class:`TransformerLayout`.
    rope : rotary embeddings (sigma_qk fixed to the identity); ``None`` takes the layout's default.
    residual : permute the residual stream (``"<prefix>res"``). ``False`` keeps outputs in the
        original basis (e.g. for embedding models whose outputs are used directly).
    prefix : only keys starting with it are covered, and permutation names start with it (build
        each tower of a two-tower model separately and combine the specs with ``|``).
    extra : more ``{key: axes}`` entries (may use the names ``"<prefix>res"``, ``"<prefix>blk<i>.mlp"``).

    Raises
    ------
    KeyMismatchError
        Float keys under ``prefix`` that no rule covers (name them in ``extra``).
    """
    keys = [k for k in state_dict if k.startswith(prefix) and k not in (extra or {})]
    if isinstance(layout, str):
        lay = LAYOUTS[_detect(keys)] if layout == "auto" else LAYOUTS.get(layout, layout)
    else:
        lay = layout
    if not isinstance(lay, TransformerLayout):
        raise InvalidParameterError(f"The 'layout' parameter must be 'auto', one of {sorted(LAYOUTS)} or a "
                                    f"TransformerLayout. Got {layout!r} instead.")
    names = {"res": f"{prefix}res" if residual else None, "blk": f"{prefix}blk"}
    axes, blocks = _transformer_axes(state_dict, keys, lay, names, prefix, layout)
    axes.update(extra or {})
    heads = [HeadGroup(f"{names['blk']}{i}.attn", n_heads, _kv_heads(state_dict, found, n_heads, n_kv_heads),
                       lay.rope if rope is None else rope) for i, found in sorted(blocks.items())]
    spec = PermutationSpec(axes, heads)
    spec.sizes(state_dict)
    return spec


def _kv_heads(sd: StateDict, found: Mapping[str, str], n_heads: int, n_kv_heads: int | None) -> int:
    if n_kv_heads is not None or "q" not in found or "k" not in found:
        return n_kv_heads if n_kv_heads is not None else n_heads
    q_rows, k_rows = shape_of(sd, found["q"])[0], shape_of(sd, found["k"])[0]
    if q_rows % n_heads or (k_rows * n_heads) % q_rows:
        raise ShapeMismatchError(
            f"{found['q']!r} has {q_rows} rows and {found['k']!r} {k_rows}: not n_heads={n_heads} heads of equal "
            f"size with a whole number of key/value heads. Check n_heads (and pass n_kv_heads)."
        )
    return k_rows * n_heads // q_rows
