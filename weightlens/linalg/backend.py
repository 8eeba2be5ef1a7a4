"""Devices, dtypes and SVD drivers: the one place in weightlens that knows about them.

Every decomposition (:func:`svd`, :func:`svdvals`, :func:`polar`, :func:`topk_svd`) runs through one
guarded path, :func:`_run`:

1. The input (float tensor or array, shape ``(..., m, n)``) is detached, cast to the working dtype
   (float32, or float64) and moved to the compute device *before* anything else, so CUDA never sees
   fp16/bf16. Non-finite input raises :class:`~weightlens.errors.NonFiniteError` naming the tensor
   key and the number of NaN and Inf values.
2. The decomposition runs with the CUDA driver :func:`choose_driver` picks for the shape.
3. A result is accepted only if every output is finite and, after ``gesvda``, it passes the check
   below. Otherwise (also on ``LinAlgError``) the next attempt runs: on CUDA, table driver ->
   ``"gesvd"`` on the same GPU -> CPU float64 (LAPACK gesdd) -> CPU float64 gesvd (SciPy); on the
   CPU, float32 gesdd -> float64 gesdd -> float64 gesvd. Fallback results are cast back to the
   requested device and dtype. NaN is never returned: if every attempt fails,
   :class:`DecompositionError` names the key, the shape and what each attempt hit.

CUDA driver table
-----------------
:data:`CUDA_DRIVER_TABLE` maps ``min(m, n)`` to a cuSOLVER driver. ``None`` is torch's default:
Jacobi (``gesvdjBatched`` up to 32x32, ``gesvdj`` above) with torch's own fallback to ``gesvd``;
naming ``"gesvdj"`` would only lose that fallback. From 256 up the table picks ``"gesvda"``: on an
H100, DESIGN.md ("Performance shape") records ~4x (768x768: 9 vs 36 ms) and ~9x (4096x4096: 131 ms
vs 1.1 s) over the default at 4e-7 relative error; batched cuSOLVER calls did not help above 32x32.
gesvda can be inaccurate on ill-conditioned or rank-deficient input, so each gesvda result is
verified in float64 with Gaussian probes: the relative residual ``||A - U diag(S) Vh||_F / ||A||_F``
and the loss of orthonormality of ``U`` and ``Vh`` (for ``svdvals``: ``| ||S||_2 - ||A||_F | /
||A||_F``) must stay below :func:`gesvda_tolerance` = ``GESVDA_RTOL_FACTOR * sqrt(max(m, n)) *
eps(dtype)`` (3.3e-4 at 768x768 in float32, ~1000x the H100 figure); a failure retries with gesvd.

**The table is unmeasured in this session (written without a GPU).** Re-measure with
``python benchmarks/bench_linalg.py`` on the GPU, record the figures in ``benchmarks/RESULTS.md``
and edit :data:`~weightlens.linalg.devices.CUDA_DRIVER_TABLE`. When torch prefers MAGMA no driver is passed (torch accepts
``driver=`` only with cuSOLVER).

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

import functools
import math
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple, TypeVar

import numpy as np
import torch
from torch import Tensor

from weightlens.errors import DTypeError, InvalidParameterError, NonFiniteError, WeightlensError
from weightlens.linalg.devices import (  # noqa: F401  (re-exported: the backend's public surface)
    CUDA_DRIVER_TABLE,
    GESVDA_RTOL_FACTOR,
    choose_driver,
    gesvda_tolerance,
    resolve_device,
    warn_if_oversubscribed,
)

__all__ = [
    "CUDA_DRIVER_TABLE",
    "GESVDA_RTOL_FACTOR",
    "SVD",
    "DecompositionError",
    "choose_driver",
    "gesvda_tolerance",
    "numerical_rank",
    "polar",
    "resolve_device",
    "svd",
    "svdvals",
    "topk_svd",
]

T = TypeVar("T")

#: ``method="auto"`` in :func:`topk_svd` goes randomized when ``min(m, n) >= _RANDOMIZED_MIN_SIDE``
#: and ``k <= min(m, n) // _RANDOMIZED_FRACTION``; otherwise, on the CPU, ``"eigh"`` when
#: ``min(m, n) >= _EIGH_MIN_SIDE`` and ``k <= min(m, n) // _EIGH_FRACTION``; else ``"exact"``.
_RANDOMIZED_MIN_SIDE = 512
_RANDOMIZED_FRACTION = 8
_EIGH_MIN_SIDE = 128
_EIGH_FRACTION = 4
#: ``method="eigh"`` trusts the Gram matrix only while ``sigma_k > _EIGH_MIN_RATIO * sigma_1``: below,
#: ``A v / sigma`` loses orthonormality, so the exact path runs instead.
_EIGH_MIN_RATIO = 1e-4

_WORKING_DTYPES = (torch.float32, torch.float64)
_CPU = torch.device("cpu")
_PROBES = 4


class SVD(NamedTuple):
    """Thin SVD ``A = U @ diag(S) @ Vh`` (batched over leading dims).

    Attributes
    ----------
    U : Tensor of shape (..., m, r)
    S : Tensor of shape (..., r), descending
    Vh : Tensor of shape (..., r, n)
    """

    U: Tensor
    S: Tensor
    Vh: Tensor


class DecompositionError(WeightlensError, torch.linalg.LinAlgError):
    """Every attempt to decompose a matrix failed (non-convergence or non-finite output).

    Subclasses ``torch.linalg.LinAlgError`` (a ``RuntimeError``), which callers of torch's
    decompositions already catch.
    """


class _Unreliable(Exception):
    """A result failed its verification (internal: triggers the next attempt)."""


class _Attempt(NamedTuple):
    device: torch.device
    dtype: torch.dtype
    driver: str | None

    def describe(self) -> str:
        return f"{self.device}/{str(self.dtype).removeprefix('torch.')}/{self.driver or 'default'}"


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
        Compute device (see :func:`resolve_device`); outputs stay there.
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
    return _fix_signs(_run(a, _svd_kernel, op="svd", device=device, dtype=dtype, name=name))


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
    return _run(a, _svdvals_kernel, op="svdvals", device=device, dtype=dtype, name=name)


def polar(
    a: Tensor,
    *,
    device: str | torch.device = "auto",
    dtype: torch.dtype = torch.float32,
    name: str | None = None,
) -> Tensor:
    """Orthogonal polar factor ``U @ Vh``: the semi-orthogonal matrix closest to ``a``.

    Parameters are those of :func:`svd`. Returns shape ``(..., m, n)`` with orthonormal columns
    (``m >= n``) or rows (``m < n``).

    Notes
    -----
    For rank-deficient input the factor is not unique: the directions of zero singular values are
    an arbitrary orthonormal completion. Check with :func:`numerical_rank` on :func:`svdvals`.
    """
    return _run(a, _polar_kernel, op="polar", device=device, dtype=dtype, name=name)


def topk_svd(
    a: Tensor,
    k: int,
    *,
    device: str | torch.device = "auto",
    dtype: torch.dtype = torch.float32,
    method: str = "auto",
    approximate: bool = True,
    oversample: int = 10,
    niter: int = 2,
    seed: int = 0,
    name: str | None = None,
) -> SVD:
    """Leading ``k`` singular triplets: ``U (..., m, k)``, ``S (..., k)``, ``Vh (..., k, n)``.

    Parameters
    ----------
    a : Tensor or ndarray of shape (..., m, n)
    k : int
        Number of triplets, ``0 <= k <= min(m, n)`` (``k = 0`` gives empty factors).
    method : {"auto", "exact", "eigh", "randomized"}, default="auto"
        ``"exact"`` slices a full thin SVD. ``"eigh"`` is exact too: the leading ``k`` eigenpairs of
        the float64 Gram matrix of the smaller side (LAPACK ``syevx`` on the CPU computes only
        those), then ``U = A V / S``; 1.7-4x faster than a full SVD for ``k`` well below ``min(m, n)``
        and at least as accurate as float32 (squaring happens in float64). It falls back to
        ``"exact"`` when ``sigma_k <= 1e-4 * sigma_1`` (vectors of tiny values are not reliable
        through the Gram matrix). ``"randomized"`` is Halko et al.'s range finder with ``niter``
        power iterations (the algorithm of ``torch.svd_lowrank``, but seeded through a private
        generator so the global RNG is untouched, and returning ``Vh``): approximate for flat
        spectra. ``"auto"`` is randomized when ``min(m, n) >= 512`` and ``k <= min(m, n) // 8``,
        else ``"eigh"`` on the CPU when ``min(m, n) >= 128`` and ``k <= min(m, n) // 4``, else exact.
    approximate : bool, default=True
        Whether ``method="auto"`` may pick ``"randomized"``; ``False`` keeps it to exact methods
        (for merges that must match their reference implementation).
    oversample, niter, seed : int
        Randomized only: extra sample columns, power iterations, generator seed.
    device, dtype, name
        As in :func:`svd`.
    """
    op = "topk_svd"
    src = _as_tensor(a, op, name)
    m, n = src.shape[-2:]
    _check_int(op, "k", k, 0, min(m, n))
    _check_int(op, "oversample", oversample, 0)
    _check_int(op, "niter", niter, 0)
    _check_int(op, "seed", seed, 0)
    chosen = _pick_method(method, k, (m, n), resolve_device(device), approximate=approximate)
    if k == 0:
        compute: Callable[[Tensor, str | None], SVD] = _empty_kernel
    elif chosen == "exact":
        compute = partial(_exact_topk_kernel, k=k)
    elif chosen == "eigh":
        compute = partial(_eigh_topk_kernel, k=k)
    else:
        compute = partial(_randomized_kernel, k=k, oversample=oversample, niter=niter, seed=seed)
    return _fix_signs(_run(src, compute, op=op, device=device, dtype=dtype, name=name))


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


def _wide_on_cpu(x: Tensor) -> bool:
    """Whether ``x`` is a wide CPU matrix, which LAPACK decomposes faster through its transpose:
    1.5x for the full SVD of 384 x 1536 float32 (MKL, 1-2 threads), up to 1.6x for singular values."""
    return x.device.type == "cpu" and x.shape[-2] < x.shape[-1]


def _svd_kernel(x: Tensor, driver: str | None) -> SVD:
    if _wide_on_cpu(x):  # A = U S Vh  <=>  A^T = Vh^T S U^T
        U, S, Vh = _svd_kernel(x.mT, driver)
        return SVD(Vh.mT.contiguous(), S, U.mT.contiguous())
    if x.device.type == "cpu" and driver == "gesvd":
        return _scipy_gesvd(x, vectors=True)
    U, S, Vh = torch.linalg.svd(x, full_matrices=False, driver=driver)
    result = SVD(U, S, Vh)
    if driver == "gesvda":
        _verify_vectors(x, result)
    return result


def _svdvals_kernel(x: Tensor, driver: str | None) -> Tensor:
    if _wide_on_cpu(x):
        x = x.mT  # same singular values
    if x.device.type == "cpu" and driver == "gesvd":
        return _scipy_gesvd(x, vectors=False)
    S = torch.linalg.svdvals(x, driver=driver)
    if driver == "gesvda":
        _verify_values(x, S)
    return S


def _polar_kernel(x: Tensor, driver: str | None) -> Tensor:
    U, _, Vh = _svd_kernel(x, driver)
    return U @ Vh


def _exact_topk_kernel(x: Tensor, driver: str | None, *, k: int) -> SVD:
    U, S, Vh = _svd_kernel(x, driver)
    # clone: a view would keep the full factors alive (and in the cache's byte count)
    return SVD(U[..., :k].clone(), S[..., :k].clone(), Vh[..., :k, :].clone())


def _eigh_topk_kernel(x: Tensor, driver: str | None, *, k: int) -> SVD:
    """Leading ``k`` triplets from the float64 Gram matrix of the smaller side (see :func:`topk_svd`)."""
    tall = x.shape[-2] >= x.shape[-1]
    a = (x if tall else x.mT).to(torch.float64)  # (..., p, q), p >= q
    gram = a.mT @ a
    q = gram.shape[-1]
    if x.device.type == "cpu":  # syevx: only the k largest eigenpairs
        import scipy.linalg

        with _scipy_blas_single_threaded():
            pairs = [scipy.linalg.eigh(g, subset_by_index=[q - k, q - 1], driver="evx", check_finite=False)
                     for g in gram.reshape(-1, q, q).numpy()]
        lam = torch.from_numpy(np.stack([w[::-1] for w, _ in pairs]).reshape(*gram.shape[:-2], k))
        V = torch.from_numpy(np.stack([v[:, ::-1] for _, v in pairs]).reshape(*gram.shape[:-2], q, k))
    else:
        w, v = torch.linalg.eigh(gram)
        lam, V = w.flip(-1)[..., :k], v.flip(-1)[..., :k]
    S = lam.clamp_min(0).sqrt()
    if not bool((S[..., -1] > _EIGH_MIN_RATIO * S[..., 0]).all()):
        return _exact_topk_kernel(x, driver, k=k)  # (numerically) rank < k, or a steep spectrum
    U = (a @ V) / S[..., None, :]
    left, right = (U, V) if tall else (V, U)
    return SVD(left.to(x.dtype), S.to(x.dtype), right.mT.to(x.dtype).contiguous())


def _randomized_kernel(
    x: Tensor, driver: str | None, *, k: int, oversample: int, niter: int, seed: int
) -> SVD:
    m, n = x.shape[-2:]
    q = min(k + oversample, m, n)
    gen = torch.Generator(device=x.device).manual_seed(seed)
    omega = torch.randn((*x.shape[:-2], n, q), generator=gen, dtype=x.dtype, device=x.device)
    basis = torch.linalg.qr(x @ omega).Q
    for _ in range(niter):
        basis = torch.linalg.qr(x.mT @ basis).Q
        basis = torch.linalg.qr(x @ basis).Q
    small = basis.mT @ x  # (..., q, n)
    inner = "gesvd" if driver == "gesvd" else choose_driver(tuple(small.shape[-2:]), small.device)
    Ub, S, Vh = _svd_kernel(small, inner)
    return SVD(basis @ Ub[..., :k], S[..., :k].clone(), Vh[..., :k, :].clone())


def _empty_kernel(x: Tensor, driver: str | None) -> SVD:
    batch, (m, n) = x.shape[:-2], x.shape[-2:]
    opts = {"dtype": x.dtype, "device": x.device}
    empty = torch.zeros((*batch, 0), **opts)
    return SVD(x.new_zeros((*batch, m, 0)), empty, x.new_zeros((*batch, 0, n)))


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


def _scipy_blas_single_threaded() -> Any:
    """Run SciPy's LAPACK on one thread: its OpenBLAS threads spin after each call and measurably
    slowed torch's next decompositions (2-3x on 2 cores) when both ran multi-threaded."""
    return _blas_controller().limit(limits=1, user_api="blas")


