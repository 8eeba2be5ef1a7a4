"""TSV-M, Iso-C, Iso-CTS and STAR, per matrix key (``docs/methods.md#tsv``, ``#iso_c``, ``#iso_cts``, ``#star``).

Decompositions come from the cache shared with the analysis (``weightlens.decompositions``):
TSV-M and STAR use the per-task SVDs, Iso-C and Iso-CTS the SVD of the task-arithmetic sum, so a
switch between them reuses what it can. Iso-CTS also caches its per-task residual SVDs.

Non-matrix tensors (``ndim != 2``, e.g. biases, norms, convolution kernels) and keys containing
``text_projection`` (the CLIP reference code excludes them from the SVD) follow the authors'
convention: TSV-M and Iso get the **mean** of the task vectors, scaled by the same ``alpha``. STAR's
``alpha`` multiplies a *sum* (default 1/T, the plain average), so its non-matrix tensors get
``alpha * sum_t tau_t``: the plain mean at the default, as the other methods; reading
"mean times alpha" literally there would give mean / T.

Degenerate cases are reported per key in ``MergeResult.notes`` and never silent:

* TSV-M keeps ``floor(r/T)`` components per task; ``r < T`` gives a zero update (reference
  behaviour), ``fallback="mean"`` or ``"sum"`` opts into the task mean or sum instead;
* Iso-CTS with no task-specific room (``s = 0``) is Iso-C;
* a rank-deficient task-arithmetic sum (LoRA-like deltas) makes Iso weight arbitrary null-space
  directions by sigma-bar (reference behaviour); ``restrict_to_numerical_rank=True`` drops them;
* an all-zero task matrix (an untouched layer) is noted; STAR skips it (its rescale would be 0/0);
  where every task matrix is zero the update is zero and no decomposition is taken;
* Iso-CTS sizes that the reference formula would make negative (``r`` close to ``T``) are noted.

**LoRA adapters** (``docs/adapters.md``): their decompositions come exactly from the factors, thin in the
rank (``k = rank < min(m, n)`` triplets, see ``weightlens.decompositions``), and nothing of size
``m x n`` is decomposed; the update itself is formed, one key at a time. A dense SVD of a rank-``k``
matrix returns ``min(m, n) - k`` more triplets of singular value zero whose vectors are an arbitrary
orthonormal completion. From factors:

* TSV-M takes ``min(floor(r/T), rank)`` meaningful triplets of such a task (noted): the arbitrary ones
  would have weight 0 and only bend the others' orthogonalisation;
* Iso-C and Iso-CTS, which weight those directions by sigma-bar (``restrict_to_numerical_rank=False``,
  the reference), take a deterministic completion orthogonal to every meaningful direction
  (:func:`weightlens.linalg.factored.complete_basis`); Iso-CTS's residuals ``delta_t - Uc Uc^T delta_t``
  are low-rank products too (``(B_t - Uc Uc^T B_t) @ A_t``), decomposed from their factors in float64,
  their rank counted against the task's norm;
* every other step is the dense path's, so the results agree wherever the dense result does not depend
  on its arbitrary completion (TSV-M with ``floor(r/T)`` at most the adapters' ranks; Iso with
  ``restrict_to_numerical_rank=True`` or a full-rank sum; STAR always).
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch

from weightlens import decompositions, linalg
from weightlens.io.sources import AdapterCheckpoint, LoraFactors
from weightlens.linalg.factored import complete_basis, complete_pair
from weightlens.merge.engine import MergeContext
from weightlens.merge.registry import DEFAULT_GRID, Interval, KeyUpdate, register_merge, task_top_k

__all__ = ["iso_c", "iso_cts", "iso_cts_sizes", "star", "star_rank", "tsv"]


def _spectral(ctx: MergeContext, key: str) -> bool:
    """True when ``key`` is decomposed (a 2-D matrix that is not a CLIP ``text_projection``)."""
    return ctx.is_matrix(key) and "text_projection" not in key and min(ctx.shape(key)) > 0


def _tasks_ahead(ctx: MergeContext, key: str) -> tuple[str, ...]:
    """What STAR reads at ``key`` through ``ctx.task_svd`` (``prefetch=``): each task's SVD."""
    return ("tasks",) if _spectral(ctx, key) else ()


