"""PEFT's ``add_weighted_adapter`` modes ``cat`` and ``svd`` as merge methods (``peft_cat``, ``peft_svd``).

peft (``peft.tuners.lora.model.LoraModel.add_weighted_adapter``, read at peft 0.21.2) combines LoRA adapters
into a new one whose ``lora_alpha`` equals its rank, so the new adapter's scale is 1 and its update is
``lora_B @ lora_A``:

* ``combination_type="cat"``: ``lora_A = [w_1 s_1 A_1; ...; w_T s_T A_T]``, ``lora_B = [B_1, ..., B_T]`` (rank
  ``sum_t r_t``), so the update is ``sum_t w_t s_t B_t A_t = sum_t w_t delta_t`` exactly;
* ``combination_type="svd"``: the weighted sum ``sum_t w_t delta_t`` (``delta_t`` with its scale
  ``s_t``; transposed for ``fan_in_fan_out`` layers and embeddings), ``U, S, Vh = torch.linalg.svd(.,
  full_matrices=svd_full_matrices, driver=svd_driver)``, ``lora_B = U[:, :k] diag(S[:k])``,
  ``lora_A = Vh[:k]`` with ``k = svd_rank`` (default: the largest ``r`` of the adapters' configs, their
  ``rank_pattern`` included), and with ``svd_clamp = q`` both clamped entrywise to ``[-h, h]``, ``h`` the
  ``q``-quantile of the *signed* entries of ``lora_B`` and ``lora_A`` together.

**weights and alpha.** weightlens' ``alpha`` is peft's weight, the same for every adapter:
``merge(tv, method="peft_cat", alpha=w)`` is ``add_weighted_adapter(weights=[w] * T, combination_type="cat")``,
and ``peft_svd`` likewise while ``clamp`` is None (a truncated SVD commutes with a common factor). The clamp
does not (``U S`` scales with ``w``, ``Vh`` does not, and the quantile is taken over both): ``peft_svd``
clamps the weight-1 factors, i.e. equals peft's ``weights=[1] * T`` adapter with its update scaled by
``alpha``. Unequal per-adapter weights are not a scalar parameter; scale those task vectors beforehand.

**Keys.** peft changes only the modules its adapters target; for a task vector every key is merged:
keys with 2 or more dims as above (convolutions flattened to ``(out, -1)``, as peft does), others (biases,
norms: a full fine-tune's) get the task-arithmetic sum, which is also what ``cat`` gives. **Dense task
vectors** (full fine-tunes): ``peft_cat`` is task arithmetic; ``peft_svd`` the rank-``k`` truncation of the
task-arithmetic sum, with ``rank=None`` meaning the largest numerical rank of the task updates (no
truncation for full-rank fine-tunes).

**From LoRA factors** (every task an adapter at the key): the sum ``[B_1 ... B_T] @ [s_1 A_1; ...]`` is
decomposed exactly from its factors (:func:`weightlens.linalg.factored_svd`, rank at most ``sum r_t``), and the
top ``k`` triplets are handed to the engine as the update's factors (2-D keys); nothing ``m x n`` is
decomposed. Only ``clamp`` needs peft's own dense ``torch.linalg.svd`` of the ``m x n`` sum: the clamp
threshold depends on the sign LAPACK gives each singular pair (a signed quantile), so the decomposition
is peft's call, with its ``full_matrices`` and ``driver``, on this device.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

import torch

from weightlens import decompositions, linalg
from weightlens.io.recipe import Mergekit
from weightlens.io.sources import AdapterCheckpoint
from weightlens.linalg.factored import concat_factors
from weightlens.merge.engine import MergeContext
from weightlens.merge.registry import DEFAULT_GRID, Interval, KeyUpdate, register_merge
from weightlens.merge.spectral import _all_zero, _lora

__all__ = ["peft_cat", "peft_rank", "peft_svd"]


def _matrix(ctx: MergeContext, key: str) -> tuple[int, int] | None:
    """``(m, n)`` of a key with 2 or more dims (trailing dims flattened), else None."""
    shape = ctx.shape(key)
    if len(shape) < 2:
        return None
    n = 1
    for d in shape[1:]:
        n *= d
    return (shape[0], n) if min(shape[0], n) > 0 else None


def _sum_factors(ctx: MergeContext, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(B, A)`` with ``B @ A = sum_t delta_t`` when every task has LoRA factors at ``key``, else None."""
    lora = _lora(ctx, key)
    if lora is None:
        return None
    return concat_factors([(f.A, f.B, f.scale) for f in lora.values()])


