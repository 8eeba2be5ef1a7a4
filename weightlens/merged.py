"""What "merged" means everywhere in weightlens: full merged weights, and the update taken from them here.

``analyze(..., merged=)``, ``alignment_to_merged`` and ``compare`` all accept the same thing: a merge
result (``wl.merge(...)``, a :class:`MergedWeights`) or a mapping of full merged weights (a state
dict, ``wl.load(folder)``). The update of a key, ``merged - base``, is taken in one place,
:func:`merged_update`: a merge result hands over its exact fp32 update (before it was added to the
base and cast); plain weights are upcast to fp32 and the base is subtracted, as ``TaskVectors`` does
for fine-tunes.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable, Mapping

import torch

from weightlens.errors import KeyMismatchError, ShapeMismatchError
from weightlens.taskvectors import TaskVectors

__all__ = ["MergedWeights", "check_merged", "merged_keys", "merged_update"]


class MergedWeights(Mapping[str, torch.Tensor]):
    """Full merged weights that know their own update per key (``wl.MergeResult`` is one).

    Subclasses provide ``task_vectors`` (what was merged), ``updated_keys`` and :meth:`update`.
    """

    task_vectors: TaskVectors

    @property
    @abstractmethod
    def updated_keys(self) -> list[str]:
        """Keys that received an update, in order."""

    @abstractmethod
    def update(self, key: str) -> torch.Tensor:
        """The fp32 update ``merged - base`` of ``key``."""


def merged_keys(tv: TaskVectors, merged: Mapping[str, torch.Tensor]) -> list[str]:
    """Task-vector keys that ``merged`` updates (a merge result) or holds (plain weights), in ``tv`` order."""
    held = set(merged.updated_keys) if isinstance(merged, MergedWeights) else set(merged)
    return [k for k in tv.keys if k in held]


def check_merged(tv: TaskVectors, merged: Mapping[str, torch.Tensor], keys: Iterable[str], *, caller: str) -> None:
    """Every key of ``keys`` is updated by ``merged`` with the task vectors' shape (read from headers
    where possible, so nothing is computed); raises ``KeyMismatchError`` / ``ShapeMismatchError``."""
    updated = set(merged.updated_keys) if isinstance(merged, MergedWeights) else None
    for key in keys:
        if key not in (updated if updated is not None else merged):
            what = "received no update in the merge" if key in merged else "is missing from the merged weights"
            raise KeyMismatchError(
                f"{caller}: key {key!r} of the task vectors (base {tv.base.name!r}) {what}. Pass a merge of "
                "these task vectors (wl.merge(tv, ...)) or their full merged weights, or restrict keys=[...]."
            )
        _check_shape(tv, key, _known_shape(merged, key), caller)


def merged_update(tv: TaskVectors, merged: Mapping[str, torch.Tensor], key: str, *, caller: str) -> torch.Tensor:
    """The fp32 update ``merged - base`` of ``key``: the merge's own for a merge result, else by subtraction."""
    if isinstance(merged, MergedWeights):
        return merged.update(key)
    check_merged(tv, merged, [key], caller=caller)
    weights = merged[key]
    _check_shape(tv, key, tuple(weights.shape), caller)
    return weights.to(torch.float32) - tv.base_tensor(key).to(torch.float32)


def _check_shape(tv: TaskVectors, key: str, got: tuple[int, ...] | None, caller: str) -> None:
    want = tv.shape(key)
    if got is not None and got != want:
        raise ShapeMismatchError(
            f"{caller}: key {key!r} has shape {got} in the merged weights but {want} in the task vectors "
            f"(base {tv.base.name!r}); pass a merge of these task vectors (wl.merge(tv, ...)) or their full "
            "merged weights, not other checkpoints."
        )


def _known_shape(merged: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...] | None:
    """Shape of ``merged[key]`` when it is known without computing the key, else None."""
    if isinstance(merged, MergedWeights):
        return merged.task_vectors.shape(key)
    shape_of = getattr(merged, "shape", None)  # a Checkpoint reads it from the header
    if callable(shape_of):
        return tuple(shape_of(key))
    value = merged.get(key) if isinstance(merged, dict) else None
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None
