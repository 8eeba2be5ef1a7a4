"""PCB-Merging: parameter competition balancing, drop, rescale (``docs/methods.md#pcb``).

Du et al., "Parameter Competition Balancing for Model Merging", NeurIPS 2024 (arXiv:2410.02396);
reference implementation ``PCB_merge`` in the authors' ``duguodong7/pcb-merging`` (``pcb-merging.py``),
which FusionBench's ``pcb_merging`` adapts.

Per task ``i`` of ``T``, on the task vectors flattened over the whole model (``scope="global"``, as the
reference code flattens every merged key into one vector; ``scope="tensor"``: each key on its own).

``variant="code"`` (default; the authors' ``PCB_merge``, float32 as there):

* clip: ``a_i = clamp(|tau_i|, q_lo, q_hi)``, the bounds the task's ``int(P clip)``-th and
  ``int(P (1 - clip) - 1)``-th smallest ``|tau_i|`` (0-based; ``clip=0.0001``), and
  ``c_i = sign(tau_i) a_i``;
* intra-balancing ``exp(T n_i^2)``, ``n_i = (a_i - q_lo) / (q_hi - q_lo)`` (the numerator of a softmax; its
  denominator is one number per task and cancels below);
* inter-balancing ``tanh(tau_i * sum_j tau_j)`` (``j`` over every task, ``i`` included);
* importance ``b_i`` their product; drop and rescale: ``s_i = (max(b_i, v_i) - v_i) / (max b_i - v_i)``, ``v_i``
  the ``int(P (1 - ratio))``-th smallest ``b_i``: the top ``ratio`` of the entries keep a weight in (0, 1], the
  rest 0;
* ``update = sum_i s_i c_i / max(sum_i s_i, 1e-12)``.

``variant="paper"`` (equations 2-6 of the paper, without the clip): ``Norm`` the min-max normalisation over
the ``P`` entries and ``Softmax`` over them,

* ``beta_intra_i = Softmax(T * Norm(tau_i * tau_i))``, ``beta_inter_i = sum_j Softmax(Norm(tau_i * tau_j))``,
  ``beta_i = beta_intra_i * beta_inter_i`` (float64, rounded to float32 for the ranking);
* ``m_i = beta_i >= v_i``, ``v_i`` the ``int(P (1 - ratio))``-th smallest ``beta_i`` (0-based);
* ``update = sum_i m_i beta_i tau_i / sum_i m_i beta_i`` (0 where no task keeps the entry).

The merge is ``theta_0 + alpha * update``. A constant normalisation (``q_hi = q_lo``, ``max = min``) reads 0.

**Streaming.** The global statistics are exact order statistics found by a two-pass radix select over the
fp32 bits of each pass's values, one key of every task at a time (``weightlens._order_stats.kth_values``, the
select behind TIES' global thresholds too): ``code`` reads
the task vectors twice for the clip bounds, twice for the drop threshold and once to merge; ``paper`` once
for the pairwise minima and maxima, once for the softmax denominators, twice for the threshold and once to
merge. Factored (LoRA) task vectors are materialised one key at a time by ``ctx.deltas``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Annotated, Any, Literal

import torch

from weightlens._order_stats import kth_values
from weightlens.merge.arithmetic import _TIES_GRID
from weightlens.merge.engine import MergeContext
from weightlens.merge.registry import Interval, KeyUpdate, register_merge

__all__ = ["pcb", "pcb_importance"]

Unit = Annotated[float, Interval(0, 1, "right")]
Clip = Annotated[float, Interval(0, 0.5, "left")]
Variant = Literal["code", "paper"]
Scope = Literal["global", "tensor"]
_F64 = torch.float64


# ------------------------------------------------------------------------------ exact order statistics
def _clip_ranks(clip: float) -> Callable[[int], list[int]]:
    """The reference's ``sorted[int(d * clip)]`` and ``sorted[int(d * (1 - clip) - 1)]``, as 1-based ranks."""
    return lambda d: [int(d * clip) + 1, int(d * (1 - clip) - 1) + 1]