def _svd_factors(ctx: MergeContext, key: str, dec: linalg.SVD, k: int) -> linalg.SVD | None:
    """The top ``k`` triplets as ``KeyUpdate.factors`` (2-D keys, at least one triplet), else None."""
    U, S, Vh = dec
    p = min(k, S.numel())
    if len(ctx.shape(key)) != 2 or p == 0:
        return None
    return linalg.SVD(U[:, :p].float(), S[:p].float(), Vh[:p].float())


# --------------------------------------------------------------------------------------- cat
def _peft_cat_mergekit(p: Mapping[str, Any]) -> Mergekit:
    """``cat``'s update is the weighted sum: mergekit's ``task_arithmetic`` exactly."""
    return Mergekit("task_arithmetic", {"weight": float(p.get("alpha", 1.0))}, {"normalize": False})


@register_merge(
    "peft_cat", alpha=1.0, pretty_name="PEFT cat", reference="peft add_weighted_adapter (combination_type='cat')",
    uses_svd=False, alpha_grid=DEFAULT_GRID, mergekit=_peft_cat_mergekit,
)
def peft_cat(ctx: MergeContext, key: str) -> KeyUpdate:
    """PEFT ``cat``: the adapters' factors concatenated, update ``sum_t delta_t`` (rank ``sum_t r_t``).

    Parameters
    ----------
    alpha : float, default=1.0
        peft's weight of every adapter (``weights=[alpha] * T``).
    """
    factors = _sum_factors(ctx, key) if _matrix(ctx, key) else None
    if factors is None:
        return KeyUpdate(ctx.deltas(key).sum(0))
    B, A = factors
    dec = linalg.factored_svd(B, A, device=ctx.device, name=key) if B.shape[1] else None
    update = (B @ A).reshape(ctx.shape(key))
    return KeyUpdate(update, (), None if dec is None else _svd_factors(ctx, key, dec, dec.S.numel()))


# --------------------------------------------------------------------------------------- svd
def peft_rank(ctx: MergeContext, key: str) -> int:
    """``peft_svd``'s default rank at ``key``: the largest rank among the tasks. An adapter's is peft's
    ``svd_rank`` default (its config's ``r`` and every ``rank_pattern`` value, one number for the whole
    adapter); a full fine-tune's the numerical rank of its update at ``key`` (so the dense twin of an
    adapter with no ``rank_pattern`` gets the adapter's rank)."""
    ranks = [0]
    mn = _matrix(ctx, key)
    for task in ctx.tasks:
        ckpt = ctx.tv.finetuned[task]
        if isinstance(ckpt, AdapterCheckpoint):
            cfg = ckpt.config
            ranks.append(max([int(cfg.get("r", 8)), *(int(v) for v in (cfg.get("rank_pattern") or {}).values())]))
        elif mn is not None:  # 2-D: the values cached for analysis and the spectral merges
            S = (decompositions.svdvals(ctx.tv, key, task, device=ctx.device) if len(ctx.shape(key)) == 2 else
                 linalg.svdvals(ctx.delta(task, key).reshape(mn), device=ctx.device, name=key))
            ranks.append(linalg.numerical_rank(S, mn))
    return max(ranks)


def _transposed(ctx: MergeContext, key: str) -> bool:
    """Whether peft decomposes ``key``'s update transposed: an adapter stores it ``fan_in_fan_out`` or as an
    embedding (peft's ``delta_weight.T`` before its SVD)."""
    for task in ctx.tasks:
        ckpt = ctx.tv.finetuned[task]
        if not isinstance(ckpt, AdapterCheckpoint):
            continue
        own = {base: mine for mine, base in ctx.tv.key_maps[task].items()}.get(key, key)
        if own in ckpt.lora_keys and ckpt.lora(own).layout in ("fan_in_fan_out", "embedding"):
            return True
    return False


