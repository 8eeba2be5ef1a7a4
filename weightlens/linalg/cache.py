"""DecompositionCache: decompose once, reuse everywhere (LRU, bounded by tensor bytes).

Analysis, merges and widgets share one cache (``TaskVectors.cache``), so moving a coefficient or
switching a method never repeats an SVD that is already known. Its default bound follows the memory
this process may still allocate when the cache is made (:func:`default_cache_bytes`).
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from typing import Any, Literal, TypeVar

import numpy as np
import torch

from weightlens.errors import InvalidParameterError
from weightlens.linalg.devices import available_memory

__all__ = ["DEFAULT_CACHE_FRACTION", "DEFAULT_CACHE_RANGE", "DecompositionCache", "default_cache_bytes",
           "value_nbytes"]

T = TypeVar("T")

#: The default bound is this fraction of the memory available when a cache is made ...
DEFAULT_CACHE_FRACTION = 1 / 8
#: ... clamped to this range of bytes (the upper end also when the available memory is unknown).
DEFAULT_CACHE_RANGE = (256 * 2**20, 2 * 2**30)


def default_cache_bytes(available: int | None) -> int:
    """Default ``max_bytes`` of a cache: 1/8 of ``available`` bytes, clamped to [256 MiB, 2 GiB].

    ``available`` is what :func:`~weightlens.linalg.devices.available_memory` reports (None:
    unknown, which gives 2 GiB). A merge and export then holds its per-key working set plus this.

    Examples
    --------
    >>> [default_cache_bytes(gib * 2**30) // 2**20 for gib in (1, 8, 64)], default_cache_bytes(None) // 2**20
    ([256, 1024, 2048], 2048)
    """
    low, high = DEFAULT_CACHE_RANGE
    if available is None:
        return high
    return int(min(high, max(low, available * DEFAULT_CACHE_FRACTION)))


class DecompositionCache:
    """Least-recently-used cache of decompositions, bounded by the bytes of the tensors it holds.

    Parameters
    ----------
    max_bytes : int or "auto", default="auto"
        Bound on :attr:`nbytes`. Storing a value evicts least-recently-used entries until it fits;
        a value larger than ``max_bytes`` on its own is returned but not stored. ``"auto"``:
        :func:`default_cache_bytes` of the memory available now (1/8 of it, 256 MiB to 2 GiB).

    Attributes
    ----------
    hits, misses, evictions : int
        Counters since creation or the last :meth:`clear`.
    nbytes : int
        Bytes held, counted by :func:`value_nbytes`.

    Notes
    -----
    Values are returned by reference: treat them as read-only (an in-place edit of a cached ``U``
    would reach every later hit). Bookkeeping is thread-safe; ``compute`` runs outside the lock,
    so two threads missing the same key at once both compute it and the first value stored wins.

    Examples
    --------
    >>> import torch
    >>> cache = DecompositionCache(max_bytes=2**20)
    >>> s = cache.get_or_compute(("svdvals", "w"), lambda: torch.ones(3))
    >>> s = cache.get_or_compute(("svdvals", "w"), lambda: torch.zeros(3))
    >>> (cache.hits, cache.misses, cache.nbytes, float(s[0]))
    (1, 1, 12, 1.0)
    """

    def __init__(self, max_bytes: int | Literal["auto"] = "auto") -> None:
        if isinstance(max_bytes, str) and max_bytes == "auto":
            max_bytes = default_cache_bytes(available_memory())
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0:
            raise InvalidParameterError(
                f"The 'max_bytes' parameter of DecompositionCache must be an int >= 0 or 'auto'. "
                f"Got {max_bytes!r} instead."
            )
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.nbytes = 0
        self._entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._lock = threading.RLock()

    def get_or_compute(self, key: Hashable, compute: Callable[[], T], *, store: bool = True) -> T:
        """The value cached under ``key``, or ``compute()`` (stored, then returned).

        Parameters
        ----------
        key : hashable
            E.g. ``("svd", task, tensor_key, device, dtype)``.
        compute : callable
            Called with no arguments on a miss; an exception propagates and nothing is stored.
        store : bool, default=True
            False: a miss returns ``compute()`` without storing it (for a value read once).
        """
        _check_key(key)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.hits += 1
                return self._entries[key][0]
            self.misses += 1
        value = compute()
        if not store:
            return value
        size = value_nbytes(value)
        with self._lock:
            if key in self._entries:  # another thread stored it meanwhile
                self._entries.move_to_end(key)
                return self._entries[key][0]
            if size > self.max_bytes:
                return value
            while self._entries and self.nbytes + size > self.max_bytes:
                _, (_, old) = self._entries.popitem(last=False)
                self.nbytes -= old
                self.evictions += 1
            self._entries[key] = (value, size)
            self.nbytes += size
        return value

    def clear(self) -> None:
        """Drop every entry and reset the counters."""
        with self._lock:
            self._entries.clear()
            self.nbytes = self.hits = self.misses = self.evictions = 0

    def items(self) -> list[tuple[Hashable, Any]]:
        """``(key, value)`` of every entry, least recently used first (reads count no hit)."""
        with self._lock:
            return [(key, value) for key, (value, _) in self._entries.items()]

    def __reduce__(self) -> tuple[Any, ...]:
        """A pickled cache (a Ray task's task vectors) arrives empty, with the same bound."""
        return (type(self), (self.max_bytes,))

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        """Membership test; counts neither a hit nor a miss and leaves the LRU order alone."""
        try:
            return key in self._entries
        except TypeError:  # unhashable
            return False

    def __repr__(self) -> str:
        return (
            f"DecompositionCache({len(self)} entries, {self.nbytes / 2**20:.1f} of "
            f"{self.max_bytes / 2**20:.1f} MiB, hits={self.hits}, misses={self.misses})"
        )


def _check_key(key: object) -> None:
    try:
        hash(key)
    except TypeError:
        raise InvalidParameterError(
            f"DecompositionCache keys must be hashable (e.g. a tuple of str). Got {key!r}."
        ) from None


def value_nbytes(value: Any) -> int:
    """Bytes of the tensors (and ndarrays) inside ``value``.

    Walks tensors, ndarrays, tuples (``NamedTuple`` included), lists, sets, mappings and
    dataclass instances. A tensor counts its whole storage (a view keeps its base alive); a
    storage reached twice counts once. Other leaves count 0.
    """
    seen: set[tuple[str, int]] = set()
    return _walk(value, seen, set())


def _walk(value: Any, seen: set[tuple[str, int]], visiting: set[int]) -> int:
    if isinstance(value, torch.Tensor):
        return _tensor_bytes(value, seen)
    if isinstance(value, np.ndarray):
        base = value if value.base is None else value.base
        ident = ("numpy", id(base))
        if ident in seen:
            return 0
        seen.add(ident)
        return int(base.nbytes) if isinstance(base, np.ndarray) else int(value.nbytes)
    if id(value) in visiting:
        return 0
    children = _children(value)
    if not children:
        return 0
    visiting.add(id(value))
    total = sum(_walk(child, seen, visiting) for child in children)
    visiting.discard(id(value))
    return total


def _children(value: Any) -> list[Any]:
    if isinstance(value, Mapping):
        return list(value.values())
    if isinstance(value, (tuple, list, set, frozenset)):
        return list(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [getattr(value, f.name) for f in dataclasses.fields(value)]
    return []


def _tensor_bytes(t: torch.Tensor, seen: set[tuple[str, int]]) -> int:
    try:
        storage = t.untyped_storage()
        ident = (str(t.device), storage.data_ptr())
        size = storage.nbytes()
    except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts
        return t.numel() * t.element_size()
    if ident in seen and ident[1] != 0:
        return 0
    seen.add(ident)
    return int(size)
