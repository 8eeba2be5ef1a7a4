"""One registry of merge methods; one decorator; the parameter schema comes from the signature.

A merge method is a plain function ``fn(ctx, key, *, param=default, ...) -> KeyUpdate`` that returns
the *unscaled* update of one tensor key. Its keyword-only parameters, their annotations and defaults
are the method's schema:

* ``float``, ``int``, ``bool``, ``str`` and ``X | None`` are checked by type;
* ``Literal["a", "b"]`` lists the allowed options;
* ``Annotated[float, Interval(0, 1, "right")]`` adds a range.

The coefficient ``alpha`` is declared on the decorator, not on the function: the engine applies it
(``theta = theta_0 + alpha * update``), so a change of ``alpha`` alone reuses every cached update.
The decorator also carries what the rest of the package needs to know of a method: its display name
and citation, the ``alpha`` grid ``sweep`` scores by default, and its mergekit equivalent (written
beside an exported recipe). A method is therefore one file: the CLI, the studio, ``sweep`` and
export read everything from here.

Every real-valued parameter, ``alpha`` included, must also be finite and either 0 or of magnitude
in [1e-6, 1e6] (:data:`MAGNITUDE`): methods multiply by their parameters or divide by them (DARE
rescales by ``1/density``) in float32, and a value outside that range (``alpha=1e300``, a density
of ``1e-300``) gives Inf or NaN weights, not a merge. Values are checked before any tensor is read.

Examples
--------
>>> from typing import Annotated
>>> from weightlens.merge.registry import Interval, KeyUpdate, register_merge, get_method, unregister
>>> @register_merge("demo_scale", alpha=1.0)
... def demo_scale(ctx, key, *, gain: Annotated[float, Interval(0, None, "neither")] = 2.0):
...     return KeyUpdate(gain * ctx.deltas(key).sum(0))
>>> get_method("demo_scale").describe()
'gain=2.0, alpha=1.0'
>>> unregister("demo_scale")
"""

from __future__ import annotations

import inspect
import math
import numbers
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union

import torch

from weightlens.errors import InvalidParameterError
from weightlens.io import recipe as _io_recipe

__all__ = [
    "DECOMPOSITIONS",
    "DEFAULT_GRID",
    "MAGNITUDE",
    "Interval",
    "KeyUpdate",
    "MergeMethod",
    "Param",
    "get_method",
    "list_methods",
    "register_merge",
    "task_top_k",
    "unregister",
]

_REGISTRY: dict[str, MergeMethod] = {}
_RESERVED = ("alpha", "method", "device", "progress", "lazy", "data")  # merge()'s own keywords
_BRACKETS = {"both": "[]", "left": "[)", "right": "(]", "neither": "()"}
#: Magnitudes a real-valued merge parameter may have (besides 0): float32 holds their products.
MAGNITUDE = (1e-6, 1e6)
#: What ``decomposes=`` of :func:`register_merge` may name (per 2-D key; ``wl.plan`` prices each).
DECOMPOSITIONS = ("tasks", "task_tops", "residuals", "sum", "polar", "concat")
#: The ``alpha`` grid of a method that declares none: ``{0.1, 0.2, ..., 3.0}``.
DEFAULT_GRID = tuple(round(0.1 * i, 10) for i in range(1, 31))
#: ``alpha_grid=`` of :func:`register_merge`: a fixed grid, or ``grid(params, n_tasks)``.
Grid = Sequence[float] | Callable[[Mapping[str, Any], int], Sequence[float]]
#: ``per_task=`` of :func:`register_merge`: ``per_task(ctx, key, task, shared) -> KeyUpdate``, the unscaled
#: update of ``key`` in task ``task``'s own model, from the key's shared update ``shared`` (EMR's mask and rescaler).
PerTask = Callable[..., "KeyUpdate"]
#: ``prefetch=`` of :func:`register_merge`: ``prefetch(ctx, key) -> ("tasks", "sum")`` or a part of it.
Prefetch = Callable[..., Sequence[str]]


def task_top_k(shape: tuple[int, ...], n_tasks: int) -> int:
    """How many leading triplets ``"task_tops"`` takes of each task's ``m x n`` matrix: ``floor(r / T)``,
    ``r = min(m, n)`` (TSV-M's share of the rank per task; 0 when ``r < T``)."""
    return min(shape[-2:]) // n_tasks


