"""weightlens.linalg against independent float64 references (NumPy/SciPy), planted answers and fakes.

Tests parametrized over ``DEVICES`` run on CUDA too when it is present (marked ``gpu``).
"""

from __future__ import annotations

import ast
import os
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from weightlens import linalg
from weightlens.errors import DTypeError, InvalidParameterError, NonFiniteError, WeightlensError
from weightlens.linalg import SVD, DecompositionCache, DecompositionError, devices, guard, topk, verify

HAS_CUDA = torch.cuda.is_available()
GPU = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")]
DEVICES = ["cpu", pytest.param("cuda", marks=GPU, id="cuda")]
SHAPES = [(40, 40), (60, 25), (25, 60), (3, 30, 20), (2, 12, 30), (2, 2, 16, 12)]
TOL = {torch.float32: 2e-5, torch.float64: 1e-12}
KEY = "blocks.0.attn.qkv.weight"


def gaussian(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape)


def planted(m: int, n: int, values: np.ndarray, seed: int = 0) -> np.ndarray:
    """``Q1 diag(values) Q2^T`` with random orthonormal Q1 (m x r), Q2 (n x r)."""
    rng = np.random.default_rng(seed)
    r = len(values)
    q1 = np.linalg.qr(rng.standard_normal((m, r)))[0]
    q2 = np.linalg.qr(rng.standard_normal((n, r)))[0]
    return (q1 * values) @ q2.T


def rank3() -> np.ndarray:
    rng = np.random.default_rng(3)
    return rng.standard_normal((50, 3)) @ rng.standard_normal((3, 40))


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def assert_svd(a: np.ndarray, res: SVD, tol: float, *, device: str, dtype: torch.dtype) -> None:
    """Shapes, device/dtype, reconstruction, orthonormality and S against float64 NumPy."""
    m, n = a.shape[-2:]
    r = min(m, n)
    assert res.U.shape == (*a.shape[:-2], m, r)
    assert res.S.shape == (*a.shape[:-2], r)
    assert res.Vh.shape == (*a.shape[:-2], r, n)
    for t in res:
        assert t.device.type == device and t.dtype == dtype
    U, S, Vh = (np64(t) for t in res)
    scale = max(np.linalg.norm(a), 1.0)
    assert np.linalg.norm(U @ (S[..., None] * Vh) - a) <= tol * scale
    assert np.abs(U.swapaxes(-1, -2) @ U - np.eye(r)).max() <= tol
    assert np.abs(Vh @ Vh.swapaxes(-1, -2) - np.eye(r)).max() <= tol
    ref = np.linalg.svd(a, compute_uv=False)
    assert np.abs(S - ref).max() <= tol * max(ref.max(initial=0.0), 1.0)
    assert np.all(np.diff(S, axis=-1) <= 0)


def assert_semi_orthogonal(p: np.ndarray, tol: float) -> None:
    m, n = p.shape[-2:]
    gram = p.swapaxes(-1, -2) @ p if m >= n else p @ p.swapaxes(-1, -2)
    assert np.abs(gram - np.eye(min(m, n))).max() <= tol


# ---------------------------------------------------------------------------------------------
# Devices and drivers
# ---------------------------------------------------------------------------------------------
def test_resolve_device_auto_and_cpu():
    assert linalg.resolve_device("cpu") == torch.device("cpu")
    assert linalg.resolve_device(torch.device("cpu")) == torch.device("cpu")
    auto = linalg.resolve_device()
    assert auto.type == ("cuda" if HAS_CUDA else "cpu")
    if HAS_CUDA:
        assert auto.index is not None


