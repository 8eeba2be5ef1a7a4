"""Small task vectors for the merge methods' unit tests: a matrix ``w`` and a bias ``b`` of a random base, each
fine-tune the base plus seeded noise (linear-algebra checks only; real models are in the zoo and the HF tests)."""

from __future__ import annotations

import numpy as np
import torch

import weightlens as wl


def noise_task_vectors(n_tasks: int, shape: tuple[int, int] = (6, 5), scale: float = 1.0,
                       seed: int = 0) -> wl.TaskVectors:
    """Tasks ``t0 .. t{n-1}``: ``base + scale * N(0, 1)`` for ``w`` (``shape``) and ``b`` (``shape[1]``)."""
    g = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(*shape, generator=g), "b": torch.randn(shape[1], generator=g)}
    fts = {f"t{i}": {k: v + scale * torch.randn(v.shape, generator=g) for k, v in base.items()}
           for i in range(n_tasks)}
    return wl.TaskVectors(base, fts)


def flat_deltas(tv: wl.TaskVectors, keys: list[str]) -> np.ndarray:
    """``(T, P)`` float64: every task's deltas at ``keys``, flattened and concatenated (whole-model references)."""
    return np.concatenate([np.stack([tv.delta(t, k).double().numpy().reshape(-1) for t in tv.names])
                           for k in keys], axis=1)


def unflat(tv: wl.TaskVectors, keys: list[str], merged: np.ndarray) -> dict[str, np.ndarray]:
    """The inverse of :func:`flat_deltas` for one merged ``(P,)`` vector: ``{key: array of its shape}``."""
    out, at = {}, 0
    for k in keys:
        n = int(np.prod(tv.shape(k)))
        out[k] = merged[at:at + n].reshape(tv.shape(k))
        at += n
    return out
