"""The data hook of data-based merges (``regmean``, ``fisher``): per task, a model and input batches.

``wl.merge(tv, method="regmean", data=zoo.merge_data())``: a :class:`MergeData` gives, for each task,

* ``model(task, weights) -> nn.Module``: the task's model with ``weights`` (fine-tune ``task``'s full
  weights, ``tv.finetuned_weights(task)``) loaded, its forward returning the logits of a batch (the task's
  head included); its parameter names are the task vectors' keys (``fc1.weight``), which is how a statistic
  finds its key;
* ``batches(task)``: the task's input batches, each a tensor (``module(x)``), a tuple (``module(*b)``) or a
  dict (``module(**b)``). Labels are not needed: RegMean reads inputs, Fisher the model's own predictions.

Statistics are computed once per task from fine-tune ``task`` on its own batches, as FusionBench does, and
cached in ``tv.cache`` under the data's fingerprint (a SHA-256 of its description and batches), so a second merge with other
parameters (``reduce_non_diagonal_ratio``, ``alpha``) computes none:

* :func:`gram_matrices`: per ``nn.Linear`` layer the mean input Gram ``X^T X / N`` (rows of every batch, a
  sequence's positions each a row, padding included, as FusionBench's forward hooks), keyed by its weight key;
* :func:`diagonal_fishers`: per parameter a diagonal Fisher (``estimator="batch"``: FusionBench's squared
  gradient of ``sum_x sum_c sqrt(p_c) log p_c`` per batch, summed over batches, divided by the examples;
  ``"example"``: the paper's ``mean_x sum_c p_c (d log p_c)^2``, one gradient per example and class).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from weightlens.errors import InvalidParameterError, KeyMismatchError
from weightlens.taskvectors import TaskVectors

__all__ = ["MergeData", "check_matched", "diagonal_fishers", "gram_matrices", "stacked_statistic", "task_statistics"]

Estimator = Literal["batch", "example"]


@dataclass(frozen=True, eq=False)
class MergeData:
    """What a data-based merge reads: per task, a model built from weights and input batches.

    Attributes
    ----------
    tasks : tuple of str
        The tasks the data covers (a merge needs every merged task among them).
    model : callable
        ``model(task, weights) -> nn.Module``: task ``task``'s model with ``weights`` loaded; its forward
        on a batch returns logits ``(batch, classes)``; its parameter names are the task vectors' keys.
    batches : callable
        ``batches(task) -> iterable`` of input batches (tensor, tuple or dict of tensors).
    description : str
        What the data is, in words (``"digits-tasks train, 256 examples per task, batches of 32"``).
    spec : dict or None
        How to make this data again, which an exported recipe records: a zoo's :meth:`merge_data` gives
        ``{"zoo", "size", "options", "split", "n", "batch_size", "seed"}`` (``weightlens.zoo.merge_data_of``
        rebuilds it); None for user data (an export of its merge then writes no recipe).
    """

    tasks: tuple[str, ...]
    model: Callable[[str, Mapping[str, torch.Tensor]], nn.Module] = field(repr=False)
    batches: Callable[[str], Iterable[Any]] = field(repr=False)
    description: str = ""
    spec: dict[str, Any] | None = None
    _fingerprints: dict[str, str] = field(default_factory=dict, repr=False, init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", tuple(self.tasks))

    def fingerprint(self, task: str | Iterable[str] | None = None) -> str:
        """SHA-256 of the description and ``task``'s batches (dtypes, shapes, bytes), or of several tasks' (a
        sequence; ``None``: every task's); computed once per task.

        Statistics are cached in ``tv.cache`` under it: two ``MergeData`` with the same batches and description
        but different models would share them on one ``TaskVectors`` (give them different descriptions)."""
        if not isinstance(task, str):
            joined = "".join(f"{t}:{self.fingerprint(t)};" for t in (self.tasks if task is None else task))
            return hashlib.sha256(joined.encode()).hexdigest()
        self.check_tasks([task], method="fingerprint")
        if task not in self._fingerprints:
            digest = hashlib.sha256(self.description.encode())
            for batch in self.batches(task):
                for tensor in _tensors(batch):
                    t = tensor.detach().cpu().contiguous()
                    digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
                    digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            self._fingerprints[task] = digest.hexdigest()
        return self._fingerprints[task]

    def check_tasks(self, tasks: Iterable[str], *, method: str) -> None:
        """Raise when a task has no data here, naming it and the tasks that have."""
        missing = [t for t in tasks if t not in self.tasks]
        if missing:
            raise InvalidParameterError(
                f"{method}: data= has no batches for task(s) {', '.join(map(repr, missing))} (it covers "
                f"{', '.join(map(repr, self.tasks)) or 'none'}); pass data for every merged task, e.g. "
                "zoo.merge_data() of the zoo these task vectors come from."
            )

    def __repr__(self) -> str:
        return f"MergeData({', '.join(self.tasks)}: {self.description or 'user data'})"


def _tensors(batch: Any) -> list[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, Mapping):
        return [v for _, v in sorted(batch.items()) if isinstance(v, torch.Tensor)]
    if isinstance(batch, (tuple, list)):
        return [v for v in batch if isinstance(v, torch.Tensor)]
    raise InvalidParameterError(
        f"MergeData batches must be tensors, tuples or dicts of tensors; got {type(batch).__name__}."
    )


def _forward(module: nn.Module, batch: Any) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return module(batch)
    if isinstance(batch, Mapping):
        return module(**batch)
    return module(*batch)


def _module(data: MergeData, tv: TaskVectors, task: str) -> nn.Module:
    module = data.model(task, tv.finetuned_weights(task))
    if not isinstance(module, nn.Module):
        raise InvalidParameterError(
            f"MergeData.model({task!r}, weights) must return an nn.Module; got {type(module).__name__}."
        )
    return module.eval()


@torch.no_grad()
def gram_matrices(data: MergeData, tv: TaskVectors, task: str) -> dict[str, torch.Tensor]:
    """``{weight key: X^T X / N}`` (float32, ``(in, in)``) of every ``nn.Linear`` layer of task ``task``'s
    model that its batches reach and whose weight is a task-vector key; ``X``: the layer's inputs, rows of
    all batches (leading dimensions flattened), summed in float64."""
    module = _module(data, tv, task)
    wanted = set(tv.keys)
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(_: nn.Module, inputs: tuple, __: Any) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).to(torch.float64)
            sums[name] = sums[name] + x.T @ x if name in sums else x.T @ x
            rows[name] = rows.get(name, 0) + x.shape[0]
        return record

    linear = {f"{n}.weight": m for n, m in module.named_modules() if isinstance(m, nn.Linear) and n}
    handles = [m.register_forward_hook(hook(k)) for k, m in linear.items() if k in wanted]
    try:
        for batch in data.batches(task):
            _forward(module, batch)
    finally:
        for h in handles:
            h.remove()
    return {k: (sums[k] / rows[k]).to(torch.float32) for k in linear if k in sums}


def diagonal_fishers(data: MergeData, tv: TaskVectors, task: str, estimator: Estimator = "batch"
                     ) -> dict[str, torch.Tensor]:
    """``{key: diagonal Fisher}`` (float32, the key's shape) of every parameter of task ``task``'s model that
    is a task-vector key, from its own predictive distribution ``p = softmax(logits)`` on its batches.

    ``"batch"`` (FusionBench ``fisher_merging``): per batch the squared gradient of ``sum_x sum_c
    sqrt(p_c) log p_c`` (``p`` detached), summed over batches and divided by the number of examples;
    ``"example"`` (Matena & Raffel): ``mean_x sum_c p_c(x) (d log p_c(x))^2``.
    """
    module = _module(data, tv, task)
    wanted = set(tv.keys)
    params = {k: p for k, p in module.named_parameters() if k in wanted}
    for p in module.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    total = {k: torch.zeros(p.shape, dtype=torch.float64) for k, p in params.items()}
    n = 0
    for batch in data.batches(task):
        logits = _forward(module, batch)
        if logits.dim() != 2 or logits.shape[-1] < 2:
            raise InvalidParameterError(
                f"fisher: the model of task {task!r} returned logits of shape {tuple(logits.shape)}; the Fisher "
                "of a classifier needs (batch, classes) with at least 2 classes."
            )
        log_p = torch.log_softmax(logits.double(), dim=-1)
        n += logits.shape[0]
        if estimator == "batch":
            objective = (log_p.detach().exp().sqrt() * log_p).sum()
            grads = torch.autograd.grad(objective, list(params.values()), allow_unused=True)
            _add_squares(total, params, grads)
            continue
        _add_expected(total, module, params, batch)
    if n == 0:
        raise InvalidParameterError(f"fisher: data= gave no batches for task {task!r}.")
    return {k: (v / n).to(torch.float32) for k, v in total.items()}


_CHUNK = 8  # examples whose per-class gradients are held at once (8 x classes x parameters floats)


def _add_expected(total: dict[str, torch.Tensor], module: nn.Module, params: Mapping[str, torch.Tensor],
                  batch: Any) -> None:
    """Add ``sum_x sum_c p_c(x) (d log p_c(x))^2`` of one batch: per-example Jacobians of ``log p`` (torch.func)."""
    from torch.func import functional_call, jacrev, vmap
    from torch.utils._pytree import tree_map

    detached = {k: p.detach() for k, p in params.items()}

    def log_p(weights: dict[str, torch.Tensor], one: Any) -> torch.Tensor:
        single = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, one)
        args = (single,) if isinstance(single, torch.Tensor) else single
        if isinstance(args, Mapping):
            logits = functional_call(module, weights, args=(), kwargs=dict(args))
        else:
            logits = functional_call(module, weights, tuple(args))
        return torch.log_softmax(logits[0].double(), dim=-1)

    per_example = vmap(lambda one: (jacrev(log_p)(detached, one), log_p(detached, one)))
    size = len(_tensors(batch)[0])
    for start in range(0, size, _CHUNK):
        part = tree_map(lambda t: t[start:start + _CHUNK] if isinstance(t, torch.Tensor) else t, batch)
        jac, lp = per_example(part)
        p = lp.exp()  # (b, classes)
        for key, j in jac.items():  # j: (b, classes, *shape)
            weight = p.reshape(*p.shape, *[1] * (j.dim() - 2))
            total[key] += (weight * j.double() ** 2).sum((0, 1))


def _add_squares(total: dict[str, torch.Tensor], params: Mapping[str, torch.Tensor],
                 grads: tuple[torch.Tensor | None, ...]) -> None:
    for key, g in zip(params, grads):
        if g is not None:
            total[key] += g.detach().double() ** 2


def task_statistics(tv: TaskVectors, data: MergeData, kind: Literal["gram", "fisher"], task: str,
                    estimator: Estimator = "batch") -> dict[str, torch.Tensor]:
    """One task's statistics, cached in ``tv.cache`` under the data's fingerprint (computed once per task)."""
    tag = ("merge-data", kind, task, data.fingerprint(task), estimator if kind == "fisher" else None)
    if kind == "gram":
        return tv.cache.get_or_compute(tag, lambda: gram_matrices(data, tv, task))
    return tv.cache.get_or_compute(tag, lambda: diagonal_fishers(data, tv, task, estimator))


def check_matched(stats: Mapping[str, Mapping[str, torch.Tensor]], tv: TaskVectors, method: str,
                  what: str) -> None:
    """Raise when no task-vector key received a statistic (the model's names are not the keys)."""
    if all(not s for s in stats.values()):
        keys = list(tv.keys)
        raise KeyMismatchError(
            f"{method}: the data's models gave no {what} for any task-vector key (keys {keys[:4]}"
            f"{', ...' if len(keys) > 4 else ''}): MergeData.model must return a module whose parameter names "
            "are the task vectors' keys and whose forward reaches them."
        )


def stacked_statistic(tasks: list[str], key: str, stats: Mapping[str, Mapping[str, torch.Tensor]], *, method: str,
                      what: str, needs: str) -> torch.Tensor | None:
    """Every task's statistic of ``key`` (``stats[task][key]``) stacked in task order; None when no task has one
    (the method's fallback applies); a ``KeyMismatchError`` naming the tasks when only some have it (``what``: the
    statistic's name, ``needs``: what every task's model must share)."""
    have = [t for t in tasks if key in stats[t]]
    if not have:
        return None
    if len(have) < len(tasks):
        lack = [t for t in tasks if t not in have]
        raise KeyMismatchError(
            f"{method} has {what} of {key!r} for task(s) {', '.join(have)} but not for {', '.join(lack)}: "
            f"every task's model must {needs} (check MergeData.model for those tasks)."
        )
    return torch.stack([stats[t][key] for t in tasks])