def _stack(arrays: list[np.ndarray], shape: tuple[int, ...], like: Tensor) -> Tensor:
    data = np.stack(arrays) if arrays else np.zeros(shape)
    return torch.from_numpy(np.ascontiguousarray(data.reshape(shape))).to(dtype=like.dtype)


def _verify_vectors(x: Tensor, result: SVD) -> None:
    recon, ortho = _probe_errors(x, result)
    tol = gesvda_tolerance(tuple(x.shape), x.dtype)
    if not (recon <= tol and ortho <= tol):
        raise _Unreliable(
            f"gesvda residual {recon:.1e} / orthonormality loss {ortho:.1e} above tolerance {tol:.1e}"
        )


def _probe_errors(x: Tensor, result: SVD) -> tuple[float, float]:
    """Estimates of max ||A - U S Vh||_F/||A||_F and of the loss of orthonormality of U, Vh."""
    f64 = torch.float64
    a, U, S, Vh = (t.to(f64) for t in (x, *result))
    gen = torch.Generator(device=x.device).manual_seed(0)
    batch, n, r = a.shape[:-2], a.shape[-1], S.shape[-1]
    tiny = torch.finfo(f64).tiny
    probe = torch.randn((*batch, n, _PROBES), generator=gen, dtype=f64, device=x.device)
    err = a @ probe - U @ (S.unsqueeze(-1) * (Vh @ probe))
    scale = torch.linalg.matrix_norm(a) * math.sqrt(_PROBES)  # E||A X||_F for Gaussian X
    recon = torch.linalg.matrix_norm(err) / scale.clamp_min(tiny)
    z = torch.randn((*batch, r, _PROBES), generator=gen, dtype=f64, device=x.device)
    znorm = torch.linalg.matrix_norm(z).clamp_min(tiny)
    loss_u = torch.linalg.matrix_norm(U.mT @ (U @ z) - z) / znorm
    loss_v = torch.linalg.matrix_norm(Vh @ (Vh.mT @ z) - z) / znorm
    return _max(recon), max(_max(loss_u), _max(loss_v))