def _tsv_ahead(ctx: MergeContext, key: str) -> tuple[str, ...]:
    """What TSV-M reads at ``key`` (``prefetch=``): each task's SVD on CUDA (``ctx.task_top`` slices it; on the
    CPU it computes the leading triplets alone), unless ``r < T`` leaves no component."""
    if ctx.device.type == "cpu":
        return ()
    return _tasks_ahead(ctx, key) if task_top_k(ctx.shape(key), ctx.n_tasks) else ()


def _sum_ahead(ctx: MergeContext, key: str) -> tuple[str, ...]:
    """What Iso-C and Iso-CTS read at ``key`` through ``ctx.sum_svd`` (``prefetch=``): the sum's SVD."""
    return ("sum",) if _spectral(ctx, key) else ()


def _mean(ctx: MergeContext, key: str) -> KeyUpdate:
    return KeyUpdate(ctx.deltas(key).mean(0))


def _lora(ctx: MergeContext, key: str) -> dict[str, LoraFactors] | None:
    """Every task's LoRA factors at ``key`` (``tv.factors``), read once per task set and key (``tv.cache``), or
    None when a task has none there (a full fine-tune: then nothing is read or cached)."""
    if not all(isinstance(ctx.tv.finetuned[t], AdapterCheckpoint) for t in ctx.tasks):
        return None

    def read() -> dict[str, LoraFactors] | None:
        factors = {t: ctx.tv.factors(t, key) for t in ctx.tasks}
        return None if any(f is None for f in factors.values()) else factors

    return ctx.cached(("lora_factors", key), read)


def _zero_tasks(ctx: MergeContext, key: str) -> tuple[str, ...]:
    """Tasks whose matrix of ``key`` is zero: ``ctx.zero_tasks``, or from the factors when every task has LoRA
    factors there (nothing ``m x n`` formed): rank 0 (the adapter leaves the key alone), a zero factor or scale.
    (Nonzero factors whose product vanishes count as nonzero: their exact SVD is then numerically zero.)"""
    lora = _lora(ctx, key)
    if lora is None:
        return ctx.zero_tasks(key)
    return tuple(t for t, f in lora.items() if f.A.shape[0] == 0 or f.scale == 0 or not f.B.any() or not f.A.any())


def _all_zero(ctx: MergeContext, key: str, method: str) -> KeyUpdate | None:
    """A zero update and a note when every task matrix of ``key`` is zero (no SVD is taken)."""
    if len(_zero_tasks(ctx, key)) < ctx.n_tasks:
        return None
    note = f"{method}: every task matrix is zero here (an untouched layer): zero update, no decomposition."
    return KeyUpdate(torch.zeros(ctx.shape(key)), (note,))


def _zero_notes(ctx: MergeContext, key: str, method: str, consequence: str) -> list[str]:
    return [f"{method}: task {t!r} has an all-zero matrix here; {consequence}." for t in _zero_tasks(ctx, key)]


# --------------------------------------------------------------------------------------- TSV-M
@register_merge("tsv", alpha=1.0, pretty_name="TSV-M", reference="Gargiulo et al., CVPR 2025", uses_svd=True,
                decomposes=("task_tops", "polar"), prefetch=_tsv_ahead)
