"""EMR-Merging: Elect, Mask & Rescale; one shared task vector, one model per task (``docs/methods.md#emr``).

Huang, Ye, Li, Gao, Li, Qin, Wang, "EMR-Merging: Tuning-Free High-Performance Model Merging", NeurIPS 2024
(arXiv:2405.17461); reference code ``harveyhuang18/EMR_Merging`` (``merge_vit/src/main_emr_merging.py``,
``emr_merge``), also FusionBench's ``fusion_bench/method/emr_merging`` (the same function).

Per key, from the task vectors ``tau_t``:

* **Elect** the unified task vector ``tau_uni``: its sign is the sign of ``sum_t tau_t`` (a zero sum counts
  as negative, as the reference's ``(sum > 0) * 2 - 1``), its magnitude the largest ``|tau_t|`` among the
  tasks whose sign agrees with the elected one (0 where none agrees);
* **Mask** of task ``t``: ``M_t = tau_t * tau_uni > 0`` (``t`` agrees with the elected sign);
* **Rescale**: ``lambda_t = A_t / B_t`` with ``A_t`` the size of ``tau_t`` and ``B_t`` that of ``M_t * tau_uni``
  (``rescale`` below says how sizes are summed);
* task ``t``'s model: ``theta_0 + alpha * lambda_t * M_t * tau_uni`` (:meth:`MergeResult.for_task`), the shared
  model ``theta_0 + alpha * tau_uni`` (the merge result's own weights). ``alpha`` is 1 (the method is
  tuning-free; the reference has no coefficient).

The rescaler, paper vs code: the paper writes ``lambda_t = sum|tau_t| / sum|M_t * tau_uni|`` over the whole
model (``rescale="model_sum"``); the reference code sums the per-tensor *means* (``scales[m] +=
torch.mean(torch.abs(param))``), so each tensor weighs the same whatever its size (``"model_mean"``, the
default). ``"key"`` computes one rescaler per key (an option of ours). A task that agrees with the elected sign
nowhere has a zero denominator: the reference then divides by zero (NaN weights); here its rescaler is 1 and its
update 0 there, with a note. Nothing is random.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from weightlens.merge.engine import MergeContext
from weightlens.merge.registry import KeyUpdate, register_merge

__all__ = ["elect", "emr", "emr_rescalers"]

Rescale = Literal["model_mean", "model_sum", "key"]


def elect(deltas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tau_uni, masks)`` of one key from the stacked task vectors ``(T, *shape)``: the elected vector
    (``shape``) and the tasks' masks ``tau_t * tau_uni > 0`` (bool ``(T, *shape)``)."""
    flag = torch.where(deltas.sum(0) > 0, 1.0, -1.0).to(deltas.dtype)
    masks = deltas * flag > 0
    size = torch.where(masks, deltas.abs(), 0.0).amax(0) if deltas.shape[0] else torch.zeros(deltas.shape[1:])
    return size * flag, masks


def _sizes(deltas: torch.Tensor, masked: torch.Tensor, mean: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per task, float64: the size of ``tau_t`` and of ``M_t * tau_uni`` (sums of ``|.|``, or means)."""
    n = max(1, deltas[0].numel()) if mean else 1
    a = deltas.double().abs().reshape(deltas.shape[0], -1).sum(1) / n
    b = masked.double().abs().reshape(masked.shape[0], -1).sum(1) / n
    return a, b


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else 1.0


def emr_rescalers(ctx: MergeContext, rescale: Rescale) -> dict[str, float]:
    """``{task: lambda_t}`` over the whole model (``rescale`` in ``"model_mean"``, ``"model_sum"``): one streaming
    pass over the keys, one key of every task at a time; cached per task set and keys."""

    def compute() -> dict[str, float]:
        a = torch.zeros(ctx.n_tasks, dtype=torch.float64)
        b = torch.zeros(ctx.n_tasks, dtype=torch.float64)
        for key in ctx.tv.keys:
            deltas = ctx.deltas(key)
            if deltas[0].numel() == 0:  # the reference's mean of an empty tensor would be NaN
                continue
            tau_uni, masks = elect(deltas)
            da, db = _sizes(deltas, torch.where(masks, tau_uni, 0.0), rescale == "model_mean")
            a, b = a + da, b + db
        return {t: _ratio(float(x), float(y)) for t, x, y in zip(ctx.tasks, a, b)}

    return ctx.once(("emr_rescalers", rescale), compute)


def _prepare(ctx: MergeContext, *, rescale: str, **_: Any) -> dict:
    """The whole-model rescalers (``state["rescalers"]``), or none for ``rescale="key"``."""
    return {} if rescale == "key" else {"rescalers": emr_rescalers(ctx, rescale)}


def _task_update(ctx: MergeContext, key: str, task: str, shared: KeyUpdate) -> KeyUpdate:
    """Task ``task``'s update of ``key``: ``lambda_t * M_t * tau_uni`` (``shared.update`` is ``tau_uni``)."""
    tau = ctx.delta(task, key)
    tau_uni = shared.update
    mask = tau * tau_uni > 0
    masked = torch.where(mask, tau_uni, 0.0)
    if ctx.params["rescale"] == "key":
        a, b = _sizes(tau[None], masked[None], mean=False)
        lam = _ratio(float(a[0]), float(b[0]))
    else:
        lam = ctx.state["rescalers"][task]
    notes: tuple[str, ...] = ()
    if tau.any() and not mask.any():
        notes = (f"EMR: task {task!r} agrees with the elected sign nowhere on this key: its update here is 0.",)
    return KeyUpdate(masked * lam, notes)


@register_merge(
    "emr", alpha=1.0, pretty_name="EMR-Merging", reference="Huang et al., NeurIPS 2024", prepare=_prepare,
    alpha_grid=(1.0,), per_task=_task_update,
)
def emr(ctx: MergeContext, key: str, *, rescale: Rescale = "model_mean") -> KeyUpdate:
    """EMR-Merging: the elected vector ``tau_uni`` (the shared model); per task a mask and a rescaler.

    ``merged = wl.merge(tv, method="emr")`` holds the shared model ``theta_0 + alpha * tau_uni``;
    ``merged.for_task(t)`` is task ``t``'s model ``theta_0 + alpha * lambda_t * M_t * tau_uni``, the one EMR
    evaluates on task ``t`` (``sweep`` does so).

    Parameters
    ----------
    rescale : {"model_mean", "model_sum", "key"}, default="model_mean"
        How ``lambda_t`` sums sizes: over the whole model, each tensor's mean ``|.|`` (the reference code),
        over the whole model, every coordinate (the paper's formula), or one rescaler per key.
    alpha : float, default=1.0
        Coefficient of the shared and the per-task updates (EMR is tuning-free: 1, the paper's models).
    """
    tau_uni, _ = elect(ctx.deltas(key))
    return KeyUpdate(tau_uni)