def _verify_values(x: Tensor, S: Tensor) -> None:
    anorm = torch.linalg.matrix_norm(x.to(torch.float64))
    snorm = torch.linalg.vector_norm(S.to(torch.float64), dim=-1)
    gap = _max((snorm - anorm).abs() / anorm.clamp_min(torch.finfo(torch.float64).tiny))
    tol = gesvda_tolerance(tuple(x.shape), x.dtype)
    if not gap <= tol:
        raise _Unreliable(f"gesvda singular values miss ||A||_F by {gap:.1e} (tolerance {tol:.1e})")


def _max(t: Tensor) -> float:
    return float(t.max()) if t.numel() else 0.0


_FAILURES = (torch.linalg.LinAlgError, np.linalg.LinAlgError, _Unreliable)


def _run(
    a: Tensor,
    compute: Callable[[Tensor, str | None], T],
    *,
    op: str,
    device: str | torch.device,
    dtype: torch.dtype,
    name: str | None,
) -> T:
    """Prepare ``a``, then run ``compute`` through the attempt plan until a result is accepted."""
    dev = resolve_device(device)
    if dev.type == "cpu":
        warn_if_oversubscribed()
    _check_dtype(op, dtype)
    src = _as_tensor(a, op, name)
    x = _cast(src, dev, dtype)
    _check_finite_input(op, name, x, src)
    driver = choose_driver(tuple(x.shape[-2:]), dev)
    failures: list[str] = []
    for attempt in _plan(dev, dtype, driver):
        same = attempt.device == dev and attempt.dtype == dtype
        xi = x if same else _cast(src, attempt.device, attempt.dtype)
        out = _attempt(compute, xi, attempt, failures)
        if out is None:
            continue
        out = _restore(out, dev, dtype)
        if _all_finite(out):
            return out
        failures.append(f"{attempt.describe()}: the result overflows {dtype}; pass dtype=torch.float64")
        break
    where = f"tensor {name!r}" if name else "the input"
    raise DecompositionError(
        f"{op} of {where} (shape {tuple(x.shape)}, {dtype}) failed on every attempt: "
        + "; ".join(failures)
        + ". The matrix may be extremely ill-conditioned or hold values near the limits of its "
        "dtype; inspect its norm and largest |value|, rescale it, or exclude this key."
    )