def tsv(ctx: MergeContext, key: str, *, fallback: Literal["zero", "mean", "sum"] = "zero") -> KeyUpdate:
    """TSV-M: top ``floor(r/T)`` singular triplets per task, orthogonalised, rebuilt.

    Parameters
    ----------
    fallback : {"zero", "mean", "sum"}, default="zero"
        What a matrix with ``r < T`` (no component per task) gets: the reference's zero update,
        or opt-in the task mean or sum (always noted).
    alpha : float, default=1.0
    """
    if not _spectral(ctx, key):
        return _mean(ctx, key)
    T, (m, n) = ctx.n_tasks, ctx.shape(key)
    r, k = min(m, n), task_top_k((m, n), T)
    zero = _all_zero(ctx, key, "TSV-M")
    if zero is not None:
        return zero
    if k == 0:
        note = f"TSV-M: rank r={r} < T={T} tasks, floor(r/T)=0 components per task"
        if fallback == "zero":
            return KeyUpdate(torch.zeros(m, n), (note + ": zero update (reference behaviour).",))
        deltas = ctx.deltas(key)
        upd = deltas.mean(0) if fallback == "mean" else deltas.sum(0)
        return KeyUpdate(upd, (note + f": used the task {fallback} (fallback={fallback!r}).",))
    svds = [ctx.task_top(t, key, k) for t in ctx.tasks]  # each task's leading k triplets
    if any(s.S.numel() < k for s in svds):  # a task of rank < k, decomposed from its LoRA factors
        return _tsv_low_rank(ctx, key, svds, k)
    dev = svds[0].U.device
    U_hat, V_hat, S_hat = torch.zeros(m, r, device=dev), torch.zeros(n, r, device=dev), torch.zeros(r, device=dev)
    for i, s in enumerate(svds):
        U_hat[:, i * k:(i + 1) * k] = s.U[:, :k]
        V_hat[:, i * k:(i + 1) * k] = s.Vh[:k].mT
        S_hat[i * k:(i + 1) * k] = s.S[:k]
    U_perp, left = _orthogonalised(U_hat, T * k, key, "left")
    V_perp, right = _orthogonalised(V_hat, T * k, key, "right")
    notes = _zero_notes(ctx, key, "TSV-M", "its singular vectors are arbitrary (weight 0) but still "
                        "enter the orthogonalisation (reference behaviour)") + left + right
    order = torch.argsort(S_hat, descending=True, stable=True)  # U_perp, V_perp orthonormal: an SVD
    factors = linalg.SVD(U_perp[:, order], S_hat[order], V_perp[:, order].mT)
    return KeyUpdate(((U_perp * S_hat) @ V_perp.mT).cpu(), tuple(notes), factors)


def _tsv_low_rank(ctx: MergeContext, key: str, svds: list[linalg.SVD], k: int) -> KeyUpdate:
    """TSV-M when some task's SVD has fewer than ``k`` triplets (exact, from LoRA factors): such a task
    brings its ``min(k, numerical rank)`` meaningful triplets; the others their top ``k`` as usual."""
    shape = ctx.shape(key)
    r = min(shape)
    Us, Vs, Ss, notes, zero = [], [], [], [], _zero_tasks(ctx, key)
    for task, s in zip(ctx.tasks, svds):
        keep = k
        if s.S.numel() < k:
            keep = min(k, linalg.numerical_rank(s.S, shape))
            notes.append(f"TSV-M: task {task!r} has rank {keep} < floor(r/T)={k} here (from its LoRA factors): its "
                         f"{keep} direction(s) enter the orthogonalisation, not {k - keep} more of weight 0 that a "
                         "dense SVD would complete arbitrarily.")
        elif task in zero:
            notes.append(f"TSV-M: task {task!r} has an all-zero matrix here; its singular vectors are arbitrary "
                         "(weight 0) but still enter the orthogonalisation (reference behaviour).")
        Us.append(s.U[:, :keep])
        Vs.append(s.Vh[:keep].mT)
        Ss.append(s.S[:keep])
    U_hat, V_hat, S_hat = torch.cat(Us, 1), torch.cat(Vs, 1), torch.cat(Ss)
    if S_hat.numel() == 0:  # every task numerically zero
        return KeyUpdate(torch.zeros(shape), (*notes, "TSV-M: no direction left to merge: zero update."))
    U_perp, left = _orthogonalised(U_hat, S_hat.numel(), key, "left")
    V_perp, right = _orthogonalised(V_hat, S_hat.numel(), key, "right")
    order = torch.argsort(S_hat, descending=True, stable=True)
    factors = linalg.SVD(U_perp[:, order], S_hat[order], V_perp[:, order].mT)
    return KeyUpdate(((U_perp * S_hat) @ V_perp.mT).cpu(), (*notes, *left, *right), factors)


