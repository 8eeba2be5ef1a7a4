"""Data side of the digits zoos: sklearn's 8x8 digits, seeded splits, task transforms, scaling.

Everything here is a pure function of the data shipped inside scikit-learn and a few fixed seeds,
so a zoo folder only needs to store its split indices to reproduce its inputs exactly.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from weightlens.errors import InvalidParameterError

TASKS = ("rot90", "hflip", "invert", "blockperm")
"""Task names of ``digits-tasks``, in order; each is a fixed transform of the same 8x8 images."""

BLOCK_SEED = 0
"""Seed of the fixed permutation of the 16 blocks (2x2 pixels each) used by ``blockperm``."""


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "The digits zoos need scikit-learn (its load_digits ships the data). "
            "Install it with: pip install 'weightlens[zoo]'"
        ) from exc
    data = load_digits()
    x = np.asarray(data.data, dtype=np.float64)
    y = np.asarray(data.target, dtype=np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def raw_digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits: raw pixels ``(n, 64)`` in 0..16 (float64) and labels ``(n,)`` (int64)."""
    return _digits()


def block_permutation() -> np.ndarray:
    """The fixed permutation ``p`` of the 4x4 grid of 2x2-pixel blocks used by ``blockperm``.

    Output block ``i`` is input block ``p[i]``; blocks are numbered row-major over the 4x4 grid.
    Drawn once from ``RandomState(BLOCK_SEED)``.
    """
    return np.random.RandomState(BLOCK_SEED).permutation(16)


def _permute_blocks(images: np.ndarray) -> np.ndarray:
    n = images.shape[0]
    blocks = images.reshape(n, 4, 2, 4, 2).transpose(0, 1, 3, 2, 4).reshape(n, 16, 2, 2)
    blocks = blocks[:, block_permutation()]
    return blocks.reshape(n, 4, 4, 2, 2).transpose(0, 1, 3, 2, 4).reshape(n, 8, 8)


def transform(x: np.ndarray, task: str) -> np.ndarray:
    """Apply a task's fixed transform to raw pixels ``(n, 64)``; ``"orig"`` is the identity.

    ``rot90``: rotate 90 degrees counter-clockwise; ``hflip``: mirror left-right; ``invert``:
    ``16 - x``; ``blockperm``: permute the 16 blocks of 2x2 pixels (:func:`block_permutation`).
    """
    images = np.asarray(x, dtype=np.float64).reshape(-1, 8, 8)
    if task == "orig":
        out = images
    elif task == "rot90":
        out = np.rot90(images, k=1, axes=(1, 2))
    elif task == "hflip":
        out = images[:, :, ::-1]
    elif task == "invert":
        out = 16.0 - images
    elif task == "blockperm":
        out = _permute_blocks(images)
    else:
        raise InvalidParameterError(
            f"The 'task' parameter must be one of {('orig', *TASKS)}. Got {task!r} instead."
        )
    return np.ascontiguousarray(out.reshape(-1, 64))


def stratified_split(y: np.ndarray, test_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split of ``arange(len(y))``: sorted ``(train, test)`` index arrays."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    train, test = train_test_split(idx, test_size=test_size, stratify=y, random_state=seed)
    return np.sort(train).astype(np.int64), np.sort(test).astype(np.int64)


def standardizer(x_train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel mean and std of the training inputs (std 0 becomes 1, as in StandardScaler)."""
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std[std == 0] = 1.0
    return mean, std


def tensors(
    x: np.ndarray, y: np.ndarray, mean: np.ndarray | float, std: np.ndarray | float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardize in float64, then return ``(float32 inputs, int64 labels)`` tensors."""
    z = ((x - mean) / std).astype(np.float32)
    labels = np.asarray(y, dtype=np.int64).copy()
    return torch.from_numpy(np.ascontiguousarray(z)), torch.from_numpy(labels)


def save_split(path: Path, splits: dict[str, np.ndarray]) -> None:
    """Store split indices (int64) in a safetensors file."""
    from safetensors.torch import save_file

    tensors_ = {k: torch.from_numpy(np.asarray(v, dtype=np.int64).copy()) for k, v in splits.items()}
    save_file(tensors_, str(path))


def load_split(path: Path) -> dict[str, np.ndarray]:
    """Read split indices written by :func:`save_split`."""
    from safetensors.torch import load_file

    return {k: v.numpy() for k, v in load_file(str(path)).items()}
