"""KnOTS: merge task updates in the basis of one SVD of their concatenation (``knots_ties``, ``knots_ta``).

Stoica, Ramesh, Ecsedi, Choshen, Hoffman, "Model Merging with SVD to Tie the KnOTS", ICLR 2025
(arXiv:2410.19735; reference code github.com/gstoica27/KnOTS, ``SVDMerger`` in ``task_merger.py``,
``ties_masking`` / ``tv_masking`` / ``masked_merge`` in ``masking_ops.py``).

Per matrix key, with task updates ``delta_t`` of shape ``(m, n)`` (the reference's
``concat_across_output=True``: no transpose):

1. concatenate them along the input dimension, ``[delta_1, ..., delta_T]`` (``m x T n``), and take one
   thin SVD ``U S [V_1^T, ..., V_T^T]`` in float64, keeping the ``R`` directions above the numerical-rank
   tolerance (the reference keeps ``s > 1e-5``, an absolute cut; see *Differences*);
2. represent task ``t`` by ``S V_t^T`` (``R x n``, float32): the singular values scale the blocks *before*
   the trim (the reference's ``s_on_V``, its default and only behaviour in its latest code), so
   ``delta_t = U (S V_t^T)`` exactly;
3. merge the ``T`` blocks entrywise: ``knots_ties`` by TIES (per-task magnitude trim keeping the
   entries with ``|x| >=`` the ``(P - int(P * density))``-th smallest ``|x|``, elected sign
   ``sgn(sum_t x_t)``, disjoint mean or sum of the agreeing entries); ``knots_ta`` by a sum (after the same
   magnitude trim, the reference's ``tv_masking``, when ``density < 1``);
4. rebuild ``U @ merged`` and let the engine add ``alpha`` times it to the base (the reference multiplies
   the blocks by its first scaling coefficient before the merge: the same, since the merge is
   positively homogeneous).

``scope="global"`` (default, the reference): the trim thresholds and the majority sign that settles a
zero vote sum are taken over the blocks of *every* decomposed key at once (the reference flattens all
blocks of a task into one vector). They are found before any key is merged, by the ``prepare`` hook,
in streaming passes (a radix select on the fp32 bits, as TIES' global scope) that hold one key's blocks
at a time. ``scope="tensor"``: thresholds and majority sign per key.

Decomposed keys are those with 2 or more dims (convolutions flattened to ``(out, -1)``, as the reference
does); an all-zero key (every task zero) gets a zero update and a note. **Other keys** (biases, norms):
``knots_ta`` gives their task-arithmetic sum (so ``knots_ta`` at ``density=1`` *is* task arithmetic on
every key), ``knots_ties`` their mean, as TSV-M and Iso do; both scaled by ``alpha``.

**Dense task vectors** (full fine-tunes): the concatenation is formed and decomposed (``m x T n``).
**LoRA adapters**: ``delta_t = s_t B_t A_t``, so the concatenation is ``[B_1 ... B_T] blockdiag(s_t A_t)``,
a product of rank at most ``sum_t r_t``: its thin SVD comes exactly from the factors
(:func:`weightlens.linalg.factored_svd`: QR of the stacked ``B``'s and of ``blockdiag(s_t A_t)^T``, SVD of
the small core), ``U`` is ``m x R`` and each block ``R x n`` with ``R <= sum_t r_t``; nothing ``m x T n`` is
decomposed (the merged update ``U @ merged`` is formed, as every merge forms its update).

Differences from the reference code (``docs/methods.md``):

* the kept directions are those above ``max(m, T n) * eps(float32) * s_1`` (the same on the dense and the
  factored path); the reference's ``s > 1e-5`` depends on the scale of the weights;
* a coordinate whose elected sign is 0 even after the majority rule keeps nothing (the reference's
  ``where(sign > 0, x > 0, x < 0)`` would keep its negative entries, as in TIES);
* the reference's LoRA handler reads ``B @ A`` without peft's scale ``lora_alpha / r`` (its configs use
  ``alpha = r``); here the task vector is the scaled update;
* for full fine-tunes the reference appends each bias as one more column of its weight and turns norm
  weights into diagonal matrices; per key, biases and norms here get the mean (TIES) or sum (TA);
* ``merge_func="max"`` is not offered (the reference's unsigned max of masked blocks is not TIES' signed one).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Annotated, Any, Literal

import torch

from weightlens import linalg
from weightlens.analysis.signs import elected_sign, majority_sign, radix_thresholds, trim
from weightlens.io.recipe import Mergekit
from weightlens.merge.arithmetic import _TA_GRID, disjoint_merge  # knots_ta at density 1 is task arithmetic
from weightlens.merge.engine import MergeContext
from weightlens.merge.registry import DEFAULT_GRID, Interval, KeyUpdate, register_merge
from weightlens.merge.spectral import _all_zero, _lora

__all__ = ["knots_blocks", "knots_ta", "knots_ties"]

Unit = Annotated[float, Interval(0, 1, "right")]


def _decomposed(ctx: MergeContext, key: str) -> bool:
    shape = ctx.shape(key)
    return len(shape) >= 2 and min(shape[0], _width(shape)) > 0


def _width(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape[1:]:
        n *= d
    return n


# --------------------------------------------------------------------------------------- the blocks
def knots_blocks(ctx: MergeContext, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, blocks)`` of one key: ``U (m, R)`` and the tasks' ``S V_t^T`` stacked ``(T, R, n)``, float32,
    with ``delta_t = U @ blocks[t]`` (``n`` the product of the trailing dims). Cached per task set and key.

    From LoRA factors when every task has them at ``key`` (nothing ``m x T n`` decomposed), else from the
    dense concatenation. ``R`` counts the singular values above ``max(m, T n) * eps(float32) * s_1``."""

    def compute() -> tuple[torch.Tensor, torch.Tensor]:
        shape, T = ctx.shape(key), ctx.n_tasks
        m, n = shape[0], _width(shape)
        lora = _lora(ctx, key)
        if lora is not None:  # [B_1 ... B_T] @ blockdiag(s_t A_t)
            B = torch.cat([f.B for f in lora.values()], 1)
            A = torch.block_diag(*[f.A.double() * float(f.scale) for f in lora.values()])
            dec = linalg.factored_svd(B, A, device=ctx.device, dtype=torch.float64, name=key)
        else:
            cat = torch.cat([d.reshape(m, n) for d in ctx.deltas(key)], 1)
            dec = linalg.svd(cat, device=ctx.device, dtype=torch.float64, name=key)
        U, S, Vh = dec
        R = linalg.numerical_rank(S, (m, T * n), torch.float32) if S.numel() else 0
        blocks = (S[:R, None] * Vh[:R]).reshape(R, T, n).permute(1, 0, 2)
        return U[:, :R].to(torch.float32).contiguous(), blocks.to(torch.float32).contiguous()

    return ctx.cached(("knots_blocks", key), compute)


