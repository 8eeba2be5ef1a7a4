"""The merge engine: one walk over the keys, one cached unscaled update per key, then base + alpha * update.

``merge`` resolves the method and its parameters against the registry, runs the method's
``prepare`` hook when it has one (whole-model statistics: the TIES global thresholds and majority
sign, found in streaming passes before any key is merged) and returns a :class:`MergeResult`. When
a task-vector key is read, the result asks the method for the *unscaled* update (cached in
``tv.cache`` under the method, its parameters other than ``alpha``, the task set and the device) and
returns ``base + alpha * update`` cast back to the base dtype. Keys outside ``tv.keys`` (integer
buffers, excluded keys) are copied from the base. Hence:

* a second call that changes only ``alpha`` costs one scale-and-add per key;
* a call with another spectral method reuses the per-task and per-sum SVDs (same cache as analysis);
* ``merge`` itself computes no key: the result computes a key when it is read. Indexing keeps what
  it computed (a second read is free); ``wl.export`` reads through :meth:`MergeResult.peek`, which
  keeps nothing and caches no update, so the documented ``merge`` then ``export`` holds one merged
  key at a time (plus one key of every input while the merge computes it, and ``tv.cache``);
* ``merge(..., lazy=True)`` keeps nothing on indexing either (for streaming readers other than
  ``export``); :meth:`MergeResult.materialize` computes and keeps every key at once;
* on CUDA (``weightlens.config.batch``) the walks of ``materialize`` and ``export`` compute the SVDs a method
  declares (``register_merge(prefetch=)``) ahead, a window of keys at a time, batched by shape
  (``weightlens.decompositions.ahead``); indexing one key does not.

A method registered with ``per_task=`` (EMR-Merging) gives one model per task besides the shared one:
:meth:`MergeResult.for_task` returns task ``t``'s model as another ``MergeResult`` whose key updates are
the hook's (computed from the shared update of the key when read, cached per task), scaled by the same
``alpha``; everything that reads a merge result (indexing, ``peek``, ``update``, ``compare``, export)
reads it unchanged.

``merge(..., executor="ray")`` runs the per-key work of :meth:`MergeResult.materialize` and of
``wl.export`` (:meth:`MergeResult.stream`) as Ray tasks (``weightlens._executor``), bitwise the serial
result; what a task caches comes back to ``tv.cache`` as the serial path would have cached it. One
key read by indexing is computed here.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from weightlens import decompositions, linalg
from weightlens._executor import check_executor, map_keys
from weightlens._progress import bar
from weightlens.errors import InvalidParameterError, KeyMismatchError, ShapeMismatchError, WeightlensError
from weightlens.linalg.factored import complete_basis
from weightlens.merge.registry import KeyUpdate, MergeMethod, get_method, list_methods
from weightlens.merged import MergedWeights
from weightlens.taskvectors import TaskVectors

__all__ = ["MergeContext", "MergeResult", "check_data", "merge", "task_vectors_of"]


@dataclass
class MergeContext:
    """What a merge method sees: the task vectors, the compute device and cached helpers.

    Methods read data only through this object, so every decomposition lands in the shared cache.
    ``state`` holds the method's whole-model statistics (its ``prepare`` hook, run once per merge).
    """

    tv: TaskVectors
    device: torch.device
    method: str
    params: Mapping[str, Any] = field(default_factory=dict)
    state: Mapping[str, Any] = field(default_factory=dict)
    data: Any = None  # the MergeData of a data-based method (weightlens.merge.data), else None

    @property
    def tasks(self) -> tuple[str, ...]:
        """Task names, in order."""
        return tuple(self.tv.names)

    @property
    def n_tasks(self) -> int:
        """Number of tasks T."""
        return len(self.tv)

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of ``key``."""
        return self.tv.shape(key)

    def is_matrix(self, key: str) -> bool:
        """True for 2-D float keys (the parameter class ``"matrix"``)."""
        return self.tv.kind(key) == "matrix"

    def deltas(self, key: str) -> torch.Tensor:
        """Stacked task vectors of ``key``: ``(T, *shape)``, fp32, CPU (a fresh tensor)."""
        return self.tv.deltas(key)

    def delta(self, task: str, key: str) -> torch.Tensor:
        """One task vector of ``key``, fp32, CPU."""
        return self.tv.delta(task, key)

    def task_svd(self, task: str, key: str) -> linalg.SVD:
        """Thin SVD of one task matrix (shared cache; factors on ``self.device``)."""
        return decompositions.svd(self.tv, key, task, device=self.device)

    def task_top(self, task: str, key: str, k: int) -> linalg.SVD:
        """Leading ``k`` singular triplets of one task matrix (shared cache; factors on ``self.device``).

        On the CPU by :func:`weightlens.decompositions.topk_svd` with ``method="eigh"``: the float64 Gram
        eigensolve of the smaller side, then ``A V / S`` (1.4-1.8x faster than a full SVD on MiniLM and
        ViT-B/32 shapes, 2 threads; a full SVD where ``sigma_k <= 1e-4 sigma_1``, which the Gram matrix does not
        resolve); on CUDA sliced from :meth:`task_svd` (``gesvda``, batched ahead). The route depends on the
        device and the matrix alone, never on what ``tv.cache`` holds, so a merge's bits are the same whatever
        ran before it. LoRA factors: as :meth:`task_svd`.
        """
        if self.device.type == "cpu":
            return decompositions.topk_svd(self.tv, key, task, k, device=self.device, method="eigh")
        U, S, Vh = self.task_svd(task, key)
        return linalg.SVD(U[..., :k], S[..., :k], Vh[..., :k, :])

    def sum_svd(self, key: str) -> linalg.SVD:
        """Thin SVD of the task-arithmetic sum over this context's tasks (shared cache)."""
        return decompositions.svd(self.tv, key, self.tasks, device=self.device)

    def zero_tasks(self, key: str) -> tuple[str, ...]:
        """Tasks whose task vector of ``key`` is exactly zero (e.g. a frozen layer); cached."""

        def compute() -> tuple[str, ...]:
            flat = self.deltas(key).reshape(self.n_tasks, -1)
            zero = (flat == 0).all(1).tolist() if flat.shape[1] else [True] * self.n_tasks
            return tuple(t for t, z in zip(self.tasks, zero) if z)

        return self.tv.cache.get_or_compute(("zero_tasks", self.tasks, key), compute)

    def cache_key(self, tag: tuple[Any, ...]) -> tuple[Any, ...]:
        """Where :meth:`cached` keeps the value of ``tag`` in ``tv.cache``."""
        return ("merge", *tag, self.tasks, str(self.device))

    def cached(self, tag: tuple[Any, ...], compute: Callable[[], Any], *, store: bool = True) -> Any:
        """``compute()`` cached in ``tv.cache`` under ``("merge", *tag, tasks, device)``.

        ``store=False`` takes a cached value but does not store a computed one.
        """
        return self.tv.cache.get_or_compute(self.cache_key(tag), compute, store=store)

    def once(self, tag: tuple[Any, ...], compute: Callable[[], Any]) -> Any:
        """A whole-model statistic: cached per ``tag``, task set and selected keys."""
        return self.cached(("global", *tag, tuple(self.tv.keys)), compute)