def test_resolve_device_cuda_without_cuda_raises(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert linalg.resolve_device("auto") == torch.device("cpu")
    for request in ("cuda", "cuda:0", torch.device("cuda")):
        with pytest.raises(InvalidParameterError, match="CUDA is not available"):
            linalg.resolve_device(request)
    with pytest.raises(InvalidParameterError, match="CUDA is not available"):
        linalg.svd(torch.eye(3), device="cuda", name=KEY)


@pytest.mark.parametrize("bad", ["mps", "banana", 3, None])
def test_resolve_device_rejects_other(bad):
    with pytest.raises(InvalidParameterError, match="device"):
        linalg.resolve_device(bad)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_resolve_device_cuda_index():
    assert linalg.resolve_device("cuda") == torch.device("cuda", torch.cuda.current_device())
    with pytest.raises(InvalidParameterError, match="CUDA device"):
        linalg.resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_choose_driver_table(monkeypatch):
    cuda = torch.device("cuda", 0)  # a device object needs no GPU
    assert linalg.choose_driver((4096, 4096), torch.device("cpu")) is None
    assert linalg.choose_driver((16, 16), cuda) is None
    assert linalg.choose_driver((3072, 64), cuda) is None
    assert linalg.choose_driver((255, 4096), cuda) is None
    assert linalg.choose_driver((256, 256), cuda) == "gesvda"
    assert linalg.choose_driver((768, 3072), cuda) == "gesvda"
    assert linalg.choose_driver((4, 384, 384), cuda) == "gesvda"  # batched shapes: last two dims
    monkeypatch.setattr(devices, "CUDA_DRIVER_TABLE", ((1024, "gesvd"), (64, "gesvdj"), (0, None)))
    assert linalg.choose_driver((2048, 2048), cuda) == "gesvd"
    assert linalg.choose_driver((100, 100), cuda) == "gesvdj"
    assert linalg.choose_driver((8, 8), cuda) is None
    monkeypatch.setattr(devices, "_magma_preferred", lambda: True)
    assert linalg.choose_driver((2048, 2048), cuda) is None


def test_retry_plan():
    cuda, cpu, f32, f64 = torch.device("cuda", 0), torch.device("cpu"), torch.float32, torch.float64
    describe = lambda plan: [p.describe() for p in plan]  # noqa: E731
    assert describe(guard._plan(cuda, f32, "gesvda")) == [
        "cuda:0/float32/gesvda", "cuda:0/float32/gesvd", "cpu/float64/default", "cpu/float64/gesvd"
    ]
    assert describe(guard._plan(cuda, f32, None))[1] == "cuda:0/float32/gesvd"
    assert describe(guard._plan(cpu, f32, None)) == [
        "cpu/float32/default", "cpu/float64/default", "cpu/float64/gesvd"
    ]
    assert describe(guard._plan(cpu, f64, None)) == ["cpu/float64/default", "cpu/float64/gesvd"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gesvda_verification_accepts_good_and_rejects_bad(dtype):
    x = torch.from_numpy(gaussian((120, 90), seed=5)).to(dtype)
    good = SVD(*torch.linalg.svd(x, full_matrices=False))
    verify.verify_vectors(x, good)
    verify.verify_values(x, good.S)
    U, S, Vh = good
    skewed_u = U.clone()
    skewed_u[:, -1] = (U[:, -1] + 1e-2 * U[:, 0]) / (1 + 1e-4) ** 0.5  # not orthogonal to column 0
    nan_u = U * float("nan")
    for bad in (SVD(U, S * 1.01, Vh), SVD(skewed_u, S, Vh), SVD(U, S, Vh.flip(-2)), SVD(nan_u, S, Vh)):
        with pytest.raises(verify._Unreliable):
            verify.verify_vectors(x, bad)
    with pytest.raises(verify._Unreliable):
        verify.verify_values(x, S * 1.01)
    assert devices.gesvda_tolerance((768, 768), torch.float32) == pytest.approx(3.3e-4, rel=0.01)


# ---------------------------------------------------------------------------------------------
# Decompositions against float64 references
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_svd_matches_numpy(device, dtype, shape):
    a = gaussian(shape)
    res = linalg.svd(torch.from_numpy(a), device=device, dtype=dtype)
    assert_svd(a, res, TOL[dtype], device=device, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_svd_rank_deficient(device, dtype):
    for a in (rank3(), rank3().T):  # tall, and wide (decomposed through its transpose on the CPU)
        res = linalg.svd(torch.from_numpy(a), device=device, dtype=dtype)
        assert_svd(a, res, TOL[dtype], device=device, dtype=dtype)
        S = res.S.cpu()
        assert float(S[3:].max()) <= TOL[dtype] * float(S[0])
        assert linalg.numerical_rank(S, a.shape, dtype) == 3

    zero = np.zeros((30, 20))
    res = linalg.svd(torch.from_numpy(zero), device=device, dtype=dtype)
    assert_svd(zero, res, TOL[dtype], device=device, dtype=dtype)
    assert float(res.S.abs().max()) == 0.0
    assert linalg.numerical_rank(res.S.cpu(), zero.shape) == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES + [(50, 40)], ids=str)
def test_svdvals_matches_numpy(device, dtype, shape):
    a = gaussian(shape, seed=1) if shape != (50, 40) else rank3()
    S = linalg.svdvals(torch.from_numpy(a), device=device, dtype=dtype, name=KEY)
    assert S.device.type == device and S.dtype == dtype and S.shape == (*shape[:-2], min(shape[-2:]))
    ref = np.linalg.svd(a, compute_uv=False)
    assert np.abs(np64(S) - ref).max() <= TOL[dtype] * ref.max()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(30, 30), (50, 20), (20, 50)], ids=str)