def _plan(device: torch.device, dtype: torch.dtype, driver: str | None) -> list[_Attempt]:
    """Attempts in order (see the module docstring)."""
    plan = [_Attempt(device, dtype, driver)]
    if device.type == "cuda" and driver != "gesvd":
        plan.append(_Attempt(device, dtype, "gesvd"))
    if device.type == "cuda" or dtype != torch.float64:
        plan.append(_Attempt(_CPU, torch.float64, None))
    plan.append(_Attempt(_CPU, torch.float64, "gesvd"))
    return plan


def _attempt(
    compute: Callable[[Tensor, str | None], T], x: Tensor, attempt: _Attempt, failures: list[str]
) -> T | None:
    """One attempt: the result, or ``None`` after appending why it was rejected to ``failures``."""
    try:
        out = compute(x, attempt.driver)
    except _FAILURES as exc:
        failures.append(f"{attempt.describe()}: {type(exc).__name__}: {_first_line(exc)}")
        return None
    except RuntimeError as exc:  # cuSOLVER status errors surface as plain RuntimeError
        if x.device.type != "cuda" or "cusolver" not in str(exc).lower():
            raise
        failures.append(f"{attempt.describe()}: {_first_line(exc)}")
        return None
    if not _all_finite(out):
        failures.append(f"{attempt.describe()}: non-finite output")
        return None
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"


