"""The guarded path every decomposition runs through (:func:`run`): prepare, attempt, fall back.

1. The input (float tensor or array, shape ``(..., m, n)``) is detached, cast to the working dtype
   (float32, or float64) and moved to the compute device *before* anything else, so CUDA never sees
   fp16/bf16. Non-finite input raises :class:`~weightlens.errors.NonFiniteError` naming the tensor
   key and the number of NaN and Inf values.
2. The decomposition runs with the CUDA driver :func:`~weightlens.linalg.devices.choose_driver` picks
   for the shape.
3. A result is accepted only if every output is finite and, after ``gesvda``, it passes its check
   (:mod:`weightlens.linalg.verify`). Otherwise (also on ``LinAlgError``) the next attempt runs: on
   CUDA, table driver -> ``"gesvd"`` on the same GPU -> CPU float64 (LAPACK gesdd) -> CPU float64
   gesvd (SciPy); on the CPU, float32 gesdd -> float64 gesdd -> float64 gesvd. Fallback results are
   cast back to the requested device and dtype. NaN is never returned: if every attempt fails,
   :class:`~weightlens.linalg.results.DecompositionError` names the key, the shape and what each
   attempt hit.
4. A result accepted after a failed attempt is reported, one sentence each, to the innermost
   :func:`recording_retries` block around the call (a merge records them per key, into its notes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, NamedTuple, TypeVar

import numpy as np
import torch
from torch import Tensor

from weightlens.linalg.devices import choose_driver, resolve_device, warn_if_oversubscribed
from weightlens.linalg.inputs import as_tensor, cast, check_dtype, check_finite_input, finite
from weightlens.linalg.results import DecompositionError
from weightlens.linalg.verify import _Unreliable  # private: its name appears in failure messages

__all__ = ["first_attempt", "recording_retries", "run"]

T = TypeVar("T")

_CPU = torch.device("cpu")
_FAILURES = (torch.linalg.LinAlgError, np.linalg.LinAlgError, _Unreliable)
_RETRIES: ContextVar[list[str] | None] = ContextVar("weightlens_retries", default=None)


@contextmanager
def recording_retries() -> Iterator[list[str]]:
    """Collect, in the list it yields, one sentence per decomposition in the block that was accepted only after
    a failed attempt (what failed, what was accepted): e.g. a float32 SVD that did not converge, redone in
    float64."""
    found: list[str] = []
    token = _RETRIES.set(found)
    try:
        yield found
    finally:
        _RETRIES.reset(token)


class _Attempt(NamedTuple):
    device: torch.device
    dtype: torch.dtype
    driver: str | None

    def describe(self) -> str:
        return f"{self.device}/{str(self.dtype).removeprefix('torch.')}/{self.driver or 'default'}"


def run(
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
    check_dtype(op, dtype)
    src = as_tensor(a, op, name)
    x = cast(src, dev, dtype)
    check_finite_input(op, name, x, src)
    driver = choose_driver(tuple(x.shape[-2:]), dev)
    failures: list[str] = []
    for attempt in _plan(dev, dtype, driver):
        same = attempt.device == dev and attempt.dtype == dtype
        xi = x if same else cast(src, attempt.device, attempt.dtype)
        out = _attempt(compute, xi, attempt, failures)
        if out is None:
            continue
        out = _restore(out, dev, dtype)
        if _all_finite(out):
            log = _RETRIES.get()
            if failures and log is not None:
                where = f"{name!r}" if name else "a matrix"
                log.append(f"{op} of {where} (shape {tuple(x.shape)}) was retried: {'; '.join(failures)}; "
                           f"accepted {attempt.describe()}")
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


def first_attempt(
    a: Tensor,
    compute: Callable[[Tensor, str | None], T],
    *,
    op: str,
    device: str | torch.device,
    dtype: torch.dtype,
) -> T | None:
    """The first attempt of :func:`run` alone (the table's driver on ``device``): its result when accepted,
    else None, also for non-finite input; a batch then goes matrix by matrix through :func:`run`."""
    dev = resolve_device(device)
    check_dtype(op, dtype)
    x = cast(as_tensor(a, op, None), dev, dtype)
    if not finite(x):
        return None
    out = _attempt(compute, x, _Attempt(dev, dtype, choose_driver(tuple(x.shape[-2:]), dev)), [])
    return None if out is None else _restore(out, dev, dtype)


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
        failures.append(f"{attempt.describe()}: {type(exc).__name__.lstrip('_')}: {_first_line(exc)}")
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
    return all(finite(t) for t in tensors)


def _restore(out: T, device: torch.device, dtype: torch.dtype) -> T:
    if isinstance(out, tuple):  # SVD, LeftSVD
        return type(out)(*(t.to(device=device, dtype=dtype) for t in out))  # type: ignore[return-value]
    return out.to(device=device, dtype=dtype)  # type: ignore[union-attr]