def test_polar_matches_scipy(device, dtype, shape):
    a = gaussian(shape, seed=2)
    p = linalg.polar(torch.from_numpy(a), device=device, dtype=dtype)
    assert p.shape == shape and p.device.type == device and p.dtype == dtype
    ref, _ = scipy.linalg.polar(a)
    assert np.abs(np64(p) - ref).max() <= 10 * TOL[dtype]
    assert_semi_orthogonal(np64(p), TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_polar_semi_orthogonal_and_closest(device):
    rng = np.random.default_rng(4)
    for a in (rank3(), rank3().T, np.zeros((12, 7)), gaussian((3, 16, 10), seed=6)):
        p = np64(linalg.polar(torch.from_numpy(a), device=device))
        assert p.shape == a.shape
        assert_semi_orthogonal(p, 2e-5)
    a = gaussian((25, 25), seed=7)
    p = np64(linalg.polar(torch.from_numpy(a), device=device))
    for _ in range(5):  # no random orthogonal matrix is closer to A than its polar factor
        q = np.linalg.qr(rng.standard_normal((25, 25)))[0]
        assert np.linalg.norm(a - p) <= np.linalg.norm(a - q)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_exact_matches_reference(device, dtype):
    a = planted(60, 45, np.linspace(10.0, 1.0, 45), seed=8)  # distinct values: unique triplets
    k = 6
    res = linalg.topk_svd(torch.from_numpy(a), k, method="exact", device=device, dtype=dtype)
    assert res.U.shape == (60, k) and res.S.shape == (k,) and res.Vh.shape == (k, 45)
    assert all(t.device.type == device and t.dtype == dtype for t in res)
    U, S, Vh = np.linalg.svd(a, full_matrices=False)
    best = (U[:, :k] * S[:k]) @ Vh[:k]
    got = np64(res.U) @ (np64(res.S)[:, None] * np64(res.Vh))
    tol = TOL[dtype] * 10
    assert np.abs(np64(res.S) - S[:k]).max() <= tol * S[0]
    assert np.linalg.norm(got - best) <= tol * np.linalg.norm(best)
    assert np.abs(np64(res.U) @ np64(res.U).T - U[:, :k] @ U[:, :k].T).max() <= tol


@pytest.mark.parametrize("device", DEVICES)
def test_topk_randomized_planted_spectrum(device):
    m, n, k = 320, 240, 8
    a = planted(m, n, 0.5 ** np.arange(60), seed=9)  # fast-decaying planted spectrum
    res = linalg.topk_svd(torch.from_numpy(a), k, method="randomized", device=device)
    U, S, Vh = np.linalg.svd(a, full_matrices=False)
    assert np.abs(np64(res.S) - S[:k]).max() <= 1e-5 * S[0]
    best = (U[:, :k] * S[:k]) @ Vh[:k]
    got = np64(res.U) @ (np64(res.S)[:, None] * np64(res.Vh))
    assert np.linalg.norm(got - best) <= 1e-5 * np.linalg.norm(best)
    assert np.abs(np64(res.U).T @ np64(res.U) - np.eye(k)).max() <= 1e-5
    assert np.abs(np64(res.Vh) @ np64(res.Vh).T - np.eye(k)).max() <= 1e-5
    exact = linalg.topk_svd(torch.from_numpy(a), k, method="exact", device=device)
    assert np.abs(np64(res.U) - np64(exact.U)).max() <= 1e-4  # same signs as the exact path


def test_topk_randomized_is_seeded_and_leaves_global_rng_alone():
    a = torch.from_numpy(planted(300, 200, 0.7 ** np.arange(40), seed=10))
    state = torch.get_rng_state()
    first = linalg.topk_svd(a, 5, method="randomized", seed=3, niter=0, oversample=2)
    assert torch.equal(torch.get_rng_state(), state)
    again = linalg.topk_svd(a, 5, method="randomized", seed=3, niter=0, oversample=2)
    assert all(torch.equal(x, y) for x, y in zip(first, again))


def test_topk_randomized_batched_and_wide():
    values = 0.5 ** np.arange(30)
    a = np.stack([planted(64, 90, values, seed=s) for s in (11, 12)])
    res = linalg.topk_svd(torch.from_numpy(a), 4, method="randomized")
    assert res.U.shape == (2, 64, 4) and res.Vh.shape == (2, 4, 90)
    ref = np.linalg.svd(a, compute_uv=False)[..., :4]
    assert np.abs(np64(res.S) - ref).max() <= 1e-5


def test_topk_method_auto_rule():
    assert topk._pick_method("auto", 5, (100, 100)) == "exact"  # small matrix
    assert topk._pick_method("auto", 8, (700, 560)) == "randomized"
    assert topk._pick_method("auto", 64, (512, 768)) == "randomized"
    assert topk._pick_method("auto", 65, (512, 768)) == "eigh"  # k > min // 8, k <= min // 4, CPU
    assert topk._pick_method("auto", 65, (512, 768), torch.device("cuda")) == "exact"
    assert topk._pick_method("auto", 129, (512, 768)) == "exact"  # k > min // 4
    assert topk._pick_method("auto", 19, (384, 384)) == "eigh"
    assert topk._pick_method("auto", 8, (700, 560), approximate=False) == "eigh"  # exact methods only
    assert topk._pick_method("auto", 8, (700, 560), torch.device("cuda"), approximate=False) == "exact"
    assert topk._pick_method("exact", 1, (4096, 4096)) == "exact"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(300, 140), (140, 300), (2, 150, 150)])
def test_topk_eigh_matches_float64_reference(device, dtype, shape):
    *batch, m, n = shape
    r, k = min(m, n), 20
    values = np.geomspace(50.0, 0.05, r)  # distinct values, a 1000x range inside the top k and below
    a = np.stack([planted(m, n, values, seed=40 + i) for i in range(batch[0] if batch else 1)])
    a = a if batch else a[0]
    res = linalg.topk_svd(torch.from_numpy(a), k, method="eigh", device=device, dtype=dtype)
    assert res.U.shape == (*batch, m, k) and res.S.shape == (*batch, k) and res.Vh.shape == (*batch, k, n)
    assert all(t.device.type == device and t.dtype == dtype for t in res)
    U, S, Vh = np.linalg.svd(a, full_matrices=False)
    tol = 10 * TOL[torch.float32]  # the float64 Gram matrix is at least as accurate as a float32 SVD
    assert np.abs(np64(res.S) - S[..., :k]).max() <= tol * S.max()
    eye = np.eye(k)
    assert np.abs(np64(res.U).swapaxes(-1, -2) @ np64(res.U) - eye).max() <= tol
    assert np.abs(np64(res.Vh) @ np64(res.Vh).swapaxes(-1, -2) - eye).max() <= tol
    proj = np64(res.U) @ np64(res.U).swapaxes(-1, -2)  # the same leading subspace as LAPACK's
    assert np.abs(proj - U[..., :k] @ U[..., :k].swapaxes(-1, -2)).max() <= tol
    exact = linalg.topk_svd(torch.from_numpy(a), k, method="exact", device=device, dtype=dtype)
    assert np.abs(np64(res.U) - np64(exact.U)).max() <= 1e-3  # same sign convention


def test_topk_eigh_falls_back_to_exact_below_its_range():
    rank3 = planted(200, 160, np.array([3.0, 2.0, 1.0]), seed=44)  # k = 8 > rank: zero values in the top k
    steep = planted(200, 160, np.geomspace(1.0, 1e-7, 160), seed=45)  # sigma_k / sigma_1 < 1e-4
    for a in (rank3, steep):
        res = linalg.topk_svd(torch.from_numpy(a), 8 if a is rank3 else 100, method="eigh")
        exact = linalg.topk_svd(torch.from_numpy(a), res.S.shape[0], method="exact")
        assert all(torch.equal(x, y) for x, y in zip(res, exact))


