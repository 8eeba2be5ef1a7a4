"""Task vectors: a base checkpoint and named fine-tunes, read as fp32 deltas one key at a time.

``TaskVectors`` checks keys, shapes and dtypes from the checkpoint headers when it is built (no
tensor data is read), classifies every key (matrix / vector / conv / skip), and computes
``finetuned - base`` per key on demand, upcasting to fp32 *before* subtracting so bf16/fp16
checkpoints keep their small deltas. It also carries the decomposition cache that analysis, merges
and widgets share.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch

from weightlens.errors import (
    DTypeError,
    InvalidParameterError,
    KeyMismatchError,
    NonFiniteError,
    ShapeMismatchError,
)
from weightlens.io import Checkpoint, load
from weightlens.linalg import DecompositionCache

__all__ = ["TaskVectors", "parameter_kind"]

Kind = Literal["matrix", "vector", "conv", "skip"]
_SHOWN = 5  # keys listed in one error message


def parameter_kind(shape: Sequence[int], dtype: torch.dtype) -> Kind:
    """Class of a parameter, which decides how each merge treats it.

    ``"matrix"``: 2-D float (Linear weights, embeddings, projections); ``"vector"``: 0/1-D float
    (biases, norms); ``"conv"``: float with 3 or more dims; ``"skip"``: integer/bool buffers.
    """
    if not (dtype.is_floating_point or dtype.is_complex):
        return "skip"
    ndim = len(shape)
    if ndim == 2:
        return "matrix"
    return "vector" if ndim < 2 else "conv"


def _where(ckpt: Checkpoint) -> str:
    return f"{ckpt.name!r} ({ckpt.source})" if ckpt.source != ckpt.name else repr(ckpt.name)


def _listing(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(repr(k) for k in keys[:_SHOWN])
    return shown + (f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else "")


def _as_patterns(patterns: str | Iterable[str] | None) -> list[str] | None:
    if patterns is None:
        return None
    return [patterns] if isinstance(patterns, str) else list(patterns)


def _matches(key: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


_HOW = ("Pass them as a list of sources, TaskVectors(base, ['ft/a', 'ft/b']), or by name, "
        "TaskVectors(base, {'a': 'ft/a'}).")


def _named_checkpoints(finetuned: Any) -> dict[str, Checkpoint]:
    """``{name: Checkpoint}`` from a mapping of sources or a list (names from file/folder names)."""
    empty = finetuned is None or (isinstance(finetuned, (Mapping, Sequence)) and not isinstance(finetuned, str)
                                  and len(finetuned) == 0)
    if empty:
        got = "None" if finetuned is None else f"an empty {type(finetuned).__name__}"
        raise InvalidParameterError(f"TaskVectors needs at least one fine-tuned checkpoint; got {got}. {_HOW}")
    if isinstance(finetuned, Mapping) and not all(isinstance(v, torch.Tensor) for v in finetuned.values()):
        return {str(name): _with_name(load(src), str(name)) for name, src in finetuned.items()}
    if isinstance(finetuned, (str, os.PathLike, Mapping, torch.nn.Module, Checkpoint)):
        finetuned = [finetuned]
    named: dict[str, Checkpoint] = {}
    for i, src in enumerate(finetuned):
        ckpt = load(src)
        stem = ckpt.name if ckpt.name not in ("state_dict", "") else f"task{i}"
        name, n = stem, 2
        while name in named:
            name, n = f"{stem}_{n}", n + 1
        named[name] = _with_name(ckpt, name)
    if not named:  # an empty iterator
        raise InvalidParameterError(f"TaskVectors needs at least one fine-tuned checkpoint; got none. {_HOW}")
    return named


def _with_name(ckpt: Checkpoint, name: str) -> Checkpoint:
    """``ckpt`` displayed as ``name`` (a shallow copy; the caller's object is left alone)."""
    return ckpt if ckpt.name == name else ckpt.renamed(name)


class TaskVectors:
    """A base checkpoint and named fine-tunes of it, read as fp32 deltas per key.

    Parameters
    ----------
    base : any source ``wl.load`` accepts (path, state dict, ``nn.Module``, ``Checkpoint``).
    finetuned : a list of sources (names from their file or folder names) or ``{name: source}``.
    include, exclude : glob patterns (``fnmatch``) on tensor keys, e.g. ``"*.attention.*"``.
        ``include`` keeps only matching keys, ``exclude`` drops matching keys.
    cache : decomposition cache to share; a new one by default.

    Raises
    ------
    KeyMismatchError, ShapeMismatchError, DTypeError
        When a fine-tune's keys, shapes or dtype classes differ from the base's; the message names
        both checkpoints and the keys.

    Examples
    --------
    >>> import torch, weightlens as wl
    >>> base = {"w": torch.zeros(2, 2), "b": torch.zeros(2)}
    >>> tv = wl.TaskVectors(base, {"a": {"w": torch.ones(2, 2), "b": torch.ones(2)}})
    >>> tv.names, tv.keys, tv.kind("w")
    (['a'], ['w', 'b'], 'matrix')
    >>> tv.delta("a", "w").sum().item()
    4.0
    """

    def __init__(
        self,
        base: Any,
        finetuned: Any,
        *,
        include: str | Iterable[str] | None = None,
        exclude: str | Iterable[str] | None = None,
        cache: DecompositionCache | None = None,
    ) -> None:
        self.base = load(base)
        self.finetuned = _named_checkpoints(finetuned)
        self.include = _as_patterns(include)
        self.exclude = _as_patterns(exclude)
        self.cache = cache if cache is not None else DecompositionCache()
        self._finite: set[tuple[int, str]] = set()
        self._validate()
        self.keys = self._select_keys()

    # ------------------------------------------------------------------ structure
    @property
    def names(self) -> list[str]:
        """Task names, in order."""
        return list(self.finetuned)

    def __len__(self) -> int:
        return len(self.finetuned)

    def kind(self, key: str) -> Kind:
        """Parameter class of ``key``: ``"matrix"``, ``"vector"``, ``"conv"`` or ``"skip"``."""
        info = self.base.info(key)
        return parameter_kind(info.shape, info.dtype)

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of ``key`` (shared by base and every fine-tune)."""
        return tuple(self.base.shape(key))

    def keys_of_kind(self, *kinds: Kind) -> list[str]:
        """Selected keys of the given classes, in checkpoint order."""
        return [k for k in self.keys if self.kind(k) in kinds]

    def numel(self, key: str) -> int:
        """Number of entries of ``key``."""
        n = 1
        for d in self.shape(key):
            n *= d
        return n

    def subset(self, names: Iterable[str]) -> TaskVectors:
        """The same task vectors restricted to ``names`` (order kept), sharing the cache."""
        names = list(names)
        unknown = [n for n in names if n not in self.finetuned]
        if unknown or not names:
            raise KeyMismatchError(
                f"Unknown task(s) {unknown} for subset; tasks are {self.names}." if unknown
                else "subset() needs at least one task name."
            )
        new = object.__new__(TaskVectors)
        new.__dict__.update(self.__dict__)
        new.finetuned = {n: self.finetuned[n] for n in names}
        return new

    def __repr__(self) -> str:
        kinds = {k: 0 for k in ("matrix", "vector", "conv")}
        for key in self.keys:
            kinds[self.kind(key)] += 1
        counts = ", ".join(f"{v} {k}" for k, v in kinds.items() if v)
        return f"TaskVectors(base={self.base.name!r}, tasks={self.names}, keys: {counts})"

    # ------------------------------------------------------------------ data
    def base_tensor(self, key: str) -> torch.Tensor:
        """The base tensor of ``key`` in its stored dtype."""
        self._check_key(key)
        return self.base[key]

    def delta(self, task: str, key: str) -> torch.Tensor:
        """``finetuned[task][key] - base[key]`` in fp32 on the CPU (upcast before subtracting)."""
        self._check_key(key)
        if task not in self.finetuned:
            raise KeyMismatchError(f"Unknown task {task!r}; tasks are {self.names}.")
        return self._delta(self.finetuned[task], key, self._upcast(self.base, key))

    def deltas(self, key: str) -> torch.Tensor:
        """Deltas of every task for ``key``, stacked: shape ``(T, *shape)``, fp32, CPU."""
        self._check_key(key)
        base = self._upcast(self.base, key)
        out = torch.empty((len(self.finetuned), *base.shape), dtype=torch.float32)
        for i, ft in enumerate(self.finetuned.values()):  # filled in place: no list + stack copy
            torch.sub(self._upcast(ft, key), base, out=out[i])
        return out

    def _delta(self, ft: Checkpoint, key: str, base: torch.Tensor) -> torch.Tensor:
        diff = self._upcast(ft, key) - base
        return diff if diff.dtype == torch.float32 else diff.to(torch.float32)

    def _upcast(self, ckpt: Checkpoint, key: str) -> torch.Tensor:
        t = ckpt[key]
        wide = torch.float64 if t.dtype == torch.float64 else torch.float32
        t = t.to(wide)
        # The scan costs as much as the read; a tensor found finite once is not scanned again
        # (checkpoints are read-only, and the set is shared with subset()s).
        seen = (id(ckpt._reader), key)
        if seen in self._finite:
            return t
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise NonFiniteError(
                f"{_where(ckpt)} key {key!r}: {bad} of {t.numel()} values are NaN or Inf. "
                "Fix or drop that checkpoint (or exclude the key with exclude=...)."
            )
        self._finite.add(seen)
        return t

    def _check_key(self, key: str) -> None:
        if key not in self.base:
            raise KeyMismatchError(f"Key {key!r} is not in the base checkpoint {_where(self.base)}.")
        if self.kind(key) == "skip":
            raise DTypeError(
                f"Key {key!r} of {_where(self.base)} has dtype {self.base.dtype(key)}; task vectors "
                "need floating-point tensors (integer/bool buffers are skipped)."
            )

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        base_keys = set(self.base.keys())
        for ft in self.finetuned.values():
            keys = set(ft.keys())
            missing, extra = base_keys - keys, keys - base_keys
            if missing:
                raise KeyMismatchError(
                    f"Fine-tuned {_where(ft)} lacks {len(missing)} key(s) of base {_where(self.base)}: "
                    f"{_listing(missing)}. Task vectors need identical keys; check that both come "
                    "from the same architecture."
                )
            if extra:
                raise KeyMismatchError(
                    f"Fine-tuned {_where(ft)} has {len(extra)} key(s) that base {_where(self.base)} "
                    f"lacks: {_listing(extra)}. Exclude them with exclude=[...] if they are new heads."
                )
            for key in self.base.keys():
                self._validate_key(ft, key)

    def _validate_key(self, ft: Checkpoint, key: str) -> None:
        b, f = self.base.info(key), ft.info(key)
        if tuple(b.shape) != tuple(f.shape):
            raise ShapeMismatchError(
                f"Shape mismatch for key {key!r}: base {_where(self.base)} has {tuple(b.shape)}, "
                f"fine-tuned {_where(ft)} has {tuple(f.shape)}."
            )
        if parameter_kind(b.shape, b.dtype) == "skip" and parameter_kind(f.shape, f.dtype) == "skip":
            return
        if (b.dtype.is_floating_point) != (f.dtype.is_floating_point):
            raise DTypeError(
                f"Dtype mismatch for key {key!r}: base {_where(self.base)} has {b.dtype}, fine-tuned "
                f"{_where(ft)} has {f.dtype}; a task vector needs floating-point tensors on both sides."
            )

    def _select_keys(self) -> list[str]:
        keys = []
        for key in self.base.keys():
            if self.include is not None and not _matches(key, self.include):
                continue
            if self.exclude is not None and _matches(key, self.exclude):
                continue
            if self.kind(key) == "skip":
                if self.include is not None and key in self.include:  # named exactly, yet not float
                    raise DTypeError(
                        f"include={self.include} selects key {key!r} of dtype {self.base.dtype(key)} "
                        f"in {_where(self.base)}; task vectors need floating-point tensors."
                    )
                continue
            keys.append(key)
        if not keys:
            raise KeyMismatchError(
                f"No floating-point keys left in {_where(self.base)} after include={self.include} "
                f"exclude={self.exclude}."
            )
        return keys
