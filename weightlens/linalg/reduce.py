"""Sums of float32 tensors accumulated in float64, fast on the CPU.

Statistics that add many float32 terms (masses, energies, block sums) accumulate in float64 so that a figure
never depends on the summation order beyond float64 rounding. torch's float64 reduction of float32 input is
slow on the CPU (it casts element by element without vectorising: 133 ms for 49M values on 2 threads, 22x its
float32 sum); NumPy's reduction casts in buffered blocks and takes 28 ms for the same float64 sum.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["sum64"]

_NUMPY_DTYPES = (torch.float32, torch.float64)


def sum64(x: Tensor, dim: int | None = None) -> Tensor:
    """``x.sum(dim, dtype=torch.float64)``: the sum over ``dim`` (every element when None) accumulated in float64.

    On the CPU by NumPy's reduction (4-6x faster than torch's for float32 input; the same float64 accuracy, in
    another summation order), elsewhere (CUDA, half-precision dtypes, tensors that require grad) by torch's.
    Returns a float64 tensor on ``x``'s device.
    """
    if x.device.type != "cpu" or x.dtype not in _NUMPY_DTYPES or x.requires_grad:
        return x.sum(dtype=torch.float64) if dim is None else x.sum(dim, dtype=torch.float64)
    return torch.from_numpy(np.asarray(np.add.reduce(x.numpy(), axis=dim, dtype=np.float64)))