def test_topk_k_zero_and_validation():
    a = torch.from_numpy(gaussian((20, 12)))
    res = linalg.topk_svd(a, 0)
    assert res.U.shape == (20, 0) and res.S.shape == (0,) and res.Vh.shape == (0, 12)
    assert linalg.topk_svd(a, 12).S.shape == (12,)
    for bad in (-1, 13, 2.5, True, "3"):
        with pytest.raises(InvalidParameterError, match="'k'"):
            linalg.topk_svd(a, bad)
    with pytest.raises(InvalidParameterError, match="'method'"):
        linalg.topk_svd(a, 2, method="arpack")
    with pytest.raises(InvalidParameterError, match="'eigh'"):  # the message lists every method
        linalg.topk_svd(a, 2, method="lanczos")
    with pytest.raises(InvalidParameterError, match="'oversample'"):
        linalg.topk_svd(a, 2, oversample=-1)
    with pytest.raises(InvalidParameterError, match="'niter'"):
        linalg.topk_svd(a, 2, niter=None)


def test_topk_options_object_equals_keyword_options():
    a = torch.from_numpy(planted(300, 200, 0.7 ** np.arange(40), seed=10))
    opts = linalg.TopkOptions(method="randomized", seed=3, niter=0, oversample=2)
    by_keywords = linalg.topk_svd(a, 5, method="randomized", seed=3, niter=0, oversample=2)
    by_object = linalg.topk_svd(a, 5, options=opts)
    overridden = linalg.topk_svd(a, 5, options=linalg.TopkOptions(method="exact"), method="randomized",
                                 seed=3, niter=0, oversample=2)
    for res in (by_object, overridden):
        assert all(torch.equal(x, y) for x, y in zip(by_keywords, res))
    with pytest.raises(InvalidParameterError, match="unknown option"):
        linalg.topk_svd(a, 5, methd="exact")
    with pytest.raises(InvalidParameterError, match="'seed'"):
        linalg.TopkOptions(seed=-1)
    with pytest.raises(InvalidParameterError, match="'options'"):
        linalg.topk_svd(a, 5, options={"method": "exact"})


@pytest.mark.parametrize("device", DEVICES)
def test_sign_convention_is_deterministic(device):
    a = torch.from_numpy(planted(40, 30, np.linspace(5.0, 1.0, 30), seed=13))
    f32 = linalg.svd(a, device=device)
    f64 = linalg.svd(a, device=device, dtype=torch.float64)
    U = np64(f32.U)
    assert np.all(U[np.abs(U).argmax(axis=0), np.arange(U.shape[1])] > 0)
    assert np.abs(U - np64(f64.U)).max() <= 1e-4
    assert np.abs(np64(f32.Vh) - np64(f64.Vh)).max() <= 1e-4


