"""Small task vectors for the merge methods' unit tests: a matrix ``w`` and a bias ``b`` of a random base, each
fine-tune the base plus seeded noise (linear-algebra checks only; real models are in the zoo and the HF tests)."""

from __future__ import annotations

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