def _orthogonalised(stacked: torch.Tensor, filled: int, key: str, side: str) -> tuple[torch.Tensor, list[str]]:
    """The orthogonal polar factor of ``stacked`` (:func:`weightlens.linalg.polar`), and a
    note when its first ``filled`` columns (the tasks' directions; the rest are zero padding) span fewer
    dimensions: then the factor is not unique (an arbitrary completion, in the reference too) and the update
    depends on rounding there. Seen on the digits zoo's ``fc2``: four tasks' top 128 left vectors span 489 of
    512 dimensions, and float32 and float64 merges of that key differ by 35%."""
    factor, S = linalg.polar(stacked, device=stacked.device, name=key, with_values=True)
    rank = linalg.numerical_rank(S, tuple(stacked.shape))
    notes = []
    if rank < filled:
        notes.append(f"TSV-M: the tasks' {filled} {side} singular vectors stacked here span {rank} dimensions "
                     "(their subspaces overlap): the orthogonalisation is not unique, so this key's update "
                     "depends on rounding in those directions (the reference's too).")
    return factor, notes


def _flat(U: torch.Tensor, sigma: torch.Tensor, Vh: torch.Tensor) -> linalg.SVD:
    """``(U, sigma * 1, Vh)``: the SVD of ``sigma * U @ Vh`` for orthonormal ``U``, ``Vh``."""
    return linalg.SVD(U, sigma * torch.ones(U.shape[1], dtype=U.dtype, device=U.device), Vh)


# --------------------------------------------------------------------------------------- Iso
def _rank_note(method: str, what: str, rank: int, r: int, restrict: bool) -> str:
    if restrict:
        return (f"{method}: {what} is rank-deficient (numerical rank {rank} of {r}); kept only its "
                f"{rank} directions (restrict_to_numerical_rank=True).")
    return (f"{method}: {what} is rank-deficient (numerical rank {rank} of {r}); its {r - rank} "
            "null-space direction(s) are arbitrary and get weight sigma-bar (reference behaviour; "
            "restrict_to_numerical_rank=True drops them).")


def _iso_c_update(ctx: MergeContext, key: str, restrict: bool, method: str) -> KeyUpdate:
    U, S, Vh = ctx.sum_svd(key)
    if S.numel() < min(ctx.shape(key)):  # the sum of LoRA adapters, decomposed from their factors
        return _iso_c_low_rank(ctx, key, restrict, method, linalg.SVD(U, S, Vh))
    r = S.numel()
    rank = linalg.numerical_rank(S, ctx.shape(key))
    notes = () if rank == r else (_rank_note(method, "the task-arithmetic sum", rank, r, restrict),)
    keep = rank if restrict else r
    if rank == 0:
        return KeyUpdate(torch.zeros(ctx.shape(key)), (f"{method}: the task-arithmetic sum is zero: zero update.",))
    sigma_bar = S[:keep].mean()
    factors = _flat(U[:, :keep], sigma_bar, Vh[:keep])
    return KeyUpdate((sigma_bar * (U[:, :keep] @ Vh[:keep])).cpu(), notes, factors)


def _iso_c_low_rank(ctx: MergeContext, key: str, restrict: bool, method: str, dec: linalg.SVD) -> KeyUpdate:
    """Iso-C of a sum whose exact SVD has fewer than ``r`` triplets (from factors): the same update, its
    ``r - rank`` null-space directions (unrestricted) a deterministic completion."""
    U, S, Vh = dec
    shape = ctx.shape(key)
    r = min(shape)
    rank = linalg.numerical_rank(S, shape)
    if rank == 0:
        return KeyUpdate(torch.zeros(shape), (f"{method}: the task-arithmetic sum is zero: zero update.",))
    notes = (_rank_note(method, "the task-arithmetic sum", rank, r, restrict),)
    sigma_bar = S[:rank].mean() if restrict else S.sum() / r  # unrestricted: the mean of all r values
    return _isotropic(U[:, :rank], Vh[:rank].mT, sigma_bar, rank if restrict else r, notes)