# ---------------------------------------------------------------------------------------------
# Inputs: dtypes, arrays, non-finite values
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_inputs_are_upcast_before_decomposing(device, half, monkeypatch):
    seen: list[torch.dtype] = []
    real = torch.linalg.svd

    def spy(x, *args, **kwargs):
        seen.append(x.dtype)
        return real(x, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", spy)
    a = torch.from_numpy(gaussian((30, 20), seed=14)).to(half)
    res = linalg.svd(a, device=device, name=KEY)
    assert seen and all(dt == torch.float32 for dt in seen)
    assert_svd(np64(a), res, TOL[torch.float32], device=device, dtype=torch.float32)
    p = linalg.polar(a, device=device)
    assert p.dtype == torch.float32
    assert linalg.svdvals(a, device=device).dtype == torch.float32


def test_numpy_input_is_accepted():
    a = gaussian((15, 10), seed=15)
    a.setflags(write=False)
    res = linalg.svd(a)
    assert_svd(a, res, TOL[torch.float32], device="cpu", dtype=torch.float32)


@pytest.mark.parametrize(
    "op",
    [linalg.svd, linalg.svdvals, linalg.polar, lambda a, **kw: linalg.topk_svd(a, 2, **kw)],
    ids=["svd", "svdvals", "polar", "topk_svd"],
)
def test_nonfinite_input_names_key_and_counts(op):
    a = torch.ones(6, 5)
    a[0, 0] = a[2, 3] = float("nan")
    a[4, 1] = float("-inf")
    with pytest.raises(NonFiniteError, match=r"'blocks\.0\.attn\.qkv\.weight'.*2 NaN and 1 Inf"):
        op(a, name=KEY)
    with pytest.raises(NonFiniteError, match="the input"):
        op(a)


def test_overflow_on_cast_is_reported():
    a = torch.ones(4, 4, dtype=torch.float64)
    a[1, 1] = 1e300
    with pytest.raises(NonFiniteError, match="overflowed"):
        linalg.svdvals(a, name=KEY)
    assert float(linalg.svdvals(a, dtype=torch.float64)[0]) == pytest.approx(1e300)


def test_result_that_overflows_the_dtype_is_an_error_not_inf():
    a = torch.full((8, 8), 3e38)  # finite float32 entries (their sum overflows); sigma_1 = 2.4e39
    a[0, 1] = 1e38
    with pytest.raises(DecompositionError, match="overflows torch.float32"):
        linalg.svdvals(a, name=KEY)
    S = linalg.svdvals(a, dtype=torch.float64)
    assert float(S[0]) == pytest.approx(np.linalg.svd(a.double().numpy(), compute_uv=False)[0])


def test_bad_inputs_and_dtypes():
    with pytest.raises(InvalidParameterError, match="'dtype'"):
        linalg.svd(torch.eye(3), dtype=torch.float16)
    with pytest.raises(DTypeError, match=KEY):
        linalg.svd(torch.eye(3, dtype=torch.int64), name=KEY)
    with pytest.raises(DTypeError):
        linalg.svdvals(torch.eye(3, dtype=torch.complex64))
    with pytest.raises(InvalidParameterError, match=r"shape \(5,\)"):
        linalg.polar(torch.ones(5))
    with pytest.raises(InvalidParameterError, match="list"):
        linalg.svd([[1.0, 2.0], [3.0, 4.0]])
    with pytest.raises(InvalidParameterError, match="1-D"):
        linalg.numerical_rank(torch.ones(2, 3), (3, 3))


def test_numerical_rank_uses_dtype_eps():
    S = torch.tensor([1.0, 1e-3, 1e-9, 0.0], dtype=torch.float64)
    assert linalg.numerical_rank(S, (100, 4)) == 3  # tol = 100 * 2.2e-16
    assert linalg.numerical_rank(S, (100, 4), torch.float32) == 2  # tol = 100 * 1.2e-7
    assert linalg.numerical_rank(torch.zeros(4), (4, 4)) == 0
    assert linalg.numerical_rank(torch.zeros(0), (0, 3)) == 0


# ---------------------------------------------------------------------------------------------
# Retries
# ---------------------------------------------------------------------------------------------
class Flaky:
    """Wraps a torch function: fails the first ``fails`` calls (raise or NaN), records inputs."""

    def __init__(self, real, fails: int, mode: str):
        self.real, self.fails, self.mode = real, fails, mode
        self.calls: list[tuple[torch.dtype, str, str | None]] = []

    def __call__(self, x, *args, **kwargs):
        self.calls.append((x.dtype, x.device.type, kwargs.get("driver")))
        out = None if self.mode == "raise" else self.real(x, *args, **kwargs)
        if len(self.calls) > self.fails:
            return out if out is not None else self.real(x, *args, **kwargs)
        if self.mode == "raise":
            raise torch.linalg.LinAlgError("simulated: the algorithm failed to converge")
        if isinstance(out, torch.Tensor):
            return out * float("nan")
        return (out[0] * float("nan"), *out[1:])


OPS = {
    "svd": (lambda a, **kw: linalg.svd(a, **kw), "svd"),
    "svdvals": (lambda a, **kw: linalg.svdvals(a, **kw), "svdvals"),
    "polar": (lambda a, **kw: linalg.polar(a, **kw), "svd"),
    "topk_exact": (lambda a, **kw: linalg.topk_svd(a, 3, method="exact", **kw), "svd"),
    "topk_randomized": (lambda a, **kw: linalg.topk_svd(a, 3, method="randomized", **kw), "svd"),
}


def reference(op: str, a: np.ndarray):
    U, S, Vh = np.linalg.svd(a, full_matrices=False)
    return {"svd": U @ np.diag(S) @ Vh, "svdvals": S, "polar": U @ Vh}.get(op, (U[:, :3] * S[:3]) @ Vh[:3])


def result_matrix(op: str, out) -> np.ndarray:
    if op in ("svdvals", "polar"):
        return np64(out)
    return np64(out.U) @ (np64(out.S)[..., None] * np64(out.Vh))


@pytest.mark.parametrize("mode", ["raise", "nan"])
@pytest.mark.parametrize("op", list(OPS))
def test_retry_once_returns_correct_result(op, mode, monkeypatch):
    call, target = OPS[op]
    flaky = Flaky(getattr(torch.linalg, target), fails=1, mode=mode)
    monkeypatch.setattr(torch.linalg, target, flaky)
    # randomized top-k is exact only up to the tail: give it a fast-decaying planted spectrum
    fast = op == "topk_randomized"
    a = planted(24, 18, 0.2 ** np.arange(18), seed=16) if fast else gaussian((24, 18), seed=16)
    out = call(torch.from_numpy(a), name=KEY)
    assert [c[0] for c in flaky.calls] == [torch.float32, torch.float64]  # fp32, then fp64
    tensors = out if isinstance(out, tuple) else (out,)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in tensors)
    assert np.abs(result_matrix(op, out) - reference(op, a)).max() <= 1e-4


def test_float64_falls_back_to_scipy_gesvd(monkeypatch):
    flaky = Flaky(torch.linalg.svd, fails=10, mode="raise")
    monkeypatch.setattr(torch.linalg, "svd", flaky)
    a = gaussian((3, 20, 14), seed=17)
    res = linalg.svd(torch.from_numpy(a), dtype=torch.float64)
    assert len(flaky.calls) == 1
    assert_svd(a, res, TOL[torch.float64], device="cpu", dtype=torch.float64)


def test_every_attempt_failing_raises_clear_error(monkeypatch):
    monkeypatch.setattr(torch.linalg, "svd", Flaky(torch.linalg.svd, fails=10, mode="nan"))

    def scipy_fails(*args, **kwargs):
        raise np.linalg.LinAlgError("SVD did not converge")

    monkeypatch.setattr(scipy.linalg, "svd", scipy_fails)
    with pytest.raises(DecompositionError) as info:
        linalg.polar(torch.from_numpy(gaussian((12, 9))), name=KEY)
    err = info.value
    assert isinstance(err, WeightlensError) and isinstance(err, RuntimeError)
    assert isinstance(err, torch.linalg.LinAlgError)
    text = str(err)
    for part in (KEY, "(12, 9)", "cpu/float32/default: non-finite output", "cpu/float64/gesvd: LinAlgError"):
        assert part in text


