"""A cache of comparisons: reuse a merge's :class:`~weightlens.merge.Comparison` at another ``alpha``.

A comparison of one merge serves every merge that differs from it only in a positive ``alpha``
(:meth:`Comparison.rescaled`: singular values and ``kept`` scale, nothing else changes). A
:class:`ComparisonCache` holds that rule: asked for a merge's comparison it returns the cached one
(the same object at the same ``alpha``), rescales one of the same method, tasks and other parameters,
or computes one with :func:`~weightlens.merge.compare`. The merge studio asks it on every move of a
control; anything else that compares many merges of one set of task vectors can use it the same way.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from weightlens.errors import InvalidParameterError
from weightlens.merge.compare import Comparison, compare
from weightlens.merge.engine import MergeResult

__all__ = ["ComparisonCache"]


class ComparisonCache:
    """The comparisons of recent merges, by tasks, method, parameters other than ``alpha`` and keys.

    Parameters
    ----------
    size : int, default=8
        Comparisons kept (least recently used dropped first).
    criterion, eps, device
        Passed to :func:`~weightlens.merge.compare` for every comparison made here.

    Notes
    -----
    A comparison at ``alpha <= 0`` is computed but not kept (it cannot be rescaled), and no cached
    comparison is rescaled to ``alpha <= 0``. Safe to use from several threads: one comparison is
    computed at a time, and a comparison asked for while another thread computes it is computed once.

    Examples
    --------
    >>> cache = ComparisonCache()                                         # doctest: +SKIP
    >>> a = cache.compare(merge(tv, method="tsv", alpha=1.0, lazy=True))  # doctest: +SKIP
    >>> b = cache.compare(merge(tv, method="tsv", alpha=2.0, lazy=True))  # doctest: +SKIP
    >>> b is a.rescaled(2.0)  # no SVD: a's rows, scaled                  # doctest: +SKIP
    """

    def __init__(self, size: int = 8, *, criterion: str = "iso_script", eps: float = 0.05,
                 device: str | torch.device = "auto") -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise InvalidParameterError(f"The 'size' parameter must be an int >= 1. Got {size!r} instead.")
        self.size = size
        self._options: dict[str, Any] = {"criterion": criterion, "eps": eps, "device": device}
        self._entries: OrderedDict[tuple, Comparison] = OrderedDict()
        self._lock = threading.Lock()  # the entries
        self._computing = threading.Lock()  # one compare() at a time

    @staticmethod
    def tag(merged: MergeResult, keys: Sequence[str] | None = None) -> tuple:
        """What a comparison is cached under: tasks, method, parameters other than ``alpha``, keys."""
        if not isinstance(merged, MergeResult):
            raise InvalidParameterError(
                f"ComparisonCache needs a MergeResult (from weightlens.merge.merge); got {type(merged).__name__}."
            )
        others = tuple(sorted(((k, v) for k, v in merged.params.items() if k != "alpha"), key=lambda kv: kv[0]))
        return (tuple(merged.task_vectors.names), merged.method, others, None if keys is None else tuple(keys))

    def get(self, merged: MergeResult, keys: Sequence[str] | None = None) -> Comparison | None:
        """The comparison of ``merged`` (restricted to ``keys``) from the cache, rescaled to its
        ``alpha``; None when there is none that can be rescaled to it."""
        tag = self.tag(merged, keys)
        with self._lock:
            comp = self._entries.get(tag)
            if comp is None or not comp.can_rescale_to(merged):
                return None
            self._entries.move_to_end(tag)
        return comp.rescaled(merged.alpha)

    def compare(self, merged: MergeResult, keys: Sequence[str] | None = None) -> Comparison:
        """The comparison of ``merged`` (restricted to ``keys``): cached or rescaled when possible,
        else computed with :func:`~weightlens.merge.compare` and kept."""
        found = self.get(merged, keys)
        if found is not None:
            return found
        with self._computing:
            found = self.get(merged, keys)  # computed by another thread meanwhile
            if found is not None:
                return found
            comp = compare(merged.task_vectors, merged, keys=None if keys is None else list(keys), progress=False,
                           **self._options)  # the caller (a widget) shows its own progress
            self._put(self.tag(merged, keys), comp)
        return comp

    def _put(self, tag: tuple, comp: Comparison) -> None:
        if not float(comp.params.get("alpha", 0.0)) > 0:
            return
        with self._lock:
            self._entries[tag] = comp
            self._entries.move_to_end(tag)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"ComparisonCache({len(self)} of {self.size} comparisons)"