def _drop_ranks(ratio: float) -> Callable[[int], list[int]]:
    """The reference's drop threshold ``sorted[int(d * (1 - ratio))]`` and the maximum, as 1-based ranks."""
    return lambda d: [int(d * (1 - ratio)) + 1, d]


def _col(x: torch.Tensor, ndim: int) -> torch.Tensor:
    return x.reshape(-1, *([1] * (ndim - 1)))


def _norm(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Min-max normalisation with given bounds; 0 where they are equal."""
    span = high - low
    return torch.where(span > 0, (x - low) / torch.where(span > 0, span, 1), torch.zeros((), dtype=x.dtype))


# ------------------------------------------------------------------------------ importance
def pcb_importance(deltas: torch.Tensor, stats: dict[str, torch.Tensor], variant: str) -> torch.Tensor:
    """PCB importance of the stacked task vectors ``(T, *shape)`` of one key, given the whole-scope statistics
    ``stats`` (``code``: ``clip`` ``(T, 2)``; ``paper``: ``min``, ``max``, ``z_intra``, ``z_inter``). float32."""
    T, nd = deltas.shape[0], deltas.dim()
    if variant == "code":
        lo, hi = _col(stats["clip"][:, 0], nd), _col(stats["clip"][:, 1], nd)
        a = torch.maximum(torch.minimum(deltas.abs(), hi), lo)
        intra = torch.exp(T * _norm(a, lo, hi) ** 2)
        inter = torch.tanh(deltas * deltas.sum(0))
        return intra * inter
    d = deltas.to(_F64)
    beta = torch.empty_like(d)
    for i in range(T):
        prod = d[i] * d  # (T, *shape): tau_i * tau_j for every j
        low, high = _col(stats["min"][i], nd), _col(stats["max"][i], nd)
        inter = (torch.exp(_norm(prod, low, high)) / _col(stats["z_inter"][i], nd)).sum(0)
        intra = torch.exp(T * _norm(prod[i], low[i], high[i])) / stats["z_intra"][i]
        beta[i] = intra * inter
    return beta.to(torch.float32)


def _paper_pairs(blocks: Iterable[torch.Tensor], T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(min, max)`` of ``tau_i * tau_j`` over the scope, ``(T, T)`` float64 each."""
    low = torch.full((T, T), float("inf"), dtype=_F64)
    high = torch.full((T, T), float("-inf"), dtype=_F64)
    for block in blocks:
        d = block.reshape(T, -1).to(_F64)
        if d.shape[1] == 0:
            continue
        for i in range(T):
            prod = d[i] * d
            low[i] = torch.minimum(low[i], prod.amin(1))
            high[i] = torch.maximum(high[i], prod.amax(1))
    return low, high


def _paper_sums(blocks: Iterable[torch.Tensor], T: int, low: torch.Tensor,
                high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax denominators: ``sum exp(T Norm(tau_i^2))`` ``(T,)`` and ``sum exp(Norm(tau_i tau_j))`` ``(T, T)``."""
    z_intra, z_inter = torch.zeros(T, dtype=_F64), torch.zeros(T, T, dtype=_F64)
    for block in blocks:
        d = block.reshape(T, -1).to(_F64)
        for i in range(T):
            n = _norm(d[i] * d, low[i][:, None], high[i][:, None])
            z_inter[i] += torch.exp(n).sum(1)
            z_intra[i] += torch.exp(T * n[i]).sum()
    return z_intra, z_inter


def _statistics(blocks: Callable[[], Iterable[torch.Tensor]], T: int, ratio: float, variant: str,
                clip: float) -> dict[str, torch.Tensor]:
    """Every statistic the update of a key needs, over the stacks ``blocks()`` yields (the model or one key)."""
    if variant == "code":
        stats = {"clip": kth_values(blocks, T, _clip_ranks(clip), magnitude=True)}
    else:
        low, high = _paper_pairs(blocks(), T)
        z_intra, z_inter = _paper_sums(blocks(), T, low, high)
        stats = {"min": low, "max": high, "z_intra": z_intra, "z_inter": z_inter}
    stats["drop"] = kth_values(lambda: (pcb_importance(b, stats, variant) for b in blocks()), T, _drop_ranks(ratio))
    return stats


def _prepare(ctx: MergeContext, *, ratio: float, variant: str, scope: str, clip: float, **_: Any) -> dict:
    """Global scope: the clip bounds or softmax denominators, then the drop thresholds, over the whole model."""
    if scope != "global":
        return {}
    keys = [k for k in ctx.tv.keys if ctx.tv.numel(k) > 0]
    stats = ctx.once(("pcb", ratio, variant, clip),
                     lambda: _statistics(lambda: (ctx.deltas(k) for k in keys), ctx.n_tasks, ratio, variant, clip))
    return {"stats": stats}


def _update(deltas: torch.Tensor, stats: dict[str, torch.Tensor], variant: str) -> torch.Tensor:
    nd = deltas.dim()
    imp = pcb_importance(deltas, stats, variant)
    cut, top = _col(stats["drop"][:, 0], nd), _col(stats["drop"][:, 1], nd)
    if variant == "code":
        lo, hi = _col(stats["clip"][:, 0], nd), _col(stats["clip"][:, 1], nd)
        clipped = torch.sign(deltas) * torch.maximum(torch.minimum(deltas.abs(), hi), lo)
        scale = _norm(torch.maximum(imp, cut), cut, top)
        return (clipped * scale).sum(0) / scale.sum(0).clamp(min=1e-12)
    weight = torch.where(imp >= cut, imp, torch.zeros((), dtype=imp.dtype)).to(_F64)
    num, den = (weight * deltas.to(_F64)).sum(0), weight.sum(0)
    return torch.where(den > 0, num / torch.where(den > 0, den, 1), 0).to(torch.float32)


@register_merge(
    "pcb", alpha=1.0, pretty_name="PCB-Merging", reference="Du et al., NeurIPS 2024", prepare=_prepare,
    alpha_grid=_TIES_GRID,
)
def pcb(ctx: MergeContext, key: str, *, ratio: Unit = 0.1, variant: Variant = "code", scope: Scope = "global",
        clip: Clip = 0.0001) -> KeyUpdate:
    """PCB-Merging: intra- and inter-balancing importance, drop all but the top ``ratio``, importance-weighted mean.

    Parameters
    ----------
    ratio : float in (0, 1], default=0.1
        Fraction of each task's entries kept, by importance (the reference's ``pcb_ratio``).
    variant : {"code", "paper"}, default="code"
        ``"code"``: the authors' ``PCB_merge`` (clip, ``exp`` and ``tanh``, min-max rescaled weights);
        ``"paper"``: equations 2-6 (softmaxes of min-max normalised products, the kept importances as weights).
    scope : {"global", "tensor"}, default="global"
        Statistics (clip bounds, normalisations, softmaxes, drop threshold) over the whole model, as the
        reference flattens it, or per tensor.
    clip : float in [0, 0.5), default=0.0001
        ``variant="code"``: fraction of each task's smallest and largest ``|tau|`` clamped (the reference's
        ``min_ratio = max_ratio``); unused by ``"paper"``.
    alpha : float, default=1.0
        lambda of the paper (the update is a weighted mean of the task vectors).
    """
    deltas = ctx.deltas(key)
    if deltas[0].numel() == 0:
        return KeyUpdate(deltas.sum(0))
    T = ctx.n_tasks
    if scope == "global":
        stats = ctx.state["stats"]
    else:
        stats = _statistics(lambda: (deltas,), T, ratio, variant, clip)
    return KeyUpdate(_update(deltas, stats, variant))