def test_failed_gesvda_verification_triggers_the_next_attempt(monkeypatch):
    """Simulated on the CPU: a 'gesvda' result with skewed vectors (or values) is rejected."""
    real_svd, real_vals = torch.linalg.svd, torch.linalg.svdvals
    drivers: list[str | None] = []

    def fake_svd(x, *args, driver=None, **kwargs):
        drivers.append(driver)
        U, S, Vh = real_svd(x, *args, **kwargs)
        if driver == "gesvda":
            U = U.clone()
            U[:, -1] += 1e-2 * U[:, 0]
        return U, S, Vh

    def fake_vals(x, *args, driver=None, **kwargs):
        drivers.append(driver)
        S = real_vals(x, *args, **kwargs)
        return S * 1.01 if driver == "gesvda" else S

    monkeypatch.setattr(torch.linalg, "svd", fake_svd)
    monkeypatch.setattr(torch.linalg, "svdvals", fake_vals)
    monkeypatch.setattr(guard, "choose_driver", lambda shape, device: "gesvda")
    a = gaussian((40, 30), seed=21)
    res = linalg.svd(torch.from_numpy(a))
    assert drivers == ["gesvda", None]
    assert_svd(a, res, TOL[torch.float32], device="cpu", dtype=torch.float32)
    S = linalg.svdvals(torch.from_numpy(a))
    assert drivers[2:] == ["gesvda", None]
    assert np.abs(np64(S) - np.linalg.svd(a, compute_uv=False)).max() <= 1e-4


