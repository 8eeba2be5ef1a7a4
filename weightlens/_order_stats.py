"""Exact order statistics of float32 values streamed block by block: a two-pass radix select on their bits.

:func:`kth_values` finds, per task, the values of given ranks among every ``(T, ...)`` block a callable
yields, equal to ``torch.sort`` on the concatenation, while holding one block at a time. It is the one
select of weightlens: TIES' and KnOTS' trim thresholds (``analysis.signs.radix_thresholds``, on ``|x|``)
and PCB's clip bounds and drop thresholds (``merge.pcb``, on signed values) call it.

The keys are the fp32 bit patterns as int32 ``b``. Pass 1 counts the high halves ``h = b >> 16`` (a
bucket, indexed by ``h mod 2**16``); a negative float's bits order its magnitude, so in value order the
buckets run from ``h = -1`` down to ``-2**15`` (the negative values, ``-0.0`` last), then from 0 up: a
permutation of the histogram rather than of the data. Pass 2 counts the low halves inside each task's
chosen buckets (read from the top in a negative one). Finite values and infinities are ordered; NaN is not.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

__all__ = ["kth_values"]

_HALF = 1 << 15  # buckets per sign
_BUCKETS = 1 << 16


def _bits(block: torch.Tensor, n_tasks: int) -> torch.Tensor:
    """The fp32 bits of ``block`` as int32, flattened per task ``(T, n)``, on the CPU."""
    return block.reshape(n_tasks, -1).to("cpu", torch.float32).contiguous().view(torch.int32)


def _add_counts(into: torch.Tensor, values: torch.Tensor) -> None:
    """``into += bincount(values)``, the counts only as long as the largest value needs."""
    counts = torch.bincount(values)
    into[: counts.numel()] += counts


def _ordered(counts: torch.Tensor) -> torch.Tensor:
    """Bucket counts ``(..., 2**16)`` (indexed by ``h mod 2**16``) in value order: negative buckets from the
    largest magnitude, then the others."""
    return torch.cat([counts[..., _HALF:].flip(-1), counts[..., :_HALF]], -1)


def _high(position: int) -> int:
    """The high half ``h`` of the bucket at an ordered position."""
    return -1 - position if position < _HALF else position - _HALF


def kth_values(blocks: Callable[[], Iterable[torch.Tensor]], n_tasks: int,
               ranks: Callable[[int], Sequence[int]], *, magnitude: bool = False) -> torch.Tensor:
    """Per task, the ``r``-th smallest value for each 1-based ``r`` in ``ranks(P)`` over every ``(T, ...)`` stack
    ``blocks()`` yields (``P`` entries per task in all), any sign, exact.

    ``magnitude=True`` ranks ``|x|`` instead (the sign bit masked off in the bit pattern: no ``|x|`` pass).
    ``blocks`` is called once per pass: once to count, and once more unless ``ranks(P)`` is empty. Ranks
    must lie in ``[1, P]``; with no entries (``P = 0``) every value is NaN. ``(T, len(ranks(P)))`` float32.
    """
    high_mask = 0x7FFF if magnitude else 0xFFFF
    hist = torch.zeros(n_tasks, _BUCKETS, dtype=torch.int64)
    total = 0
    for block in blocks():
        bits = _bits(block, n_tasks)
        total += bits.shape[1]
        index = (bits >> 16).bitwise_and_(high_mask)  # in place: a second temporary costs as much as the shift
        for t in range(n_tasks):
            _add_counts(hist[t], index[t])
    want = [int(r) for r in ranks(total)]
    if total == 0 or not want:
        return torch.full((n_tasks, len(want)), float("nan"))
    if not all(1 <= r <= total for r in want):
        raise ValueError(f"kth_values: ranks {want} outside [1, {total}]")
    target = torch.tensor(want, dtype=torch.int64).expand(n_tasks, -1).contiguous()
    cum = _ordered(hist).cumsum(1)
    pos = torch.searchsorted(cum, target)  # (T, R): the ordered bucket of each rank
    below = torch.where(pos > 0, cum.gather(1, (pos - 1).clamp(min=0)), 0)
    highs = [[_high(p) for p in row] for row in pos.tolist()]
    chosen = [sorted(set(row)) for row in highs]
    low = [torch.zeros(len(row), _BUCKETS, dtype=torch.int64) for row in chosen]
    for block in blocks():
        bits = _bits(block, n_tasks)
        high = bits >> 16
        if magnitude:
            high.bitwise_and_(high_mask)
        for t in range(n_tasks):
            for j, h in enumerate(chosen[t]):
                _add_counts(low[t][j], bits[t][high[t] == h] & 0xFFFF)
    out = torch.empty(n_tasks, len(want), dtype=torch.int64)
    for t in range(n_tasks):
        for j, h in enumerate(chosen[t]):
            rows = [r for r in range(len(want)) if highs[t][r] == h]
            counts, k = low[t][j].cumsum(0), target[t, rows] - below[t, rows]
            if h >= 0:
                lo = torch.searchsorted(counts, k)
            else:  # a negative bucket's low bits grow with the magnitude: the k-th smallest is the k-th largest
                lo = torch.searchsorted(counts, counts[-1] - k, right=True)
            out[t, rows] = (h << 16) | lo
    return out.to(torch.int32).view(torch.float32).clone()