@dataclass(frozen=True)
class Interval:
    """A range of real numbers; ``None`` is an open end. ``closed`` in {both, left, right, neither}."""

    low: float | None
    high: float | None
    closed: Literal["both", "left", "right", "neither"] = "both"

    def __contains__(self, x: float) -> bool:
        lo_ok = self.low is None or (x >= self.low if self.closed in ("both", "left") else x > self.low)
        hi_ok = self.high is None or (x <= self.high if self.closed in ("both", "right") else x < self.high)
        return lo_ok and hi_ok

    def __str__(self) -> str:
        left, right = _BRACKETS[self.closed]
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        return f"{left}{lo}, {hi}{right}"


@dataclass(frozen=True)
class KeyUpdate:
    """What a method returns for one key.

    Attributes
    ----------
    update : unscaled merged update (fp32, CPU, shape of the key); the engine multiplies by alpha.
    notes : degenerate cases met on this key, one sentence each (reported in ``MergeResult.notes``).
    factors : optional SVD ``(U, S, Vh)`` of ``update`` (``S`` descending, ``p <= min(m, n)`` values:
        the update has rank at most ``p``) for a method that builds its update from orthonormal factors
        anyway (TSV-M, Iso): ``MergeResult.update_svd`` then needs no decomposition (it completes fewer
        than ``min(m, n)`` triplets with zero values and orthogonal directions only when asked).
    task_sum : True when ``update`` is the plain task-arithmetic sum ``ctx.deltas(key).sum(0)`` (task
        arithmetic): ``MergeResult.update_svd`` is then the sum's SVD of ``weightlens.decompositions``, the
        one ``compare`` and ``analyze`` take, decomposed once for all of them.
    """

    update: torch.Tensor
    notes: tuple[str, ...] = ()
    factors: Any = None
    task_sum: bool = False


