"""What a decomposition returns (:class:`SVD`) and what it raises when every attempt fails."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from weightlens.errors import WeightlensError

__all__ = ["SVD", "DecompositionError", "LeftSVD", "Polar"]


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


class LeftSVD(NamedTuple):
    """The left side of a thin SVD ``A = U @ diag(S) @ Vh``: ``U @ diag(S)`` and ``S`` (batched over
    leading dims), what a projection of ``A``'s columns needs (``||P A||_F = ||P U S||_F``) without ``Vh``.

    Attributes
    ----------
    US : Tensor of shape (..., m, r)
        ``U`` scaled by ``S`` column by column; ``U[:, :k] = US[:, :k] / S[:k]`` for values well above zero.
    S : Tensor of shape (..., r), descending
    """

    US: Tensor
    S: Tensor

    def span(self, k: int) -> Tensor:
        """The leading ``k`` left singular vectors (``k`` at most the numerical rank: ``S[k - 1] > 0``)."""
        return self.US[..., :k] / self.S[..., None, :k]


class Polar(NamedTuple):
    """The orthogonal polar factor of ``A = U diag(S) Vh`` and ``A``'s singular values (``linalg.polar(...,
    with_values=True)``): ``factor = U @ Vh``, ``S`` descending (how far ``A`` is from rank-deficient, where the
    factor is not unique)."""

    factor: Tensor
    S: Tensor


class DecompositionError(WeightlensError, torch.linalg.LinAlgError):
    """Every attempt to decompose a matrix failed (non-convergence or non-finite output).

    Subclasses ``torch.linalg.LinAlgError`` (a ``RuntimeError``), which callers of torch's
    decompositions already catch.
    """