def test_unrelated_runtime_errors_are_not_swallowed(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("some bug")

    monkeypatch.setattr(torch.linalg, "svd", broken)
    with pytest.raises(RuntimeError, match="some bug"):
        linalg.svd(torch.eye(3))


# ---------------------------------------------------------------------------------------------
# CUDA only
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_cuda_gesvda_path_is_used_and_verified(monkeypatch):
    flaky = Flaky(torch.linalg.svd, fails=0, mode="raise")
    monkeypatch.setattr(torch.linalg, "svd", flaky)
    a = gaussian((300, 280), seed=18)
    res = linalg.svd(torch.from_numpy(a), device="cuda")
    assert flaky.calls[0] == (torch.float32, "cuda", "gesvda")
    assert_svd(a, res, 1e-4, device="cuda", dtype=torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_cuda_ill_conditioned_results_stay_orthonormal():
    a = planted(400, 300, np.logspace(0, -12, 300), seed=19)
    tol = 2 * linalg.gesvda_tolerance(a.shape, torch.float32)  # what a verified gesvda result meets
    res = linalg.svd(torch.from_numpy(a), device="cuda")
    assert_svd(a, res, tol, device="cuda", dtype=torch.float32)
    assert_semi_orthogonal(np64(linalg.polar(torch.from_numpy(a), device="cuda")), tol)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_cuda_failure_falls_back_to_gesvd_then_cpu(monkeypatch):
    flaky = Flaky(torch.linalg.svd, fails=2, mode="raise")
    monkeypatch.setattr(torch.linalg, "svd", flaky)
    a = gaussian((300, 300), seed=20)
    res = linalg.svd(torch.from_numpy(a), device="cuda", name=KEY)
    assert flaky.calls == [
        (torch.float32, "cuda", "gesvda"), (torch.float32, "cuda", "gesvd"), (torch.float64, "cpu", None)
    ]
    assert_svd(a, res, 1e-4, device="cuda", dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# DecompositionCache
# ---------------------------------------------------------------------------------------------
def test_cache_hits_misses_and_compute_once():
    cache = DecompositionCache()
    calls: list[str] = []

    def make(key):
        def compute():
            calls.append(key)
            return torch.ones(4)

        return compute

    first = cache.get_or_compute(("svd", "a"), make("a"))
    again = cache.get_or_compute(("svd", "a"), make("a"))
    cache.get_or_compute(("svd", "b"), make("b"))
    assert first is again and calls == ["a", "b"]
    assert (cache.hits, cache.misses, len(cache), cache.nbytes) == (1, 2, 2, 32)
    assert ("svd", "a") in cache and ("svd", "z") not in cache and ["unhashable"] not in cache
    assert (cache.hits, cache.misses) == (1, 2)  # membership tests count nothing
    cache.clear()
    assert (len(cache), cache.nbytes, cache.hits, cache.misses) == (0, 0, 0, 0)


def test_cache_evicts_least_recently_used_by_bytes():
    cache = DecompositionCache(max_bytes=3000)
    kib = lambda: torch.zeros(256)  # noqa: E731  (1024 bytes)
    for key in "abc":
        cache.get_or_compute(key, kib)
    assert cache.nbytes == 2048 and "a" not in cache and cache.evictions == 1
    cache.get_or_compute("b", kib)  # touch b: c is now least recently used
    cache.get_or_compute("d", kib)
    assert "b" in cache and "d" in cache and "c" not in cache
    big = cache.get_or_compute("big", lambda: torch.zeros(1000))  # 4000 bytes > max_bytes
    assert big.shape == (1000,) and "big" not in cache and cache.nbytes == 2048


def test_cache_counts_bytes_of_nested_values():
    cache = DecompositionCache()
    res = SVD(torch.zeros(10, 4), torch.zeros(4), torch.zeros(4, 6, dtype=torch.float64))
    value = {"svd": res, "extra": [torch.zeros(2, dtype=torch.float16), "label", 3], "arr": np.zeros(5)}
    cache.get_or_compute("k", lambda: value)
    assert cache.nbytes == 160 + 16 + 192 + 4 + 40
    base = torch.zeros(100)
    assert linalg.value_nbytes((base[:10], base[10:20])) == 400  # a view keeps its storage; once
    assert linalg.value_nbytes(None) == 0


def test_cache_exception_is_not_stored_and_bad_arguments():
    cache = DecompositionCache()

    def boom():
        raise ValueError("no")

    with pytest.raises(ValueError):
        cache.get_or_compute("k", boom)
    assert "k" not in cache and cache.misses == 1
    assert cache.get_or_compute("k", lambda: torch.ones(1)).item() == 1.0
    with pytest.raises(InvalidParameterError, match="hashable"):
        cache.get_or_compute(["list"], lambda: 1)
    for bad in (-1, 1.5, True, None):
        with pytest.raises(InvalidParameterError, match="max_bytes"):
            DecompositionCache(max_bytes=bad)
    assert "entries" in repr(cache)


def test_cache_threads_share_results():
    cache = DecompositionCache()
    results = []

    def worker():
        results.append(cache.get_or_compute("k", lambda: linalg.svdvals(torch.eye(8))))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and len(cache) == 1 and cache.hits + cache.misses == 4


# ---------------------------------------------------------------------------------------------
# Module boundaries
# ---------------------------------------------------------------------------------------------
def test_linalg_imports_only_torch_numpy_scipy_and_errors():
    allowed = {"__future__", "collections", "contextlib", "contextvars", "dataclasses", "functools", "math", "os",
               "threading", "time", "typing", "warnings",
               "numpy", "scipy", "threadpoolctl", "torch", "weightlens"}  # threadpoolctl: SciPy's BLAS threads
    root = Path(linalg.__file__).parent
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"
                if name.startswith("weightlens."):
                    leaves = ("weightlens.errors", "weightlens._options", "weightlens._finite")  # leaves: errors, or nothing
                    assert name in leaves or name.startswith("weightlens.linalg"), name


def test_torch_threads_sets_and_restores_the_count_even_on_error():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="inside"):
        with linalg.torch_threads(1) as n:
            assert n == 1 and torch.get_num_threads() == 1
            raise RuntimeError("inside")
    assert torch.get_num_threads() == before
    for bad in (0, -1, 1.5, True):
        with pytest.raises(InvalidParameterError, match="positive thread count"):
            with linalg.torch_threads(bad):
                pass
    assert 1 <= linalg.available_cores() <= (os.cpu_count() or 1)


@pytest.mark.parametrize("files, quota", [
    ({}, None),
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu.max": "150000 100000\n"}, 1.5),
    ({"cpu.max": "garbage"}, None),
    ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),
    ({"cpu/cpu.cfs_quota_us": "300000", "cpu/cpu.cfs_period_us": "100000"}, 3.0),
])
def test_cgroup_cpu_quota_reads_v1_and_v2(tmp_path, files, quota):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert linalg.devices.cgroup_cpu_quota(str(tmp_path)) == quota
    cores = linalg.available_cores(str(tmp_path))
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert cores == (affinity if quota is None else max(1, min(affinity, int(quota))))


def test_more_torch_threads_than_cores_warns_once_per_count(monkeypatch):
    from weightlens.linalg import devices

    monkeypatch.setattr(devices, "available_cores", lambda: 1)
    monkeypatch.setattr(devices, "_threads_checked", None)
    monkeypatch.setattr(devices, "_contention_warned", True)  # the busy-machine warning: its own test
    x = torch.randn(8, 6)
    with linalg.torch_threads(2):
        with pytest.warns(RuntimeWarning, match=r"torch runs on 2 CPU threads .* 1 core\(s\).*set_num_threads\(1\)"):
            linalg.svd(x, device="cpu")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            linalg.svdvals(x, device="cpu")  # the same count is not checked again
    with linalg.torch_threads(1), warnings.catch_warnings():
        warnings.simplefilter("error")
        linalg.svd(x, device="cpu")  # within the cores: silent


def test_a_busy_machine_warns_once_unless_a_wait_policy_was_chosen(monkeypatch):
    """Other processes busy (load average >= cores + 1) and OpenMP threads spinning (no wait setting): one
    warning that names the fix; silent with OMP_WAIT_POLICY or GOMP_SPINCOUNT set, on one thread, or when idle."""
    from weightlens.linalg import devices

    x = torch.randn(8, 6)
    monkeypatch.setattr(devices, "available_cores", lambda: 2)
    for var in devices._WAIT_SETTINGS:
        monkeypatch.delenv(var, raising=False)

    def run(load: float, threads: int = 2) -> list[str]:
        monkeypatch.setattr(devices, "_threads_checked", None)
        monkeypatch.setattr(devices, "_contention_next_check", 0.0)
        monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
        with linalg.torch_threads(threads), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            linalg.svd(x, device="cpu")
        return [str(w.message) for w in caught if "busy" in str(w.message)]

    monkeypatch.setattr(devices, "_contention_warned", False)
    assert run(2.5) == [] and run(3.5, threads=1) == []
    said = run(3.5)
    assert len(said) == 1 and "load average 3.5" in said[0] and "OMP_WAIT_POLICY=PASSIVE" in said[0]
    assert run(9.0) == []  # once per process
    monkeypatch.setattr(devices, "_contention_warned", False)
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert run(9.0) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(7, 3), (3, 7), (4, 4), (2, 6, 3), (2, 3, 6)])
def test_zero_matrix_decomposed_as_lapack_without_it(shape, dtype):
    """An all-zero matrix (a frozen layer) skips LAPACK: the same factors gesdd returns, exactly."""
    z = torch.zeros(shape, dtype=dtype)
    U, S, Vh = torch.linalg.svd(z, full_matrices=False)
    got = linalg.svd(z, dtype=dtype)
    assert all(torch.equal(a, b) for a, b in zip(got, (U, S, Vh)))
    assert torch.equal(linalg.svdvals(z, dtype=dtype), S)
    assert torch.equal(linalg.polar(z, dtype=dtype), U @ Vh)