@dataclass(frozen=True)
class Param:
    """One parameter of a merge method: its default, type, options and range."""

    name: str
    default: Any
    kind: type
    options: tuple[Any, ...] | None = None
    interval: Interval | None = None
    nullable: bool = False
    doc: str = ""

    def expected(self) -> str:
        """Words for what the parameter accepts, for error messages."""
        if self.options is not None:
            text = "one of " + ", ".join(repr(o) for o in self.options)
        elif self.interval is not None:
            text = f"in {self.interval}"
        else:
            text = {float: "a real number", int: "an int", bool: "a bool", str: "a str"}[self.kind]
        return text + (" or None" if self.nullable else "")


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method (see :func:`register_merge`)."""

    name: str
    fn: Callable[..., KeyUpdate] = field(repr=False)
    params: Mapping[str, Param]
    pretty_name: str
    reference: str
    alpha_default: Callable[[Mapping[str, Any], int], float] | None = field(default=None, repr=False)
    prepare: Callable[..., Mapping[str, Any]] | None = field(default=None, repr=False)
    uses_svd: bool = False  # its updates come from SVDs: their last bits vary across devices, LAPACK, threads
    grid: Grid = field(default=DEFAULT_GRID, repr=False)
    mergekit: Callable[[Mapping[str, Any]], _io_recipe.Mergekit | None] | None = field(default=None, repr=False)
    per_task: PerTask | None = field(default=None, repr=False)
    decomposes: tuple[str, ...] = ()  # per matrix key: DECOMPOSITIONS' names (see register_merge)
    passes: Callable[[Mapping[str, Any]], int] | None = field(default=None, repr=False)
    prefetch: Prefetch | None = field(default=None, repr=False)
    needs_data: str = ""  # what the method computes from merge(data=...); empty: it needs none

    def reading_passes(self, params: Mapping[str, Any]) -> int:
        """Whole-model passes over the inputs besides the merge's own (its ``prepare``'s, its export's):
        declared, else 1 with a ``prepare`` hook and 0 without."""
        if self.passes is not None:
            return int(self.passes({**self.defaults(), **params}))
        return 0 if self.prepare is None else 1

    def alpha_grid(self, params: Mapping[str, Any], n_tasks: int) -> list[float]:
        """The default ``alpha`` grid for ``params`` (unknown names ignored, the rest defaulted)."""
        if not callable(self.grid):
            return list(self.grid)
        given = {**self.defaults(), **{k: v for k, v in params.items() if k in self.params}}
        return list(self.grid(given, n_tasks))

    def defaults(self) -> dict[str, Any]:
        """``{param: default}`` in signature order, ``alpha`` last."""
        return {p.name: p.default for p in self.params.values()}

    def describe(self) -> str:
        """``"density=0.2, scope='global', ..."``: the parameters and their defaults (then ``"; needs data=..."``
        for a data-based method)."""
        text = ", ".join(f"{p.name}={p.doc or repr(p.default)}" for p in self.params.values())
        return text + (f"; needs data= ({self.needs_data})" if self.needs_data else "")

    def resolve(self, params: Mapping[str, Any], n_tasks: int) -> dict[str, Any]:
        """Check ``params`` against the schema and fill defaults (``alpha`` resolved to a float)."""
        unknown = [k for k in params if k not in self.params]
        if unknown:
            raise InvalidParameterError(
                f"Unknown parameter(s) {', '.join(map(repr, unknown))} for merge method {self.name!r}. "
                f"Valid parameters (defaults): {self.describe()}."
            )
        out = self.defaults()
        for name, value in params.items():
            out[name] = _check_value(self, self.params[name], value)
        if out["alpha"] is None:
            out["alpha"] = float(self.alpha_default(out, n_tasks)) if self.alpha_default else 1.0
        return out


def _check_value(method: MergeMethod, p: Param, value: Any) -> Any:
    if value is None and p.nullable:
        return None
    ok = _type_ok(p.kind, value)
    if ok and p.options is not None:
        ok = value in p.options
    if ok and p.kind is float:
        ok = math.isfinite(float(value)) and (p.interval is None or float(value) in p.interval)
    if ok and p.kind is int:  # compared as ints: a huge int has no float
        ok = p.interval is None or int(value) in p.interval
    if not ok:
        raise InvalidParameterError(
            f"The {p.name!r} parameter of {method.name} must be {p.expected()}. Got {value!r} instead."
        )
    if p.kind is float:
        _check_magnitude(method, p, float(value))
    return float(value) if p.kind is float else int(value) if p.kind is int else value


def _check_magnitude(method: MergeMethod, p: Param, value: float) -> None:
    """Refuse a real value that is neither 0 nor of magnitude in :data:`MAGNITUDE`."""
    low, high = MAGNITUDE
    if value == 0 or low <= abs(value) <= high:
        return
    raise InvalidParameterError(
        f"The {p.name!r} parameter of {method.name} is {value!r}: real-valued merge parameters must be 0 or "
        f"of magnitude in [{low:g}, {high:g}] (the merge computes in float32 and would give Inf or NaN "
        f"weights). Pass a value in that range (the default is {p.doc or repr(p.default)})."
    )


def _type_ok(kind: type, value: Any) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind is float:
        return isinstance(value, numbers.Real)
    if kind is int:
        return isinstance(value, numbers.Integral)
    return isinstance(value, kind)


# --------------------------------------------------------------------------------------------- schema
def _unpack(annotation: Any, where: str) -> tuple[type, tuple | None, Interval | None, bool]:
    """``(kind, options, interval, nullable)`` from one annotation."""
    interval = None
    if typing.get_origin(annotation) is Annotated:
        annotation, *meta = typing.get_args(annotation)
        interval = next((m for m in meta if isinstance(m, Interval)), None)
    nullable = False
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        nullable = len(args) < len(typing.get_args(annotation))
        if len(args) != 1:
            raise TypeError(f"{where}: only 'X | None' unions are supported, got {annotation!r}.")
        annotation = args[0]
    if typing.get_origin(annotation) is Literal:
        options = typing.get_args(annotation)
        kinds = {type(o) for o in options}
        if len(kinds) != 1:
            raise TypeError(f"{where}: Literal options must share one type, got {options!r}.")
        return kinds.pop(), options, interval, nullable
    if annotation not in (float, int, bool, str):
        raise TypeError(f"{where}: unsupported annotation {annotation!r} (use float, int, bool, str, Literal).")
    return annotation, None, interval, nullable


def _param_hints(fn: Callable[..., Any], name: str) -> dict[str, Any]:
    """Resolved annotations of the parameters (the return annotation is not needed, nor evaluated)."""
    ann = {k: v for k, v in getattr(fn, "__annotations__", {}).items() if k != "return"}
    holder = types.SimpleNamespace(__annotations__=ann, __globals__=getattr(fn, "__globals__", {}))
    try:
        return typing.get_type_hints(holder, include_extras=True)
    except NameError as err:
        raise TypeError(f"Merge method {name!r}: cannot resolve a parameter annotation ({err}); "
                        "import the names it uses at module level.") from None


def _schema(fn: Callable[..., Any], name: str, alpha: float | None, alpha_doc: str) -> dict[str, Param]:
    sig = inspect.signature(fn)
    hints = _param_hints(fn, name)
    positional = [p for p in sig.parameters.values() if p.kind is not p.KEYWORD_ONLY]
    if [p.name for p in positional] != ["ctx", "key"]:
        raise TypeError(
            f"Merge method {name!r}: the signature must start with (ctx, key, *, ...); "
            f"got ({', '.join(p.name for p in positional)})."
        )
    params: dict[str, Param] = {}
    for p in sig.parameters.values():
        if p.kind is not p.KEYWORD_ONLY:
            continue
        where = f"Merge method {name!r}, parameter {p.name!r}"
        if p.name == "alpha":
            raise TypeError(f"{where}: declare alpha on @register_merge(alpha=...), not in the signature.")
        if p.name in _RESERVED:
            raise TypeError(f"{where}: the name is reserved for merge() itself ({', '.join(_RESERVED)}).")
        if p.default is p.empty or p.name not in hints:
            raise TypeError(f"{where}: every parameter needs an annotation and a default.")
        kind, options, interval, nullable = _unpack(hints[p.name], where)
        params[p.name] = Param(p.name, p.default, kind, options, interval, nullable)
    params["alpha"] = Param("alpha", alpha, float, nullable=alpha is None, doc=alpha_doc)
    return params


def register_merge(
    name: str,
    *,
    alpha: float | None = 1.0,
    alpha_default: Callable[[Mapping[str, Any], int], float] | None = None,
    alpha_doc: str = "",
    pretty_name: str | None = None,
    reference: str = "",
    prepare: Callable[..., Mapping[str, Any]] | None = None,
    uses_svd: bool = False,
    alpha_grid: Grid = DEFAULT_GRID,
    mergekit: Callable[[Mapping[str, Any]], _io_recipe.Mergekit | None] | None = None,
    per_task: PerTask | None = None,
    decomposes: Sequence[str] = (),
    passes: Callable[[Mapping[str, Any]], int] | None = None,
    prefetch: Prefetch | None = None,
    needs_data: str = "",
) -> Callable[[Callable[..., KeyUpdate]], Callable[..., KeyUpdate]]:
    """Register a merge method under ``name``; the schema comes from the function's signature.

    Parameters
    ----------
    name : str
        Registry name, e.g. ``"ties"``. A second registration of the same name raises.
    alpha : float or None, default=1.0
        Default coefficient. ``None`` means "computed": ``alpha_default(params, n_tasks)``.
    alpha_default : callable, optional
        Computes alpha when it is None (e.g. ``1/T`` for STAR).
    alpha_doc : str
        How the default reads in messages, e.g. ``"1/T"``.
    pretty_name, reference : str
        Display name and citation.
    prepare : callable, optional
        ``prepare(ctx, **params) -> Mapping`` computes whole-model statistics (e.g. the TIES global
        thresholds) before any key is merged; the engine exposes the result as ``ctx.state``.
    uses_svd : bool
        The updates are built from SVDs, whose last bits depend on the device, the LAPACK build and
        the CPU thread count (a recipe's re-run says so when its weights differ).
    alpha_grid : sequence of float, or callable
        The grid ``sweep`` scores when given no ``alphas``: a fixed grid, or ``grid(params, n_tasks)``
        (``params``: the method's defaults updated with the sweep's). Default :data:`DEFAULT_GRID`.
    mergekit : callable, optional
        ``mergekit(recipe_params) -> weightlens.io.recipe.Mergekit | None``: mergekit's method name
        and parameters equivalent to a recipe of this method (``None``: no equivalent for these
        parameters). Export then writes ``mergekit_config.yml`` beside the recipe.
    per_task : callable, optional
        ``per_task(ctx, key, task, shared) -> KeyUpdate``: the method gives one model per task besides the
        shared one (EMR-Merging). ``shared`` is the key's update from the method function (cached); the
        hook returns the unscaled update of ``key`` in task ``task``'s model, which the engine scales by
        ``alpha`` like the shared one. ``MergeResult.for_task(task)`` reads it; ``sweep`` scores each
        task on its own model.
    decomposes : sequence of str, default=()
        The decompositions the method computes per 2-D key, for ``wl.plan``: ``"tasks"`` (a thin SVD of
        each task's ``m x n`` matrix, cached in ``tv.cache``), ``"task_tops"`` (each task's leading
        ``floor(r / T)`` triplets, ``MergeContext.task_top``: TSV-M), ``"residuals"`` (one of each task's
        matrix less a common part, its leading triplets cached by the method: Iso-CTS), ``"sum"`` (one of the
        task-arithmetic sum), ``"polar"`` (orthogonal polar factors of the ``m x r`` and ``n x r`` stacked directions), ``"concat"`` (one float64 SVD of
        the ``m x T n`` concatenation of the tasks).
    passes : callable, optional
        ``passes(params) -> int``: whole-model reading passes besides the merge's own (``prepare``'s, and
        any an export of the result makes), for ``wl.plan``; default 1 with a ``prepare`` hook, 0 without.
    prefetch : callable, optional
        ``prefetch(ctx, key) -> sequence of {"tasks", "sum"}``: the cached SVDs the method reads at ``key``
        through ``ctx.task_svd`` / ``ctx.sum_svd`` (empty where it decomposes nothing). The engine's walks
        (``materialize``, ``export``) then compute them ahead, batched by shape, where
        ``weightlens.config.batch`` asks for it (``weightlens.decompositions.ahead``; on CUDA by default).
    needs_data : str, default=""
        What the method computes from ``merge(..., data=MergeData)`` (e.g. ``"the input Gram matrices of each
        linear layer"``); non-empty marks a data-based method: ``merge`` without ``data`` raises, naming it,
        and ``sweep``, the what-if and the studio pass the data they were given or leave the method out.

    Raises
    ------
    InvalidParameterError
        If ``name`` is already registered.
    TypeError
        If the signature is not ``(ctx, key, *, annotated params with defaults)``.
    """

    def decorator(fn: Callable[..., KeyUpdate]) -> Callable[..., KeyUpdate]:
        if name in _REGISTRY:
            raise InvalidParameterError(
                f"A merge method named {name!r} is already registered ({_REGISTRY[name].fn.__module__}."
                f"{_REGISTRY[name].fn.__qualname__}); choose another name or unregister it first."
            )
        params = _schema(fn, name, alpha, alpha_doc)
        unknown = sorted(set(decomposes) - set(DECOMPOSITIONS))
        if unknown:
            raise TypeError(f"Merge method {name!r}: unknown decomposes= entries {unknown}; "
                            f"use {', '.join(DECOMPOSITIONS)}.")
        _REGISTRY[name] = MergeMethod(name, fn, params, pretty_name or name, reference, alpha_default, prepare,
                                      uses_svd, alpha_grid, mergekit, per_task, tuple(decomposes), passes,
                                      prefetch, needs_data)
        return fn

    return decorator


def unregister(name: str) -> None:
    """Remove a method from the registry (for tests and plugins)."""
    get_method(name)
    del _REGISTRY[name]


def get_method(name: str) -> MergeMethod:
    """The registered method ``name``; an unknown name lists the valid ones."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise InvalidParameterError(
            f"Unknown merge method {name!r}. Available: {', '.join(list_methods())}."
        )
    return _REGISTRY[name]


def list_methods() -> list[str]:
    """Names of the registered merge methods, in registration order."""
    return list(_REGISTRY)


def mergekit_of(name: str, params: Mapping[str, Any], merged: Any = None) -> _io_recipe.Mergekit | None:
    """mergekit's equivalent of method ``name`` with ``params``, from its registration (``None``: none,
    no such method, or ``alpha``/``density`` that are not numbers, as in a recipe no merge accepted).

    A translation that takes ``merged`` (the merge result, when there is one) may measure how far
    mergekit's nearest config is from it (TIES with ``scope="global"``)."""
    method = _REGISTRY.get(name)
    numbers = [params.get(k, 1.0) for k in ("alpha", "density")]
    if method is None or method.mergekit is None or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers):
        return None
    if merged is not None and "merged" in inspect.signature(method.mergekit).parameters:
        return method.mergekit(params, merged=merged)
    return method.mergekit(params)
