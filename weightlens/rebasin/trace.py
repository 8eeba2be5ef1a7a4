"""Derive a permutation spec by tracing a module with ``torch.fx`` (or ``torch.export``).

Every Linear/Conv/Embedding output starts a permutation; operations that keep units aligned pass it on
(norms, activations, dropout, pooling, flatten, reductions over other axes, slicing of other axes);
``a + b`` (residual connections, also broadcast, as with a positional embedding parameter) and
``a * b`` (gating) tie their inputs' permutations into one; whatever reaches the module's outputs, or
comes from its inputs, is not permuted. ``nn.MultiheadAttention`` becomes a head-structured
:class:`~weightlens.rebasin.spec.HeadGroup` named after the module, and its output projection starts
a permutation. Operations outside this list raise an
error naming the graph node, so a spec is never silently wrong.

Modules that ``torch.fx`` cannot trace (Hugging Face transformers, whose forward branches on Python
values) are traced with ``torch.export`` instead; the walk over its ATen graph (in
``weightlens.rebasin._export_trace``) follows the same rules and also attention written with head
reshapes, grouped-query attention and rotary embeddings.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from weightlens.errors import InvalidParameterError
from weightlens.rebasin.spec import HeadGroup, PermutationSpec, Seg

__all__ = ["spec_from_module"]

FIXED = "<fixed>"

_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.Softplus, nn.Mish,
    nn.Hardswish, nn.Hardtanh, nn.Hardsigmoid, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.AlphaDropout,
)
_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
_ELEMENTWISE_FUNCS = {
    F.relu, F.relu6, F.gelu, F.silu, F.elu, F.leaky_relu, F.softplus, F.mish, F.hardswish, F.hardtanh,
    F.dropout, torch.relu, torch.sigmoid, torch.tanh, F.sigmoid, F.tanh, torch.nn.functional.hardsigmoid,
}
_ELEMENTWISE_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone", "float", "relu_"}
_POOL_FUNCS = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool2d,
}
_BINARY = {operator.add, operator.iadd, operator.sub, operator.mul, operator.imul, torch.add, torch.sub,
           torch.mul, operator.truediv, torch.div}
_BINARY_METHODS = {"add", "sub", "mul", "div", "add_", "mul_"}
_REDUCE_FUNCS = {torch.mean, torch.sum, torch.amax}
_REDUCE_METHODS = {"mean", "sum", "amax"}
_NORMS = tuple(getattr(nn, n) for n in ("LayerNorm", "RMSNorm") if hasattr(nn, n))  # RMSNorm: torch >= 2.4
_SUPPORTED = ("Linear, Conv (groups 1 or depthwise), Embedding, MultiheadAttention, BatchNorm, LayerNorm, "
              "RMSNorm, GroupNorm (1 or C groups), activations, dropout, pooling, flatten/view to (N, -1), "
              "mean/sum over non-channel axes, slicing of non-channel axes, parameters used directly "
              "(units on their last axis), and +, -, *, / of tensors (broadcast along aligned unit axes) "
              "or with numbers")


@dataclass(frozen=True)
class _Val:
    elem: str  # union-find element of the channel permutation
    ch: int | None  # channel axis (None: unknown, only for fixed inputs)
    inner: int  # block size per channel after flattening
    shape: tuple[int, ...]


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {FIXED: FIXED}
        self.order: list[str] = [FIXED]

    def add(self, x: str) -> str:
        if x not in self.parent:
            self.parent[x] = x
            self.order.append(x)
        return x

    def find(self, x: str) -> str:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, x: str, y: str) -> None:
        rx, ry = self.find(x), self.find(y)
        if rx == ry:
            return
        first, second = sorted((rx, ry), key=self.order.index)  # the earlier element names the class
        self.parent[second] = first


class _Tracer:
    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.uf = _UnionFind()
        self.vals: dict[fx.Node, _Val] = {}
        self.params: dict[str, list[tuple[str | tuple[str, ...] | None, int]]] = {}
        self.heads: list[HeadGroup] = []

    # ---------------------------------------------------------------- helpers
    def fail(self, node: fx.Node, why: str) -> InvalidParameterError:
        return InvalidParameterError(
            f"spec_from_module: cannot follow node {node.name!r} ({node.op} {_target_name(node)}): {why}. "
            f"Supported: {_SUPPORTED}. Build the spec with a builder (mlp_spec, resnet_spec, "
            f"transformer_spec) or write a PermutationSpec by hand; tracer='export' follows attention "
            f"written with head reshapes."
        )

    def val(self, node: fx.Node, arg: object) -> _Val:
        if not isinstance(arg, fx.Node) or arg not in self.vals:
            raise self.fail(node, f"its input {arg!r} is not a tensor this tracer followed")
        return self.vals[arg]

    def channel(self, node: fx.Node, v: _Val, want: int, what: str) -> None:
        if v.ch is not None and v.ch != want:
            raise self.fail(node, f"{what} expects units on axis {want} but they are on axis {v.ch}")

    def record(self, key: str, axes: list[tuple[str | tuple[str, ...] | None, int]], node: fx.Node) -> None:
        """Axes of a parameter: per axis a union-find element, a tuple of head views (literal), or None."""
        if key in self.params:  # a module called twice: its axes must agree
            for (old, i_old), (new, i_new) in zip(self.params[key], axes, strict=True):
                if (old is None) != (new is None) or i_old != i_new or isinstance(old, tuple) != isinstance(new, tuple):
                    raise self.fail(node, f"{key!r} is used twice with different layouts")
                if isinstance(old, tuple):
                    if old != new:
                        raise self.fail(node, f"{key!r} is used twice with different layouts")
                elif old is not None and new is not None:
                    self.uf.union(old, new)
        else:
            self.params[key] = axes

    # ---------------------------------------------------------------- modules
    def module(self, node: fx.Node, mod: nn.Module, shape: tuple[int, ...]) -> _Val:
        path = str(node.target)
        if isinstance(mod, nn.MultiheadAttention):
            return self.attention(node, path, mod)
        if isinstance(mod, nn.Embedding):
            out = self.uf.add(path)
            self.record(f"{path}.weight", [(None, 1), (out, 1)], node)
            return _Val(out, len(shape) - 1, 1, shape)
        x = self.val(node, node.args[0])
        if isinstance(mod, nn.Linear):
            self.channel(node, x, len(x.shape) - 1, "Linear")
            return self.writer(node, path, mod, x, (len(shape) - 1), extra=0)
        if isinstance(mod, nn.modules.conv._ConvNd):
            self.channel(node, x, 1, "Conv")
            if x.inner != 1 or isinstance(mod, nn.modules.conv._ConvTransposeNd):
                raise self.fail(node, "transposed or flattened-input convolutions are not supported")
            if mod.groups == 1:
                return self.writer(node, path, mod, x, 1, extra=mod.weight.ndim - 2)
            if mod.groups == mod.in_channels == mod.out_channels:  # depthwise: units stay aligned
                self.record(f"{path}.weight", [(x.elem, 1)] + [(None, 1)] * (mod.weight.ndim - 1), node)
                if mod.bias is not None:
                    self.record(f"{path}.bias", [(x.elem, 1)], node)
                return _Val(x.elem, 1, 1, shape)
            raise self.fail(node, f"grouped convolution with groups={mod.groups}")
        if isinstance(mod, (nn.modules.batchnorm._NormBase, nn.GroupNorm, *_NORMS)):
            return self.norm(node, path, mod, x, shape)
        if isinstance(mod, _ELEMENTWISE_MODULES):
            return _Val(x.elem, x.ch, x.inner, shape)
        if isinstance(mod, _POOL_MODULES):
            self.channel(node, x, 1, "pooling")
            return _Val(x.elem, 1, x.inner, shape)
        if isinstance(mod, nn.Flatten):
            return self.flatten(node, x, mod.start_dim, mod.end_dim, shape)
        raise self.fail(node, f"module type {type(mod).__name__} is not supported")

    def writer(self, node: fx.Node, path: str, mod: nn.Module, x: _Val, ch: int, extra: int) -> _Val:
        out = self.uf.add(path)
        self.record(f"{path}.weight", [(out, 1), (x.elem, x.inner)] + [(None, 1)] * extra, node)
        if getattr(mod, "bias", None) is not None:
            self.record(f"{path}.bias", [(out, 1)], node)
        return _Val(out, ch, 1, tuple(self.meta(node)))

    def norm(self, node: fx.Node, path: str, mod: nn.Module, x: _Val, shape: tuple[int, ...]) -> _Val:
        if isinstance(mod, _NORMS):
            if len(mod.normalized_shape) != 1 or x.inner != 1:
                raise self.fail(node, "LayerNorm/RMSNorm over more than the last axis")
            self.channel(node, x, len(x.shape) - 1, "LayerNorm")
        else:
            self.channel(node, x, 1, type(mod).__name__)
            if isinstance(mod, nn.GroupNorm) and mod.num_groups not in (1, mod.num_channels):
                raise self.fail(node, f"GroupNorm with {mod.num_groups} groups mixes units across groups")
        for name, t in [*mod.named_parameters(recurse=False), *mod.named_buffers(recurse=False)]:
            if t is not None:
                self.record(f"{path}.{name}", [(x.elem, 1)] if t.ndim == 1 else [(None, 1)] * t.ndim, node)
        return _Val(x.elem, x.ch if x.ch is not None else len(x.shape) - 1, x.inner, shape)

    def attention(self, node: fx.Node, path: str, mod: nn.MultiheadAttention) -> _Val:
        """Self- or cross-attention: head-structured Q/K/V rows and O columns, a new output permutation."""
        args = list(node.args[:3]) + [node.kwargs.get(n) for n in ("query", "key", "value")][len(node.args):]
        q, k, v = (self.val(node, a) for a in args)
        for x in (q, k, v):
            self.channel(node, x, len(x.shape) - 1, "MultiheadAttention")
            if x.inner != 1:
                raise self.fail(node, "attention over flattened channel blocks")
        if mod.bias_k is not None:
            raise self.fail(node, "add_bias_kv=True is not supported")
        group = HeadGroup(path, mod.num_heads)
        self.heads.append(group)
        views = {p: group.view(p) for p in ("q", "k", "v", "o")}
        if mod._qkv_same_embed_dim:
            self.uf.union(q.elem, k.elem)
            self.uf.union(q.elem, v.elem)
            self.record(f"{path}.in_proj_weight", [((views["q"], views["k"], views["v"]), 1), (q.elem, 1)], node)
        else:
            for part, x in (("q", q), ("k", k), ("v", v)):
                self.record(f"{path}.{part}_proj_weight", [((views[part],), 1), (x.elem, 1)], node)
        if mod.in_proj_bias is not None:
            self.record(f"{path}.in_proj_bias", [((views["q"], views["k"], views["v"]), 1)], node)
        out = self.uf.add(f"{path}.out_proj")
        self.record(f"{path}.out_proj.weight", [(out, 1), ((views["o"],), 1)], node)
        if mod.out_proj.bias is not None:
            self.record(f"{path}.out_proj.bias", [(out, 1)], node)
        shape = tuple(node.meta["tensor_meta"][0].shape)
        return _Val(out, len(shape) - 1, 1, shape)

    def parameter(self, node: fx.Node, shape: tuple[int, ...]) -> _Val:
        """A parameter used directly (positional embedding, class token): units on its last axis."""
        key = str(node.target)
        if not shape:
            return _Val(FIXED, None, 1, shape)
        elem = self.uf.add(key)
        self.record(key, [(None, 1)] * (len(shape) - 1) + [(elem, 1)], node)
        return _Val(elem, len(shape) - 1, 1, shape)

    def getitem(self, node: fx.Node, shape: tuple[int, ...]) -> _Val:
        """``out[0]`` of attention (``out[1]``, the weights, carries no units) or basic slicing."""
        src, index = node.args[0], node.args[1]
        if isinstance(src, fx.Node) and src.op == "call_module" and isinstance(
            self.gm.get_submodule(str(src.target)), nn.MultiheadAttention
        ):
            x = self.val(node, src)
            return _Val(x.elem, x.ch, x.inner, shape) if index == 0 else _Val(FIXED, None, 1, shape)
        x = self.val(node, src)
        items = list(index) if isinstance(index, tuple) else [index]
        if any(i is None or isinstance(i, fx.Node) for i in items) or items.count(Ellipsis) > 1:
            raise self.fail(node, "indexing with None, tensors or several Ellipsis")
        if Ellipsis in items:
            at = items.index(Ellipsis)
            items[at:at + 1] = [slice(None)] * (len(x.shape) - len(items) + 1)
        ch = x.ch
        for dim, item in enumerate(items):
            if ch is None or dim > x.ch:
                break
            if dim == x.ch and item != slice(None):
                raise self.fail(node, "indexing selects part of the channel axis")
            if isinstance(item, int) and dim < x.ch:
                ch -= 1
        return _Val(x.elem, ch, x.inner, shape)

    # ---------------------------------------------------------------- shape ops
    def flatten(self, node: fx.Node, x: _Val, start: int, end: int, shape: tuple[int, ...]) -> _Val:
        nd = len(x.shape)
        start, end = start % nd, end % nd
        if x.ch is None or x.ch < start:
            return _Val(x.elem, x.ch, x.inner, shape)
        if x.ch > end:
            return _Val(x.elem, x.ch - (end - start), x.inner, shape)
        if x.ch != start:
            raise self.fail(node, "flatten puts other axes before the channel axis")
        return _Val(x.elem, start, x.inner * math.prod(x.shape[start + 1 : end + 1]), shape)

    def reshape(self, node: fx.Node, x: _Val, shape: tuple[int, ...]) -> _Val:
        if shape == x.shape:
            return _Val(x.elem, x.ch, x.inner, shape)
        if len(shape) == 2 and x.ch in (1, None) and shape[0] == x.shape[0]:
            return self.flatten(node, x, 1, -1, shape)
        raise self.fail(node, f"reshape {x.shape} -> {shape} is not a flatten to (N, -1)")

    def reduce(self, node: fx.Node, x: _Val, shape: tuple[int, ...]) -> _Val:
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if dims is None:
            raise self.fail(node, "a reduction over every axis mixes units")
        dims = {d % len(x.shape) for d in ((dims,) if isinstance(dims, int) else dims)}
        keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
        if x.ch is not None and x.ch in dims:
            raise self.fail(node, "a reduction over the channel axis mixes units")
        ch = x.ch if keep or x.ch is None else x.ch - sum(d < x.ch for d in dims)
        return _Val(x.elem, ch, x.inner, shape)

    def binary(self, node: fx.Node, shape: tuple[int, ...]) -> _Val:
        tensors = [a for a in node.args[:2] if isinstance(a, fx.Node)]
        vals = [self.val(node, a) for a in tensors]
        if len(vals) == 1:
            return _Val(vals[0].elem, vals[0].ch, vals[0].inner, shape)
        x, y = vals
        if x.shape == y.shape and x.inner == y.inner and (None in (x.ch, y.ch) or x.ch == y.ch):
            self.uf.union(x.elem, y.elem)
            return _Val(x.elem, x.ch if x.ch is not None else y.ch, x.inner, shape)
        # broadcasting: both channel axes must line up from the end and have the same length
        if None in (x.ch, y.ch) or x.inner != y.inner or x.ch - len(x.shape) != y.ch - len(y.shape) \
                or x.shape[x.ch] != y.shape[y.ch]:
            raise self.fail(node, f"tensors of shapes {x.shape} and {y.shape} whose unit axes do not line up "
                                  f"when broadcast")
        self.uf.union(x.elem, y.elem)
        return _Val(x.elem, len(shape) + x.ch - len(x.shape), x.inner, shape)

    # ---------------------------------------------------------------- graph walk
    def meta(self, node: fx.Node) -> tuple[int, ...]:
        return tuple(node.meta["tensor_meta"].shape)

    def step(self, node: fx.Node) -> None:
        meta = node.meta.get("tensor_meta")
        if node.op == "output":
            fx.node.map_arg(node.args, lambda n: self.uf.union(self.vals[n].elem, FIXED) if n in self.vals else None)
            return
        if meta is None:
            return  # sizes, shapes and other Python values
        if node.op == "placeholder":
            if hasattr(meta, "shape"):
                self.vals[node] = _Val(FIXED, None, 1, tuple(meta.shape))
            return
        handler = self.handler(node)
        if handler is None:
            raise self.fail(node, "this operation is not supported")
        if not hasattr(meta, "shape") and node.op != "call_module":
            raise self.fail(node, "it returns several tensors")
        self.vals[node] = handler(tuple(meta.shape) if hasattr(meta, "shape") else ())

    def handler(self, node: fx.Node) -> Callable[[tuple[int, ...]], _Val] | None:
        t = node.target
        first = node.args[0] if node.args else None
        if node.op == "call_module":
            mod = self.gm.get_submodule(str(t))
            return lambda s: self.module(node, mod, s)
        if node.op == "get_attr":
            return lambda s: self.parameter(node, s)
        if node.op == "call_function" and t is operator.getitem:
            return lambda s: self.getitem(node, s)
        if node.op == "call_function" and t in _BINARY or node.op == "call_method" and t in _BINARY_METHODS:
            return lambda s: self.binary(node, s)
        if node.op == "call_function" and t in _ELEMENTWISE_FUNCS | _POOL_FUNCS or (
            node.op == "call_method" and t in _ELEMENTWISE_METHODS
        ):
            pool = t in _POOL_FUNCS
            return lambda s: self.passthrough(node, first, s, pool)
        if (node.op, t) in (("call_function", torch.flatten), ("call_method", "flatten")):
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            return lambda s: self.flatten(node, self.val(node, first), start, end, s)
        if node.op == "call_method" and t in ("view", "reshape") or t is torch.reshape:
            return lambda s: self.reshape(node, self.val(node, first), s)
        if node.op == "call_function" and t in _REDUCE_FUNCS or node.op == "call_method" and t in _REDUCE_METHODS:
            return lambda s: self.reduce(node, self.val(node, first), s)
        return None

    def passthrough(self, node: fx.Node, first: object, shape: tuple[int, ...], pool: bool) -> _Val:
        x = self.val(node, first)
        if pool:
            self.channel(node, x, 1, "pooling")
        return _Val(x.elem, x.ch, x.inner, shape)

    def spec(self) -> PermutationSpec:
        axes = {}
        for key, entries in self.params.items():
            out = []
            for elem, inner in entries:
                if isinstance(elem, tuple):  # head views of an attention module
                    out.append(tuple(Seg(v, inner) for v in elem))
                    continue
                root = None if elem is None else self.uf.find(elem)
                name = None if root in (None, FIXED) else root
                out.append(None if name is None else (name if inner == 1 else Seg(name, inner)))
            axes[key] = tuple(out)
        return PermutationSpec(axes, self.heads)


def _target_name(node: fx.Node) -> str:
    t = node.target
    return getattr(t, "__name__", None) or str(t)


def spec_from_module(
    module: nn.Module,
    example_input: torch.Tensor | tuple[torch.Tensor, ...] | Mapping[str, object],
    *,
    tracer: str = "auto",
) -> PermutationSpec:
    """Derive a permutation spec by tracing ``module`` with ``torch.fx`` or ``torch.export``.

    Parameters
    ----------
    module : a model built from Linear/Conv/Embedding/BatchNorm/LayerNorm layers,
        ``nn.MultiheadAttention``, activations, pooling, flatten, slicing and additions (see the module
        docstring), or (through ``torch.export``) a transformer whose attention splits layer outputs
        into heads, such as Hugging Face BERT, GPT-2 and Llama models (GQA and rotary embeddings
        included).
    example_input : one input, a tuple of positional inputs, or a dict of keyword inputs (e.g.
        ``{"input_ids": ids, "attention_mask": mask}``) to find shapes; the module runs once in eval
        mode, its train/eval mode is restored afterwards and BatchNorm statistics are not updated.
    tracer : ``"auto"`` (default): ``torch.fx`` when it can trace the module, else ``torch.export``
        (and always ``torch.export`` for keyword inputs); ``"fx"``; ``"export"``: also follows
        attention written with head reshapes (``view``, ``transpose``, ``q @ k.transpose``,
        ``scaled_dot_product_attention``). With ``torch.export``, a ``use_cache`` argument of
        ``forward`` is set to ``False`` unless given: a KV cache is not an output.

    Returns
    -------
    PermutationSpec
        Permutations named after the first Linear/Conv writing them (a residual stream is named
        after its first writer); ``num_batches_tracked`` entries are ``()`` (fx). Units that reach
        the outputs are not permuted: for a model that returns its hidden states (``BertModel``)
        that is the residual stream. Head groups are named after the attention module (fx:
        ``nn.MultiheadAttention``; export: the module the attention op runs in).

    Raises
    ------
    InvalidParameterError
        The module cannot be traced (e.g. data-dependent control flow in ``forward``), or uses an
        operation the tracer cannot follow; the error names the graph node and the builder to use
        instead (e.g. ``transformer_spec(model.state_dict(), n_heads=12, layout='bert')``).
    """
    if tracer not in ("auto", "fx", "export"):
        raise InvalidParameterError(
            f"The 'tracer' parameter of spec_from_module must be one of 'auto', 'fx', 'export'. Got {tracer!r} "
            f"instead."
        )
    from weightlens.rebasin._export_trace import builder_hint, spec_from_export

    if isinstance(example_input, Mapping):
        args: tuple = ()
        kwargs = dict(example_input)
    else:
        args, kwargs = (example_input if isinstance(example_input, tuple) else (example_input,)), {}
    if tracer == "export" or kwargs and tracer == "auto":
        return spec_from_export(module, args, kwargs)
    if kwargs:
        raise InvalidParameterError(
            "spec_from_module: tracer='fx' takes a tensor or a tuple of positional inputs; pass keyword inputs "
            "with tracer='export' (or 'auto')."
        )
    try:
        gm = fx.symbolic_trace(module)
    except Exception as exc:  # torch.fx raises many types (TraceError, TypeError, ...)
        if tracer == "auto":
            return spec_from_export(module, args, kwargs, fx_error=exc)
        raise InvalidParameterError(
            f"spec_from_module: torch.fx cannot trace {type(module).__name__} ({type(exc).__name__}: {exc}). "
            f"Pass tracer='export' (or 'auto'). {builder_hint(module)}."
        ) from None
    modes = {m: m.training for m in module.modules()}
    try:
        gm.eval()
        with torch.no_grad():
            ShapeProp(gm).propagate(*args)
    finally:
        for m, mode in modes.items():
            m.train(mode)
    walk = _Tracer(gm)
    for node in gm.graph.nodes:
        walk.step(node)
    spec = walk.spec()
    spec.sizes(module.state_dict())
    return spec
