"""Exact SVDs of low-rank products ``scale * B @ A`` (LoRA updates and their sums) from the factors.

With ``B (m, r)`` and ``A (r, n)``, ``r << min(m, n)``: ``B = Q_b R_b`` and ``A^T = Q_a R_a`` (thin
QR), so ``B @ A = Q_b (R_b R_a^T) Q_a^T`` and the SVD of the ``r x r`` core ``R_b R_a^T = U_c S V_c^T``
gives the thin SVD ``U = Q_b U_c``, ``S``, ``Vh = V_c^T Q_a^T`` with ``r`` triplets: ``O((m + n) r^2)``
work instead of ``O(m n min(m, n))``, and nothing of size ``m x n`` is formed. Singular values past
``r`` are exactly zero. A sum of products ``sum_i s_i B_i A_i`` is one product of the concatenated
factors ``[s_1 B_1, ..., s_k B_k] @ [A_1; ...; A_k]`` (rank at most ``sum r_i``).

The QR and the core run in float64 (cheap at these sizes) and the result is cast to ``dtype``, so
small singular values keep float64 accuracy; signs follow :func:`~weightlens.linalg.svd`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from weightlens.errors import InvalidParameterError, ShapeMismatchError
from weightlens.linalg.backend import _fix_signs, svd
from weightlens.linalg.devices import resolve_device
from weightlens.linalg.results import SVD

__all__ = ["concat_factors", "factored_svd"]


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
    if A.ndim != 2 or B.ndim != 2 or B.shape[1] != A.shape[0]:
        raise ShapeMismatchError(
            f"factored_svd{'' if name is None else f' of {name!r}'}: B {tuple(B.shape)} @ A {tuple(A.shape)} is "
            "not a product of an (m, r) and an (r, n) matrix."
        )
    if dtype not in (torch.float32, torch.float64):
        raise InvalidParameterError(f"The 'dtype' parameter must be torch.float32 or torch.float64. Got {dtype!r}.")
    (m, r), n = B.shape, A.shape[1]
    dev = resolve_device(device)
    if r >= min(m, n):
        dense = float(scale) * (B.to(dev, torch.float64) @ A.to(dev, torch.float64))
        return svd(dense, device=dev, dtype=dtype, name=name)
    Qb, Rb = torch.linalg.qr(B.to(dev, torch.float64))
    Qa, Ra = torch.linalg.qr(A.to(dev, torch.float64).mT)
    Uc, S, Vch = torch.linalg.svd(float(scale) * (Rb @ Ra.mT))
    result = SVD((Qb @ Uc).to(dtype), S.to(dtype), (Vch @ Qa.mT).to(dtype))
    return _fix_signs(result)