def _keys(ctx: MergeContext) -> list[str]:
    return [k for k in ctx.tv.keys if _decomposed(ctx, k)]


def _all_blocks(ctx: MergeContext) -> Iterator[torch.Tensor]:
    for key in _keys(ctx):
        yield knots_blocks(ctx, key)[1]


def global_thresholds(ctx: MergeContext, density: float) -> torch.Tensor:
    """Per-task ``(P - int(P * density))``-th smallest ``|x|`` over the blocks of every decomposed key (the
    reference's ``topk_values_mask`` on the flattened blocks), exact (:func:`radix_thresholds`, two passes over
    the cached blocks); ``(T,)`` float32, zeros when nothing is trimmed."""
    return radix_thresholds(lambda: _all_blocks(ctx), ctx.n_tasks, density)


def _prepare(ctx: MergeContext, *, density: float, scope: str, ties: bool) -> dict[str, Any]:
    """Global scope: per-task thresholds (two passes), then for TIES the majority sign (one pass)."""
    if scope != "global":
        return {}
    thresholds = ctx.once(("knots_thresholds", density), lambda: global_thresholds(ctx, density))
    if not ties:
        return {"thresholds": thresholds}

    majority = ctx.once(("knots_majority", density),
                        lambda: majority_sign(trim(blocks, thresholds=thresholds) for blocks in _all_blocks(ctx)))
    return {"thresholds": thresholds, "majority": majority}


def _knots_ties_prepare(ctx: MergeContext, *, density: float, scope: str, merge_func: str) -> dict[str, Any]:
    return _prepare(ctx, density=density, scope=scope, ties=True)


def _knots_ta_prepare(ctx: MergeContext, *, density: float, scope: str) -> dict[str, Any]:
    return _prepare(ctx, density=density, scope=scope, ties=False)


