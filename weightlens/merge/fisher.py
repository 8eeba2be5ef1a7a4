"""Fisher merging: every weight averaged with its tasks' diagonal Fishers as weights (``docs/methods.md#fisher``).

Matena, Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022 (arXiv:2111.09832); reference
implementation FusionBench ``fusion_bench/method/fisher_merging`` (``fisher_merging.py``,
``merging_with_fisher_weights``; from MergeLM).

Per parameter ``theta = sum_t c_t (F_t + eps) theta_t / sum_t c_t (F_t + eps)``, elementwise, with ``F_t`` the
diagonal Fisher of fine-tune ``t`` on task ``t``'s inputs and ``eps = minimal_fisher_weight`` (FusionBench adds
it to every Fisher). With ``normalize_fisher_weight`` (FusionBench's default) ``c_t`` is proportional to
``1 / (||F_t|| + eps)``, ``||F_t||`` the L2 norm of task ``t``'s Fisher over every merged parameter (so a task
whose Fisher is larger overall does not win everywhere); otherwise ``c_t = 1``. The coefficients sum to one,
so the base cancels and the update is ``sum_t w_t tau_t / sum_t w_t`` (float64).

The Fisher, paper vs code (``estimator``): the paper's is ``E_x sum_c p_c(x) (d log p_c(x) / d theta)^2``, one
gradient per example and class (``"example"``); FusionBench squares one gradient per *batch*, of ``sum_x sum_c
sqrt(p_c) log p_c`` (``p`` detached), which adds cross terms between examples and classes and depends on the
batch size (``"batch"``, the default: the reference's numbers). Both divide by the number of examples. A key the
data's models have no parameter for gets the average of the fine-tunes (with a note).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import torch

from weightlens.errors import ShapeMismatchError
from weightlens.merge.data import check_matched, stacked_statistic, task_statistics
from weightlens.merge.engine import MergeContext
from weightlens.merge.registry import Interval, KeyUpdate, register_merge

__all__ = ["fisher", "fisher_coefficients", "fisher_update"]

_NO_FISHER = ("Fisher: no Fisher for this key (not a parameter of the data's models): the average of the "
              "fine-tunes.")


def fisher_coefficients(norms: list[float], normalize: bool, eps: float) -> list[float]:
    """``c_t``: ``1/T`` each, times ``(1 / (||F_t|| + eps)) / sum_s 1 / (||F_s|| + eps)`` when ``normalize``."""
    t = len(norms)
    if not normalize:
        return [1.0 / t] * t
    inv = [1.0 / (n + eps) for n in norms]
    return [v / sum(inv) / t for v in inv]


def fisher_update(deltas: torch.Tensor, fishers: torch.Tensor, coeffs: list[float], eps: float) -> torch.Tensor:
    """``sum_t w_t tau_t / sum_t w_t`` (float64) with ``w_t = c_t (F_t + eps)``; ``deltas``, ``fishers``:
    ``(T, *shape)``."""
    c = torch.tensor(coeffs, dtype=torch.float64).reshape(-1, *[1] * (deltas.dim() - 1))
    w = c * (fishers.double() + eps)
    return (w * deltas.double()).sum(0) / w.sum(0)


def _norm(fishers: dict[str, torch.Tensor]) -> float:
    """L2 norm of one task's Fisher over every parameter (FusionBench's per-parameter norms, then their norm)."""
    return math.sqrt(sum(float(torch.linalg.vector_norm(f.double())) ** 2 for f in fishers.values()))


def _prepare(ctx: MergeContext, *, normalize_fisher_weight: bool, minimal_fisher_weight: float,
             estimator: str) -> dict:
    """Each task's diagonal Fisher (cached per task) and the tasks' coefficients ``c_t``."""
    fishers = {t: task_statistics(ctx.tv, ctx.data, "fisher", t, estimator) for t in ctx.tasks}
    check_matched(fishers, ctx.tv, "fisher", "Fisher (a parameter of the model)")
    merged = [k for k in ctx.tv.keys if all(k in fishers[t] for t in ctx.tasks)]
    norms = [_norm({k: fishers[t][k] for k in merged}) for t in ctx.tasks]
    coeffs = fisher_coefficients(norms, normalize_fisher_weight, minimal_fisher_weight)
    return {"fishers": fishers, "norms": dict(zip(ctx.tasks, norms)), "coefficients": dict(zip(ctx.tasks, coeffs))}


@register_merge(
    "fisher", alpha=1.0, pretty_name="Fisher merging", reference="Matena & Raffel, NeurIPS 2022",
    prepare=_prepare, alpha_grid=(1.0,), needs_data="the diagonal Fisher of each parameter, from squared gradients",
)
def fisher(ctx: MergeContext, key: str, *, normalize_fisher_weight: bool = True,
           minimal_fisher_weight: Annotated[float, Interval(0, None)] = 1e-6,
           estimator: Literal["batch", "example"] = "batch") -> KeyUpdate:
    """Fisher-weighted average of the fine-tunes, per weight; needs ``data=`` (``zoo.merge_data()``).

    Parameters
    ----------
    normalize_fisher_weight : bool, default=True
        Scale each task's Fisher by ``1 / ||F_t||`` (whole model) first (FusionBench's default).
    minimal_fisher_weight : float >= 0, default=1e-6
        Added to every Fisher (FusionBench's guard against zero weights).
    estimator : {"batch", "example"}, default="batch"
        FusionBench's per-batch squared gradient, or the paper's per-example expected Fisher.
    alpha : float, default=1.0
        ``theta = theta_0 + alpha * (theta_fisher - theta_0)``: 1 is Fisher merging (tuning-free).
    """
    deltas = ctx.deltas(key)
    stacked = stacked_statistic(ctx.tasks, key, ctx.state["fishers"], method="Fisher merging", what="Fishers",
                                needs="have the same parameters")
    if stacked is None:
        return KeyUpdate(deltas.mean(0), (_NO_FISHER,))
    if stacked.shape[1:] != deltas.shape[1:]:
        raise ShapeMismatchError(f"Fisher merging: the Fisher of {key!r} has shape {tuple(stacked.shape[1:])}; "
                                 f"the key's shape is {tuple(deltas.shape[1:])}.")
    coeffs = [ctx.state["coefficients"][t] for t in ctx.tasks]
    return KeyUpdate(fisher_update(deltas, stacked, coeffs, minimal_fisher_weight).float())
