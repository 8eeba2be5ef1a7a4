"""Decomposition kernels: one attempt of an SVD, singular values or polar factor with one driver.

A kernel takes the prepared input (working dtype, compute device) and a driver name, and returns its
result or raises; :func:`~weightlens.linalg.guard.run` decides what to try next. Wide CPU matrices
are decomposed through their transpose; ``driver="gesvd"`` on the CPU goes to SciPy's LAPACK gesvd
(the last resort); ``gesvda`` results are verified (:mod:`weightlens.linalg.verify`).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from torch import Tensor

from weightlens.linalg.results import SVD, LeftSVD, Polar
from weightlens.linalg.verify import verify_values, verify_vectors

__all__ = ["left_svd_kernel", "polar_kernel", "polar_values_kernel", "scipy_blas_single_threaded", "svd_kernel",
           "svdvals_kernel"]


def _wide_on_cpu(x: Tensor) -> bool:
    """Whether ``x`` is a wide CPU matrix, which LAPACK decomposes faster through its transpose:
    1.5x for the full SVD of 384 x 1536 float32 (MKL, 1-2 threads), up to 1.6x for singular values."""
    return x.device.type == "cpu" and x.shape[-2] < x.shape[-1]


def _zero_svd(x: Tensor) -> SVD:
    """The thin SVD of an all-zero ``x`` without LAPACK's ``O(m n r)`` work: zero values and the identity's
    leading columns and rows, which LAPACK's gesdd returns for a zero matrix too (exactly, for tall, wide and
    square float32/float64 CPU matrices). A frozen embedding (30522 x 384) took 0.2-2 s per decomposition."""
    *batch, m, n = x.shape
    r = min(m, n)
    U = torch.eye(m, r, dtype=x.dtype, device=x.device).expand(*batch, m, r).clone()
    Vh = torch.eye(r, n, dtype=x.dtype, device=x.device).expand(*batch, r, n).clone()
    return SVD(U, torch.zeros((*batch, r), dtype=x.dtype, device=x.device), Vh)


def svd_kernel(x: Tensor, driver: str | None) -> SVD:
    """Thin SVD of ``x`` with ``driver`` (unsigned: signs are fixed by the caller)."""
    if x.numel() and not bool(x.any()):  # a frozen layer's task vector or merged update
        return _zero_svd(x)
    if _wide_on_cpu(x):  # A = U S Vh  <=>  A^T = Vh^T S U^T
        U, S, Vh = svd_kernel(x.mT, driver)
        return SVD(Vh.mT.contiguous(), S, U.mT.contiguous())
    if x.device.type == "cpu" and driver == "gesvd":
        return _scipy_gesvd(x, vectors=True)
    U, S, Vh = torch.linalg.svd(x, full_matrices=False, driver=driver)
    result = SVD(U, S, Vh)
    if driver == "gesvda":
        verify_vectors(x, result)
    return result


def svdvals_kernel(x: Tensor, driver: str | None) -> Tensor:
    """Singular values of ``x`` with ``driver``."""
    if x.numel() and not bool(x.any()):  # zero, exactly (LAPACK's too), without the bidiagonalisation
        return torch.zeros((*x.shape[:-2], min(x.shape[-2:])), dtype=x.dtype, device=x.device)
    if _wide_on_cpu(x):
        x = x.mT  # same singular values
    if x.device.type == "cpu" and driver == "gesvd":
        return _scipy_gesvd(x, vectors=False)
    S = torch.linalg.svdvals(x, driver=driver)
    if driver == "gesvda":
        verify_values(x, S)
    return S


def left_svd_kernel(x: Tensor, driver: str | None) -> LeftSVD:
    """``U S`` and ``S`` of ``x`` from the float64 Gram matrix of its smaller side (``driver`` unused).

    Wide (``m <= n``): ``x x^T = U S^2 U^T``, so ``U S`` comes from the eigenvectors. Tall: ``x^T x = V S^2
    V^T`` and ``U S = x V``. An eigensolve of the ``r x r`` Gram costs about half a thin SVD of a
    384 x 1536 matrix (MKL, 2 threads); squaring in float64 resolves values down to ~1e-8 of ``S[0]``,
    far below float32's numerical-rank tolerance. Unsigned (the caller fixes signs).
    """
    m, n = x.shape[-2:]
    if x.numel() and not bool(x.any()):
        r = min(m, n)
        return LeftSVD(x.new_zeros((*x.shape[:-2], m, r)), x.new_zeros((*x.shape[:-2], r)))
    a = x.to(torch.float64)
    wide = m <= n
    lam, vectors = torch.linalg.eigh(a @ a.mT if wide else a.mT @ a)
    lam, vectors = lam.flip(-1), vectors.flip(-1)  # descending
    S = lam.clamp_min(0).sqrt()
    US = vectors * S[..., None, :] if wide else x @ vectors.to(x.dtype)  # x V in the working dtype
    return LeftSVD(US.to(x.dtype), S.to(x.dtype))


def polar_kernel(x: Tensor, driver: str | None) -> Tensor:
    """Orthogonal polar factor ``U @ Vh`` of ``x`` with ``driver``."""
    return polar_values_kernel(x, driver).factor


def polar_values_kernel(x: Tensor, driver: str | None) -> Polar:
    """The orthogonal polar factor ``U @ Vh`` of ``x`` with ``driver``, and ``x``'s singular values."""
    U, S, Vh = svd_kernel(x, driver)
    return Polar(U @ Vh, S)


def _scipy_gesvd(x: Tensor, *, vectors: bool) -> Any:
    """LAPACK gesvd (QR iteration) through SciPy: the last resort when gesdd does not converge."""
    import scipy.linalg

    arr = x.detach().cpu().numpy()
    batch, (m, n) = arr.shape[:-2], arr.shape[-2:]
    r = min(m, n)
    flat = arr.reshape(-1, m, n)
    opts = {"lapack_driver": "gesvd", "check_finite": False}
    if not vectors:
        values = [scipy.linalg.svd(mat, compute_uv=False, **opts) for mat in flat]
        return _stack(values, (*batch, r), x)
    parts = [scipy.linalg.svd(mat, full_matrices=False, **opts) for mat in flat]
    return SVD(
        _stack([p[0] for p in parts], (*batch, m, r), x),
        _stack([p[1] for p in parts], (*batch, r), x),
        _stack([p[2] for p in parts], (*batch, r, n), x),
    )


@functools.cache
def _blas_controller() -> Any:
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def scipy_blas_single_threaded() -> Any:
    """Run SciPy's LAPACK on one thread: its OpenBLAS threads spin after each call and measurably
    slowed torch's next decompositions (2-3x on 2 cores) when both ran multi-threaded."""
    return _blas_controller().limit(limits=1, user_api="blas")


def _stack(arrays: list[np.ndarray], shape: tuple[int, ...], like: Tensor) -> Tensor:
    data = np.stack(arrays) if arrays else np.zeros(shape)
    return torch.from_numpy(np.ascontiguousarray(data.reshape(shape))).to(dtype=like.dtype)
