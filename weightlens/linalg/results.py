"""What a decomposition returns (:class:`SVD`) and what it raises when every attempt fails."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from weightlens.errors import WeightlensError

__all__ = ["SVD", "DecompositionError"]


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
