"""The merge engine: one walk over the keys, one cached unscaled update per key, then base + alpha * update.

``merge`` resolves the method and its parameters against the registry, then walks the base keys
once. For every task-vector key it asks the method for the *unscaled* update (cached in
``tv.cache`` under the method, its parameters other than ``alpha``, the task set and the device),
and writes ``base + alpha * update`` cast back to the base dtype. Keys outside ``tv.keys`` (integer
buffers, excluded keys) are copied from the base. Hence:

* a second call that changes only ``alpha`` costs one scale-and-add per key;
* a call with another spectral method reuses the per-task and per-sum SVDs (same cache as analysis);
* global statistics (TIES global thresholds) are computed once per (tasks, keys, density) through
  :meth:`MergeContext.once` and cached too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from weightlens import linalg
from weightlens.analysis import decompose
from weightlens.errors import InvalidParameterError, KeyMismatchError
from weightlens.merge.registry import KeyUpdate, MergeMethod, get_method
from weightlens.taskvectors import TaskVectors

__all__ = ["MergeContext", "MergeResult", "merge", "task_vectors_of"]


@dataclass
class MergeContext:
    """What a merge method sees: the task vectors, the compute device and cached helpers.

    Methods read data only through this object, so every decomposition lands in the shared cache.
    """

    tv: TaskVectors
    device: torch.device
    method: str
    params: Mapping[str, Any] = field(default_factory=dict)

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
        return decompose.task_svd(self.tv, task, key, device=self.device)

    def sum_svd(self, key: str) -> linalg.SVD:
        """Thin SVD of the task-arithmetic sum over this context's tasks (shared cache)."""
        return decompose.sum_svd(self.tv, key, self.tasks, device=self.device)

    def cached(self, tag: tuple[Any, ...], compute: Callable[[], Any]) -> Any:
        """``compute()`` cached in ``tv.cache`` under ``("merge", *tag, tasks, device)``."""
        return self.tv.cache.get_or_compute(("merge", *tag, self.tasks, str(self.device)), compute)

    def once(self, tag: tuple[Any, ...], compute: Callable[[], Any]) -> Any:
        """A whole-model statistic: cached per ``tag``, task set and selected keys."""
        return self.cached(("global", *tag, tuple(self.tv.keys)), compute)


class MergeResult(Mapping[str, torch.Tensor]):
    """Full merged weights (``Mapping[str, Tensor]``) with the notes and updates behind them.

    Attributes
    ----------
    method : str
        Registry name of the method.
    params : dict
        Every parameter of the method, defaults filled in, ``alpha`` resolved to a float.
    task_vectors : TaskVectors
        The task vectors that were merged (``compare`` uses them).
    notes : pandas.DataFrame
        One row per degenerate case met: columns ``key``, ``method``, ``note``.
    """

    def __init__(
        self,
        weights: dict[str, torch.Tensor],
        updates: Mapping[str, torch.Tensor],
        *,
        method: str,
        params: dict[str, Any],
        notes: list[dict[str, str]],
        task_vectors: TaskVectors,
    ) -> None:
        self._weights = weights
        self._updates = dict(updates)
        self.method = method
        self.params = dict(params)
        self.task_vectors = task_vectors
        self._notes = list(notes)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._weights[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._weights)

    def __len__(self) -> int:
        return len(self._weights)

    @property
    def alpha(self) -> float:
        """The coefficient the unscaled updates were multiplied by."""
        return float(self.params["alpha"])

    @property
    def updated_keys(self) -> list[str]:
        """Keys that received an update (the task vectors' keys), in order."""
        return list(self._updates)

    def update(self, key: str) -> torch.Tensor:
        """The merged update ``alpha * u`` of ``key`` in fp32 (before adding the base and casting)."""
        if key not in self._updates:
            raise KeyMismatchError(
                f"Key {key!r} received no update in this {self.method} merge (it is "
                f"{'copied from the base' if key in self._weights else 'not in the model'}); "
                f"updated keys are the task vectors' keys ({len(self._updates)})."
            )
        return self.alpha * self._updates[key]

    @property
    def notes(self) -> Any:
        """Degenerate cases per key as a DataFrame (``key``, ``method``, ``note``)."""
        import pandas as pd

        return pd.DataFrame(self._notes, columns=["key", "method", "note"])

    @property
    def recipe(self) -> dict[str, Any]:
        """``{"method": ..., "params": ..., "tasks": [...]}``: enough to repeat the merge."""
        return {"method": self.method, "params": dict(self.params), "tasks": list(self.task_vectors.names)}

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return (f"MergeResult({self.method}: {shown}; {len(self)} keys, {len(self._updates)} updated, "
                f"{len(self._notes)} note(s))")


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
    progress: bool = False,
    **params: Any,
) -> MergeResult:
    """Merge fine-tunes of one base model; returns the full merged weights.

    Parameters
    ----------
    base_or_tv : TaskVectors or any source ``wl.load`` accepts
        The task vectors, or the base checkpoint (then give ``finetuned``).
    finetuned : list or dict of sources, optional
        Fine-tuned checkpoints when ``base_or_tv`` is the base.
    method : str
        A registered method: ``task_arithmetic``, ``ties``, ``dare``, ``tsv``, ``iso_c``,
        ``iso_cts``, ``star`` (see ``weightlens.merge.list_methods()``).
    device : str or torch.device, default="auto"
        Where decompositions run (``"auto"``: CUDA when present).
    progress : bool, default=False
        Show a progress bar over the keys.
    **params
        The method's parameters (unknown names and out-of-range values raise
        ``InvalidParameterError`` listing the valid ones and their defaults).

    Returns
    -------
    MergeResult
        ``Mapping[str, Tensor]`` of every base key: ``base + alpha * update`` in the base dtype;
        keys outside ``tv.keys`` copied from the base. ``.notes`` lists degenerate cases per key.

    Examples
    --------
    >>> import torch, weightlens as wl
    >>> base = {"w": torch.zeros(2, 2)}
    >>> tv = wl.TaskVectors(base, {"a": {"w": torch.eye(2)}, "b": {"w": -torch.eye(2)}})
    >>> merged = wl.merge(tv, method="task_arithmetic", alpha=0.5)
    >>> merged["w"].tolist()
    [[0.0, 0.0], [0.0, 0.0]]
    """
    tv = task_vectors_of(base_or_tv, finetuned)
    spec = get_method(method)
    resolved = spec.resolve(params, len(tv))
    inner = {k: v for k, v in resolved.items() if k != "alpha"}
    ctx = MergeContext(tv, linalg.resolve_device(device), spec.name, inner)
    updates, weights, notes = _walk(ctx, spec, resolved["alpha"], progress)
    return MergeResult(weights, updates, method=spec.name, params=resolved, notes=notes, task_vectors=tv)


