"""The public decompositions (:func:`svd`, :func:`svdvals`, :func:`polar`, :func:`topk_svd`) and
:func:`numerical_rank`.

Every decomposition runs through one guarded path, :func:`weightlens.linalg.guard.run` (input
checks and cast, the attempt plan and its fallbacks), with a kernel from
:mod:`weightlens.linalg.kernels` or :mod:`weightlens.linalg.topk`; this module fixes the signs of
the singular vectors. Devices and the CUDA driver table live in :mod:`weightlens.linalg.devices`.

CUDA driver table
-----------------
:data:`~weightlens.linalg.devices.CUDA_DRIVER_TABLE` maps ``min(m, n)`` to a cuSOLVER driver.
``None`` is torch's default: Jacobi (``gesvdjBatched`` up to 32x32, ``gesvdj`` above) with torch's
own fallback to ``gesvd``; naming ``"gesvdj"`` would only lose that fallback. From 256 up the table
picks ``"gesvda"``, because on an H100 it is ~4x (768x768: 9 vs 36 ms) and ~9x (4096x4096:
131 ms vs 1.1 s) faster than the default at 4e-7 relative error; batched cuSOLVER calls do not
help above 32x32.
gesvda can be inaccurate on ill-conditioned or rank-deficient input, so each gesvda result is
verified in float64 (:mod:`weightlens.linalg.verify`) against
:func:`~weightlens.linalg.devices.gesvda_tolerance` = ``GESVDA_RTOL_FACTOR * sqrt(max(m, n)) *
eps(dtype)`` (3.3e-4 at 768x768 in float32, ~1000x the H100 figure); a failure retries with gesvd.

``benchmarks/RESULTS.md`` holds no CUDA timings yet, so these H100 figures are not reproduced in
this repository: ``python benchmarks/bench_linalg.py`` on a GPU machine measures them; record the
figures in ``benchmarks/RESULTS.md`` and edit :data:`~weightlens.linalg.devices.CUDA_DRIVER_TABLE`
to match. When torch prefers MAGMA no driver is passed (torch accepts ``driver=`` only with
cuSOLVER).

Conventions
-----------
* Thin SVD: ``U (..., m, r)``, ``S (..., r)`` descending, ``Vh (..., r, n)``, ``r = min(m, n)``.
* Signs are fixed: the largest-magnitude entry of each column of ``U`` is positive (``Vh`` flipped
  to match), so vectors agree across drivers, devices and fallbacks where singular values differ.
* Rank deficiency: vectors of zero (or numerically zero) singular values are an arbitrary
  orthonormal completion, so the polar factor ``U @ Vh`` of a rank-deficient matrix is not unique
  (every choice is semi-orthogonal and equally close to ``A``). See :func:`numerical_rank`.
* No autograd (inputs are detached). Products run at torch's float32 matmul precision: leave TF32
  off (torch's default) for polar factors orthonormal to float32 accuracy on CUDA.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from weightlens.errors import InvalidParameterError
from weightlens.linalg.devices import resolve_device
from weightlens.linalg.guard import run
from weightlens.linalg.inputs import as_tensor, check_int
from weightlens.linalg.kernels import left_svd_kernel, polar_kernel, polar_values_kernel, svd_kernel, svdvals_kernel
from weightlens.linalg.results import SVD, LeftSVD, Polar
from weightlens.linalg.topk import TopkOptions, resolve_topk_options, topk_kernel

__all__ = ["left_svd", "numerical_rank", "polar", "svd", "svdvals", "topk_svd"]


def svd(
    a: Tensor,
    *,
    device: str | torch.device = "auto",
    dtype: torch.dtype = torch.float32,
    name: str | None = None,
) -> SVD:
    """Thin SVD of a matrix or a batch of matrices.

    Parameters
    ----------
    a : Tensor or ndarray of shape (..., m, n)
        Any float dtype; cast to ``dtype`` before decomposing.
    device : str or torch.device, default="auto"
        Compute device (see :func:`~weightlens.linalg.devices.resolve_device`); outputs stay there.
    dtype : {torch.float32, torch.float64}, default=torch.float32
        Working and output dtype.
    name : str, optional
        Tensor key, used in error messages.

    Returns
    -------
    SVD
        ``(U, S, Vh)`` with ``U (..., m, r)``, ``S (..., r)``, ``Vh (..., r, n)``, ``r = min(m, n)``,
        signs fixed (largest-magnitude entry of each ``U`` column positive).
    """
    return _fix_signs(run(a, svd_kernel, op="svd", device=device, dtype=dtype, name=name))


def svdvals(
    a: Tensor,
    *,
    device: str | torch.device = "auto",
    dtype: torch.dtype = torch.float32,
    name: str | None = None,
) -> Tensor:
    """Singular values (descending) of a matrix or batch, shape ``(..., min(m, n))``.

    Parameters are those of :func:`svd`. Cheaper than :func:`svd` (no singular vectors).
    """
    return run(a, svdvals_kernel, op="svdvals", device=device, dtype=dtype, name=name)


def left_svd(
    a: Tensor,
    *,
    device: str | torch.device = "auto",
    dtype: torch.dtype = torch.float32,
    name: str | None = None,
) -> LeftSVD:
    """The left side of the thin SVD, ``U @ diag(S)`` and ``S``, of a matrix or batch, without ``Vh``.

    Parameters are those of :func:`svd`. From the float64 Gram matrix of the smaller side (an eigensolve
    instead of a bidiagonalisation: 1.3-2x faster than :func:`svd` on the CPU for 384 x 384 to
    384 x 1536 task matrices), so values below about ``1e-8 * S[0]`` are not resolved (they come out
    near zero, well under :func:`numerical_rank`'s float32 tolerance). For projections of the columns
    (``||P A||_F = ||P U S||_F``) and leading spans (:meth:`LeftSVD.span`); signs as :func:`svd`'s
    (largest-magnitude entry of each column positive).
    """
    US, S = run(a, left_svd_kernel, op="left_svd", device=device, dtype=dtype, name=name)
    return LeftSVD(US.mul_(_column_signs(US)), S)  # in place: a fresh output


def polar(
    a: Tensor,
    *,
    device: str | torch.device = "auto",
    dtype: torch.dtype = torch.float32,
    name: str | None = None,
    with_values: bool = False,
) -> Tensor | Polar:
    """Orthogonal polar factor ``U @ Vh``: the semi-orthogonal matrix closest to ``a``.

    Parameters are those of :func:`svd`. Returns shape ``(..., m, n)`` with orthonormal columns
    (``m >= n``) or rows (``m < n``); with ``with_values=True`` a :class:`~weightlens.linalg.Polar`, the same
    factor and ``a``'s singular values (from the same SVD).

    Notes
    -----
    For rank-deficient input the factor is not unique: the directions of zero singular values are
    an arbitrary orthonormal completion. Check with :func:`numerical_rank` on the values.
    """
    kernel = polar_values_kernel if with_values else polar_kernel
    return run(a, kernel, op="polar", device=device, dtype=dtype, name=name)


def topk_svd(
    a: Tensor,
    k: int,
    *,
    device: str | torch.device = "auto",
    dtype: torch.dtype = torch.float32,
    name: str | None = None,
    options: TopkOptions | None = None,
    **overrides: Any,
) -> SVD:
    """Leading ``k`` singular triplets: ``U (..., m, k)``, ``S (..., k)``, ``Vh (..., k, n)``.

    Parameters
    ----------
    a : Tensor or ndarray of shape (..., m, n)
    k : int
        Number of triplets, ``0 <= k <= min(m, n)`` (``k = 0`` gives empty factors).
    device, dtype, name
        As in :func:`svd`.
    options : TopkOptions, optional
        How the triplets are found (``method``, ``approximate``; randomized ``oversample``, ``niter``,
        ``seed``: see :class:`~weightlens.linalg.topk.TopkOptions`); ``**overrides`` set its fields
        directly, e.g.
        ``topk_svd(a, 8, method="randomized", seed=3)``.
    """
    op = "topk_svd"
    src = as_tensor(a, op, name)
    m, n = src.shape[-2:]
    check_int(op, "k", k, 0, min(m, n))
    opts = resolve_topk_options(options, overrides)
    compute = topk_kernel(opts, k, (m, n), resolve_device(device))
    return _fix_signs(run(src, compute, op=op, device=device, dtype=dtype, name=name))


def numerical_rank(S: Tensor, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> int:
    """Number of singular values above ``max(m, n) * eps(dtype) * sigma_1``.

    Parameters
    ----------
    S : Tensor of shape (r,)
        Singular values of one matrix.
    shape : tuple of int
        The matrix shape ``(m, n)`` (last two entries used).
    dtype : torch.dtype, optional
        Precision the values were computed in; ``S.dtype`` by default.

    Returns
    -------
    int
        0 for an all-zero matrix; ``min(m, n)`` for a numerically full-rank one.
    """
    if not isinstance(S, Tensor) or S.ndim != 1:
        got = tuple(S.shape) if isinstance(S, Tensor) else type(S).__name__
        raise InvalidParameterError(
            f"numerical_rank needs the 1-D singular values of one matrix. Got {got}; for a batch, "
            f"call it per matrix (S[i])."
        )
    dt = S.dtype if dtype is None else dtype
    if not dt.is_floating_point:
        raise InvalidParameterError(
            f"The 'dtype' parameter of numerical_rank must be a float dtype. Got {dt} instead."
        )
    if S.numel() == 0:
        return 0
    tol = max(int(shape[-2]), int(shape[-1])) * torch.finfo(dt).eps * float(S.max())
    return int((S > tol).sum())


def _fix_signs(result: SVD) -> SVD:
    """Make the largest-magnitude entry of each column of U positive (Vh flipped to match)."""
    U, S, Vh = result
    if U.numel() == 0:
        return result
    signs = _column_signs(U)
    return SVD(U.mul_(signs), S, Vh.mul_(signs.mT))  # in place: the factors are fresh outputs


def _column_signs(U: Tensor) -> Tensor:
    """``(..., 1, r)`` signs that make the largest-magnitude entry of each column of ``U`` positive (1 for a
    zero column, and for an empty ``U``)."""
    if U.numel() == 0:
        return torch.ones((*U.shape[:-2], 1, U.shape[-1]), dtype=U.dtype, device=U.device)
    idx = U.abs().argmax(dim=-2, keepdim=True)
    signs = torch.sign(torch.gather(U, -2, idx))
    return torch.where(signs == 0, torch.ones_like(signs), signs)
