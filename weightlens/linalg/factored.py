"""Exact SVDs of low-rank products ``scale * B @ A`` (LoRA updates and their sums) from the factors.

With ``B (m, r)`` and ``A (r, n)``, ``r << min(m, n)``: ``B = Q_b R_b`` and ``A^T = Q_a R_a`` (thin
QR), so ``B @ A = Q_b (R_b R_a^T) Q_a^T`` and the SVD of the ``r x r`` core ``R_b R_a^T = U_c S V_c^T``
gives the thin SVD ``U = Q_b U_c``, ``S``, ``Vh = V_c^T Q_a^T`` with ``r`` triplets: ``O((m + n) r^2)``
work instead of ``O(m n min(m, n))``, and nothing of size ``m x n`` is formed. Singular values past
``r`` are exactly zero. A sum of products ``sum_i s_i B_i A_i`` is one product of the concatenated
factors ``[s_1 B_1, ..., s_k B_k] @ [A_1; ...; A_k]`` (rank at most ``sum r_i``).

The QR and the core run in float64 (cheap at these sizes) and the result is cast to ``dtype``, so
small singular values keep float64 accuracy; signs follow :func:`~weightlens.linalg.svd`.

Such a thin SVD has ``k = rank`` triplets, not ``min(m, n)``: where a method needs the directions of the
zero singular values (which a dense SVD returns as an arbitrary orthonormal completion),
:func:`complete_basis` gives a deterministic one, orthogonal to the known directions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from weightlens.errors import InvalidParameterError, ShapeMismatchError
from weightlens.linalg.backend import _fix_signs, svd, svdvals
from weightlens.linalg.devices import resolve_device
from weightlens.linalg.results import SVD

__all__ = ["complete_basis", "complete_pair", "concat_factors", "factored_svd", "factored_svdvals"]


def concat_factors(factors: Sequence[tuple[Tensor, Tensor, float]]) -> tuple[Tensor, Tensor]:
    """``(B, A)`` with ``B @ A = sum_i scale_i * B_i @ A_i`` for ``factors = [(A_i, B_i, scale_i), ...]``.

    Factors are given as ``(A, B, scale)`` (PEFT's order: ``A (r, n)`` first), each upcast to float32
    at least; the scales go into ``B``.
    """
    if not factors:
        raise InvalidParameterError("concat_factors needs at least one (A, B, scale) triple.")
    dtype = torch.promote_types(torch.float32, factors[0][0].dtype)
    Bs, As = [], []
    for i, (A, B, scale) in enumerate(factors):
        if A.ndim != 2 or B.ndim != 2 or B.shape[1] != A.shape[0]:
            raise ShapeMismatchError(
                f"factors[{i}]: B {tuple(B.shape)} @ A {tuple(A.shape)} is not a product of an (m, r) and an "
                "(r, n) matrix."
            )
        if (B.shape[0], A.shape[1]) != (factors[0][1].shape[0], factors[0][0].shape[1]):
            raise ShapeMismatchError(
                f"factors[{i}] gives a {(B.shape[0], A.shape[1])} product; factors[0] gives "
                f"{(factors[0][1].shape[0], factors[0][0].shape[1])}: sum products of one shape."
            )
        Bs.append(B.to(dtype) * float(scale))
        As.append(A.to(dtype))
    return torch.cat(Bs, dim=1), torch.cat(As, dim=0)


def factored_svd(
    B: Tensor,
    A: Tensor,
    *,
    scale: float = 1.0,
    device: str | torch.device = "auto",
    dtype: torch.dtype = torch.float32,
    name: str | None = None,
) -> SVD:
    """Thin SVD of ``scale * B @ A`` from its factors (see the module docstring), exact.

    Parameters
    ----------
    B : Tensor of shape (m, r)
    A : Tensor of shape (r, n)
    scale : the product's scale (LoRA's ``lora_alpha / r``).
    device, dtype, name : as :func:`~weightlens.linalg.svd`.

    Returns
    -------
    SVD
        ``U (m, k)``, ``S (k,)``, ``Vh (k, n)`` with ``k = min(r, m, n)``. When ``r >= min(m, n)`` the
        product is formed and decomposed densely (nothing to gain from the factors).
    """
    dev, dense = _prepare(B, A, scale, device, dtype, "factored_svd", name)
    if dense is not None:
        return svd(dense, device=dev, dtype=dtype, name=name)
    Qb, Rb = torch.linalg.qr(B.to(dev, torch.float64))
    Qa, Ra = torch.linalg.qr(A.to(dev, torch.float64).mT)
    Uc, S, Vch = torch.linalg.svd(float(scale) * (Rb @ Ra.mT))
    result = SVD((Qb @ Uc).to(dtype), S.to(dtype), (Vch @ Qa.mT).to(dtype))
    return _fix_signs(result)


def factored_svdvals(
    B: Tensor,
    A: Tensor,
    *,
    scale: float = 1.0,
    device: str | torch.device = "auto",
    dtype: torch.dtype = torch.float32,
    name: str | None = None,
) -> Tensor:
    """Singular values of ``scale * B @ A`` alone: :func:`factored_svd`'s ``S`` from the triangular factors
    only (no ``Q`` formed), ``min(r, m, n)`` values, descending; dense when ``r >= min(m, n)``."""
    dev, dense = _prepare(B, A, scale, device, dtype, "factored_svdvals", name)
    if dense is not None:
        return svdvals(dense, device=dev, dtype=dtype, name=name)
    Rb = torch.linalg.qr(B.to(dev, torch.float64), mode="r").R
    Ra = torch.linalg.qr(A.to(dev, torch.float64).mT, mode="r").R
    return torch.linalg.svdvals(float(scale) * (Rb @ Ra.mT)).to(dtype)


def _prepare(B: Tensor, A: Tensor, scale: float, device: str | torch.device, dtype: torch.dtype, op: str,
             name: str | None) -> tuple[torch.device, Tensor | None]:
    """Checks the factors, resolves the device, and forms the product (float64) when the factors are no
    thinner than it (``r >= min(m, n)``: nothing to gain from them); else ``None``."""
    if A.ndim != 2 or B.ndim != 2 or B.shape[1] != A.shape[0]:
        raise ShapeMismatchError(
            f"{op}{'' if name is None else f' of {name!r}'}: B {tuple(B.shape)} @ A {tuple(A.shape)} is "
            "not a product of an (m, r) and an (r, n) matrix."
        )
    if dtype not in (torch.float32, torch.float64):
        raise InvalidParameterError(f"The 'dtype' parameter must be torch.float32 or torch.float64. Got {dtype!r}.")
    dev = resolve_device(device)
    if B.shape[1] < min(B.shape[0], A.shape[1]):
        return dev, None
    return dev, float(scale) * (B.to(dev, torch.float64) @ A.to(dev, torch.float64))


def complete_basis(Q: Tensor, width: int) -> Tensor:
    """``Q``'s orthonormal columns followed by ``width - p`` more, orthogonal to them and to each other.

    ``Q`` is ``(m, p)`` with orthonormal columns and ``p <= width <= m``. The new columns are columns
    ``p .. width - 1`` of the product of the Householder reflections that triangularise ``Q``
    (``torch.geqrf``), formed from its compact WY form ``I - W T W^T`` with one matrix product, in ``Q``'s
    dtype (float32 at least) and on its device: deterministic, ``O(m * width * p)`` work, nothing of size
    ``m x m`` formed, orthogonal to working precision. They stand for the arbitrary completion a dense SVD
    returns past a matrix's rank. The first ``p`` columns are ``Q`` itself.
    """
    _check_width(Q, width)
    if width == Q.shape[1]:
        return Q
    return torch.cat([Q, _householder(Q, width)[0].to(Q.dtype)], dim=1)


def complete_pair(U: Tensor, V: Tensor, width: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(complete_basis(U, width), complete_basis(V, width), N)`` with ``N`` the completions' product.

    ``U (m, p)`` and ``V (n, p)`` are orthonormal pairs (e.g. singular vectors); ``N = Cu @ Cv^T`` for their
    completions ``Cu (m, width - p)``, ``Cv (n, width - p)``: a partial isometry between the orthogonal
    complements, formed as ``E Cv^T - W_u (X_u Cv^T)`` from ``Cu = E - W_u X_u`` (the WY form) in
    ``O((m + n) * width * p + m * n * p)`` instead of the ``O(m * n * width)`` of the product itself.
    """
    _check_width(U, width)
    _check_width(V, width)
    if U.shape[1] != V.shape[1]:
        raise ShapeMismatchError(f"complete_pair: U has {U.shape[1]} columns and V {V.shape[1]}; pass pairs.")
    p = U.shape[1]
    Cu, Wu, Xu = _householder(U, width)
    Cv = _householder(V, width)[0]
    N = -(Wu @ (Xu @ Cv.mT))
    N[p:width] += Cv.mT
    dtype = U.dtype
    return torch.cat([U, Cu.to(dtype)], 1), torch.cat([V, Cv.to(dtype)], 1), N.to(dtype)