# ------------------------------------------------------------------------------ left_svd
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(300, 140), (140, 300), (150, 150), (2, 90, 160)])
def test_left_svd_is_the_svds_left_side(device, shape):
    """``U S`` and ``S`` against a float64 LAPACK SVD: the same values, the same columns up to sign, and
    projections of every column equal those through the full SVD."""
    *batch, m, n = shape
    r = min(m, n)
    values = np.geomspace(40.0, 0.01, r)
    a = np.stack([planted(m, n, values, seed=60 + i) for i in range(batch[0] if batch else 1)])
    a = a if batch else a[0]
    res = linalg.left_svd(torch.from_numpy(a), device=device)
    assert res.US.shape == (*batch, m, r) and res.S.shape == (*batch, r)
    assert all(t.device.type == device and t.dtype == torch.float32 for t in res)
    U, S, _ = np.linalg.svd(a, full_matrices=False)
    tol = 10 * TOL[torch.float32]
    assert np.abs(np64(res.S) - S).max() <= tol * S.max()
    signs = np.sign((np64(res.US) * U * S[..., None, :]).sum(-2))  # LAPACK's signs differ per column
    assert np.abs(np64(res.US) - U * S[..., None, :] * signs[..., None, :]).max() <= tol * S.max()
    k = 25
    span = np64(res.span(k))
    assert np.abs(span.swapaxes(-1, -2) @ span - np.eye(k)).max() <= tol
    big = np.abs(np64(res.US)).argmax(-2)  # the largest-magnitude entry of each column is positive
    assert (np.take_along_axis(np64(res.US), big[..., None, :], -2) > 0).all()


def test_left_svd_of_a_low_rank_or_zero_matrix_has_that_numerical_rank():
    low = planted(200, 120, np.array([5.0, 2.0, 1.0, 0.5]), seed=70)
    res = linalg.left_svd(torch.from_numpy(low))
    values = linalg.svdvals(torch.from_numpy(low))
    assert linalg.numerical_rank(res.S, (200, 120)) == 4 == linalg.numerical_rank(values, (200, 120))
    zero = linalg.left_svd(torch.zeros(30, 50))
    assert zero.US.shape == (30, 30) and not zero.US.any() and not zero.S.any()


def test_left_svd_refuses_non_finite_input_naming_the_key():
    a = torch.ones(6, 4)
    a[2, 1] = float("nan")
    with pytest.raises(NonFiniteError, match="'layer.w'"):
        linalg.left_svd(a, name="layer.w")


def test_recording_retries_names_each_decomposition_accepted_after_a_failed_attempt(monkeypatch):
    import weightlens.linalg.backend as backend

    real = backend.svd_kernel

    def flaky(x, driver):
        if x.dtype == torch.float32:
            raise torch.linalg.LinAlgError("planted non-convergence")
        return real(x, driver)

    monkeypatch.setattr(backend, "svd_kernel", flaky)
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    with linalg.recording_retries() as retried:
        U, S, Vh = linalg.svd(x, name="w")
        linalg.svdvals(x)  # its own kernel: no retry
    assert retried == ["svd of 'w' (shape (6, 4)) was retried: cpu/float32/default: LinAlgError: planted "
                       "non-convergence; accepted cpu/float64/default"]
    torch.testing.assert_close(S, torch.linalg.svdvals(x.double()).float())
    linalg.svd(x)  # outside a block: nothing is collected, nothing fails
    assert len(retried) == 1


def test_polar_with_values_is_the_same_factor_and_the_singular_values():
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(2))
    factor, S = linalg.polar(x, with_values=True)
    assert torch.equal(factor, linalg.polar(x))  # the same bits
    torch.testing.assert_close(S.double(), torch.linalg.svdvals(x.double()), rtol=1e-6, atol=0)
    torch.testing.assert_close(factor.mT @ factor, torch.eye(5), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dim", [None, 0, 1, -1])
def test_sum64_is_the_float64_sum_of_float32_values(dim):
    g = torch.Generator().manual_seed(5)
    # magnitudes 1e-3..1e3 and a cancelling half: a float32 sum would be off far beyond float64 rounding
    x = torch.randn(3, 20001, generator=g) * torch.logspace(-3, 3, 20001)
    x = torch.cat([x, -x[:, :5000]], dim=1)
    want = x.numpy().astype(np.float64).sum(axis=dim)
    for view in (x, x.mT.contiguous().mT):  # contiguous and strided alike
        got = linalg.sum64(view, dim)
        assert got.dtype == torch.float64 and tuple(got.shape) == np.shape(want)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=0)


def test_sum64_falls_back_to_torch_where_numpy_cannot_read_the_tensor():
    x = torch.linspace(-2, 3, 101, dtype=torch.bfloat16)
    assert linalg.sum64(x).item() == pytest.approx(float(x.double().sum()), rel=1e-12)
    w = torch.ones(4, requires_grad=True)
    assert linalg.sum64(w * 2).item() == 8.0


def test_count_nonzero_is_torchs():
    x = torch.randn(3, 1001, generator=torch.Generator().manual_seed(6))
    x[x.abs() < 0.7] = 0
    for t in (x, x > 0, x.mT.contiguous().mT):
        assert torch.equal(linalg.count_nonzero(t, 1), torch.count_nonzero(t, dim=1))
        assert int(linalg.count_nonzero(t)) == int(torch.count_nonzero(t))
    half = x.to(torch.bfloat16)  # no NumPy dtype: torch's own
    assert torch.equal(linalg.count_nonzero(half, 0), torch.count_nonzero(half, dim=0))
