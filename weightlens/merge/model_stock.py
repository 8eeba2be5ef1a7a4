"""Model Stock: the average of the fine-tunes pulled towards the base by their angle (``docs/methods.md#model_stock``).

Jang, Yun, Han, "Model Stock: All we need is just a few fine-tuned models", ECCV 2024 (arXiv:2403.19522);
reference implementation mergekit ``model_stock`` (``mergekit/merge_methods/model_stock.py``), also in
FusionBench (``fusion_bench/method/model_stock``).

Per tensor, with the task vectors ``tau_1 .. tau_k`` (``k >= 2``) flattened, exactly as mergekit:

* ``cos = mean over pairs i < j of clamp(<tau_i, tau_j> / max(|tau_i| |tau_j|, 1e-6), -1, 1)``;
* ``t = k cos / (1 + (k - 1) cos)`` (the paper's interpolation ratio); where ``|1 + (k - 1) cos| < 1e-6``
  there is no finite ratio and ``t = 0`` (the base is kept, with a note);
* ``theta = t * mean_i theta_i + (1 - t) * theta_0``, i.e. ``update = t * mean_i tau_i``.

Every tensor is treated alike (mergekit's default ``filter_wise=False``: one angle per tensor, the
paper's per-layer ratio). ``filter_wise=True`` takes one angle and one ``t`` per row (the last axis'
vectors; a 1-D tensor is one row), as mergekit's option. The merge is ``theta_0 + alpha * update``:
``alpha=1`` (the default) is mergekit's Model Stock. Identical fine-tunes have ``cos = 1``, ``t = 1``:
the merge returns them.

**The two reference implementations differ** for three or more fine-tunes: mergekit averages the pairwise
cosines (``average="cos"``, the default), FusionBench (``ModelStock``, ``compute_angle``/``compute_ratio``)
averages the pairwise *angles* and takes the cosine of the mean (``average="angle"``), guarding with
``+ 1e-8`` in the cosine's and the ratio's denominators instead of mergekit's clamp and singular mask. For
two fine-tunes they agree up to those guards. The paper defines the angle for two models and the ratio for
``k``; it does not say how to combine several angles.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch

from weightlens.errors import InvalidParameterError
from weightlens.io.recipe import Mergekit
from weightlens.merge.engine import MergeContext
from weightlens.merge.registry import KeyUpdate, register_merge

__all__ = ["mean_cos", "model_stock", "stock_ratio"]

_GRID = tuple(round(0.1 * i, 10) for i in range(1, 16))


def _rows(deltas: torch.Tensor, filter_wise: bool) -> torch.Tensor:
    k = deltas.shape[0]
    return (deltas.unsqueeze(1) if deltas.dim() == 2 else deltas) if filter_wise else deltas.reshape(k, -1)


def mean_cos(deltas: torch.Tensor, filter_wise: bool = False, average: str = "cos") -> torch.Tensor:
    """The cosine behind Model Stock's ratio for stacked task vectors ``(k, *shape)``: a 0-d tensor, or one
    per row of the last axis (``filter_wise``; a 1-D key is one row).

    ``average="cos"`` (mergekit): the mean of the pairwise cosines, each
    ``clamp(<x, y> / max(|x| |y|, 1e-6), -1, 1)``. ``average="angle"`` (FusionBench): the cosine of the mean
    pairwise angle, each ``acos(clamp(<x, y> / (|x| |y| + 1e-8), -1, 1))``.
    """
    x = _rows(deltas, filter_wise)
    k = deltas.shape[0]
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    if average == "cos":
        cos = [((x[i] * x[j]).sum(-1) / (torch.norm(x[i], dim=-1) * torch.norm(x[j], dim=-1)).clamp(min=1e-6)
                ).clamp(-1, 1) for i, j in pairs]
        return torch.stack(cos).mean(0)
    x = x.double()
    angles = [torch.acos(((x[i] * x[j]).sum(-1) / (torch.sqrt((x[i] ** 2).sum(-1) * (x[j] ** 2).sum(-1)) + 1e-8)
                          ).clamp(-1, 1)) for i, j in pairs]
    return torch.cos(torch.stack(angles).mean(0))


def stock_ratio(cos: torch.Tensor, k: int, average: str = "cos") -> tuple[torch.Tensor, torch.Tensor]:
    """``(t, singular)``: ``t = k cos / (1 + (k - 1) cos)``. mergekit (``average="cos"``): 0 where
    ``|1 + (k - 1) cos| < 1e-6`` (``singular``); FusionBench (``"angle"``): ``1e-8`` added to the denominator."""
    denominator = 1 + (k - 1) * cos
    if average == "angle":
        return ((k * cos) / (denominator + 1e-8)).float(), torch.zeros_like(cos, dtype=torch.bool)
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    return torch.where(singular, torch.zeros_like(cos), (k * cos) / safe), singular


def _model_stock_prepare(ctx: MergeContext, *, filter_wise: bool, average: str) -> dict:
    if ctx.n_tasks < 2:
        raise InvalidParameterError(
            f"model_stock needs the base and at least two fine-tunes (it measures the angle between their "
            f"updates); got {ctx.n_tasks} ({', '.join(map(repr, ctx.tasks))}). Add a fine-tune or use linear."
        )
    return {}


def _model_stock_mergekit(p: Mapping[str, Any]) -> Mergekit | None:
    """mergekit's ``model_stock`` (``filter_wise``): only at ``alpha=1``, where the merges are the same."""
    if float(p.get("alpha", 1.0)) != 1.0:
        return None
    notes: tuple[str, ...] = ()
    if p.get("average", "cos") == "angle":
        notes = ("approximate: weightlens averaged the pairwise angles (FusionBench); mergekit averages the "
                 "cosines (the same for two fine-tunes, up to its 1e-6 and FusionBench's 1e-8 guards)",)
    return Mergekit("model_stock", {}, {"filter_wise": bool(p.get("filter_wise", False))}, notes)


@register_merge(
    "model_stock", alpha=1.0, pretty_name="Model Stock", reference="Jang et al., ECCV 2024",
    prepare=_model_stock_prepare, alpha_grid=_GRID, mergekit=_model_stock_mergekit,
)
def model_stock(ctx: MergeContext, key: str, *, filter_wise: bool = False,
                average: Literal["cos", "angle"] = "cos") -> KeyUpdate:
    """Model Stock: ``update = t * mean_i tau_i`` with ``t = k cos / (1 + (k - 1) cos)`` per tensor.

    Parameters
    ----------
    filter_wise : bool, default=False
        One angle and ratio per row (mergekit's ``filter_wise``) instead of per tensor.
    average : {"cos", "angle"}, default="cos"
        With three or more fine-tunes, the mean of the pairwise cosines (mergekit) or the cosine of the
        mean pairwise angle (FusionBench); the same for two.
    alpha : float, default=1.0
        ``theta = theta_0 + alpha * update``: 1 is mergekit's Model Stock.
    """
    deltas = ctx.deltas(key)
    t, singular = stock_ratio(mean_cos(deltas, filter_wise, average), ctx.n_tasks, average)
    notes: tuple[str, ...] = ()
    if bool(singular.any()):
        where = f"{int(singular.sum())} row(s)" if filter_wise else "this tensor"
        notes = (f"model_stock: 1 + (k - 1) cos is 0 for {where} (opposing updates): t = 0 there, the base "
                 "is kept, as mergekit",)
    mean = deltas.mean(0)
    if filter_wise and deltas.dim() > 2:
        t = t.unsqueeze(-1)
    return KeyUpdate(t * mean, notes)
