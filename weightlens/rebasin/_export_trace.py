"""The ``torch.export`` path of :func:`~weightlens.rebasin.spec_from_module`.

``torch.export`` (non-strict) runs the module's Python code once and records an ATen graph
(``aten.linear``, ``aten.view``, ``aten.scaled_dot_product_attention``, ...). It follows models that
``torch.fx.symbolic_trace`` cannot, such as Hugging Face transformers, whose forward branches on Python
values and writes into tensors. The walk over that graph uses the fx tracer's rules for units on one
axis (each Linear/Conv/Embedding output starts a permutation; ``+`` and ``*`` tie permutations; what
reaches the outputs is not permuted) and adds:

* values computed from the inputs and buffers alone (attention masks, position ids, rotary tables) are
  not permuted and need no rule;
* a reduction over the unit axis (RMSNorm's mean of squares) does not change under the permutation;
  softmax along any axis keeps the units where they are;
* ``addmm`` with an ``(in, out)`` weight (GPT-2's ``Conv1D``) and ``x @ W`` are Linear layers; a
  ``split`` of a layer's output along its units (GPT-2's stacked Q/K/V in ``c_attn``) gives each part
  its own permutation;
* a layer output reshaped to ``(..., heads, head_dim)`` is split into heads; ``q @ k.transpose`` or
  ``scaled_dot_product_attention`` makes the Q and K layers views of one
  :class:`~weightlens.rebasin.spec.HeadGroup`, named after the module the attention runs in; the V layer
  and the output (reshaped back to ``heads * head_dim``, the O view) follow. K/V heads repeated for
  groups of query heads (``repeat_kv``: unsqueeze, expand, reshape; or ``enable_gqa``) give grouped-query
  attention, one K/V head broadcast to all query heads multi-query attention;
* an operation that reads single within-head dimensions of Q or K (rotary embeddings slice the head
  dimension and multiply it by per-dimension cos/sin; a per-head norm's scale shared by all heads, as
  Qwen3's ``q_norm``) fixes their within-head order (``rope=True``); on V it is an error;
* tied parameters (GPT-2's ``lm_head.weight`` and ``wte.weight``) get the same axes under every key.

Anything else that touches permuted units raises an error naming the graph node, its module and the
builder to use instead, so a spec is never silently wrong.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import math
import operator
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import torch
from torch import fx, nn

from weightlens.errors import InvalidParameterError
from weightlens.rebasin.builders import _detect
from weightlens.rebasin.spec import HeadGroup, PermutationSpec, Seg
from weightlens.rebasin.trace import FIXED, _UnionFind, _Val

aten = torch.ops.aten
_NOISY_LOGGERS = ("torch.fx.experimental.symbolic_shapes", "torch._export", "torch.export", "torch._dynamo")

_SUPPORTED = (
    "linear/addmm/mm/matmul with a weight parameter, convolutions (groups 1 or depthwise), embedding, "
    "layer/RMS/group/batch norm, elementwise operations (broadcast along aligned unit axes), reductions, "
    "softmax, view/reshape/transpose/permute/(un)squeeze/expand/slice/select/split/cat, and attention "
    "(scaled_dot_product_attention, or q @ k.transpose, softmax and @ v) over heads split off a layer's output"
)
_UNARY = {  # elementwise on their first argument (other tensor arguments give only a dtype)
    aten.gelu, aten.relu, aten.silu, aten.tanh, aten.sigmoid, aten.neg, aten.dropout, aten.alias, aten.clone,
    aten.contiguous, aten.detach, aten.to, aten._to_copy, aten.rsqrt, aten.sqrt, aten.exp, aten.log,
    aten.abs, aten.erf, aten.hardtanh, aten.leaky_relu, aten.elu, aten.mish, aten.softplus, aten.hardswish,
    aten.hardsigmoid, aten.reciprocal, aten.square, aten.lift_fresh_copy, aten.relu6, aten.log_sigmoid,
    aten.sin, aten.cos, aten.type_as, aten.gelu_, aten.relu_, aten.silu_,
}
_ELEMENTWISE = {aten.add, aten.sub, aten.mul, aten.div, aten.maximum, aten.minimum, aten.where, aten.masked_fill,
                aten.rsub, aten.pow}
_REDUCE = {aten.mean, aten.sum, aten.amax, aten.amin, aten.var, aten.std, aten.logsumexp}
_POOL = {aten.max_pool1d, aten.max_pool2d, aten.max_pool3d, aten.avg_pool1d, aten.avg_pool2d, aten.avg_pool3d,
         aten.adaptive_avg_pool1d, aten.adaptive_avg_pool2d, aten.adaptive_avg_pool3d, aten._adaptive_avg_pool2d,
         aten.max_pool2d_with_indices, aten.adaptive_max_pool2d}
_CONV = {aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution}
_NORM = {aten.layer_norm, aten.rms_norm, aten.group_norm, aten.batch_norm, aten._native_batch_norm_legit_no_training}


@dataclass(frozen=True)
class _Heads:
    """A value whose head axis (and within-head axis) carries a head-structured permutation.

    ``kind``: ``"split"`` (a layer's output reshaped into heads; ``src`` is its union-find element),
    ``"scores"`` (``q @ k.T``; ``src`` is the head group) or ``"out"`` (attention output; ``src`` is the
    head group). ``n`` distinct heads sit on axis ``ha``, each repeated ``rep`` times (grouped-query
    attention); ``ra`` is an axis of pending repeats (after unsqueeze and expand) that a reshape merges
    into ``ha``.
    """

    kind: str
    src: str
    ha: int
    da: int | None
    n: int
    rep: int
    ra: int | None
    shape: tuple[int, ...]

    def labelled(self) -> dict[str, int]:
        return {k: v for k, v in (("ha", self.ha), ("da", self.da), ("ra", self.ra)) if v is not None}


Value = _Val | _Heads | list | None


def builder_hint(module: nn.Module) -> str:
    """The builder call that gives ``module``'s spec without tracing (for error messages)."""
    keys = list(module.state_dict().keys())
    config = getattr(module, "config", None)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    kv = getattr(config, "num_key_value_heads", None)
    n_heads = f"n_heads={heads}" if isinstance(heads, int) else "n_heads=<query heads per block>"
    kv_arg = f", n_kv_heads={kv}" if isinstance(kv, int) and kv != heads else ""
    try:
        layout = _detect(keys)
    except InvalidParameterError:
        layout = None
    if layout is not None:
        return (f"Build the spec with weightlens.rebasin.transformer_spec(model.state_dict(), {n_heads}{kv_arg}, "
                f"layout={layout!r}) instead")
    return ("Build the spec with a builder (mlp_spec, vgg_spec, resnet_spec, transformer_spec) or write a "
            "PermutationSpec by hand instead")


def _schema_args(node: fx.Node) -> dict[str, object]:
    """Arguments of an ATen call by schema name, defaults filled in."""
    out: dict[str, object] = {}
    for i, a in enumerate(node.target._schema.arguments):  # type: ignore[union-attr]
        if i < len(node.args):
            out[a.name] = node.args[i]
        elif a.name in node.kwargs:
            out[a.name] = node.kwargs[a.name]
        else:
            out[a.name] = a.default_value if a.has_default_value() else None
    return out


def _shape_of(meta: object) -> tuple[int, ...] | None:
    return tuple(int(s) for s in meta.shape) if isinstance(meta, torch.Tensor) else None


def _dims(dim: object, nd: int) -> list[int]:
    if dim is None or dim == []:
        return list(range(nd))
    return sorted({int(d) % nd for d in (dim if isinstance(dim, list | tuple) else [dim])})


def _blocks(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[list[int], list[int]]] | None:
    """Pair the non-1 dims of two shapes of equal size into consecutive blocks of equal product."""
    ia = [i for i, s in enumerate(a) if s != 1]
    ib = [j for j, s in enumerate(b) if s != 1]
    blocks, i, j = [], 0, 0
    while i < len(ia) and j < len(ib):
        left, right, pa, pb = [ia[i]], [ib[j]], a[ia[i]], b[ib[j]]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb and i < len(ia):
                pa *= a[ia[i]]
                left.append(ia[i])
                i += 1
            elif pb < pa and j < len(ib):
                pb *= b[ib[j]]
                right.append(ib[j])
                j += 1
            else:
                return None
        blocks.append((left, right))
    return blocks if i == len(ia) and j == len(ib) else None


class _Walk:
    """Walks an exported graph and collects each parameter's axes."""

    def __init__(self, module: nn.Module, ep: torch.export.ExportedProgram) -> None:
        self.module, self.ep, self.graph = module, ep, ep.graph
        self.uf = _UnionFind()
        self.vals: dict[fx.Node, Value] = {}
        self.params: dict[str, list[tuple[str | None, int]]] = {}
        self.parts: dict[str, list[tuple[str, int]]] = {}  # root -> consecutive sub-elements and their sizes
        self.bound: dict[str, tuple[str, str]] = {}  # element -> (head group, view)
        self.split_shape: dict[str, tuple[int, int]] = {}  # element -> (heads, head dim) it was split into
        self.fixed_dims: dict[str, fx.Node] = {}  # element -> node that fixed its within-head order
        self.groups: dict[str, dict[str, int]] = {}
        self.count = 0
        self.node: fx.Node | None = None
        sig = ep.graph_signature
        by_id: dict[int, list[str]] = {}
        for key, t in module.state_dict(keep_vars=True).items():
            by_id.setdefault(id(t), []).append(key)
        self.key_of: dict[str, str | None] = {}  # placeholder name -> canonical state-dict key
        self.aliases: dict[str, list[str]] = {}
        self.is_param: dict[str, bool] = {}
        for name, fqn in [*sig.inputs_to_parameters.items(), *sig.inputs_to_buffers.items()]:
            is_param = name in sig.inputs_to_parameters
            t = module.get_parameter(fqn) if is_param else module.get_buffer(fqn)
            keys = by_id.get(id(t))
            self.key_of[name] = keys[0] if keys else None
            self.is_param[name] = is_param
            if keys:
                self.aliases[keys[0]] = keys
        self.hint = builder_hint(module)

    # ------------------------------------------------------------------------ helpers
    def fail(self, why: str, node: fx.Node | None = None) -> InvalidParameterError:
        node = node or self.node
        where = ""
        if node is not None:
            target = getattr(node.target, "__name__", None) or str(node.target)
            path = self.path(node)
            where = f" node {node.name!r} ({target}{f' in {path!r}' if path else ''}):"
        return InvalidParameterError(
            f"spec_from_module: cannot follow {type(self.module).__name__} traced with torch.export;{where} {why}. "
            f"Supported: {_SUPPORTED}. {self.hint}."
        )

    @staticmethod
    def path(node: fx.Node) -> str:
        stack = node.meta.get("nn_module_stack") or {}
        return str(list(stack.values())[-1][0]) if stack else ""

    def new(self, name: str) -> str:
        base = name
        while name in self.uf.parent:
            self.count += 1
            name = f"{base}#{self.count}"
        return self.uf.add(name)

    def find(self, elem: str) -> str:
        return self.uf.find(elem)

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        pa, pb = self.parts.pop(ra, None), self.parts.pop(rb, None)
        self.uf.union(ra, rb)
        root = self.find(ra)
        if pa and pb:
            if [s for _, s in pa] != [s for _, s in pb]:
                raise self.fail(f"outputs split into parts of sizes {[s for _, s in pa]} and {[s for _, s in pb]} "
                                f"are tied")
            for (x, _), (y, _) in zip(pa, pb, strict=True):
                self.union(x, y)
        parts = pa or pb
        if parts and root == FIXED:
            for x, _ in parts:
                self.union(x, FIXED)
        elif parts:
            self.parts[root] = parts

    def fixed(self, v: Value) -> bool:
        if isinstance(v, list):
            return all(self.fixed(x) for x in v)
        return v is None or isinstance(v, _Val) and self.find(v.elem) == FIXED

    def key(self, arg: object) -> str | None:
        """State-dict key of a parameter/buffer placeholder (None: not in the state dict)."""
        if not (isinstance(arg, fx.Node) and arg.op == "placeholder" and arg.name in self.key_of):
            raise self.fail(f"expected a parameter of the module, got {arg!r}")
        return self.key_of[arg.name]

    def const(self, arg: fx.Node) -> bool:
        """Whether ``arg`` is not permuted (without making a parameter's value: its use may be a weight)."""
        if arg in self.vals:
            return self.fixed(self.vals[arg])
        if self.is_state(arg):
            return not self.is_param[arg.name] or self.key_of[arg.name] is None or not arg.meta["val"].shape
        return False

    def is_state(self, arg: object) -> bool:
        return isinstance(arg, fx.Node) and arg.op == "placeholder" and arg.name in self.key_of

    def record(self, key: str | None, axes: list[tuple[str | None, int]]) -> None:
        if key is None:
            return
        if key in self.params:  # a parameter used twice (tied weights): its axes must agree
            for (old, i_old), (new, i_new) in zip(self.params[key], axes, strict=True):
                if i_old != i_new and old is not None and new is not None:
                    raise self.fail(f"{key!r} is used twice with different layouts")
                if old is not None or new is not None:  # an axis one use does not permute stays put
                    self.union(old or FIXED, new or FIXED)
        else:
            self.params[key] = axes

    def val(self, arg: object) -> Value:
        if isinstance(arg, fx.Node):
            if arg in self.vals:
                return self.vals[arg]
            if self.is_state(arg):
                return self.state_value(arg)
        raise self.fail(f"its input {arg!r} is not a tensor this tracer followed")

    def state_value(self, node: fx.Node) -> _Val:
        """A parameter used directly (norm scale, positional embedding): units on its last axis.

        Buffers and 0-d parameters are constants: not permuted.
        """
        shape = _shape_of(node.meta.get("val")) or ()
        key = self.key_of[node.name]
        if not self.is_param[node.name] or key is None or not shape:
            v = _Val(FIXED, None, 1, shape)
        else:
            elem = self.new(key)
            self.record(key, [(None, 1)] * (len(shape) - 1) + [(elem, 1)])
            v = _Val(elem, len(shape) - 1, 1, shape)
        self.vals[node] = v
        return v

    def plain(self, v: Value) -> Value:
        """A one-head split as plain units (what it is wherever attention does not need its head axis)."""
        if isinstance(v, _Heads) and v.kind == "split" and v.n * v.rep == 1 and v.ra is None:
            return _Val(v.src, v.da, 1, v.shape)
        if isinstance(v, _Heads) and v.kind == "scores" and v.n == 1:  # one head: nothing is permuted
            return _Val(FIXED, None, 1, v.shape)
        return v

    def unit(self, arg: object, what: str) -> _Val:
        v = self.plain(self.val(arg))
        if not isinstance(v, _Val):
            raise self.fail(f"{what} of a value split into attention heads")
        return v

    def fixed_value(self, meta: object) -> Value:
        if isinstance(meta, list | tuple):
            return [self.fixed_value(m) for m in meta]
        shape = _shape_of(meta)
        return None if shape is None else _Val(FIXED, None, 1, shape)

    # ------------------------------------------------------------------------ graph walk
    def run(self) -> PermutationSpec:
        for node in self.graph.nodes:
            self.node = node
            self.step(node)
        self.node = None
        return self.spec()

    def step(self, node: fx.Node) -> None:
        meta = node.meta.get("val")
        if node.op == "placeholder":
            if node.name not in self.key_of:  # user inputs and lifted constants
                self.vals[node] = self.fixed_value(meta)
            return
        if node.op == "output":
            fx.node.map_arg(node.args, self.output)
            return
        if node.op != "call_function":
            raise self.fail(f"{node.op} nodes are not supported")
        if node.target is operator.getitem:
            src = self.vals.get(node.args[0]) if isinstance(node.args[0], fx.Node) else None
            if not isinstance(src, list):
                raise self.fail("getitem of a value that is not a list of tensors")
            self.vals[node] = src[node.args[1]]  # type: ignore[index]
            return
        if _shape_of(meta) is None and not isinstance(meta, list | tuple):
            return  # checks (_assert_tensor_metadata) and other calls without a tensor result
        inputs: list[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), inputs.append)
        if all(self.const(a) for a in inputs):  # computed from inputs and constants alone: not permuted
            self.vals[node] = self.fixed_value(meta)
            return
        if isinstance(node.target, torch._ops.OpOverload) and node.target._schema.is_mutable:
            raise self.fail("in-place operations on permuted values are not supported")
        handler = self.handler(node)
        if handler is None:
            raise self.fail("this operation is not supported on permuted values")
        self.vals[node] = handler(node, meta)

    def handler(self, node: fx.Node) -> Callable[[fx.Node, object], Value] | None:
        packet = getattr(node.target, "overloadpacket", None)
        table: dict[object, Callable[[fx.Node, object], Value]] = {
            aten.linear: self.linear, aten.addmm: self.addmm, aten.embedding: self.embedding,
            aten.matmul: self.matmul, aten.mm: self.matmul, aten.scaled_dot_product_attention: self.sdpa,
            aten.view: self.reshape, aten.reshape: self.reshape, aten._unsafe_view: self.reshape,
            aten.flatten: self.reshape, aten.unflatten: self.reshape,
            aten.transpose: self.transpose, aten.permute: self.permute, aten.t: self.transpose,
            aten.unsqueeze: self.unsqueeze, aten.squeeze: self.squeeze, aten.expand: self.expand,
            aten.select: self.select, aten.slice: self.slice, aten.split: self.split,
            aten.split_with_sizes: self.split, aten.chunk: self.split, aten.cat: self.cat,
            aten.repeat_interleave: self.repeat_interleave, aten.index: self.index, aten.index_select: self.index,
            aten.softmax: self.softmax, aten._softmax: self.softmax, aten.log_softmax: self.softmax,
        }
        if packet in table:
            return table[packet]
        if packet in _UNARY:
            return self.unary
        if packet in _ELEMENTWISE:
            return self.elementwise
        if packet in _REDUCE:
            return self.reduce
        if packet in _CONV:
            return self.conv
        if packet in _NORM:
            return self.norm
        if packet in _POOL:
            return self.pool
        return None

    def output(self, arg: fx.Node) -> fx.Node:
        v = self.plain(self.val(arg)) if arg in self.vals or self.is_state(arg) else None
        for x in v if isinstance(v, list) else [v]:
            if isinstance(x, _Val):
                self.union(x.elem, FIXED)
            elif isinstance(x, _Heads):
                if x.kind != "split":
                    raise self.fail(f"the attention {'weights' if x.kind == 'scores' else 'output'} of head group "
                                    f"{x.src!r} are returned per head (pass output_attentions=False)", arg)
                self.union(x.src, FIXED)
        return arg

    # ------------------------------------------------------------------------ layers
    def out_elem(self, key: str | None) -> str:
        if key is None:
            raise self.fail("the weight is not in the state dict")
        return self.new(key[: -len(".weight")] if key.endswith(".weight") else key)

    def linear(self, node: fx.Node, meta: object) -> Value:
        a = _schema_args(node)
        x = self.unit(a["input"], "a Linear layer")
        if x.ch is not None and x.ch != len(x.shape) - 1:
            raise self.fail(f"Linear expects units on the last axis but they are on axis {x.ch}")
        key = self.key(a["weight"])
        out = self.out_elem(key)
        self.record(key, [(out, 1), (x.elem, x.inner)])
        if a["bias"] is not None:
            self.record(self.key(a["bias"]), [(out, 1)])
        shape = _shape_of(meta)
        return _Val(out, len(shape) - 1, 1, shape)

    def addmm(self, node: fx.Node, meta: object) -> Value:
        """``bias + x @ W`` with ``W`` stored as ``(in, out)`` (GPT-2's Conv1D)."""
        a = _schema_args(node)
        x = self.unit(a["mat1"], "addmm")
        if x.ch not in (None, 1):
            raise self.fail("addmm expects units on axis 1 of its input")
        key = self.key(a["mat2"])
        out = self.out_elem(key)
        self.record(key, [(x.elem, x.inner), (out, 1)])
        self.record(self.key(a["self"]), [(out, 1)])
        return _Val(out, 1, 1, _shape_of(meta))

    def embedding(self, node: fx.Node, meta: object) -> Value:
        a = _schema_args(node)
        if not self.fixed(self.val(a["indices"])):
            raise self.fail("embedding indices that depend on permuted values")
        key = self.key(a["weight"])
        out = self.out_elem(key)
        self.record(key, [(None, 1), (out, 1)])
        shape = _shape_of(meta)
        return _Val(out, len(shape) - 1, 1, shape)

    def conv(self, node: fx.Node, meta: object) -> Value:
        a = _schema_args(node)
        if a.get("transposed"):
            raise self.fail("transposed convolutions are not supported")
        x = self.unit(a["input"], "a convolution")
        if x.ch not in (None, 1) or x.inner != 1:
            raise self.fail("a convolution expects units on axis 1, not flattened")
        key = self.key(a["weight"])
        groups, extra = int(a["groups"]), len(a["weight"].meta["val"].shape) - 2  # type: ignore[union-attr]
        shape = _shape_of(meta)
        if groups == 1:
            out = self.out_elem(key)
            self.record(key, [(out, 1), (x.elem, 1)] + [(None, 1)] * extra)
        elif groups == x.shape[1] == shape[1]:  # depthwise: units stay aligned
            out = x.elem
            self.record(key, [(out, 1)] + [(None, 1)] * (extra + 1))
        else:
            raise self.fail(f"grouped convolution with groups={groups}")
        if a["bias"] is not None:
            self.record(self.key(a["bias"]), [(out, 1)])
        return _Val(out, 1, 1, shape)

    def norm(self, node: fx.Node, meta: object) -> Value:
        a = _schema_args(node)
        packet = node.target.overloadpacket  # type: ignore[union-attr]
        x = self.unit(a["input"], "a norm")
        last = packet in (aten.layer_norm, aten.rms_norm)
        if x.ch is not None:
            if x.ch != (len(x.shape) - 1 if last else 1):
                raise self.fail(f"the norm expects units on axis {len(x.shape) - 1 if last else 1}")
            if last and (len(a["normalized_shape"]) != 1 or x.inner != 1):  # type: ignore[arg-type]
                raise self.fail("LayerNorm/RMSNorm over more than the unit axis")
            if packet is aten.group_norm and a["num_groups"] not in (1, x.shape[1]):
                raise self.fail(f"GroupNorm with {a['num_groups']} groups mixes units across groups")
        for name in ("weight", "bias", "running_mean", "running_var"):
            if a.get(name) is not None:
                self.record(self.key(a[name]), [(x.elem, 1)])
        y = _Val(x.elem, x.ch, x.inner, _shape_of(meta if not isinstance(meta, list | tuple) else meta[0]))
        if isinstance(meta, list | tuple):
            return [y, *[self.fixed_value(m) for m in meta[1:]]]
        return y

    def pool(self, node: fx.Node, meta: object) -> Value:
        x = self.unit(node.args[0], "pooling")
        if x.ch not in (None, 1):
            raise self.fail("pooling expects units on axis 1")
        if isinstance(meta, list | tuple):
            return [_Val(x.elem, x.ch, x.inner, _shape_of(meta[0])), *[self.fixed_value(m) for m in meta[1:]]]
        return _Val(x.elem, x.ch, x.inner, _shape_of(meta))

    # ------------------------------------------------------------------------ elementwise and reductions
    def unary(self, node: fx.Node, meta: object) -> Value:
        x = self.val(node.args[0])
        if self.fixed(x):  # e.g. type_as(fixed, permuted): only the dtype of the second
            return self.fixed_value(meta)
        return replace(x, shape=_shape_of(meta))  # type: ignore[type-var]

    def elementwise(self, node: fx.Node, meta: object, plain: bool = False) -> Value:
        shape = _shape_of(meta)
        nd = len(shape)
        tensors: list[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), tensors.append)
        vals = [self.val(a) for a in tensors]
        if plain or any(isinstance(v, _Val) and not self.fixed(v) for v in vals):
            vals = [self.plain(v) for v in vals]
        moving = [v for v in vals if not self.fixed(v)]
        consts = [v for v in vals if isinstance(v, _Val) and self.fixed(v)]

        def size_at(v: _Val, axis: int) -> int:  # size of a broadcast operand along output axis ``axis``
            i = axis - (nd - len(v.shape))
            return v.shape[i] if i >= 0 else 1

        if all(isinstance(v, _Val) for v in moving):
            first = moving[0]
            ch = first.ch + nd - len(first.shape)
            for v in moving:
                if v.ch + nd - len(v.shape) != ch or v.inner != first.inner or v.shape[v.ch] != shape[ch]:
                    raise self.fail(f"operands of shapes {first.shape} and {v.shape} whose unit axes do not line "
                                    f"up when broadcast")
                self.union(first.elem, v.elem)
            if any(size_at(c, ch) != 1 for c in consts):  # a constant that differs along the units
                self.union(first.elem, FIXED)
            return _Val(first.elem, ch, first.inner, shape)
        heads = [v for v in moving if isinstance(v, _Heads)]
        for v in [v for v in moving if isinstance(v, _Val)]:  # a weight shared by all heads (q_norm's scale)
            if not (heads[0].kind == "split" and heads[0].da is not None
                    and v.ch + nd - len(v.shape) == heads[0].da + nd - len(heads[0].shape) and v.inner == 1):
                raise self.fail("combines a value split into attention heads with one that is not")
            self.fix_dims(heads[0])  # the same weight for every head: within-head order fixed, weight not permuted
            self.union(v.elem, FIXED)
            consts.append(v)
        moving = heads
        first = moving[0]
        shift = nd - len(first.shape)
        for v in moving:
            same = v.kind == first.kind and v.n == first.n and v.rep == first.rep and (
                self.find(v.src) == self.find(first.src) if v.kind == "split" else v.src == first.src)
            if not same or {k: a + nd - len(v.shape) for k, a in v.labelled().items()} != {
                    k: a + shift for k, a in first.labelled().items()}:
                raise self.fail("combines attention values of different layers or head layouts")
        out = replace(first, ha=first.ha + shift, da=None if first.da is None else first.da + shift,
                      ra=None if first.ra is None else first.ra + shift, shape=shape)
        if any(size_at(c, out.ha) != 1 or out.ra is not None and size_at(c, out.ra) != 1 for c in consts) \
                or shape[out.ha] != first.shape[first.ha]:
            if not plain and isinstance(self.plain(first), _Val):  # one head broadcast: plain units
                return self.elementwise(node, meta, plain=True)
            raise self.fail("a constant that differs between heads (e.g. ALiBi slopes) would have to be permuted "
                            "with them")
        if out.da is not None and any(size_at(c, out.da) != 1 for c in consts):
            self.fix_dims(out)
        return out

    def fix_dims(self, v: _Heads) -> None:
        if v.kind != "split":
            raise self.fail("an operation reads single within-head dimensions of the attention output")
        self.fixed_dims.setdefault(v.src, self.node)  # type: ignore[arg-type]

    def reduce(self, node: fx.Node, meta: object) -> Value:
        a = _schema_args(node)
        x = self.val(a["self"])
        nd = len(x.shape)  # type: ignore[union-attr]
        dims = _dims(a.get("dim"), nd)
        if isinstance(x, _Heads) and any(ax in dims for ax in x.labelled().values()):
            x = self.plain(x)
        keep = bool(a.get("keepdim"))
        shape = _shape_of(meta)

        def moved(axis: int) -> int:
            return axis if keep else axis - sum(d < axis for d in dims)

        if isinstance(x, _Val):
            if x.ch in dims:  # a reduction over every unit does not change when they are permuted
                return _Val(FIXED, None, 1, shape)
            return _Val(x.elem, moved(x.ch), x.inner, shape)
        if x.kind == "split" and dims == [x.da] and keep:  # per-head norm (Qwen3's q_norm): each head's statistic
            return replace(x, shape=shape)
        if any(ax in dims for ax in x.labelled().values()):
            raise self.fail("a reduction over the head or within-head axis")
        return replace(x, ha=moved(x.ha), da=None if x.da is None else moved(x.da),
                       ra=None if x.ra is None else moved(x.ra), shape=shape)

    def softmax(self, node: fx.Node, meta: object) -> Value:
        x = self.plain(self.val(node.args[0]))
        if isinstance(x, _Heads):
            dim = int(node.args[1]) % len(x.shape)
            if dim in (x.ha, x.ra):
                raise self.fail("softmax over attention heads")
        return replace(x, shape=_shape_of(meta))  # type: ignore[type-var]

    # ------------------------------------------------------------------------ shapes
    def moved(self, x: Value, where: Callable[[int], int | None], shape: tuple[int, ...], what: str) -> Value:
        """``x`` with each labelled axis moved to ``where(axis)`` (``None``: the axis is dropped: an error)."""
        if isinstance(x, _Val):
            ch = None if x.ch is None else where(x.ch)
            if x.ch is not None and ch is None:
                raise self.fail(f"{what} removes the unit axis")
            return _Val(x.elem, ch, x.inner, shape)
        assert isinstance(x, _Heads)
        new = {k: where(a) for k, a in x.labelled().items()}
        if any(a is None for a in new.values()) and isinstance(self.plain(x), _Val):
            return self.moved(self.plain(x), where, shape, what)
        if any(a is None for a in new.values()):
            raise self.fail(f"{what} removes a head axis")
        return replace(x, ha=new["ha"], da=new.get("da"), ra=new.get("ra"), shape=shape)

    def transpose(self, node: fx.Node, meta: object) -> Value:
        x = self.val(node.args[0])
        nd = len(x.shape)  # type: ignore[union-attr]
        d0, d1 = (int(node.args[1]) % nd, int(node.args[2]) % nd) if len(node.args) > 2 else (0, 1)
        swap = {d0: d1, d1: d0}
        return self.moved(x, lambda a: swap.get(a, a), _shape_of(meta), "transpose")

    def permute(self, node: fx.Node, meta: object) -> Value:
        x = self.val(node.args[0])
        nd = len(x.shape)  # type: ignore[union-attr]
        order = [int(d) % nd for d in node.args[1]]  # type: ignore[union-attr]
        return self.moved(x, order.index, _shape_of(meta), "permute")

    def unsqueeze(self, node: fx.Node, meta: object) -> Value:
        x = self.val(node.args[0])
        shape = _shape_of(meta)
        dim = int(node.args[1]) % len(shape)
        return self.moved(x, lambda a: a + (a >= dim), shape, "unsqueeze")

    def squeeze(self, node: fx.Node, meta: object) -> Value:
        x = self.val(node.args[0])
        old = x.shape  # type: ignore[union-attr]
        dims = _dims(node.args[1] if len(node.args) > 1 else None, len(old))
        gone = [d for d in dims if old[d] == 1]
        return self.moved(x, lambda a: None if a in gone else a - sum(d < a for d in gone), _shape_of(meta), "squeeze")

    def select(self, node: fx.Node, meta: object) -> Value:
        x = self.val(node.args[0])
        dim = int(node.args[1]) % len(x.shape)  # type: ignore[union-attr]
        return self.moved(x, lambda a: None if a == dim else a - (a > dim), _shape_of(meta), "select (indexing)")

    def slice(self, node: fx.Node, meta: object) -> Value:
        a = _schema_args(node)
        x = self.val(a["self"])
        shape = _shape_of(meta)
        dim = int(a["dim"]) % len(shape)  # type: ignore[arg-type]
        full = shape[dim] == x.shape[dim]  # type: ignore[union-attr]
        if isinstance(x, _Val):
            if x.ch == dim and not full:
                raise self.fail("slicing selects part of the unit axis")
            return _Val(x.elem, x.ch, x.inner, shape)
        if not full and dim in (x.ha, x.ra):
            raise self.fail("slicing selects some of the attention heads")
        if not full and dim == x.da:
            self.fix_dims(x)
        return replace(x, shape=shape)

    def expand(self, node: fx.Node, meta: object) -> Value:
        x = self.val(node.args[0])
        shape = _shape_of(meta)
        old = x.shape  # type: ignore[union-attr]
        lead = len(shape) - len(old)
        grown = [i for i in range(len(old)) if old[i] != shape[i + lead]]
        if isinstance(x, _Val):
            if x.ch in grown:
                raise self.fail("expand along the unit axis")
            return _Val(x.elem, None if x.ch is None else x.ch + lead, x.inner, shape)
        if x.ha in grown and x.n * x.rep == 1 and x.ra is None and x.kind == "split":  # one K/V head to all
            out = self.moved(x, lambda a: a + lead, shape, "expand")
            return replace(out, rep=shape[x.ha + lead])  # type: ignore[type-var]
        if any(a in grown for a in x.labelled().values()):
            raise self.fail("expand along a head axis")
        out = self.moved(x, lambda a: a + lead, shape, "expand")
        if x.ha + 1 in grown and x.ra is None and x.kind == "split":  # repeat_kv: (B, kv, 1, T, d) -> (B, kv, r, T, d)
            out = replace(out, ra=x.ha + 1 + lead)  # type: ignore[type-var]
        return out

    def index(self, node: fx.Node, meta: object) -> Value:
        """Indexing other axes than the unit axis with constant indices (pick a token per sequence)."""
        a = _schema_args(node)
        x, shape = self.plain(self.val(a["self"])), _shape_of(meta)
        if not isinstance(x, _Val):
            raise self.fail("indexing a value split into attention heads")
        nd = len(x.shape)
        if node.target.overloadpacket is aten.index_select:  # type: ignore[union-attr]
            used, idx = [int(a["dim"]) % nd], [a["index"]]  # type: ignore[arg-type]
        else:
            idx = list(a["indices"])  # type: ignore[call-overload]
            used = [i for i, t in enumerate(idx) if t is not None]
        if not all(self.fixed(self.val(t)) for t in idx if t is not None):
            raise self.fail("indices that depend on permuted values")
        if x.ch in used or x.ch != nd - 1 and node.target.overloadpacket is aten.index:  # type: ignore[union-attr]
            raise self.fail("indexing the unit axis (or with the units not on the last axis)")
        return _Val(x.elem, len(shape) - 1 if x.ch == nd - 1 else x.ch, x.inner, shape)

    def repeat_interleave(self, node: fx.Node, meta: object) -> Value:
        """``k.repeat_interleave(r, dim=head_axis)``: each K/V head serves ``r`` consecutive query heads."""
        a = _schema_args(node)
        x, shape = self.val(a["self"]), _shape_of(meta)
        if a["dim"] is None or not isinstance(a["repeats"], int):
            raise self.fail("repeat_interleave without a dim or with per-element repeats")
        dim = int(a["dim"]) % len(shape)  # type: ignore[arg-type]
        if isinstance(x, _Val):
            if x.ch == dim and shape[dim] != x.shape[dim]:
                raise self.fail("repeat_interleave along the unit axis")
            return _Val(x.elem, x.ch, x.inner, shape)
        if dim == x.ha and x.kind == "split" and x.ra is None:
            return replace(x, rep=x.rep * int(a["repeats"]), shape=shape)  # type: ignore[arg-type]
        if dim in x.labelled().values() and shape[dim] != x.shape[dim]:
            raise self.fail("repeat_interleave along a within-head axis")
        return replace(x, shape=shape)

    def reshape(self, node: fx.Node, meta: object, x: Value = None) -> Value:
        x = self.val(node.args[0]) if x is None else x
        shape = _shape_of(meta)
        old = x.shape  # type: ignore[union-attr]
        if shape == old:
            return replace(x, shape=shape)  # type: ignore[type-var]
        blocks = _blocks(old, shape)
        if blocks is None:
            raise self.fail(f"reshape {old} -> {shape}")
        if isinstance(x, _Val):
            if x.ch is None:
                return _Val(x.elem, None, x.inner, shape)
            for left, right in blocks:
                if x.ch not in left:
                    continue
                if left == [x.ch] and len(right) == 1:
                    if x.inner == 1 and right[0] > 0 and shape[right[0] - 1] == 1 and (x.ch == 0 or old[x.ch - 1] != 1):
                        # (..., d) -> (..., 1, d): one head (GQA with one K/V head); plain units elsewhere
                        return _Heads("split", x.elem, right[0] - 1, right[0], 1, 1, None, shape)
                    return _Val(x.elem, right[0], x.inner, shape)
                if left[0] == x.ch and len(right) == 1:  # flatten (C, H, W) -> C*H*W: blocks of H*W
                    return _Val(x.elem, right[0], x.inner * math.prod(old[i] for i in left[1:]), shape)
                if left == [x.ch] and len(right) == 2 and x.inner == 1:  # (..., n*d) -> (..., n, d)
                    self.split_shape.setdefault(x.elem, (shape[right[0]], shape[right[1]]))
                    if self.split_shape[x.elem] != (shape[right[0]], shape[right[1]]):
                        raise self.fail("a layer's output is split into heads in two different ways")
                    return _Heads("split", x.elem, right[0], right[1], shape[right[0]], 1, None, shape)
                break
            raise self.fail(f"reshape {old} -> {shape} mixes the unit axis (axis {x.ch}) with other axes")
        try:
            return self.reshape_heads(x, old, shape, blocks)
        except InvalidParameterError:
            if not isinstance(self.plain(x), _Val):
                raise
            return self.reshape(node, meta, self.plain(x))

    def reshape_heads(self, x: _Heads, old: tuple[int, ...], shape: tuple[int, ...],
                      blocks: list[tuple[list[int], list[int]]]) -> Value:
        axes = {k: a for k, a in x.labelled().items() if old[a] != 1}
        new: dict[str, int] = {}
        for left, right in blocks:
            inside = {k: a for k, a in axes.items() if a in left}
            if not inside:
                continue
            if len(left) == 1 and len(right) == 1:
                new[next(iter(inside))] = right[0]
            elif left == [x.ha, x.ra] and len(right) == 1 and x.kind == "split":  # repeat_kv merges the repeats
                return replace(x, ha=right[0], da=self.single(x.da, blocks), ra=None, rep=x.rep * old[x.ra],
                               shape=shape)
            elif left == [x.ha, x.da] and len(right) == 1 and x.ra is None and x.kind != "scores":
                return self.merge_heads(x, right[0], shape)
            else:
                raise self.fail(f"reshape {old} -> {shape} mixes a head axis with other axes")
        if x.ra is not None and "ha" not in axes and "ra" in new:  # a single K/V head repeated
            return replace(x, ha=new["ra"], da=new.get("da"), ra=None, rep=x.rep * old[x.ra], shape=shape)
        if "ha" not in axes:  # one head: keep it on the size-1 axis before the within-head axis
            at = (new.get("da") or 0) - 1
            if x.da is not None and at >= 0 and shape[at] == 1:
                new["ha"] = at
            elif x.kind == "out" and "da" in new:  # (..., 1, d) -> (..., d)
                return self.merge_heads(x, new["da"], shape)
            else:
                raise self.fail(f"reshape {old} -> {shape} loses the axis of a single head")
        if x.da is not None and "da" not in new:
            raise self.fail(f"reshape {old} -> {shape} loses the within-head axis")
        return replace(x, ha=new["ha"], da=new.get("da"), ra=new.get("ra"), shape=shape)

    @staticmethod
    def single(axis: int | None, blocks: list[tuple[list[int], list[int]]]) -> int | None:
        for left, right in blocks:
            if axis in left and len(left) == len(right) == 1:
                return right[0]
        return None

    def merge_heads(self, x: _Heads, axis: int, shape: tuple[int, ...]) -> _Val:
        """``(..., heads, head_dim) -> (..., heads * head_dim)``."""
        if x.kind == "split":
            if x.rep != 1:
                raise self.fail("merging repeated K/V heads back into units")
            return _Val(x.src, axis, 1, shape)
        elem = self.new(f"{x.src}.o")
        self.bind(elem, x.src, "o", x.n, x.shape[x.da])  # type: ignore[index]
        return _Val(elem, axis, 1, shape)

    def split(self, node: fx.Node, meta: object) -> Value:
        x = self.val(node.args[0])
        metas = list(meta)  # type: ignore[call-overload]
        shapes = [_shape_of(m) for m in metas]
        nd = len(x.shape)  # type: ignore[union-attr]
        a = _schema_args(node)
        dim = int(a.get("dim") or 0) % nd
        if isinstance(x, _Val):
            if x.ch != dim or len(shapes) == 1:
                return [_Val(x.elem, x.ch, x.inner, s) for s in shapes]
            if x.inner != 1:
                raise self.fail("split of flattened channel blocks")
            subs = self.refine(x.elem, [s[dim] for s in shapes])
            return [_Val(e, x.ch, 1, s) for e, s in zip(subs, shapes, strict=True)]
        if dim in (x.ha, x.ra) and len(shapes) > 1:
            if isinstance(self.plain(x), _Val):
                x = self.plain(x)
                return [_Val(x.elem, x.ch, x.inner, s) for s in shapes]
            raise self.fail("split of the attention heads")
        if dim == x.da and len(shapes) > 1:
            self.fix_dims(x)
        return [replace(x, shape=s) for s in shapes]

    def refine(self, elem: str, sizes: list[int]) -> list[str]:
        """Split the units of ``elem`` into consecutive parts, each with its own permutation."""
        root = self.find(elem)
        if root == FIXED:
            return [FIXED] * len(sizes)
        if root in self.parts:
            if [s for _, s in self.parts[root]] != sizes:
                raise self.fail(f"the output of {root!r} is split in two different ways")
            return [e for e, _ in self.parts[root]]
        subs = [self.new(f"{root}[{i}]") for i in range(len(sizes))]
        self.parts[root] = list(zip(subs, sizes, strict=True))
        return subs

    def cat(self, node: fx.Node, meta: object) -> Value:
        shape = _shape_of(meta)
        vals = [self.val(t) for t in node.args[0]]  # type: ignore[union-attr]
        if any(isinstance(v, _Val) and not self.fixed(v) for v in vals):
            vals = [self.plain(v) for v in vals]
        dim = int(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % len(shape)
        moving = [v for v in vals if not self.fixed(v)]
        if all(isinstance(v, _Val) for v in moving):
            first = moving[0]
            for v in moving:
                if v.ch != first.ch or v.inner != first.inner:
                    raise self.fail("concatenates values whose unit axes differ")
                self.union(first.elem, v.elem)
            if first.ch == dim:
                raise self.fail("concatenation along the unit axis")
            if len(moving) < len(vals):  # constant parts would have to be permuted too
                self.union(first.elem, FIXED)
            return _Val(first.elem, first.ch, first.inner, shape)
        if len(moving) != len(vals) or not all(isinstance(v, _Heads) and v.kind == "split" for v in moving):
            raise self.fail("concatenates attention values with other values")
        first = moving[0]
        if any(self.find(v.src) != self.find(first.src) or v.labelled() != first.labelled() or v.n != first.n
               or v.rep != first.rep for v in moving):
            raise self.fail("concatenates attention values of different layers or head layouts")
        if dim in (first.ha, first.ra):
            raise self.fail("concatenation along the head axis")
        if dim == first.da:  # rotary embeddings: rotate_half
            self.fix_dims(first)
        return replace(first, shape=shape)

    # ------------------------------------------------------------------------ attention
    def matmul(self, node: fx.Node, meta: object) -> Value:
        x_arg, w_arg = node.args[0], node.args[1]
        shape = _shape_of(meta)
        if self.is_state(w_arg) and self.key_of[w_arg.name] is not None:  # x @ W, W stored (in, out)
            x = self.unit(x_arg, "x @ W")
            if x.ch is not None and x.ch != len(x.shape) - 1:
                raise self.fail("x @ W expects units on the last axis of x")
            key = self.key(w_arg)
            if len(w_arg.meta["val"].shape) != 2:
                raise self.fail("x @ W with a weight that is not 2-d")
            out = self.out_elem(key)
            self.record(key, [(x.elem, x.inner), (out, 1)])
            return _Val(out, len(shape) - 1, 1, shape)
        x, y = self.val(x_arg), self.val(w_arg)
        nd = len(shape)
        if nd >= 3:
            ha = x.ha if isinstance(x, _Heads) else y.ha if isinstance(y, _Heads) else nd - 3
            x = self.as_heads(x, ha, nd - 1)
            y = self.as_heads(y, ha, nd - 1 if isinstance(x, _Heads) and x.kind == "scores" else nd - 2)
        if isinstance(x, _Heads) and isinstance(y, _Heads) and len(x.shape) == len(y.shape) == len(shape):
            nd = len(shape)
            if x.kind == "split" and y.kind == "split" and x.da == nd - 1 and y.da == nd - 2:  # q @ k.T
                if x.ha != y.ha or x.ra is not None or y.ra is not None or x.ha >= nd - 2:
                    raise self.fail("q @ k.T whose head axes do not line up")
                group = self.attend(node, x, y, gqa=False)
                return _Heads("scores", group, x.ha, None, x.n * x.rep, 1, None, shape)
            if x.kind == "scores" and y.kind == "split" and y.da == nd - 1 and x.ha == y.ha and y.ra is None:
                self.attend_v(x.src, y, x.n)
                return _Heads("out", x.src, x.ha, nd - 1, x.n, 1, None, shape)
        raise self.fail("a matrix product that is neither x @ W, q @ k.T nor weights @ v")

    def sdpa(self, node: fx.Node, meta: object) -> Value:
        a = _schema_args(node)
        shape = _shape_of(meta)
        nd = len(shape)
        q = self.val(a["query"])
        ha = q.ha if isinstance(q, _Heads) else nd - 3
        q, k, v = (self.as_heads(self.val(a[n]), ha, nd - 1) for n in ("query", "key", "value"))
        for t in (q, k, v):
            if not (isinstance(t, _Heads) and t.kind == "split" and t.da == nd - 1 and t.ha < nd - 2
                    and t.ra is None and t.ha == q.ha):  # type: ignore[union-attr]
                raise self.fail("scaled_dot_product_attention on values that are not split into heads")
        mask = a["attn_mask"]
        if mask is not None:
            m = self.val(mask)
            if not self.fixed(m):
                raise self.fail("an attention mask that depends on permuted values")
            i = q.ha - (nd - len(m.shape))  # type: ignore[union-attr]
            if i >= 0 and m.shape[i] != 1:  # type: ignore[union-attr]
                raise self.fail("an attention mask that differs between heads would have to be permuted")
        group = self.attend(node, q, k, gqa=bool(a["enable_gqa"]))  # type: ignore[arg-type]
        self.attend_v(group, v, q.n, bool(a["enable_gqa"]))  # type: ignore[union-attr]
        return _Heads("out", group, q.ha, nd - 1, q.n, 1, None, shape)  # type: ignore[union-attr]

    def as_heads(self, v: Value, ha: int, da: int) -> Value:
        """A layer output used by attention without a head axis of its own: one head (repeated along ``ha``)."""
        if not isinstance(v, _Val) or self.fixed(v) or v.ch != da or v.inner != 1 or ha in (da, None):
            return v
        if ha >= len(v.shape) or v.shape[ha] != 1:  # a head axis whose entries may differ: not one head
            return v
        if self.split_shape.setdefault(v.elem, (1, v.shape[da])) != (1, v.shape[da]):
            raise self.fail("a layer's output is split into heads in two different ways")
        return _Heads("split", v.elem, ha, da, 1, 1, None, v.shape)

    def kv_heads(self, heads: int, k: _Heads, gqa: bool) -> int:
        if k.n * k.rep == heads or k.n * k.rep == 1 or gqa and k.rep == 1 and heads % k.n == 0:
            if heads % k.n:
                raise self.fail(f"{heads} query heads are not a multiple of {k.n} key/value heads")
            return k.n
        raise self.fail(f"{heads} query heads against {k.n * k.rep} key heads")

    def attend(self, node: fx.Node, q: _Heads, k: _Heads, gqa: bool) -> str:
        """Create the head group of ``q`` and ``k``; bind their layers to its Q and K views."""
        if q.rep != 1:
            raise self.fail("repeated query heads")
        kv = self.kv_heads(q.n, k, gqa)
        name = self.path(node) or "attn"
        base, i = name, 1
        while name in self.groups:
            i += 1
            name = f"{base}#{i}"
        self.groups[name] = {"n": q.n, "kv": kv}
        self.bind(q.src, name, "q", q.n, q.shape[q.da])  # type: ignore[index]
        self.bind(k.src, name, "k", k.n, k.shape[k.da])  # type: ignore[index]
        return name

    def attend_v(self, group: str, v: _Heads, heads: int, gqa: bool = False) -> None:
        if v.n != self.groups[group]["kv"] or v.n * v.rep not in (heads, 1) and not (gqa and v.rep == 1):
            raise self.fail(f"{v.n} value heads for the {self.groups[group]['kv']} key heads of {group!r}")
        self.bind(v.src, group, "v", v.n, v.shape[v.da])  # type: ignore[index]

    def bind(self, elem: str, group: str, view: str, n: int, d: int) -> None:
        g = self.groups[group]
        dim = "d_qk" if view in "qk" else "d_vo"
        if g.setdefault(dim, d) != d:
            raise self.fail(f"head group {group!r}: head dimension {d} for {view.upper()} but {g[dim]} elsewhere")
        want = g["n"] if view in "qo" else g["kv"]
        if n != want:
            raise self.fail(f"head group {group!r}: {n} heads for {view.upper()} but {want} expected")
        if self.bound.setdefault(elem, (group, view)) != (group, view):
            old = self.bound[elem]
            raise self.fail(f"one layer output is {old[1].upper()} of {old[0]!r} and {view.upper()} of {group!r}")

    # ------------------------------------------------------------------------ result
    def spec(self) -> PermutationSpec:
        bound_roots = {self.find(e) for e in self.bound}
        for elem in list(self.fixed_dims):
            if self.find(elem) not in bound_roots:  # a one-head split read per dimension, not attention
                self.union(elem, FIXED)
                del self.fixed_dims[elem]
        root_view: dict[str, tuple[str, str]] = {}
        for elem, (group, view) in self.bound.items():
            root = self.find(elem)
            if root == FIXED:
                raise self.fail(f"the {view.upper()} units of head group {group!r} reach the module's outputs (or "
                                f"are tied to units that do), so its heads cannot be permuted")
            if root_view.setdefault(root, (group, view)) != (group, view):
                raise self.fail(f"{view.upper()} of {group!r} is tied to {root_view[root][1].upper()} of "
                                f"{root_view[root][0]!r}")
            if root in self.parts:
                raise self.fail(f"the {view.upper()} units of {group!r} are split further")
        for elem, (n, d) in self.split_shape.items():
            root = self.find(elem)
            if root != FIXED and root not in root_view:
                raise self.fail(f"the output of {elem!r} is reshaped into {n} heads of {d} but never reaches attention")
        rope: dict[str, bool] = {}
        for elem, node in self.fixed_dims.items():
            group, view = root_view[self.find(elem)]
            if view not in "qk":
                raise self.fail(f"this operation reads single within-head dimensions of {view.upper()} of {group!r}",
                                node)
            rope[group] = True
        taken = {g for g in self.groups} | {f"{g}.{p}" for g in self.groups for p in "qkvo"}

        def resolve(elem: str) -> list[str] | None:
            root = self.find(elem)
            if root == FIXED:
                return None
            if root in self.parts:
                names: list[str] = []
                for sub, _ in self.parts[root]:
                    part = resolve(sub)
                    if part is None:
                        raise self.fail(f"part of the split output of {root!r} reaches the module's outputs")
                    names += part
                return names
            if root in root_view:
                group, view = root_view[root]
                return [f"{group}.{view}"]
            return [root + "'" if root in taken else root]

        axes: dict[str, tuple] = {}
        for key, entries in self.params.items():
            out = []
            for elem, inner in entries:
                names = None if elem is None else resolve(elem)
                out.append(None if names is None else tuple(Seg(n, inner) for n in names))
            for alias in self.aliases.get(key, [key]):
                axes[alias] = tuple(out)
        used = {group for group, _ in self.bound.values()}
        heads = [HeadGroup(name, g["n"], g["kv"], rope.get(name, False))
                 for name, g in self.groups.items() if name in used]
        return PermutationSpec(axes, heads)


def _call_args(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """Keyword arguments for the trace: a KV cache is not an output (``use_cache=False`` unless given)."""
    try:
        params = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return kwargs
    if "use_cache" in params and "use_cache" not in kwargs and params.index("use_cache") >= len(args):
        return {**kwargs, "use_cache": False}
    return kwargs


def spec_from_export(module: nn.Module, args: tuple, kwargs: Mapping[str, object],
                     fx_error: BaseException | None = None) -> PermutationSpec:
    """Trace ``module`` with ``torch.export`` (eval mode, train/eval modes restored) and walk the graph."""
    kwargs = _call_args(module, args, dict(kwargs))
    modes = {m: m.training for m in module.modules()}
    quiet = [logging.getLogger(n) for n in _NOISY_LOGGERS]  # a failed trace logs the whole graph as a warning
    levels = [log.level for log in quiet]
    try:
        module.eval()
        for log in quiet:
            log.setLevel(logging.ERROR)
        captured = io.StringIO()  # torch.export prints the partial graph of a failed trace to stderr
        with contextlib.redirect_stderr(captured):
            ep = torch.export.export(module, args, kwargs, strict=False)
        sys.stderr.write(captured.getvalue())
    except Exception as exc:  # torch.export raises many types (UserError, GuardOnDataDependentSymNode, ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        before = (f"torch.fx cannot trace {type(module).__name__} ({type(fx_error).__name__}: "
                  f"{str(fx_error).strip().splitlines()[0] if str(fx_error).strip() else ''}) and ") if fx_error else ""
        raise InvalidParameterError(
            f"spec_from_module: {before}torch.export cannot trace {type(module).__name__} ({type(exc).__name__}: "
            f"{first[:300]}); data-dependent control flow in forward, for one, stops both. {builder_hint(module)}."
        ) from None
    finally:
        for log, level in zip(quiet, levels, strict=True):
            log.setLevel(level)
        for m, mode in modes.items():
            m.train(mode)
    spec = _Walk(module, ep).run()
    spec.sizes(module.state_dict())
    return spec
