"""The one streaming select (``weightlens._order_stats.kth_values``) against sorting in float64."""

from __future__ import annotations

import pytest
import torch

from weightlens._order_stats import kth_values

T = 3


def _tricky(n: int, seed: int) -> torch.Tensor:
    """``(T, n)`` finite float32 values with ties, both zeros, subnormals and near neighbours of either sign
    (many entries share a high-16-bit bucket, so the low pass decides)."""
    g = torch.Generator().manual_seed(seed)
    one = torch.tensor(1.0).view(torch.int32)
    neighbours = (one + torch.arange(-40, 40, dtype=torch.int32) * 7).view(torch.float32)  # one bucket around 1.0
    pool = torch.cat([
        torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-40, -1e-40, 1.2e-38, -1.2e-38, 3.4e38, -3.4e38, 2.0, -2.0]),
        neighbours, -neighbours, torch.randn(40, generator=g), -torch.rand(20, generator=g) * 1e-3,
    ])
    return pool[torch.randint(len(pool), (T, n), generator=g)]


def _split(flat: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """``flat`` ``(T, n)`` as blocks of the given sizes, reshaped to assorted shapes (one empty)."""
    blocks, lo = [], 0
    for size in sizes:
        block = flat[:, lo:lo + size]
        blocks.append(block.reshape(T, 2, size // 2) if size % 2 == 0 and size else block)
        lo += size
    return blocks


def _sorted64(flat: torch.Tensor) -> torch.Tensor:
    return torch.sort(flat.double(), dim=1).values


@pytest.mark.parametrize("seed", range(4))
def test_every_rank_is_the_sorted_value_in_float64(seed):
    flat = _tricky(301, seed)
    blocks = _split(flat, [100, 0, 151, 50])
    n = flat.shape[1]
    got = kth_values(lambda: iter(blocks), T, lambda P: list(range(1, P + 1)))
    assert got.dtype == torch.float32 and got.shape == (T, n)
    assert torch.equal(got.double(), _sorted64(flat))  # -0.0 == +0.0 here, as in any comparison


@pytest.mark.parametrize("seed", range(3))
def test_magnitude_ranks_the_absolute_values_bit_for_bit(seed):
    # magnitude=True masks the sign bit instead of taking |x|: every rank of |x| as a float64 sort gives it,
    # with the bits of |x| (+0.0 for both zeros)
    flat = _tricky(301, seed)
    blocks = _split(flat, [100, 0, 151, 50])
    got = kth_values(lambda: iter(blocks), T, lambda P: list(range(1, P + 1)), magnitude=True)
    assert torch.equal(got.double(), _sorted64(flat.abs()))
    assert not bool(torch.signbit(got).any())


def test_several_ranks_match_kthvalue_including_rank_1_and_n():
    g = torch.Generator().manual_seed(7)
    blocks = [torch.randn(T, 50, generator=g), torch.randn(T, 7, 4, generator=g).round(), -torch.zeros(T, 5),
              torch.tensor([[float("inf")] * 2, [-1e-40, 1e-40], [3.0, -3.0]])]
    flat = torch.cat([b.reshape(T, -1) for b in blocks], 1)
    n = flat.shape[1]
    ranks = [1, 17, n // 2, n // 2, n - 1, n]  # a repeated rank too
    got = kth_values(lambda: iter(blocks), T, lambda P: ranks)
    want = torch.stack([torch.kthvalue(flat.double(), r, dim=1).values for r in ranks], 1)
    assert torch.equal(got.double(), want)


def test_signs_of_zero_order_negative_first():
    blocks = [torch.tensor([[0.0, -0.0, -0.0], [-0.0, 0.0, 0.0], [1.0, -0.0, -1.0]])]
    got = kth_values(lambda: iter(blocks), T, lambda P: [1, 2, 3])
    assert torch.signbit(got).tolist() == [[True, True, False], [True, False, False], [True, True, False]]


def test_float64_blocks_are_selected_as_float32():
    flat = torch.randn(T, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = kth_values(lambda: iter([flat]), T, lambda P: [5, P])
    assert torch.equal(got, torch.sort(flat.float(), dim=1).values[:, [4, 63]])


def test_no_ranks_reads_once_and_no_entries_gives_nan():
    calls = []

    def blocks():
        calls.append(1)
        return iter([torch.ones(T, 4)])

    assert kth_values(blocks, T, lambda P: []).shape == (T, 0)
    assert len(calls) == 1
    empty = kth_values(lambda: iter([torch.ones(T, 0)]), T, lambda P: [1])
    assert empty.shape == (T, 1) and bool(empty.isnan().all())


@pytest.mark.parametrize("rank", [0, 5])
def test_a_rank_outside_1_to_n_is_refused(rank):
    with pytest.raises(ValueError, match="outside"):
        kth_values(lambda: iter([torch.ones(T, 4)]), T, lambda P: [rank])