def _isotropic(U: torch.Tensor, V: torch.Tensor, sigma_bar: torch.Tensor, width: int,
               notes: tuple[str, ...]) -> KeyUpdate:
    """``sigma_bar`` times ``width`` orthonormal pairs: the meaningful ``(U, V)`` and a completion of them
    (:func:`complete_pair`: the completions' product costs ``O(m n p)``, not ``O(m n width)``); its ``width``
    triplets are the update's factors."""
    if width == U.shape[1]:  # nothing to complete (restricted to the meaningful directions)
        U_iso, V_iso, update = U, V, sigma_bar * (U @ V.mT)
    else:
        U_iso, V_iso, null = complete_pair(U, V, width)
        update = sigma_bar * (U @ V.mT + null)
    ones = sigma_bar * torch.ones(width, dtype=U.dtype, device=U.device)
    return KeyUpdate(update.cpu(), notes, linalg.SVD(U_iso, ones, V_iso.mT))


@register_merge("iso_c", alpha=1.0, pretty_name="Iso-C", reference="Marczak et al., ICML 2025", uses_svd=True,
                decomposes=("sum",), prefetch=_sum_ahead)
def iso_c(ctx: MergeContext, key: str, *, restrict_to_numerical_rank: bool = False) -> KeyUpdate:
    """Iso-C: ``sigma_bar * U V^T`` of the task-arithmetic sum (a flat spectrum).

    Parameters
    ----------
    restrict_to_numerical_rank : bool, default=False
        Average and rebuild only over singular values above the numerical-rank tolerance (opt-in;
        the reference averages all r values, zeros included).
    alpha : float, default=1.0
    """
    if not _spectral(ctx, key):
        return _mean(ctx, key)
    return _all_zero(ctx, key, "Iso-C") or _iso_c_update(ctx, key, restrict_to_numerical_rank, "Iso-C")


def iso_cts_sizes(r: int, n_tasks: int, common_fraction: float) -> tuple[int, int]:
    """Iso-CTS common size ``k`` and per-task size ``s`` (reference code, banker's rounding).

    ``k0 = int(f * r)``; ``s_tot = T * round((r - k0) / T)`` with Python's round (round half to
    even); ``k = r - s_tot``; ``s = s_tot / T``. When rounding up would leave ``k < 0`` (only for
    ``r`` close to ``T``), ``s = floor(r / T)`` instead.

    Examples
    --------
    >>> iso_cts_sizes(768, 8, 0.8), iso_cts_sizes(50, 20, 0.8)
    ((616, 19), (50, 0))
    """
    k0 = int(common_fraction * r)
    s = round((r - k0) / n_tasks)
    if n_tasks * s > r:
        s = r // n_tasks
    return r - n_tasks * s, s


def _residual_svd(ctx: MergeContext, key: str, task: str, Uc: torch.Tensor, s: int,
                  complement: torch.Tensor | None) -> linalg.SVD:
    """Leading ``s`` triplets of ``R_t = delta_t - Uc Uc^T delta_t`` (cached per task set, key, task, k, s).

    With ``complement`` (an orthonormal basis ``C`` of the orthogonal complement of ``Uc``, so that
    ``R_t = C (C^T delta_t)``) the SVD is that of the small ``C^T delta_t`` and ``U`` is returned in
    ``C``'s coordinates: ``R_t``'s left vectors are ``C @ U``. Only the top ``s`` are used, so
    ``linalg.topk_svd`` picks its cheapest *exact* method for them.
    """

    def compute() -> linalg.SVD:
        d = ctx.delta(task, key).to(Uc.device)
        small = d - Uc @ (Uc.mT @ d) if complement is None else complement.mT @ d
        return linalg.topk_svd(small, s, approximate=False, device=Uc.device, name=key)

    return ctx.cached(("iso_cts_residual", key, task, Uc.shape[1], s, complement is not None), compute)