class MergeResult(MergedWeights):
    """Full merged weights (``Mapping[str, Tensor]``) with the notes and updates behind them.

    Every base key maps to ``base + alpha * update`` in the base dtype (keys outside ``tv.keys``:
    a copy of the base tensor). Nothing is computed until a key is read. Reading ``result[key]``
    computes that key and, unless the result is ``lazy``, keeps it (a second read returns the same
    tensor); :meth:`peek` computes a key without keeping it (what ``wl.export`` reads, so an export
    holds one merged key at a time); :meth:`materialize` computes and keeps every key. The unscaled
    update of a key read by indexing is cached in ``tv.cache``.

    Attributes
    ----------
    method : str
        Registry name of the method.
    spec : MergeMethod
        The registry entry: ``pretty_name``, ``reference``, parameter schema.
    params : dict
        Every parameter of the method, defaults filled in, ``alpha`` resolved to a float.
    task_vectors : TaskVectors
        The task vectors that were merged (``compare`` uses them).
    lazy : bool
        True while indexing keeps nothing (``merge(..., lazy=True)``, until :meth:`materialize`).
    executor : {"local", "ray"}
        Where :meth:`materialize` and ``wl.export`` run the per-key work (``merge(..., executor=)``).
    head : str or None
        The fine-tune whose head (keys only it has) ``wl.export`` carries; None by default (the base's
        layout). Set with :meth:`with_head`.
    task : str or None
        The task whose own model these weights are (:meth:`for_task`); None for the merged model itself
        (for a per-task method: the shared model).
    """

    def __init__(self, ctx: MergeContext, spec: MergeMethod, params: dict[str, Any], *, lazy: bool,
                 progress: bool | None = None, executor: str = "local") -> None:
        self._ctx, self.spec = ctx, spec
        self.executor = executor
        self.method = spec.name
        self.params = dict(params)
        self.task_vectors = ctx.tv
        self.lazy = lazy
        self._progress = progress
        # the key set matters too: whole-model statistics (TIES global) depend on it; so does the data
        used = () if ctx.data is None else (("data", ctx.data.fingerprint(ctx.tasks)),)
        self._frozen = (*sorted(ctx.params.items()), *used, ("keys", hash(tuple(ctx.tv.keys))))
        self._selected = set(ctx.tv.keys)
        self._keys = list(ctx.tv.base.keys())
        self._weights: dict[str, torch.Tensor] = {}
        self._notes: dict[str, tuple[str, ...]] = {}  # per key whose update was computed: a few strings
        self.head: str | None = None  # the fine-tune whose head an export carries (with_head)
        self.task: str | None = None  # the task whose own model this is (for_task)

    # ---------------------------------------------------------------- Mapping
    def __getitem__(self, key: str) -> torch.Tensor:
        held = self._weights.get(key)
        if held is not None:
            return held
        tensor = self._compute(key, store=True)
        if not self.lazy:
            self._weights[key] = tensor
        return tensor

    def peek(self, key: str) -> torch.Tensor:
        """``self[key]`` without keeping it: the kept tensor when indexing kept one, else computed.

        Neither the tensor nor its update is stored (an update already in ``tv.cache`` is used), so
        a reader that visits every key once (``wl.export``) holds one merged key at a time. The
        key's notes are recorded (:attr:`notes` does not recompute them).
        """
        held = self._weights.get(key)
        return held if held is not None else self._compute(key, store=False)

    def _compute(self, key: str, *, store: bool) -> torch.Tensor:
        if key not in self._selected:
            if key not in self.task_vectors.base:
                raise KeyMismatchError(f"Key {key!r} is not in the merged model (the base's keys).")
            return self.task_vectors.base[key].clone()
        update = self._key_update(key, store=store).update
        return _full(self.task_vectors.base_wide(key), update, self.alpha, self.task_vectors.base.dtype(key))

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self.task_vectors.base

    # ---------------------------------------------------------------- merge
    def key_update(self, key: str) -> KeyUpdate:
        """The method's unscaled update and notes for one task-vector key (cached in ``tv.cache``)."""
        return self._key_update(key, store=True)

    def _key_update(self, key: str, *, store: bool) -> KeyUpdate:
        if key not in self._selected:
            raise KeyMismatchError(
                f"Key {key!r} received no update in this {self.method} merge (it is "
                f"{'copied from the base' if key in self else 'not in the model'}); "
                f"updated keys are the task vectors' keys ({len(self._selected)})."
            )
        ctx, spec, task = self._ctx, self.spec, self.task
        frozen = self._frozen[:-1] if task is not None else self._frozen  # the shared model's
        shared = ctx.cached(("update", spec.name, frozen, key), lambda: _checked(spec, ctx, key), store=store)
        ku = shared if task is None else ctx.cached(
            ("update", spec.name, self._frozen, key), lambda: _checked_task(spec, ctx, key, task, shared), store=store)
        self._notes[key] = ku.notes
        return ku

    def materialize(self, *, progress: bool | None = None, executor: str | None = None) -> MergeResult:
        """Compute and keep every key now (one walk over the base keys); returns ``self``.

        ``progress`` shows a bar over the keys (default: the ``progress`` given to ``merge``);
        ``executor`` runs the per-key work (default: the ``executor`` given to ``merge``).
        """
        self.lazy = False
        show = self._progress if progress is None else progress
        keys = [k for k in self._keys if k not in self._weights]
        walk = self._stream(keys, store=True, executor=executor)
        for key, tensor in bar(walk, progress=show, desc=f"merge {self.method}", unit="key", total=len(keys)):
            self._weights[key] = tensor
        return self

    def stream(self, keys: list[str] | None = None, *,
               executor: str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """``(key, self.peek(key))`` for ``keys`` (default: every key) in order, keeping nothing.

        What ``wl.export`` reads. ``executor`` (default: the ``executor`` given to ``merge``) runs the
        keys whose update is not cached yet; with ``"ray"`` a few keys are computed ahead of the reader.
        """
        return self._stream(list(self._keys) if keys is None else list(keys), store=False, executor=executor)

    def _stream(self, keys: list[str], *, store: bool, executor: str | None) -> Iterator[tuple[str, torch.Tensor]]:
        executor = check_executor(self.executor if executor is None else executor, caller="MergeResult")
        ctx, read = self._ctx, (self.__getitem__ if store else self.peek)
        remote = set()
        if executor != "local":
            remote = {k for k in keys if k in self._selected and k not in self._weights
                      and ctx.cache_key(("update", self.spec.name, self._frozen, k)) not in ctx.tv.cache}
        ordered = [k for k in keys if k in remote]
        payload = (ctx, self.spec, self._frozen, store)
        done = map_keys(_remote_update, ordered, executor=executor, shared=payload,
                        gpus=1 if ctx.device.type == "cuda" else 0)
        ahead = self._ahead(keys) if executor == "local" else None
        for key in keys:
            if key not in remote:
                if ahead is not None:
                    ahead(key)
                yield key, read(key)
                continue
            _, (ku, entries) = next(done)
            for tag, value in entries:  # what the task cached, where the serial path caches it
                ctx.tv.cache.get_or_compute(tag, lambda value=value: value)
            self._notes[key] = ku.notes
            tv = self.task_vectors
            yield key, _full(tv.base_wide(key), ku.update, self.alpha, tv.base.dtype(key))

    def _ahead(self, keys: list[str]) -> Callable[[str], None] | None:
        """The hook that computes the method's cached SVDs ahead of the walk over ``keys``, batched by shape
        (``register_merge(prefetch=)``, ``weightlens.config.batch``), or None."""
        ctx, spec = self._ctx, self.spec
        if spec.prefetch is None:
            return None
        frozen = self._frozen[:-1] if self.task is not None else self._frozen

        def need(key: str) -> tuple[str, ...]:
            if (key not in self._selected or key in self._weights
                    or ctx.cache_key(("update", spec.name, frozen, key)) in ctx.tv.cache):
                return ()
            return tuple(spec.prefetch(ctx, key))

        return decompositions.ahead(ctx.tv, keys, need, device=ctx.device)

    @property
    def state(self) -> Mapping[str, Any]:
        """The method's whole-model statistics (its ``prepare`` hook's result, e.g. TIES' thresholds)."""
        return self._ctx.state

    @property
    def data(self) -> Any:
        """The ``MergeData`` a data-based method read (``regmean``, ``fisher``); None for the others."""
        return self._ctx.data

    @property
    def alpha(self) -> float:
        """The coefficient the unscaled updates were multiplied by."""
        return float(self.params["alpha"])

    @property
    def updated_keys(self) -> list[str]:
        """Keys that received an update (the task vectors' keys), in order."""
        return [k for k in self._keys if k in self._selected]

    def update(self, key: str) -> torch.Tensor:
        """The merged update ``alpha * u`` of ``key`` in fp32 (before adding the base and casting)."""
        return self.alpha * self.key_update(key).update

    def update_svd(self, key: str) -> linalg.SVD:
        """Thin SVD of :meth:`update` for a matrix key; the unscaled factors are cached in ``tv.cache``.

        A call on a merge that differs only in ``alpha`` reuses them (``S`` scales by ``|alpha|``).
        Methods that build their update from orthonormal factors (TSV-M, Iso-C, Iso-CTS) hand them
        over (``KeyUpdate.factors``): no decomposition at all. For Iso's flat spectra the leading
        columns are then the method's own ordering (the sum's, for Iso-C), not an arbitrary basis.
        """
        ku = self.key_update(key)
        ctx = self._ctx
        if ku.factors is not None:  # the method built its update from these (TSV-M, Iso)
            U, S, Vh = ctx.cached(("update_svd_completed", self.method, self._frozen, key),
                                  lambda: _completed(ku.factors, min(ctx.shape(key))))
        elif self._dense_task_sum(ku, key):  # the same decomposition as compare's task-arithmetic side and
            U, S, Vh = decompositions.svd(ctx.tv, key, ctx.tasks, device=ctx.device, delta=ku.update)  # analyze's
        else:
            U, S, Vh = ctx.cached(("update_svd", self.method, self._frozen, key),
                                  lambda: linalg.svd(ku.update, device=ctx.device, name=key))
        a = self.alpha
        return linalg.SVD(U, abs(a) * S, Vh if a >= 0 else -Vh)

    def update_left(self, key: str) -> linalg.SVD | linalg.LeftSVD:
        """What projections onto the merged update's leading directions need (``compare``, ``diagnose``), for a
        matrix key: its left singular vectors and values, without ``Vh`` when that saves work.

        :meth:`update_svd` where that needs no decomposition of its own (the method handed over its factors)
        or shares one (a task sum: the sum's SVD, also compare's task-arithmetic side and analyze's); else the
        left side ``U diag(S)``, ``S`` (:class:`~weightlens.linalg.LeftSVD`) from an eigensolve of the
        update's float64 Gram matrix (:func:`weightlens.linalg.left_svd`, about 0.6x an SVD's time), cached
        like :meth:`update_svd`'s factors (unscaled). One route per method, whatever the cache holds: the
        figures built on it do not change with what was computed before.
        """
        ku = self.key_update(key)
        if ku.factors is not None or self._dense_task_sum(ku, key):
            return self.update_svd(key)
        ctx = self._ctx
        US, S = ctx.cached(("update_left_svd", self.method, self._frozen, key),
                           lambda: linalg.left_svd(ku.update, device=ctx.device, name=key))
        a = abs(self.alpha)
        return linalg.LeftSVD(a * US, a * S)

    def _dense_task_sum(self, ku: KeyUpdate, key: str) -> bool:
        """Whether ``key``'s update is the task sum with a full fine-tune in it: then its SVD is the sum's of
        :mod:`weightlens.decompositions`, shared (adapters alone: that would come from their factors)."""
        return ku.task_sum and any(self._ctx.tv.factors(t, key) is None for t in self._ctx.tasks)

    @property
    def notes(self) -> Any:
        """Degenerate cases per key as a DataFrame (``key``, ``method``, ``note``).

        Complete: the notes of keys already computed (read, peeked, exported) are recorded; the
        updates of the others are computed (and cached) here.
        """
        import pandas as pd

        def notes_of(key: str) -> tuple[str, ...]:
            known = self._notes.get(key)
            return known if known is not None else self.key_update(key).notes

        rows = [{"key": k, "method": self.method, "note": n} for k in self.updated_keys for n in notes_of(k)]
        return pd.DataFrame(rows, columns=["key", "method", "note"])

    @property
    def recipe(self) -> dict[str, Any]:
        """``{"method": ..., "params": ..., "tasks": [...]}``: enough to repeat the merge."""
        return {"method": self.method, "params": dict(self.params), "tasks": list(self.task_vectors.names)}

    @property
    def device(self) -> str:
        """The device the merge computes on (``"cpu"``, ``"cuda:0"``)."""
        return str(self._ctx.device)

    def export_recipe(self, recipe: Any = None, **options: Any) -> Any:
        """What an export of this result writes about it (an ``ExportRecipe``, built by
        :func:`weightlens.merge.recipes.export_recipe` with export's options)."""
        from weightlens.merge.recipes import export_recipe

        return export_recipe(self, recipe, **options)

    def with_head(self, task: str | None) -> MergeResult:
        """The same merged weights, exported with fine-tune ``task``'s head (``None``: none, the base's layout).

        ``wl.export(merged.with_head("sst2"), out)`` writes the merged keys under that fine-tune's names
        (``tv.key_maps``, reversed), its keys that the base lacks (``tv.extras["sst2"]``, e.g. a classifier)
        and its ``config.json`` (architectures, labels), so the folder loads as that fine-tune's model class.
        The copy shares the merged keys already kept and the cache; ``self`` is unchanged.
        """
        from weightlens.merge.recipes import check_head

        check_head(self, task)
        new = copy.copy(self)
        new.head = task
        return new

    @property
    def has_task_models(self) -> bool:
        """True when the method gives each task its own model (``for_task``), e.g. EMR-Merging."""
        return self.spec.per_task is not None

    def for_task(self, task: str) -> MergeResult:
        """Task ``task``'s own model, for a method that gives one per task (:attr:`has_task_models`).

        A ``MergeResult`` of full weights ``base + alpha * u_t`` with ``u_t`` the method's per-task update
        (EMR: ``lambda_t * M_t * tau_uni``), each key computed when read (its update cached in ``tv.cache``
        per task). It shares the method's whole-model statistics and the shared updates with ``self``
        (which stays the shared model); ``wl.export`` of it writes that task's model (without a recipe:
        a recipe re-runs the shared model).

        Raises
        ------
        InvalidParameterError
            If the method gives one model for all tasks, or ``task`` is not one of the merged tasks.
        """
        if self.spec.per_task is None:
            raise InvalidParameterError(
                f"for_task: merge method {self.method!r} gives one model for all tasks; per-task models come "
                f"from methods registered with per_task= ({', '.join(_per_task_methods()) or 'none'})."
            )
        if task not in self.task_vectors.names:
            raise InvalidParameterError(
                f"The 'task' parameter of for_task must be one of the merged tasks "
                f"({', '.join(self.task_vectors.names)}). Got {task!r} instead."
            )
        new = copy.copy(self)
        shared = self._frozen[:-1] if self.task is not None else self._frozen
        new.task, new._frozen = task, (*shared, ("task", task))
        new._weights, new._notes = {}, {}
        return new

    def export_layout(self) -> Any:
        """What an export writes beside the merged keys: head and vocabulary (an ``io._layout.ExportLayout``,
        built by :func:`weightlens.merge.recipes.export_layout`)."""
        from weightlens.merge.recipes import export_layout

        return export_layout(self)

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        state = "lazy" if self.lazy else f"{len(self._weights)} of {len(self)} held"
        task = "" if self.task is None else f", task {self.task!r}"
        return (f"MergeResult({self.method}{task}: {shown}; {len(self)} keys, {len(self._selected)} updated, "
                f"{state})")


def task_vectors_of(base_or_tv: Any, finetuned: Any = None) -> TaskVectors:
    """``base_or_tv`` when it is a TaskVectors (then ``finetuned`` must be None), else a new one."""
    if isinstance(base_or_tv, TaskVectors):
        if finetuned is not None:
            raise InvalidParameterError(
                "merge() got TaskVectors and fine-tuned checkpoints; pass either merge(tv, method=...) "
                "or merge(base, finetuned, method=...)."
            )
        return base_or_tv
    if finetuned is None:
        raise InvalidParameterError(
            "merge() needs the fine-tuned checkpoints: merge(base, finetuned, method=...) or "
            "merge(TaskVectors(base, finetuned), method=...)."
        )
    return TaskVectors(base_or_tv, finetuned)


def merge(
    base_or_tv: Any,
    finetuned: Any = None,
    *,
    method: str,
    device: str | torch.device = "auto",
    progress: bool | None = None,
    lazy: bool = False,
    executor: str = "local",
    data: Any = None,
    **params: Any,
) -> MergeResult:
    """Merge fine-tunes of one base model; returns the full merged weights.

    Parameters
    ----------
    base_or_tv : TaskVectors or any source ``wl.load`` accepts
        The task vectors, or the base checkpoint (then give ``finetuned``). Pass TaskVectors to
        reuse decompositions across calls: they live in ``tv.cache``.
    finetuned : list or dict of sources, optional
        Fine-tuned checkpoints when ``base_or_tv`` is the base.
    method : str
        A registered method (``weightlens.merge.list_methods()``, README's table): e.g. ``task_arithmetic``,
        ``ties``, ``dare``, ``tsv``, ``iso_c``, ``iso_cts``, ``star``, ``knots_ties``, ``peft_svd``, ``linear``,
        ``slerp``, ``model_stock``, ``breadcrumbs``, ``della``, ``consensus_ta``.
    device : str or torch.device, default="auto"
        Where decompositions run (``"auto"``: CUDA when present).
    progress : bool or None, default=None
        A bar over the keys when the whole result is computed at once
        (:meth:`MergeResult.materialize`; None follows ``weightlens.config.progress``). ``merge``
        computes no key itself, so it shows none;
        ``wl.export`` shows its own bar.
    lazy : bool, default=False
        Keep nothing when a key is read by indexing (each read computes it again from the cached
        update). By default a key read by indexing is kept. Either way ``merge`` returns at once:
        keys are computed when read (whole-model statistics such as the TIES global thresholds are
        computed here, in a first pass), and ``wl.export`` streams the result one key at a time.
    executor : {"local", "ray"}, default="local"
        Where :meth:`MergeResult.materialize` and ``wl.export`` run the per-key work: this process, or
        Ray tasks (``pip install 'weightlens[ray]'``; joins ``RAY_ADDRESS`` or an earlier
        ``ray.init(address=...)``, else starts a local cluster) that read their inputs from the
        checkpoint files and decompose on this process's torch thread count: bitwise the local
        result (``docs/scale.md``).
    data : MergeData, optional
        Per task, a model and input batches (``weightlens.merge.MergeData``; a zoo's ``merge_data()``), for
        the data-based methods (``regmean``, ``fisher``: ``describe()`` says ``needs data=``), which raise
        without it; their statistics are computed here, once per task (cached in ``tv.cache``). Other
        methods ignore it.
    **params
        The method's parameters (unknown names and out-of-range values raise
        ``InvalidParameterError`` listing the valid ones and their defaults; real values, ``alpha``
        included, must be finite and 0 or of magnitude in [1e-6, 1e6]), checked before any tensor
        is read.

    Returns
    -------
    MergeResult
        ``Mapping[str, Tensor]`` of every base key: ``base + alpha * update`` in the base dtype;
        keys outside ``tv.keys`` copied from the base. ``.notes`` lists degenerate cases per key.
        Errors of a key (its inputs, the method) are raised when that key is read.

    Examples
    --------
    >>> import torch, weightlens as wl
    >>> from weightlens.merge import merge
    >>> base = {"w": torch.zeros(2, 2)}
    >>> tv = wl.TaskVectors(base, {"a": {"w": torch.eye(2)}, "b": {"w": -torch.eye(2)}})
    >>> merge(tv, method="task_arithmetic", alpha=0.5)["w"].tolist()
    [[0.0, 0.0], [0.0, 0.0]]
    """
    check_executor(executor, caller="merge")
    tv = task_vectors_of(base_or_tv, finetuned)
    spec = get_method(method)
    resolved = spec.resolve(params, len(tv))
    inner = {k: v for k, v in resolved.items() if k != "alpha"}
    ctx = MergeContext(tv, linalg.resolve_device(device), spec.name, inner, data=check_data(spec, tv, data))
    if spec.prepare is not None:
        ctx.state = dict(spec.prepare(ctx, **inner))
    return MergeResult(ctx, spec, resolved, lazy=lazy, progress=progress, executor=executor)


def check_data(spec: MergeMethod, tv: TaskVectors, data: Any) -> Any:
    """``data`` for a data-based method (checked: a ``MergeData`` covering every task), None for the others."""
    if not spec.needs_data:
        return None
    from weightlens.merge.data import MergeData

    if data is None:
        raise InvalidParameterError(
            f"{spec.name} needs data=...: {spec.needs_data}, computed from each task's model on that task's "
            "inputs. Pass data=zoo.merge_data() for a zoo's task vectors, or a weightlens.merge.MergeData "
            "(per task: a model factory and input batches)."
        )
    if not isinstance(data, MergeData):
        raise InvalidParameterError(
            f"The 'data' parameter of {spec.name} must be a weightlens.merge.MergeData (e.g. zoo.merge_data()). "
            f"Got {type(data).__name__} instead."
        )
    data.check_tasks(tv.names, method=spec.name)
    return data


def _remote_update(payload: tuple[MergeContext, MergeMethod, tuple[Any, ...], bool],
                   key: str) -> tuple[KeyUpdate, list]:
    """One key's update in a Ray worker, and what computing it stored in the (worker's) ``tv.cache``."""
    ctx, spec, frozen, store = payload
    ctx.tv.cache = linalg.DecompositionCache(ctx.tv.cache.max_bytes)  # this key's entries only
    ku = ctx.cached(("update", spec.name, frozen, key), lambda: _checked(spec, ctx, key), store=store)
    return ku, ctx.tv.cache.items()


def _checked(spec: MergeMethod, ctx: MergeContext, key: str) -> KeyUpdate:
    """Run the method on one key; errors are re-raised once with the method and key named."""
    try:
        with linalg.recording_retries() as retried:  # decompositions redone after a failed attempt: noted
            ku = spec.fn(ctx, key, **ctx.params)
    except WeightlensError as err:
        raise type(err)(f"merge(method={spec.name!r}) on key {key!r}: {err}") from None
    shape = ctx.shape(key)
    if tuple(ku.update.shape) != shape:
        raise ShapeMismatchError(f"Merge method {spec.name!r} returned shape {tuple(ku.update.shape)} for "
                                 f"key {key!r}; expected {shape} (the key's shape).")
    update = ku.update.detach().to(device="cpu", dtype=torch.float32)
    notes = (*ku.notes, *(f"{spec.pretty_name or spec.name}: {r}" for r in retried))
    return KeyUpdate(update, notes, _checked_factors(spec, key, ku.factors, shape), ku.task_sum)


def _checked_task(spec: MergeMethod, ctx: MergeContext, key: str, task: str, shared: KeyUpdate) -> KeyUpdate:
    """The method's per-task update of one key (its ``per_task`` hook), checked like :func:`_checked`."""
    try:
        ku = spec.per_task(ctx, key, task, shared)
    except WeightlensError as err:
        raise type(err)(f"merge(method={spec.name!r}) on key {key!r}, task {task!r}: {err}") from None
    if tuple(ku.update.shape) != ctx.shape(key):
        raise ShapeMismatchError(f"Merge method {spec.name!r} returned shape {tuple(ku.update.shape)} for key "
                                 f"{key!r} of task {task!r}; expected {ctx.shape(key)} (the key's shape).")
    return KeyUpdate(ku.update.detach().to(device="cpu", dtype=torch.float32), tuple(ku.notes))


def _per_task_methods() -> list[str]:
    return [name for name in list_methods() if get_method(name).per_task is not None]


def _checked_factors(spec: MergeMethod, key: str, factors: Any, shape: tuple[int, ...]) -> linalg.SVD | None:
    """A method's SVD of its update, shape-checked (``None`` when it gave none)."""
    if factors is None:
        return None
    U, S, Vh = factors
    p = S.shape[0] if S.dim() == 1 else -1
    if not 0 < p <= min(shape) or tuple(U.shape) != (shape[0], p) or tuple(Vh.shape) != (p, shape[1]):
        r = min(shape)
        raise ShapeMismatchError(
            f"Merge method {spec.name!r} returned factors of shapes {tuple(U.shape)}, {tuple(S.shape)}, "
            f"{tuple(Vh.shape)} for key {key!r}; an SVD of {p} triplets of shape {shape} needs "
            f"({shape[0]}, p), (p,), (p, {shape[1]}) with 0 < p <= {r}."
        )
    return linalg.SVD(U.detach(), S.detach(), Vh.detach())


def _completed(factors: linalg.SVD, r: int) -> linalg.SVD:
    """A method's ``p`` triplets completed to ``r``: zero values, directions orthogonal to them
    (:func:`~weightlens.linalg.factored.complete_basis`), as a dense SVD's arbitrary completion past the rank."""
    U, S, Vh = factors
    p = S.numel()
    if p == r:
        return factors
    return linalg.SVD(complete_basis(U, r), torch.cat([S, S.new_zeros(r - p)]), complete_basis(Vh.mT, r).mT)


def _full(base: torch.Tensor, update: torch.Tensor, alpha: float, dtype: torch.dtype) -> torch.Tensor:
    """``base + alpha * update`` computed in fp32 (fp64 for fp64 bases; ``base`` is already that wide,
    ``TaskVectors.base_wide``), cast to the base's stored ``dtype``."""
    return torch.add(base, update.to(base.dtype), alpha=alpha).to(dtype)