def _check_width(Q: Tensor, width: int) -> None:
    m, p = Q.shape
    if not p <= width <= m:
        raise InvalidParameterError(f"complete_basis: width {width} must lie in [{p}, {m}] for a ({m}, {p}) basis.")


def _householder(Q: Tensor, width: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(C, W, X)``: columns ``p .. width - 1`` of ``H = I - W T W^T``, the Householder product of ``geqrf(Q)``
    (LAPACK's ``larft``, forward, columnwise), with ``C = E - W @ X`` (``E`` those columns of the identity,
    ``X = T @ W[p:width]^T``)."""
    (m, p), dtype = Q.shape, torch.promote_types(Q.dtype, torch.float32)
    a, tau = torch.geqrf(Q.to(dtype))
    W = a.tril(-1)
    W.diagonal().fill_(1.0)
    G = W.mT @ W
    if bool((tau != 0).all()):  # T^-1 = diag(1 / tau) + strictly upper part of W^T W (Puglisi)
        inverse = torch.diag(1.0 / tau) + G.triu(1)
        eye = torch.eye(p, dtype=dtype, device=Q.device)
        T = torch.linalg.solve_triangular(inverse, eye, upper=True)
    else:  # a reflector that is the identity: larft's recurrence
        T = torch.zeros((p, p), dtype=dtype, device=Q.device)
        for i in range(p):
            T[i, i] = tau[i]
            if i:
                T[:i, i] = -tau[i] * (T[:i, :i] @ G[:i, i])
    X = T @ W[p:width].mT
    C = -(W @ X)
    C[p:width] += torch.eye(width - p, dtype=dtype, device=Q.device)
    return C, W, X