def _cts_blocks(ctx: MergeContext, key: str, k: int, s: int,
                restrict: bool) -> tuple[torch.Tensor, list, list, list[str]]:
    """The orthogonalised left block ``U*``, the columns of ``V*`` and the singular values.

    Blocks: the common one, then one per task. When the sum's thin ``U`` is square (``m <= n``), its
    trailing columns ``C`` span the complement of the common block, every task block lies in ``C``
    (``R_t = C C^T delta_t``), and the polar factor splits exactly:
    ``polar([Uc, C W]) = [Uc, C polar(W)]`` with the small ``W`` of the tasks' residual vectors in
    ``C``'s coordinates. Otherwise the full ``m x r`` polar factor is taken.
    """
    U, S, Vh = ctx.sum_svd(key)
    shape, notes = ctx.shape(key), []
    rank = linalg.numerical_rank(S, shape)
    if rank < S.numel():
        notes.append(_rank_note("Iso-CTS", "the task-arithmetic sum", rank, S.numel(), restrict))
    kc = min(k, rank) if restrict else k
    complement = U[:, kc:] if U.shape[1] == shape[0] else None
    Us, Vs, sig = [], [Vh[:kc].mT], [S[:kc]]
    for task in ctx.tasks:  # restricted: only the kept common directions are projected out
        Ur, Sr, Vhr = _residual_svd(ctx, key, task, U[:, :kc], s, complement)
        rank = linalg.numerical_rank(Sr, shape)
        if rank < s:
            notes.append(_rank_note("Iso-CTS", f"the residual of task {task!r}", rank, s, restrict))
        ks = min(s, rank) if restrict else s
        Us.append(Ur[:, :ks])
        Vs.append(Vhr[:ks].mT)
        sig.append(Sr[:ks])
    specific = torch.cat(Us, 1)
    if specific.shape[1] and complement is not None:
        specific = complement @ linalg.polar(specific, device=specific.device, name=key)
    left = torch.cat([U[:, :kc], specific], 1)
    if left.shape[1] and complement is None:
        left = linalg.polar(left, device=left.device, name=key)
    return left, Vs, sig, notes


@register_merge("iso_cts", alpha=1.0, pretty_name="Iso-CTS", reference="Marczak et al., ICML 2025",
                uses_svd=True, decomposes=("sum", "residuals", "polar"), prefetch=_sum_ahead)
def iso_cts(
    ctx: MergeContext,
    key: str,
    *,
    common_fraction: Annotated[float, Interval(0, 1, "right")] = 0.8,
    restrict_to_numerical_rank: bool = False,
) -> KeyUpdate:
    """Iso-CTS: common subspace of the sum plus ``s`` task-specific directions per task, isotropic.

    Parameters
    ----------
    common_fraction : float in (0, 1], default=0.8
        f: the common subspace takes about ``f * r`` directions (see :func:`iso_cts_sizes`).
    restrict_to_numerical_rank : bool, default=False
        Drop directions of numerically zero singular values (opt-in; see Iso-C): the common block
        keeps only the sum's non-zero directions (and only those are projected out of each task),
        each task block only its residual's.
    alpha : float, default=1.0
    """
    if not _spectral(ctx, key):
        return _mean(ctx, key)
    zero = _all_zero(ctx, key, "Iso-CTS")
    if zero is not None:
        return zero
    r, T = min(ctx.shape(key)), ctx.n_tasks
    k, s = iso_cts_sizes(r, T, common_fraction)
    guard = ()
    if T * round((r - int(common_fraction * r)) / T) > r:
        guard = (f"Iso-CTS: the reference sizes (r={r}, T={T}, common_fraction={common_fraction}) ask "
                 f"for more than r task-specific directions (a negative common size); used "
                 f"s=floor(r/T)={s}, k={k}.",)
    if s == 0:
        ku = _iso_c_update(ctx, key, restrict_to_numerical_rank, "Iso-CTS")
        note = (f"Iso-CTS: no task-specific room (r={r}, T={T}, common_fraction="
                f"{common_fraction} gives k={k}, s=0): Iso-C update.")
        return KeyUpdate(ku.update, (*guard, note, *ku.notes), ku.factors)
    if _low_rank_sum(ctx, key):  # the sum of LoRA adapters: from their factors
        return _iso_cts_low_rank(ctx, key, k, s, restrict_to_numerical_rank, guard)
    U_perp, Vs, sig, notes = _cts_blocks(ctx, key, k, s, restrict_to_numerical_rank)
    notes = [*guard, *notes]
    if U_perp.shape[1] == 0:
        return KeyUpdate(torch.zeros(ctx.shape(key)), (*notes, "Iso-CTS: nothing left to merge: zero update."))
    V_perp = linalg.polar(torch.cat(Vs, 1), device=U_perp.device, name=key)
    sigma_bar = torch.cat(sig).mean()
    factors = _flat(U_perp, sigma_bar, V_perp.mT)
    return KeyUpdate((sigma_bar * (U_perp @ V_perp.mT)).cpu(), tuple(notes), factors)