def _all_finite(out: Any) -> bool:
    tensors = tuple(out) if isinstance(out, tuple) else (out,)
    return all(_finite(t) for t in tensors)


def _finite(t: Tensor) -> bool:
    """Whether every entry is finite: a NaN or Inf entry makes the sum non-finite, so one cheap
    reduction decides, and the elementwise test (~50x slower on CPU) runs only if the sum is not
    finite (a non-finite entry, or finite entries whose sum overflowed)."""
    if t.numel() == 0 or bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def _restore(out: T, device: torch.device, dtype: torch.dtype) -> T:
    if isinstance(out, SVD):
        return SVD(*(t.to(device=device, dtype=dtype) for t in out))  # type: ignore[return-value]
    return out.to(device=device, dtype=dtype)  # type: ignore[union-attr]


def _fix_signs(result: SVD) -> SVD:
    """Make the largest-magnitude entry of each column of U positive (Vh flipped to match)."""
    U, S, Vh = result
    if U.numel() == 0:
        return result
    idx = U.abs().argmax(dim=-2, keepdim=True)
    signs = torch.sign(torch.gather(U, -2, idx))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return SVD(U.mul_(signs), S, Vh.mul_(signs.mT))  # in place: the factors are fresh outputs


def _as_tensor(a: Any, op: str, name: str | None) -> Tensor:
    """The input as a detached float tensor of at least 2 dims (ndarrays accepted)."""
    where = f"tensor {name!r}" if name else "the input"
    if isinstance(a, np.ndarray):
        a = torch.from_numpy(a if a.flags.writeable else a.copy())
    if not isinstance(a, Tensor):
        raise InvalidParameterError(
            f"{op} needs a torch.Tensor or numpy array of shape (..., m, n); {where} is a "
            f"{type(a).__name__}."
        )
    if not a.is_floating_point():
        raise DTypeError(
            f"{op}: {where} has dtype {a.dtype}; decompositions need a real float tensor. Cast it "
            f"with .float() if that is meant, or exclude this key."
        )
    if a.ndim < 2:
        raise InvalidParameterError(
            f"{op}: {where} has shape {tuple(a.shape)}; expected a matrix or a batch of matrices "
            f"(..., m, n)."
        )
    return a.detach()


