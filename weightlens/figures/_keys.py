"""Tensor keys for display, shared by the figures and the widgets: labels, order, an even sample."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = ["ordered", "short_key", "spread"]


def short_key(key: str) -> str:
    """A tensor key without its ``.weight`` suffix, for labels."""
    return key.removesuffix(".weight")


def ordered(values: Iterable[str]) -> list[str]:
    """Distinct values in first-seen order."""
    return list(dict.fromkeys(values))


def spread(items: Sequence[str], n: int) -> list[str]:
    """``n`` items spread evenly over ``items`` (all when there are few)."""
    if len(items) <= n:
        return list(items)
    step = (len(items) - 1) / (n - 1) if n > 1 else 0
    return ordered(items[round(i * step)] for i in range(n))