def _low_rank_sum(ctx: MergeContext, key: str) -> bool:
    """Whether every task has LoRA factors at ``key`` and their ranks sum below ``min(m, n)``: then the sum's
    SVD comes from the factors with fewer than ``min(m, n)`` triplets (``weightlens.decompositions``)."""
    lora = _lora(ctx, key)
    return lora is not None and sum(f.A.shape[0] for f in lora.values()) < min(ctx.shape(key))


def _frobenius(f: LoraFactors) -> float:
    """``||scale * B @ A||_F`` from the factors: ``|scale| sqrt(sum((B^T B) * (A A^T)))``, float64."""
    B, A = f.B.double(), f.A.double()
    return abs(f.scale) * math.sqrt(max(float(((B.mT @ B) * (A @ A.mT)).sum()), 0.0))


def _residual_from_factors(ctx: MergeContext, key: str, task: str, Uc: torch.Tensor, s: int) -> linalg.SVD:
    """Exact SVD of ``R_t = (I - Uc Uc^T) delta_t`` for a LoRA task, ``(B - Uc Uc^T B) @ A * scale``, in float64
    (cached per task set, key, task, k, s)."""

    def compute() -> linalg.SVD:
        f = _lora(ctx, key)[task]
        B = f.B.to(Uc.device, torch.float64)
        B = B - Uc @ (Uc.mT @ B)
        return linalg.factored_svd(B, f.A, scale=f.scale, device=Uc.device, dtype=torch.float64, name=key)

    return ctx.cached(("iso_cts_residual_factors", key, task, Uc.shape[1], s), compute)


def _polar_beside(X: torch.Tensor, Q: torch.Tensor, key: str) -> torch.Tensor:
    """Polar factor of ``X`` (columns orthogonal to the orthonormal ``Q``) that stays orthogonal to ``Q``: the
    directions past ``X``'s numerical rank (arbitrary) are taken orthogonal to ``Q`` as well, as the dense
    path's polar factor in the coordinates of ``Q``'s complement. float64."""
    if X.shape[1] == 0:
        return X
    P, sv, Qh = linalg.svd(X, device=X.device, dtype=torch.float64, name=key)
    rank = linalg.numerical_rank(sv, tuple(X.shape), torch.float32)
    if rank < X.shape[1]:
        P = complete_basis(torch.cat([Q, P[:, :rank]], 1), Q.shape[1] + X.shape[1])[:, Q.shape[1]:]
    return P @ Qh


