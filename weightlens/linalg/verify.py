"""The accuracy check every ``gesvda`` result must pass before it is accepted.

gesvda can be inaccurate on ill-conditioned or rank-deficient input, so each gesvda result is
verified in float64 with Gaussian probes: the relative residual ``||A - U diag(S) Vh||_F / ||A||_F``
and the loss of orthonormality of ``U`` and ``Vh`` (for ``svdvals``: ``| ||S||_2 - ||A||_F | /
||A||_F``) must stay below :func:`~weightlens.linalg.devices.gesvda_tolerance`. A failure raises
:class:`_Unreliable`, which makes :func:`~weightlens.linalg.guard.run` try the next attempt.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from weightlens.linalg.devices import gesvda_tolerance
from weightlens.linalg.results import SVD

__all__ = ["verify_values", "verify_vectors"]

_PROBES = 4


class _Unreliable(Exception):
    """A result failed its verification (internal: triggers the next attempt)."""


def verify_vectors(x: Tensor, result: SVD) -> None:
    """Raise :class:`_Unreliable` unless ``result`` reconstructs ``x`` with orthonormal factors."""
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


def verify_values(x: Tensor, S: Tensor) -> None:
    """Raise :class:`_Unreliable` unless ``||S||_2`` matches ``||x||_F``."""
    anorm = torch.linalg.matrix_norm(x.to(torch.float64))
    snorm = torch.linalg.vector_norm(S.to(torch.float64), dim=-1)
    gap = _max((snorm - anorm).abs() / anorm.clamp_min(torch.finfo(torch.float64).tiny))
    tol = gesvda_tolerance(tuple(x.shape), x.dtype)
    if not gap <= tol:
        raise _Unreliable(f"gesvda singular values miss ||A||_F by {gap:.1e} (tolerance {tol:.1e})")


def _max(t: Tensor) -> float:
    return float(t.max()) if t.numel() else 0.0