def _clamped(ctx: MergeContext, key: str, mn: tuple[int, int], k: int, clamp: float, full_matrices: bool,
             driver: str) -> torch.Tensor:
    """peft's clamped rank-``k`` factors' product, by peft's own steps (see the module docstring)."""
    total = ctx.deltas(key).sum(0).reshape(mn).to(ctx.device)
    flip = _transposed(ctx, key)
    if flip:
        total = total.mT
    # torch.linalg.svd itself, not weightlens.linalg.svd: its raw signs decide the signed quantile
    U, S, Vh = torch.linalg.svd(total, full_matrices=full_matrices,
                                driver=driver if total.device.type == "cuda" and driver != "default" else None)
    U = U[:, :k] @ torch.diag(S[:k])
    Vh = Vh[:k]
    high = torch.quantile(torch.cat([U.flatten(), Vh.flatten()]), clamp)
    product = U.clamp(-high, high) @ Vh.clamp(-high, high)
    return (product.mT if flip else product).cpu()


@register_merge(
    "peft_svd", alpha=1.0, pretty_name="PEFT svd", reference="peft add_weighted_adapter (combination_type='svd')",
    uses_svd=True, decomposes=("tasks", "sum"), alpha_grid=DEFAULT_GRID,
)  # mergekit has no truncated-SVD merge: no mergekit= (no mergekit_config.yml is written)
def peft_svd(
    ctx: MergeContext,
    key: str,
    *,
    rank: Annotated[int | None, Interval(1, None, "left")] = None,
    clamp: Annotated[float | None, Interval(0, 1, "both")] = None,
    full_matrices: bool = True,
    driver: Literal["default", "gesvd", "gesvdj", "gesvda"] = "default",
) -> KeyUpdate:
    """PEFT ``svd``: the rank-``rank`` truncated SVD of ``sum_t delta_t``, optionally quantile-clamped.

    Parameters
    ----------
    rank : int >= 1 or None, default=None
        peft's ``svd_rank``; None: the largest rank of the tasks (:func:`peft_rank`: an adapter's ``r`` as
        peft reads its config, ``rank_pattern`` included; a full fine-tune's numerical rank here). Capped at
        ``min(m, n)``.
    clamp : float in [0, 1] or None, default=None
        peft's ``svd_clamp``: the quantile of the factors' signed entries that bounds them (None: no clamp).
    full_matrices, driver :
        peft's ``svd_full_matrices`` and ``svd_driver`` (``"default"``: peft's None; a driver applies on CUDA
        only, as in torch). They enter only
        with ``clamp`` (peft's own dense SVD; the truncated product does not depend on them otherwise).
    alpha : float, default=1.0
        peft's weight of every adapter (see the module docstring for ``clamp``).
    """
    mn = _matrix(ctx, key)
    if mn is None:
        return KeyUpdate(ctx.deltas(key).sum(0))
    zero = _all_zero(ctx, key, "PEFT svd")
    if zero is not None:
        return zero
    k = min(rank if rank is not None else peft_rank(ctx, key), min(mn))
    notes: tuple[str, ...] = ()
    if clamp is not None:
        update = _clamped(ctx, key, mn, k, clamp, full_matrices, driver)
        return KeyUpdate(update.reshape(ctx.shape(key)), notes)
    factors = _sum_factors(ctx, key)
    if factors is not None:
        B, A = factors
        if B.shape[1] == 0:
            return KeyUpdate(torch.zeros(ctx.shape(key)), notes)
        dec = linalg.factored_svd(B, A, device=ctx.device, dtype=torch.float64, name=key)
    else:
        dec = linalg.svd(ctx.deltas(key).sum(0).reshape(mn), device=ctx.device, name=key)
    U, S, Vh = dec
    p = min(k, S.numel())
    update = ((U[:, :p] * S[:p]) @ Vh[:p]).to(torch.float32).cpu().reshape(ctx.shape(key))
    return KeyUpdate(update, notes, _svd_factors(ctx, key, dec, k))
