"""The input gate of every decomposition: type, dtype, shape and finiteness checks, and the cast.

:func:`as_tensor` accepts a float tensor or array of shape ``(..., m, n)`` (detached);
:func:`cast` moves it to the compute device in the working dtype (cast on the host first, so CUDA
never sees fp16/bf16); :func:`check_finite_input` names the tensor key and its NaN and Inf counts;
:func:`check_dtype` and :func:`check_int` give the house message for a bad parameter.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from weightlens._finite import finite
from weightlens.errors import DTypeError, InvalidParameterError, NonFiniteError

__all__ = ["WORKING_DTYPES", "as_tensor", "cast", "check_dtype", "check_finite_input", "check_int", "finite"]

#: The dtypes decompositions run and return in.
WORKING_DTYPES = (torch.float32, torch.float64)


def as_tensor(a: Any, op: str, name: str | None) -> Tensor:
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


def cast(a: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Cast then move (on the host first, so an accelerator receives ``dtype`` only)."""
    if a.device.type == "cpu" and device.type != "cpu":
        a = a.to(dtype=dtype)
    return a.to(device=device, dtype=dtype)


def check_dtype(op: str, dtype: Any) -> None:
    """Raise unless ``dtype`` is a working dtype (float32 or float64)."""
    if dtype not in WORKING_DTYPES:
        raise InvalidParameterError(
            f"The 'dtype' parameter of {op} must be torch.float32 or torch.float64. Got {dtype!r} "
            f"instead. fp16/bf16 inputs are upcast automatically; 'dtype' is the working precision."
        )


def check_finite_input(op: str, name: str | None, x: Tensor, src: Tensor) -> None:
    """Raise :class:`NonFiniteError` naming the key and NaN/Inf counts unless ``x`` is finite."""
    if finite(x):
        return
    is_finite = torch.isfinite(x)
    nan = int(torch.isnan(x).sum())
    inf = int((~is_finite).sum()) - nan
    where = f"tensor {name!r}" if name else "the input"
    note = ""
    if src.dtype != x.dtype and finite(src):
        note = f" (finite as {src.dtype}: the cast to {x.dtype} overflowed)"
    raise NonFiniteError(
        f"{op}: {where} of shape {tuple(x.shape)} holds {nan} NaN and {inf} Inf value(s){note}; "
        f"decompositions need finite input. Check the checkpoint for corrupt or overflowed values "
        f"(fp16 deltas can overflow), or exclude this key."
    )


def check_int(op: str, param: str, value: Any, low: int, high: int | None = None) -> None:
    """Raise unless ``value`` is an int (not a bool) in ``[low, high]`` (``high=None``: no bound)."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if ok and low <= value and (high is None or value <= high):
        return
    allowed = f"an int in [{low}, {high}]" if high is not None else f"an int >= {low}"
    raise InvalidParameterError(
        f"The {param!r} parameter of {op} must be {allowed}. Got {value!r} instead."
    )


