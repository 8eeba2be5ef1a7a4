"""WUDI-Merging: the merged update that interferes least with each task on its own rows (``docs/methods.md#wudi``).

Cheng et al., "Whoever Started the Interference Should End It: Guiding Data-Free Model Merging via Task
Vectors", ICML 2025 (arXiv:2503.08099); reference code ``nathanielyvo/WUDI-Merging`` (``nlp_roberta/lamassu.py``
``get_merge_vector``) and FusionBench's ``wudi_merging``.

A linear layer's task vector ``tau_t`` (``m x n``, ``y = W x``) spans, by its rows, an approximation of the
inputs the task feeds that layer; WUDI takes, per 2-D key, the update ``X`` that disturbs those inputs least:

    L(X) = sum_t ||(X - tau_t) tau_t^T||_F^2 / ||tau_t||_F^2.

``solver="exact"``: ``L`` is a convex quadratic with ``grad L = 2 (X S - B)``,
``S = sum_t tau_t^T tau_t / ||tau_t||^2`` (``n x n``) and ``B = sum_t tau_t tau_t^T tau_t / ||tau_t||^2``, so the
minimisers solve ``X S = B``. With ``M = [tau_1 / ||tau_1||; ...; tau_T / ||tau_T||] = U Sigma V^T`` (thin SVD,
float64, ``U_t`` the rows of ``U`` of task ``t``) and ``r`` the number of singular values above
``rcond sigma_1`` (default ``rcond = max(T m, n) eps_fp32``, the numerical rank at the task vectors' fp32
precision; a cut at their rounding bound alone, ``eps_fp32 ||M||_F``, lets the directions of tiny ``sigma``
dominate the update, see ``docs/methods.md#wudi``):

    X = (sum_t tau_t (tau_t / ||tau_t||)^T U_t,r) Sigma_r^-1 V_r^T,

which is ``B S^+`` without forming ``S`` (its condition number is not squared). Where ``S`` is singular, the
minimisers differ by rows orthogonal to every task's row space; ``X`` is the minimum-norm one, whose rows lie in
the span of the tasks' rows, and that is also the minimiser closest to the reference's initialisation
``sum_t tau_t`` (whose rows lie there too): the two choices coincide.

``solver="adam"`` (default): the reference's iterations: ``X`` initialised at ``sum_t tau_t``, ``steps`` (300)
steps of Adam (``lr`` 1e-5, betas (0.9, 0.999), eps 1e-8, no weight decay) on ``L`` in float32. The gradient is taken in
closed form, ``2 (X S - B)`` with ``S`` and ``B`` formed once (the reference back-propagates through the
``T`` products ``(X - tau_t) tau_t^T``, ``m x m`` each); the Adam arithmetic is ``torch.optim.Adam``'s. Nothing is
random: the result depends only on the inputs (and the device's rounding).

Keys that are not 2-D matrices (biases, norms, convolutions) get the mean of the task vectors, as FusionBench's
``wudi_merging`` (``others="mean"``), or their sum (``others="sum"``, task arithmetic). A task whose matrix is
zero at a key has no rows and no norm (the reference divides 0 by 0): it is left out of that key's objective
(a note says so); when every task is zero the update is zero.

**Factored (LoRA) task vectors.** With every task given by factors ``tau_t = s_t B_t A_t``, the rows of every
``tau_t`` lie in the span of the ``A_t``: with ``Q`` an orthonormal basis of it (``n x k``, ``k <= sum r_t``,
from the SVD of the stacked ``A_t``), ``L`` only sees ``X Q`` and the exact solution is ``X = X_k Q^T`` with
``X_k`` the solution for the ``m x k`` matrices ``s_t B_t (A_t Q)``: nothing ``n x n`` or ``T m x n`` is
formed. The adam solver materialises one key at a time (``ctx.deltas``).
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch

from weightlens import linalg
from weightlens.merge.engine import MergeContext
from weightlens.merge.registry import Interval, KeyUpdate, register_merge
from weightlens.merge.spectral import _lora

__all__ = ["wudi", "wudi_adam", "wudi_exact", "wudi_exact_factored", "wudi_objective"]

Solver = Literal["exact", "adam"]
Others = Literal["mean", "sum"]
Cut = Annotated[float | None, Interval(0, 1, "left")]
Steps = Annotated[int, Interval(0, 100_000)]
Rate = Annotated[float, Interval(0, None, "neither")]  # open: the studio shows a text box, not a 0.01 slider
_F64 = torch.float64
_EPS32 = torch.finfo(torch.float32).eps


def _cut(S: torch.Tensor, rows: int, width: int, rcond: float | None) -> int:
    """How many singular values ``S`` (descending) the exact solve keeps: ``sigma > rcond sigma_1``, by default
    ``rcond = max(T m, n) eps_fp32`` (:func:`weightlens.linalg.numerical_rank` at the task vectors' fp32)."""
    if S.numel() == 0:
        return 0
    rel = max(rows, width) * _EPS32 if rcond is None else rcond
    return int((S > rel * float(S[0])).sum())
#: Validation grid: {0.05, 0.1, ..., 1.5} (the reference's ViT script scores 0.1, ..., 1.5; FusionBench uses 1).
_WUDI_GRID = tuple(round(0.05 * i, 10) for i in range(1, 31))


# ------------------------------------------------------------------------------ the objective and solvers
def _nonzero(taus: torch.Tensor) -> torch.Tensor:
    """Indices of the tasks whose matrix is not all zero."""
    return (taus.reshape(taus.shape[0], -1) != 0).any(1).nonzero().flatten()


def wudi_objective(X: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
    """``sum_t ||(X - tau_t) tau_t^T||_F^2 / ||tau_t||_F^2`` over the nonzero ``tau_t`` of ``taus (T, m, n)``
    (in ``X``'s dtype; a plain evaluation of the definition)."""
    taus = taus.to(X.dtype)
    total = X.new_zeros(())
    for t in _nonzero(taus).tolist():
        total = total + ((X - taus[t]) @ taus[t].mT).square().sum() / taus[t].square().sum()
    return total


def wudi_exact(taus: torch.Tensor, *, rcond: float | None = None, device: str | torch.device = "cpu",
               width: int | None = None) -> torch.Tensor:
    """Minimum-norm minimiser of :func:`wudi_objective` for ``taus (T, m, n)``: float64, on ``device``.

    Singular values of the stacked normalised tasks at or below ``rcond sigma_1`` count as zero (default
    ``max(T m, width) eps_fp32``, ``width`` defaulting to ``n``). All-zero tasks are left out; all zero gives zero."""
    T, m, n = taus.shape
    keep = _nonzero(taus)
    if keep.numel() == 0:
        return torch.zeros(m, n, dtype=_F64, device=device)
    d = taus[keep].to(device=device, dtype=_F64)
    norms = torch.linalg.vector_norm(d.reshape(d.shape[0], -1), dim=1)
    N = d / norms[:, None, None]
    U, S, Vh = linalg.svd(N.reshape(-1, n), device=device, dtype=_F64)
    r = _cut(S, N.shape[0] * m, n if width is None else width, rcond)
    U, S, Vh = U[:, :r].reshape(d.shape[0], m, r), S[:r], Vh[:r]
    W = sum(d[i] @ (N[i].mT @ U[i]) for i in range(d.shape[0]))  # (m, r): sum_t tau_t N_t^T U_t
    return (W / S) @ Vh


def wudi_exact_factored(factors: list[tuple[torch.Tensor, torch.Tensor, float]], *, rcond: float | None = None,
                        device: str | torch.device = "cpu") -> torch.Tensor:
    """:func:`wudi_exact` of ``tau_t = scale_t * B_t @ A_t`` from ``factors = [(A_t, B_t, scale_t), ...]``
    (``A_t (r_t, n)``, ``B_t (m, r_t)``), solved in the span of the ``A_t`` rows: float64, ``(m, n)``."""
    A = torch.cat([a.to(device=device, dtype=_F64) for a, _, _ in factors], 0)
    m, n = factors[0][1].shape[0], factors[0][0].shape[1]
    if A.shape[0] == 0:
        return torch.zeros(m, n, dtype=_F64, device=device)
    _, S, Vh = linalg.svd(A, device=device, dtype=_F64)
    Q = Vh[:linalg.numerical_rank(S, tuple(A.shape), _F64)].mT  # (n, k) orthonormal: the factors are exact
    reduced = torch.stack([float(s) * b.to(device=device, dtype=_F64) @ (a.to(device=device, dtype=_F64) @ Q)
                           for a, b, s in factors])
    return wudi_exact(reduced, rcond=rcond, device=device, width=n) @ Q.mT  # the dense path's cut


def wudi_adam(taus: torch.Tensor, *, steps: int = 300, lr: float = 1e-5,
              device: str | torch.device = "cpu") -> torch.Tensor:
    """The reference's solver: Adam on :func:`wudi_objective` from ``sum_t tau_t``, float32, on ``device``.

    ``torch.optim.Adam(lr=lr)`` arithmetic (betas 0.9, 0.999, eps 1e-8, no weight decay) with the exact gradient
    ``2 (X S - B)``, ``S = sum_t tau_t^T tau_t / ||tau_t||^2``, ``B = sum_t tau_t tau_t^T tau_t / ||tau_t||^2``."""
    d = taus.to(device=device, dtype=torch.float32)
    X = d.sum(0)
    keep = _nonzero(d)
    if keep.numel() == 0 or steps == 0:
        return X
    d = d[keep]
    sq = d.reshape(d.shape[0], -1).square().sum(1)
    gram = d.mT @ d / sq[:, None, None]  # (T, n, n)
    S, B = gram.sum(0), (d @ gram).sum(0)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    m1, m2 = torch.zeros_like(X), torch.zeros_like(X)
    for step in range(1, steps + 1):
        grad = 2 * (X @ S - B)
        m1.lerp_(grad, 1 - beta1)
        m2.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias1, bias2 = 1 - beta1**step, 1 - beta2**step
        denom = (m2.sqrt() / bias2**0.5).add_(eps)
        X.addcdiv_(m1, denom, value=-lr / bias1)
    return X


# ------------------------------------------------------------------------------ the method
def _solved(ctx: MergeContext, key: str) -> bool:
    return ctx.is_matrix(key) and min(ctx.shape(key)) > 0


def _notes(ctx: MergeContext, key: str, zero: list[str]) -> tuple[str, ...]:
    if len(zero) == ctx.n_tasks:
        return ("WUDI: every task matrix is zero here (an untouched layer): zero update.",)
    return tuple(f"WUDI: task {t!r} has an all-zero matrix here; it is left out of this key's objective."
                 for t in zero)


@register_merge(
    "wudi", alpha=1.0, pretty_name="WUDI-Merging", reference="Cheng et al., ICML 2025", uses_svd=True,
    alpha_grid=_WUDI_GRID,
)
def wudi(ctx: MergeContext, key: str, *, solver: Solver = "adam", steps: Steps = 300, lr: Rate = 1e-5,
         others: Others = "mean", rcond: Cut = None) -> KeyUpdate:
    """WUDI-Merging: per 2-D key, ``argmin_X sum_t ||(X - tau_t) tau_t^T||^2 / ||tau_t||^2``.

    Parameters
    ----------
    solver : {"adam", "exact"}, default="adam"
        ``"adam"``: the reference's ``steps`` Adam iterations from the task-arithmetic sum, float32 (best on the
        MiniLM zoo); ``"exact"``: the minimum-norm minimiser in float64 (from the SVD of the stacked normalised
        task matrices; from the LoRA factors when every task has them; best on the digits zoo).
    steps : int in [0, 100000], default=300
        ``solver="adam"``: iterations (the reference's ``iter_num``); unused by ``"exact"``.
    lr : float > 0, default=1e-5
        ``solver="adam"``: learning rate (FusionBench's and the ViT code's 1e-5; the RoBERTa code uses 2e-5).
    others : {"mean", "sum"}, default="mean"
        Keys that are not 2-D matrices (biases, norms, convolutions): the mean of the task vectors (FusionBench)
        or their sum (task arithmetic).
    rcond : float in [0, 1) or None, default=None
        ``solver="exact"``: singular values of the stacked normalised task matrices at or below ``rcond sigma_1``
        count as zero; None: ``max(T m, n) eps_fp32`` (their numerical rank in fp32). Unused by ``"adam"``.
    alpha : float, default=1.0
        Scale of the update (the reference adds it unscaled).
    """
    if not _solved(ctx, key):
        deltas = ctx.deltas(key)
        return KeyUpdate(deltas.mean(0) if others == "mean" else deltas.sum(0))
    lora = _lora(ctx, key) if solver == "exact" else None
    if lora is not None:
        factors = [(f.A, f.B, f.scale) for f in lora.values()]
        zero = [t for t, f in lora.items() if f.A.shape[0] == 0 or f.scale == 0 or not f.B.any() or not f.A.any()]
        live = [f for t, f in zip(lora, factors) if t not in zero]
        if not live:
            return KeyUpdate(torch.zeros(ctx.shape(key)), _notes(ctx, key, zero))
        X = wudi_exact_factored(live, rcond=rcond, device=ctx.device)
        return KeyUpdate(X.to(device="cpu", dtype=torch.float32), _notes(ctx, key, zero))
    deltas = ctx.deltas(key)
    zero = [t for t, z in zip(ctx.tasks, (deltas.reshape(ctx.n_tasks, -1) == 0).all(1).tolist()) if z]
    if solver == "exact":
        X = wudi_exact(deltas, rcond=rcond, device=ctx.device)
    else:
        X = wudi_adam(deltas, steps=steps, lr=lr, device=ctx.device)
    return KeyUpdate(X.to(device="cpu", dtype=torch.float32), _notes(ctx, key, zero))