def _walk(
    ctx: MergeContext, spec: MergeMethod, alpha: float, progress: bool
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[dict[str, str]]]:
    """One pass over the base keys: cached unscaled updates and the full weights."""
    tv, selected = ctx.tv, set(ctx.tv.keys)
    frozen = tuple(sorted(ctx.params.items()))
    key_updates: dict[str, KeyUpdate] = {}
    weights: dict[str, torch.Tensor] = {}
    deferred: list[str] = []
    for key in tqdm(list(tv.base.keys()), desc=f"merge {spec.name}", unit="key", disable=not progress):
        if key not in selected:
            weights[key] = tv.base[key].clone()
            continue
        ku = ctx.cached(("update", spec.name, frozen, key), lambda: _checked(spec, ctx, key))
        key_updates[key] = ku
        if ku.pending is None:
            weights[key] = _full(tv.base[key], ku.update, alpha)
        else:
            deferred.append(key)
    updates = {k: ku.update for k, ku in key_updates.items()}
    if deferred:  # coordinates whose sign is the whole-model majority (TIES global)
        majority = _sign(sum(ku.sign_votes for ku in key_updates.values()))
        for key in deferred:
            updates[key] = _settle(key_updates[key], majority)
            weights[key] = _full(tv.base[key], updates[key], alpha)
    weights = {k: weights[k] for k in tv.base.keys()}
    notes = [{"key": k, "method": spec.name, "note": n} for k, ku in key_updates.items() for n in ku.notes]
    return updates, weights, notes


def _checked(spec: MergeMethod, ctx: MergeContext, key: str) -> KeyUpdate:
    ku = spec.fn(ctx, key, **ctx.params)
    shape = ctx.shape(key)
    if tuple(ku.update.shape) != shape:
        raise RuntimeError(f"Merge method {spec.name!r} returned shape {tuple(ku.update.shape)} for "
                           f"key {key!r}; expected {shape}.")
    update = ku.update.detach().to(device="cpu", dtype=torch.float32)
    return KeyUpdate(update, ku.notes, ku.sign_votes, ku.pending)


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def _settle(ku: KeyUpdate, majority: int) -> torch.Tensor:
    """Fill the pending coordinates with the values for the majority sign (0 stays 0)."""
    assert ku.pending is not None
    if majority == 0:
        return ku.update
    out = ku.update.clone()
    values = ku.pending.if_positive if majority > 0 else ku.pending.if_negative
    out.view(-1)[ku.pending.index] = values
    return out


def _full(base: torch.Tensor, update: torch.Tensor, alpha: float) -> torch.Tensor:
    """``base + alpha * update`` computed in fp32 (fp64 for fp64 bases), cast to the base dtype."""
    wide = torch.float64 if base.dtype == torch.float64 else torch.float32
    return torch.add(base.to(wide), update.to(wide), alpha=alpha).to(base.dtype)

