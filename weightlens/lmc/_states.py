"""Endpoints of an interpolation: loaded once, checked, stacked, and combined with weights.

Floating tensors are combined in float32 as ``sum_i w_i * theta_i`` (for two endpoints and weights
``(1 - alpha, alpha)`` this is ``(1 - alpha) * theta_A + alpha * theta_B``); weights ``(1, 0)`` give
``theta_A`` bit for bit. Non-floating tensors (``num_batches_tracked``, integer tables) are taken
from the first endpoint.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from weightlens.errors import InvalidParameterError, KeyMismatchError, NonFiniteError, ShapeMismatchError
from weightlens.io import load

__all__ = ["Endpoints", "endpoint_names"]

_SHOWN = 5


def _listing(keys: Sequence[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(repr(k) for k in keys[:_SHOWN])
    return shown + (f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else "")


def endpoint_names(sources: Sequence[object] | Mapping[str, object]) -> tuple[list[str], list[object]]:
    """Display names and sources: a mapping gives its keys; otherwise checkpoint names, made unique."""
    if isinstance(sources, Mapping) and not _looks_like_state_dict(sources):
        return [str(k) for k in sources], list(sources.values())
    if isinstance(sources, (str, bytes)) or not isinstance(sources, Sequence):
        raise InvalidParameterError(
            "The 'sources' parameter must be a sequence of checkpoint sources or a mapping "
            f"{{name: source}}. Got {type(sources).__name__} instead."
        )
    names = [load(s).name for s in sources]
    if len(set(names)) < len(names):
        names = [f"{i}:{n}" for i, n in enumerate(names)]
    return names, list(sources)


def _looks_like_state_dict(mapping: Mapping) -> bool:
    return any(isinstance(v, Tensor) for v in mapping.values())


class Endpoints:
    """N checkpoints with identical keys and shapes, as stacked float32 tensors ``(N, *shape)``.

    Parameters
    ----------
    sources : sequence
        Anything :func:`weightlens.load` accepts (paths, state dicts, modules, checkpoints).
    names : sequence of str
        Display names, used in error messages.
    """

    def __init__(self, sources: Sequence[object], names: Sequence[str]) -> None:
        if len(sources) < 2:
            raise InvalidParameterError(f"At least 2 endpoints are needed; got {len(sources)}.")
        ckpts = [load(s) for s in sources]
        self.names = list(names)
        self.keys = list(ckpts[0].keys())
        self._check_keys(ckpts)
        self.stacked: dict[str, Tensor] = {}
        self.fixed: dict[str, Tensor] = {}
        for key in self.keys:
            tensors = [c[key] for c in ckpts]
            self._check_shapes(key, tensors)
            if tensors[0].is_floating_point():
                self.stacked[key] = torch.stack([t.to(torch.float32) for t in tensors])
                self._check_finite(key)
            else:
                self.fixed[key] = tensors[0]
        if not self.stacked:
            raise InvalidParameterError(
                f"Endpoint {self.names[0]!r} holds no floating-point tensors; there is nothing to interpolate."
            )

    def __len__(self) -> int:
        return len(self.names)

    def _check_keys(self, ckpts: Sequence) -> None:
        first = set(self.keys)
        for name, ckpt in zip(self.names[1:], ckpts[1:]):
            other = set(ckpt.keys())
            if other != first:
                raise KeyMismatchError(
                    f"Endpoints {self.names[0]!r} ({ckpts[0].source}) and {name!r} ({ckpt.source}) must "
                    f"have the same keys. Missing from {name!r}: {_listing(list(first - other)) or 'none'}; "
                    f"only in {name!r}: {_listing(list(other - first)) or 'none'}. Interpolate checkpoints "
                    "of one architecture (apply a permutation with its .apply(), never drop keys)."
                )

    def _check_shapes(self, key: str, tensors: Sequence[Tensor]) -> None:
        for name, t in zip(self.names[1:], tensors[1:]):
            if t.shape != tensors[0].shape:
                raise ShapeMismatchError(
                    f"Tensor {key!r} has shape {tuple(tensors[0].shape)} in {self.names[0]!r} but "
                    f"{tuple(t.shape)} in {name!r}. Interpolate models of the same width and architecture."
                )

    def _check_finite(self, key: str) -> None:
        bad = ~torch.isfinite(self.stacked[key]).flatten(1).all(dim=1)
        if bool(bad.any()):
            name = self.names[int(bad.nonzero()[0])]
            raise NonFiniteError(
                f"Tensor {key!r} of endpoint {name!r} holds NaN or Inf values; interpolation would "
                "propagate them. Check the checkpoint (a diverged run?)."
            )

    def combine(self, weights: Sequence[float] | np.ndarray) -> dict[str, Tensor]:
        """One state dict ``sum_i w_i theta_i`` (float32) with the fixed tensors of endpoint 0."""
        w = torch.as_tensor(np.asarray(weights, dtype=np.float64), dtype=torch.float32)
        out = {k: torch.tensordot(w.to(v.device), v, dims=1) for k, v in self.stacked.items()}
        out.update(self.fixed)
        return {k: out[k] for k in self.keys}

    def to(self, device: torch.device) -> Endpoints:
        """Move the stacked tensors to ``device`` (in place); returns ``self``."""
        self.stacked = {k: v.to(device) for k, v in self.stacked.items()}
        return self

    def combine_many(self, weights: np.ndarray) -> dict[str, Tensor]:
        """Stacked floating tensors ``(K, *shape)`` for K weight rows (no fixed tensors)."""
        device = next(iter(self.stacked.values())).device
        w = torch.as_tensor(np.asarray(weights, dtype=np.float64), dtype=torch.float32, device=device)
        return {k: torch.tensordot(w, v, dims=1) for k, v in self.stacked.items()}

    def state(self, index: int) -> dict[str, Tensor]:
        """Endpoint ``index`` as a state dict (float tensors in float32)."""
        out = {k: v[index] for k, v in self.stacked.items()}
        out.update(self.fixed)
        return {k: out[k] for k in self.keys}