def _merged(ctx: MergeContext, key: str, name: str, density: float, scope: str,
            merge: Any) -> KeyUpdate:
    """``U @ merge(trimmed blocks)`` of one decomposed key (``merge(trimmed) -> (R, n)``)."""
    zero = _all_zero(ctx, key, name)
    if zero is not None:
        return zero
    U, blocks = knots_blocks(ctx, key)
    if scope == "global":
        trimmed = trim(blocks, thresholds=ctx.state["thresholds"])
    else:
        trimmed = trim(blocks, density if density < 1 else None)
    notes: tuple[str, ...] = ()
    if blocks.numel() and blocks.any() and not trimmed.any():
        notes = (f"{name}: no entry of this key's aligned blocks reaches the whole-model trim threshold "
                 f"(density={density}, scope='global'): zero update.",)
    return KeyUpdate((U @ merge(trimmed)).reshape(ctx.shape(key)), notes)


# --------------------------------------------------------------------------------------- KnOTS-TIES
@register_merge(
    "knots_ties", alpha=0.6, pretty_name="KnOTS-TIES", reference="Stoica et al., ICLR 2025",
    prepare=_knots_ties_prepare, uses_svd=True, decomposes=("concat",), alpha_grid=DEFAULT_GRID,
)  # mergekit has no KnOTS: no mergekit= (no mergekit_config.yml is written)
def knots_ties(
    ctx: MergeContext,
    key: str,
    *,
    density: Unit = 0.2,
    scope: Literal["global", "tensor"] = "global",
    merge_func: Literal["mean", "sum"] = "mean",
) -> KeyUpdate:
    """KnOTS-TIES: TIES on the tasks' ``S V_t^T`` blocks of one SVD of ``[delta_1 ... delta_T]``, rebuilt by ``U``.

    Parameters
    ----------
    density : float in (0, 1], default=0.2
        Fraction of each task's block entries kept by magnitude (the reference's ``topK=20``).
    scope : {"global", "tensor"}, default="global"
        ``"global"``: thresholds and the zero-vote majority sign over every decomposed key at once
        (the reference); ``"tensor"``: per key.
    merge_func : {"mean", "sum"}, default="mean"
        Disjoint mean (the reference's ``merging_type``) or sum of the agreeing entries.
    alpha : float, default=0.6
        The reference's scaling coefficient (its configs' 0.6). Keys with fewer than 2 dims get
        ``alpha`` times the task mean.
    """
    if not _decomposed(ctx, key):
        return KeyUpdate(ctx.deltas(key).mean(0))

    def merge(trimmed: torch.Tensor) -> torch.Tensor:
        zero = ctx.state["majority"] if scope == "global" else None
        return disjoint_merge(trimmed, elected_sign(trimmed.sum(0), zero), merge_func)

    return _merged(ctx, key, "KnOTS-TIES", density, scope, merge)


# --------------------------------------------------------------------------------------- KnOTS-TA
def _knots_ta_mergekit(p: Mapping[str, Any]) -> Mergekit | None:
    """At ``density=1`` KnOTS-TA is task arithmetic exactly: mergekit's ``task_arithmetic``; else none."""
    if float(p.get("density", 1.0)) < 1:
        return None
    return Mergekit("task_arithmetic", {"weight": float(p.get("alpha", 0.3))}, {"normalize": False})


@register_merge(
    "knots_ta", alpha=0.3, pretty_name="KnOTS-TA", reference="Stoica et al., ICLR 2025",
    prepare=_knots_ta_prepare, uses_svd=True, decomposes=("concat",), alpha_grid=_TA_GRID, mergekit=_knots_ta_mergekit,
)
def knots_ta(
    ctx: MergeContext,
    key: str,
    *,
    density: Unit = 1.0,
    scope: Literal["global", "tensor"] = "global",
) -> KeyUpdate:
    """KnOTS-TA: the sum of the tasks' (magnitude-trimmed) ``S V_t^T`` blocks, rebuilt by ``U``.

    At ``density=1`` (default, nothing trimmed) this is task arithmetic exactly:
    ``U sum_t S V_t^T = sum_t delta_t``.

    Parameters
    ----------
    density : float in (0, 1], default=1.0
        Fraction of each task's block entries kept by magnitude before the sum (the reference's
        ``tv_masking`` with ``topK``; 1 keeps all).
    scope : {"global", "tensor"}, default="global"
        Where the trim thresholds are taken: over every decomposed key (the reference) or per key.
    alpha : float, default=0.3
        Coefficient of the sum (task arithmetic's default). Keys with fewer than 2 dims get ``alpha``
        times the task sum.
    """
    if not _decomposed(ctx, key):
        return KeyUpdate(ctx.deltas(key).sum(0))
    return _merged(ctx, key, "KnOTS-TA", density, scope, lambda trimmed: trimmed.sum(0))