def _cast(a: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Cast then move (on the host first, so an accelerator receives ``dtype`` only)."""
    if a.device.type == "cpu" and device.type != "cpu":
        a = a.to(dtype=dtype)
    return a.to(device=device, dtype=dtype)


def _check_dtype(op: str, dtype: Any) -> None:
    if dtype not in _WORKING_DTYPES:
        raise InvalidParameterError(
            f"The 'dtype' parameter of {op} must be torch.float32 or torch.float64. Got {dtype!r} "
            f"instead. fp16/bf16 inputs are upcast automatically; 'dtype' is the working precision."
        )


def _check_finite_input(op: str, name: str | None, x: Tensor, src: Tensor) -> None:
    if _finite(x):
        return
    finite = torch.isfinite(x)
    nan = int(torch.isnan(x).sum())
    inf = int((~finite).sum()) - nan
    where = f"tensor {name!r}" if name else "the input"
    note = ""
    if src.dtype != x.dtype and _finite(src):
        note = f" (finite as {src.dtype}: the cast to {x.dtype} overflowed)"
    raise NonFiniteError(
        f"{op}: {where} of shape {tuple(x.shape)} holds {nan} NaN and {inf} Inf value(s){note}; "
        f"decompositions need finite input. Check the checkpoint for corrupt or overflowed values "
        f"(fp16 deltas can overflow), or exclude this key."
    )


def _check_int(op: str, param: str, value: Any, low: int, high: int | None = None) -> None:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if ok and low <= value and (high is None or value <= high):
        return
    allowed = f"an int in [{low}, {high}]" if high is not None else f"an int >= {low}"
    raise InvalidParameterError(
        f"The {param!r} parameter of {op} must be {allowed}. Got {value!r} instead."
    )


def _pick_method(
    method: Any, k: int, shape: tuple[int, int], device: torch.device = _CPU, *, approximate: bool = True
) -> str:
    if method not in ("auto", "exact", "eigh", "randomized"):
        raise InvalidParameterError(
            f"The 'method' parameter of topk_svd must be one of 'auto', 'exact', 'eigh', "
            f"'randomized'. Got {method!r} instead."
        )
    if method != "auto":
        return method
    side = min(shape)
    if approximate and side >= _RANDOMIZED_MIN_SIDE and 0 < k <= side // _RANDOMIZED_FRACTION:
        return "randomized"
    if device.type == "cpu" and side >= _EIGH_MIN_SIDE and 0 < k <= side // _EIGH_FRACTION:
        return "eigh"
    return "exact"
