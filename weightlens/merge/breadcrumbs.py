"""Model Breadcrumbs: drop each task vector's largest and smallest entries (``docs/methods.md#breadcrumbs``).

Davari, Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks", ECCV 2024
(arXiv:2312.06795); reference implementation mergekit ``breadcrumbs`` and ``breadcrumbs_ties``
(``mergekit/sparsify.py::magnitude_outliers``, ``mergekit/merge_methods/generalized_task_arithmetic.py``).

Per tensor and task, exactly as mergekit's ``magnitude_outliers`` (deterministic: nothing is random):
with ``n`` entries, ``keep = int(density * n)``, ``top = int(gamma * n)`` and
``bottom = max(0, n - keep - top)``, sort ``|tau|`` ascending and keep the entries ranked
``bottom .. bottom + keep - 1``: the ``top`` largest are dropped as outliers and the smallest as noise
(when ``keep + top > n`` fewer outliers are dropped, so that ``keep`` entries remain). ``density >= 1``
keeps everything. Ties in ``|tau|`` are ranked by index (a stable sort; mergekit's ``torch.sort`` leaves
their order unspecified, which matters only between equal magnitudes). ``rescale=True`` multiplies the
kept entries by ``|tau|_1 / |kept|_1`` (mergekit's L1 rescale; skipped when either is below 1e-7).

Then mergekit's generalized task arithmetic with every fine-tune's ``weight`` 1:

* ``breadcrumbs``: ``update = sum_t kept_t`` (``normalize=True``: divided by ``T``);
* ``breadcrumbs_ties``: TIES' sign election on the kept entries (the sign of their sum, ``+`` where it
  is 0, mergekit's ``sign_weight >= 0``), then the sum of the agreeing nonzero entries
  (``normalize=True``: their mean, the divisor 1 where none agrees);

and ``theta = theta_0 + alpha * update``: weightlens' ``alpha`` is mergekit's ``lambda``. Every tensor is
treated alike (matrices, vectors, embeddings), as mergekit does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import torch

from weightlens.analysis.signs import elected_sign
from weightlens.io.recipe import Mergekit
from weightlens.merge.arithmetic import _TA_GRID, _TIES_GRID, disjoint_merge, l1_rescaled
from weightlens.merge.engine import MergeContext
from weightlens.merge.registry import Interval, KeyUpdate, register_merge

__all__ = ["breadcrumbs", "breadcrumbs_mask", "breadcrumbs_ties", "combine", "l1_rescaled"]

Unit = Annotated[float, Interval(0, 1, "right")]
Gamma = Annotated[float, Interval(0, 1, "left")]


def breadcrumbs_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """mergekit's ``magnitude_outliers`` keep-mask of one task vector (bool, its shape)."""
    n = delta.numel()
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    keep, top = int(density * n), int(gamma * n)
    bottom = max(0, n - keep - top)
    order = torch.sort(delta.abs().reshape(-1).float(), stable=True).indices
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[bottom:bottom + keep]] = True
    return mask.reshape(delta.shape)


def combine(sparse: torch.Tensor, *, consensus: bool, normalize: bool) -> torch.Tensor:
    """mergekit's generalized task arithmetic of sparsified task vectors ``(T, *shape)`` (weights 1, lambda 1)."""
    if consensus:  # a zero vote sum counts as positive (mergekit's sign_weight >= 0)
        return disjoint_merge(sparse, elected_sign(sparse.sum(0), 1), "mean" if normalize else "sum")
    total = sparse.sum(0)
    return total / sparse.shape[0] if normalize else total


def _alpha(params: Mapping[str, Any], n_tasks: int) -> float:
    return 1.0 if params["normalize"] else 0.3


def _grid(params: Mapping[str, Any], n_tasks: int) -> tuple[float, ...]:
    return _TIES_GRID if params["normalize"] else _TA_GRID


def _sparse(ctx: MergeContext, key: str, density: float, gamma: float, rescale: bool) -> torch.Tensor:
    deltas = ctx.deltas(key)
    for i in range(deltas.shape[0]):
        mask = breadcrumbs_mask(deltas[i], density, gamma)
        deltas[i] = l1_rescaled(deltas[i], mask) if rescale else deltas[i] * mask
    return deltas


def _mergekit(name: str) -> Any:
    def translate(p: Mapping[str, Any]) -> Mergekit:
        per_model = {"weight": 1.0, "density": float(p.get("density", 0.9)), "gamma": float(p.get("gamma", 0.01))}
        return Mergekit(name, per_model, {"lambda": float(p.get("alpha", 0.3)),
                                          "normalize": bool(p.get("normalize", False)),
                                          "rescale": bool(p.get("rescale", False))})

    return translate


_DOC = "0.3 (normalize=False) | 1.0 (normalize=True)"


@register_merge(
    "breadcrumbs", alpha=None, alpha_default=_alpha, alpha_doc=_DOC, pretty_name="Model Breadcrumbs",
    reference="Davari & Belilovsky, ECCV 2024", alpha_grid=_grid, mergekit=_mergekit("breadcrumbs"),
)
def breadcrumbs(ctx: MergeContext, key: str, *, density: Unit = 0.9, gamma: Gamma = 0.01,
                normalize: bool = False, rescale: bool = False) -> KeyUpdate:
    """Model Breadcrumbs: per tensor drop the ``gamma`` largest and the smallest ``|tau|``, keep ``density``; sum.

    Parameters
    ----------
    density : float in (0, 1], default=0.9
        Fraction of each task vector's entries kept (mergekit's ``density``).
    gamma : float in [0, 1), default=0.01
        Fraction of the largest entries dropped as outliers (mergekit's ``gamma``).
    normalize : bool, default=False
        Divide the sum by the number of fine-tunes (mergekit's ``normalize``).
    rescale : bool, default=False
        Rescale each sparsified task vector to its L1 norm (mergekit's ``rescale``).
    alpha : float, default=0.3 (1.0 with normalize)
        mergekit's ``lambda``.
    """
    return KeyUpdate(combine(_sparse(ctx, key, density, gamma, rescale), consensus=False, normalize=normalize))


@register_merge(
    "breadcrumbs_ties", alpha=None, alpha_default=_alpha, alpha_doc=_DOC, pretty_name="Model Breadcrumbs (TIES)",
    reference="Davari & Belilovsky, ECCV 2024", alpha_grid=_grid, mergekit=_mergekit("breadcrumbs_ties"),
)
def breadcrumbs_ties(ctx: MergeContext, key: str, *, density: Unit = 0.9, gamma: Gamma = 0.01,
                     normalize: bool = False, rescale: bool = False) -> KeyUpdate:
    """Model Breadcrumbs' masks, then TIES' sign election and disjoint sum (mean with ``normalize``).

    Parameters
    ----------
    density, gamma, normalize, rescale : as :func:`breadcrumbs`
    alpha : float, default=0.3 (1.0 with normalize)
        mergekit's ``lambda``.
    """
    return KeyUpdate(combine(_sparse(ctx, key, density, gamma, rescale), consensus=True, normalize=normalize))