def _iso_cts_low_rank(ctx: MergeContext, key: str, k: int, s: int, restrict: bool,
                      guard: tuple[str, ...]) -> KeyUpdate:
    """Iso-CTS of LoRA adapters from their factors (float64 up to the directions, then float32).

    The common block is the sum's top ``k`` (its ``min(k, rank)`` meaningful directions, the rest null-space
    ones); each task's block the top ``s`` of its residual, whose rank counts values above the numerical
    tolerance ``max(m, n) * eps(float32)`` of the task's own Frobenius norm (float64 rounding of a residual
    that is zero in exact arithmetic stays far below it). Meaningful left blocks are orthogonal to the common
    one by construction, so only the task blocks are orthogonalised; directions past a rank (unrestricted)
    come from :func:`complete_basis`, orthogonal to every meaningful one.
    """
    shape, f32 = ctx.shape(key), torch.float32
    r, tol = min(shape), max(shape) * torch.finfo(f32).eps
    U, S, Vh = decompositions.svd(ctx.tv, key, ctx.tasks, device=ctx.device, dtype=torch.float64)
    rank = linalg.numerical_rank(S, shape, f32)
    notes = [*guard, _rank_note("Iso-CTS", "the task-arithmetic sum", rank, r, restrict)]
    kc = min(k, rank) if restrict else k
    cm = min(kc, rank)  # meaningful common directions
    Uc = U[:, :cm]
    Ws, Vs, sig, count = [], [Vh[:cm].mT], [S[:cm]], kc
    for task in ctx.tasks:
        Ur, Sr, Vhr = _residual_from_factors(ctx, key, task, Uc, s)
        meaningful = min(s, int((Sr > tol * _frobenius(_lora(ctx, key)[task])).sum()))
        if meaningful < s:
            notes.append(_rank_note("Iso-CTS", f"the residual of task {task!r}", meaningful, s, restrict))
        Ws.append(Ur[:, :meaningful])
        Vs.append(Vhr[:meaningful].mT)
        sig.append(Sr[:meaningful])
        count += meaningful if restrict else s
    if count == 0:
        return KeyUpdate(torch.zeros(shape), (*notes, "Iso-CTS: nothing left to merge: zero update."))
    left = torch.cat([Uc, _polar_beside(torch.cat(Ws, 1), Uc, key)], 1)
    right = torch.cat(Vs, 1)
    if right.shape[1]:
        right = linalg.polar(right, device=U.device, dtype=torch.float64, name=key)
    sigma_bar = (torch.cat(sig).sum() / count).to(f32)  # the directions in float64, the rest in float32
    return _isotropic(left.to(f32), right.to(f32), sigma_bar, count, tuple(notes))


# --------------------------------------------------------------------------------------- STAR
def star_rank(S: torch.Tensor, eta: float) -> int:
    """Smallest r with ``sum_{i<=r} sigma_i >= eta/100 * sum_i sigma_i`` (reference: searchsorted + 1).

    Computed in float64 and capped at ``len(S)``.
    """
    s64 = S.detach().to("cpu", torch.float64)
    target = torch.tensor([float(s64.sum()) * eta / 100.0], dtype=torch.float64)
    return min(int(torch.searchsorted(torch.cumsum(s64, 0), target)) + 1, s64.numel())


@register_merge(
    "star", alpha=None, alpha_default=lambda params, n_tasks: 1.0 / n_tasks, alpha_doc="1/T",
    pretty_name="STAR", reference="Lee et al., NAACL 2025", uses_svd=True, decomposes=("tasks",),
    prefetch=_tasks_ahead,
    alpha_grid=lambda params, n_tasks: [a / n_tasks for a in DEFAULT_GRID],  # untuned in its paper: around 1/T
)
def star(ctx: MergeContext, key: str, *, eta: Annotated[float, Interval(0, 100, "right")] = 40.0) -> KeyUpdate:
    """STAR: per task, keep the top singular values holding eta% of the nuclear norm, rescale, sum.

    Parameters
    ----------
    eta : float in (0, 100], default=40
        Percent of the nuclear norm *retained* (the reference code's behaviour; its CLI help says
        "truncate", which the code does not do). The kept values are rescaled so the nuclear norm
        is preserved.
    alpha : float, default=1/T
        Coefficient of the sum of the truncated matrices (1/T: the plain average, no tuning).
    """
    if not _spectral(ctx, key):
        return KeyUpdate(ctx.deltas(key).sum(0))
    zero = _all_zero(ctx, key, "STAR")
    if zero is not None:
        return zero
    total, skipped = None, _zero_tasks(ctx, key)
    notes = _zero_notes(ctx, key, "STAR", "skipped (its rescale would be 0/0)")
    for task in ctx.tasks:
        if task in skipped:
            continue
        U, S, Vh = ctx.task_svd(task, key)
        nuclear = float(S.double().sum())
        if nuclear == 0.0:  # numerically zero spectrum of a non-zero matrix: cannot happen in exact arithmetic
            notes.append(f"STAR: task {task!r} has a zero spectrum here; skipped (rescale 0/0).")
            continue
        r = star_rank(S, eta)
        scaled = S[:r] * (nuclear / float(S[:r].double().sum()))
        part = (U[:, :r] * scaled) @ Vh[:r]
        total = part if total is None else total + part
    update = torch.zeros(ctx.shape(key)) if total is None else total.cpu()
    return KeyUpdate(update, tuple(notes))
