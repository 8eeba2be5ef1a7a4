"""Task arithmetic, TIES-Merging and DARE (``docs/methods.md#task_arithmetic``, ``#ties``, ``#dare``).

Every tensor class (matrices, vectors, convolutions) is treated alike, as in the reference code.

TIES scopes
-----------
``scope="global"`` (default, the TIES reference code): one threshold per task over the whole model
(every key of ``tv.keys`` flattened together). With P entries and ``k_keep = int(P * density)``, the
threshold is the ``(P - k_keep)``-th smallest ``|tau_t|`` and every entry with ``|tau_t| >=`` it is
kept, so ties at the threshold keep slightly more than ``density``; ``density = 1`` keeps everything.
A coordinate whose trimmed votes sum to exactly zero gets the whole-model majority sign
``sgn(sum_p gamma_p)`` (``resolve_zero_signs(..., "majority")``); if that is zero too, nothing agrees
and the coordinate stays 0 (the reference code would then keep the negative entries, an artefact of
``where(sign > 0, tau > 0, tau < 0)`` that we do not copy).

``scope="tensor"`` (mergekit's ``ties``): exactly ``max(1, floor(density * numel))`` entries per tensor
and task (mergekit 0.1.5 keeps at least one entry of a non-empty tensor), the largest ``|tau_t|``, ties
broken by the lower flat index (a stable sort; mergekit's ``argsort`` leaves the order of ties
unspecified); a zero vote sum counts as positive (mergekit's ``sign_weight >= 0``).
The STAR repository's ``local`` trimming (a per-tensor threshold keeping ties) is neither of these.

Global statistics are computed by the method's ``prepare`` hook before any key is merged, in
streaming passes that hold one key of every task at a time.

The global threshold is found in two streaming passes of a radix select on the fp32 bit pattern of
``|tau_t|`` (monotone for non-negative floats): pass 1 histograms the high 16 bits, pass 2 the low 16
bits inside the one bucket that holds the rank. The result is the exact k-th value (what
``torch.kthvalue`` returns on the flattened model) while holding one key of every task plus
``T * (2**15 + 2**16)`` int64 counts (0.75 MiB per task) instead of the ``T * P`` floats of the
reference's concatenation. Each pass reads every task vector once more; a third pass finds the
majority sign.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import torch

from weightlens.analysis.signs import elected_sign, majority_sign, streaming_thresholds, trim
from weightlens.io.recipe import Mergekit
from weightlens.merge.engine import MergeContext
from weightlens.merge.registry import Interval, KeyUpdate, register_merge
from weightlens.taskvectors import TaskVectors

__all__ = [
    "dare",
    "dare_deltas",
    "dare_mask",
    "disjoint_merge",
    "l1_rescaled",
    "majority_sign",
    "task_arithmetic",
    "ties",
    "ties_update",
    "trim_tensor",
]

Unit = Annotated[float, Interval(0, 1, "right")]
MergeFunc = Literal["mean", "sum", "max"]
#: Validation grids of the reference protocols (docs/methods.md#task_arithmetic, #ties): the
#: TALL-masks, TSV and Iso code for task arithmetic ``{1/30, ..., 1}``; the TIES README
#: ``{0.8, 0.9, ..., 2.5}``.
_TA_GRID = tuple(i / 30 for i in range(1, 31))
_TIES_GRID = tuple(round(0.1 * i, 10) for i in range(8, 26))


def _alpha(params: Mapping[str, Any]) -> float:
    return float(params.get("alpha", 1.0))


# ------------------------------------------------------------------------------ task arithmetic
def _task_arithmetic_mergekit(p: Mapping[str, Any]) -> Mergekit:
    return Mergekit("task_arithmetic", {"weight": _alpha(p)}, {"normalize": False})


@register_merge(
    "task_arithmetic", alpha=0.3, pretty_name="Task Arithmetic", reference="Ilharco et al., ICLR 2023",
    alpha_grid=_TA_GRID, mergekit=_task_arithmetic_mergekit,
)
def task_arithmetic(ctx: MergeContext, key: str) -> KeyUpdate:
    """``theta = theta_0 + alpha * sum_t tau_t`` (a sum, not a mean; alpha = 1/T is the average).

    Parameters
    ----------
    alpha : float, default=0.3
        Coefficient of the sum (fusion_bench's default without validation).
    """
    return KeyUpdate(ctx.deltas(key).sum(0), task_sum=True)


# ------------------------------------------------------------------------------ TIES pieces
def trim_tensor(deltas: torch.Tensor, density: float) -> torch.Tensor:
    """Keep exactly ``max(1, floor(density * numel))`` largest ``|tau_t|`` per task (none at density 0; stable:
    lower index wins), as mergekit 0.1.5's ``magnitude`` does.

    The kept set is what a stable descending sort's first ``k`` are: every entry above the ``k``-th largest
    value ``v``, then the entries equal to ``v`` in index order until ``k`` are kept. Found with one
    selection (``kthvalue``) and the first indices of the ties, not a sort (4x faster on 4096 x 1024); no
    running count over the tensor (an int64 cumsum took 8 bytes per entry and task: 0.4 GB on a
    32000 x 512 embedding of 3 tasks).
    """
    flat = deltas.reshape(deltas.shape[0], -1)
    n = flat.shape[1]
    k = max(1, int(n * density)) if density > 0 else 0
    if k >= n:
        return deltas.clone()
    if k == 0:
        return torch.zeros_like(deltas)
    out = torch.zeros_like(flat)
    for t in range(flat.shape[0]):  # one task at a time: temporaries of one task's size, not T times it
        size = flat[t].abs()
        v = torch.kthvalue(size, n - k + 1).values  # the k-th largest
        keep = size > v
        fit = k - int(keep.sum())  # how many of the ties fit, lowest index first (at least v itself)
        keep[torch.nonzero(size == v).flatten()[:fit]] = True
        torch.mul(flat[t], keep, out=out[t])
    return out.reshape(deltas.shape)


def disjoint_merge(trimmed: torch.Tensor, sign: torch.Tensor, merge_func: str) -> torch.Tensor:
    """Merge the entries that agree with ``sign`` (zeros never vote): dis-mean, dis-sum or dis-max.

    Task by task (the agreeing entries added in task order, as a sum over the stack adds them): temporaries of
    one task's size, not ``T`` times it."""
    zero = torch.zeros((), dtype=trimmed.dtype)
    total = torch.zeros_like(trimmed[0])
    count = torch.zeros(trimmed.shape[1:], dtype=torch.int64, device=trimmed.device)
    for part in trimmed:
        agree = (torch.sign(part) == sign) & (part != 0)
        selected = torch.where(agree, part, zero)
        if merge_func == "max":
            torch.maximum(total, selected.abs_(), out=total)
        else:
            total += selected
            count += agree
    if merge_func == "mean":
        return total / count.clamp_(min=1)
    if merge_func == "sum":
        return total
    return total * sign


# ------------------------------------------------------------------------------ TIES
def _ties_prepare(ctx: MergeContext, *, density: float, scope: str, merge_func: str) -> dict:
    """Global scope: per-task thresholds (two radix passes), then the majority sign (one pass)."""
    if scope != "global":
        return {}
    thresholds = ctx.once(("ties_thresholds", density), lambda: streaming_thresholds(ctx.tv, density))
    majority = ctx.once(
        ("ties_majority", density),
        lambda: majority_sign(trim(ctx.deltas(key), thresholds=thresholds) for key in ctx.tv.keys),
    )
    return {"thresholds": thresholds, "majority": majority}


def scope_gap(tv: TaskVectors, density: float, thresholds: torch.Tensor) -> tuple[int, int]:
    """``(entries, differing)``: how many entries the global trim (``thresholds``, one per task) and the
    per-tensor trim at ``density`` keep differently for some task. The two TIES merges can differ only
    there (elsewhere every task keeps or drops the same entries), so it bounds their difference."""
    entries = differing = 0
    for key in tv.keys:
        deltas = tv.deltas(key)
        kept_global = trim(deltas, thresholds=thresholds) != 0
        kept_tensor = trim_tensor(deltas, density) != 0
        entries += deltas[0].numel()
        differing += int((kept_global != kept_tensor).any(0).sum())
    return entries, differing


def _ties_mergekit(p: Mapping[str, Any], merged: Any = None) -> Mergekit | None:
    """mergekit's ``ties``; none for ``merge_func="max"``; approximate for ``scope="global"``, by how
    much measured on ``merged`` when given (one more pass over the task vectors)."""
    if p.get("merge_func", "mean") == "max":
        return None
    notes: tuple[str, ...] = ()
    if p.get("scope", "global") == "global":
        how_much = ""
        if merged is not None and "thresholds" in merged.state:
            entries, differing = scope_gap(merged.task_vectors, float(p.get("density", 0.2)),
                                           merged.state["thresholds"])
            how_much = (f"; the two trims keep different entries at {differing} of {entries} coordinates "
                        f"({100 * differing / max(entries, 1):.1f}%), the only ones where the merges can differ")
        notes = ("approximate: weightlens trimmed with one threshold per task over the whole model "
                 f"(scope='global'); mergekit trims each tensor (weightlens scope='tensor'){how_much}",)
    return Mergekit("ties", {"weight": 1.0, "density": float(p.get("density", 0.2))},
                    {"lambda": _alpha(p), "normalize": p.get("merge_func", "mean") == "mean"}, notes)


@register_merge(
    "ties", alpha=1.0, pretty_name="TIES-Merging", reference="Yadav et al., NeurIPS 2023", prepare=_ties_prepare,
    # global scope: two radix passes and the majority sign before the merge; export's gap to mergekit's trim
    passes=lambda p: 4 if p["scope"] == "global" else 0,
    alpha_grid=_TIES_GRID, mergekit=_ties_mergekit,
)
def ties(
    ctx: MergeContext,
    key: str,
    *,
    density: Unit = 0.2,
    scope: Literal["global", "tensor"] = "global",
    merge_func: MergeFunc = "mean",
) -> KeyUpdate:
    """TIES-Merging: trim, elect sign, disjoint merge; ``theta = theta_0 + alpha * tau_m``.

    Parameters
    ----------
    density : float in (0, 1], default=0.2
        Fraction of each task vector kept by magnitude (TIES' top-k% = 20).
    scope : {"global", "tensor"}, default="global"
        ``"global"``: the TIES reference code (one threshold per task over the whole model, every
        entry at or above the k-th value kept; a zero vote sum takes the whole-model majority sign).
        ``"tensor"``: mergekit (exactly ``max(1, floor(density * numel))`` entries per tensor and task;
        a zero vote sum counts as positive, mergekit's ``sign_weight >= 0``).
    merge_func : {"mean", "sum", "max"}, default="mean"
        Disjoint mean, sum or signed max of the agreeing entries.
    alpha : float, default=1.0
        lambda of the paper.
    """
    return ties_update(ctx, key, ctx.deltas(key), density, scope, merge_func)


def ties_update(ctx: MergeContext, key: str, deltas: torch.Tensor, density: float, scope: str,
                merge_func: str) -> KeyUpdate:
    """TIES' unscaled update of ``key`` from its stacked task vectors ``deltas`` (global scope: ``ctx.state``
    holds :func:`_ties_prepare`'s thresholds and majority sign)."""
    notes: tuple[str, ...] = ()
    if scope == "global":
        trimmed = trim(deltas, thresholds=ctx.state["thresholds"])
        zero = ctx.state["majority"]
    else:
        trimmed, zero = trim_tensor(deltas, density), 1
        if int(ctx.tv.numel(key) * density) == 0:
            notes = (f"TIES: density {density} keeps floor({density} * {ctx.tv.numel(key)}) = 0 entries per "
                     "task of this tensor: its largest one is kept (scope='tensor', as mergekit).",)
    return KeyUpdate(disjoint_merge(trimmed, elected_sign(trimmed.sum(0), zero), merge_func), notes)


# ------------------------------------------------------------------------------ DARE
def dare_mask(shape: tuple[int, ...], density: float, seed: int, task: str, key: str) -> torch.Tensor:
    """Bernoulli(``density``) keep-mask of one task and key, reproducible from ``(seed, task, key)``.

    The generator seed is a hash of the three, so the mask does not depend on the order in which
    keys are visited or on which other tasks are merged.
    """
    return torch.rand(shape, generator=seeded_generator(seed, task, key)) < density


def seeded_generator(seed: int, task: str, key: str, salt: str = "") -> torch.Generator:
    """A CPU generator seeded from a hash of ``(salt, seed, task, key)``: a random mask that does not depend on
    the order keys are visited in or on the other tasks merged (DARE's; DELLA's with ``salt="della"``)."""
    text = (f"{salt}\0" if salt else "") + f"{seed}\0{task}\0{key}"
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def l1_rescaled(delta: torch.Tensor, mask: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """``delta * mask`` scaled to ``delta``'s L1 norm (mergekit's ``rescale``; unscaled when a norm < ``eps``)."""
    masked = delta * mask
    before, after = delta.abs().sum(), masked.abs().sum()
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def dare_deltas(ctx: MergeContext, key: str, density: float, seed: int, rescale: str = "density") -> torch.Tensor:
    """Stacked task vectors of ``key`` after drop-and-rescale, ``m ~ Bernoulli(density)``: ``m * tau / density``
    (``rescale="density"``), ``m * tau`` scaled to ``tau``'s L1 norm per tensor (``"l1"``) or ``m * tau``
    (``"none"``)."""
    deltas = ctx.deltas(key)
    for i, task in enumerate(ctx.tasks):
        mask = dare_mask(tuple(deltas.shape[1:]), density, seed, task, key)
        if rescale == "density":
            deltas[i] = deltas[i] * mask / density
        elif rescale == "l1":
            deltas[i] = l1_rescaled(deltas[i], mask)
        else:
            deltas[i] = deltas[i] * mask
    return deltas


def _dare_alpha(params: Mapping[str, Any], n_tasks: int) -> float:
    return 0.3 if params["combine"] == "task_arithmetic" else 1.0


def _dare_grid(params: Mapping[str, Any], n_tasks: int) -> tuple[float, ...]:
    return _TA_GRID if params["combine"] == "task_arithmetic" else _TIES_GRID


def _dare_mergekit(p: Mapping[str, Any]) -> Mergekit:
    """mergekit's ``dare_linear`` or (``combine="ties"``) ``dare_ties``: its own random masks."""
    ties = p.get("combine", "task_arithmetic") == "ties"
    rescale = p.get("rescale", "density")
    notes = ("mergekit draws its own random masks: the same distribution, other draws",)
    if rescale == "density":
        notes += ("approximate: weightlens divided the kept entries by density (DARE, rescale='density'); mergekit's "
                  "rescale scales each kept tensor back to its L1 norm (weightlens rescale='l1'): equal in "
                  "expectation, not per tensor",)
    return Mergekit("dare_ties" if ties else "dare_linear", {"weight": 1.0, "density": float(p.get("density", 0.5))},
                    {"lambda": _alpha(p), "rescale": rescale != "none", "normalize": ties}, notes)


def _dare_prepare(ctx: MergeContext, *, density: float, seed: int, combine: str, rescale: str) -> dict:
    """DARE-TIES: the whole-model majority sign of the rescaled vectors (one pass)."""
    if combine != "ties":
        return {}
    majority = ctx.once(
        ("dare_majority", density, seed, rescale),
        lambda: majority_sign(dare_deltas(ctx, k, density, seed, rescale) for k in ctx.tv.keys),
    )
    return {"majority": majority}


@register_merge(
    "dare", alpha=None, alpha_default=_dare_alpha, alpha_doc="0.3 (task_arithmetic) | 1.0 (ties)",
    pretty_name="DARE", reference="Yu et al., ICML 2024", prepare=_dare_prepare,
    alpha_grid=_dare_grid, mergekit=_dare_mergekit,
)
def dare(
    ctx: MergeContext,
    key: str,
    *,
    density: Unit = 0.5,
    seed: int = 0,
    combine: Literal["task_arithmetic", "ties"] = "task_arithmetic",
    rescale: Literal["density", "l1", "none"] = "density",
) -> KeyUpdate:
    """DARE: drop each entry with probability ``1 - density``, rescale the rest (by ``1/density``), combine.

    Parameters
    ----------
    density : float in (0, 1], default=0.5
        Keep probability (mergekit's density; the paper's drop rate p = 1 - density).
    seed : int, default=0
        Masks are drawn per (seed, task, key): the same seed gives the same merge.
    combine : {"task_arithmetic", "ties"}, default="task_arithmetic"
        Sum of the rescaled vectors (DARE-TA) or TIES sign election and disjoint mean without
        further trimming (DARE-TIES, as mergekit's ``dare_ties``; a zero vote sum takes the
        whole-model majority sign, as TIES' reference code).
    rescale : {"density", "l1", "none"}, default="density"
        ``"density"``: the paper (the kept entries divided by density, unbiased per entry); ``"l1"``: mergekit's
        ``rescale: true`` (each task's kept tensor scaled back to its L1 norm, skipped when either norm is
        below 1e-7); ``"none"``: mergekit's ``rescale: false`` (the kept entries as they are).
    alpha : float, default=0.3 with task_arithmetic, 1.0 with ties
    """
    deltas = dare_deltas(ctx, key, density, seed, rescale)
    if combine == "task_arithmetic":
        return KeyUpdate(deltas.sum(0))
    return KeyUpdate(disjoint_merge(deltas, elected_sign(deltas.sum(0), ctx.state["majority"]), "mean"))
