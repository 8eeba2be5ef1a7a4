"""The NaN/Inf check every read and write uses (``weightlens._finite``), against ``torch.isfinite`` entry by entry."""

from __future__ import annotations

import pytest
import torch

from weightlens._finite import count_nonfinite, finite

BIG = torch.finfo(torch.float32).max


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("plant", ["none", "nan", "inf", "-inf", "both infs", "overflowing sum", "nan and big"])
def test_finite_agrees_with_the_elementwise_test(dtype, plant):
    t = torch.randn(300, generator=torch.Generator().manual_seed(0)).to(dtype)
    big = torch.finfo(dtype).max
    values = {"none": {}, "nan": {7: float("nan")}, "inf": {3: float("inf")}, "-inf": {3: -float("inf")},
              "both infs": {1: float("inf"), 2: -float("inf")},  # their sum is NaN: still caught
              "overflowing sum": {i: big for i in range(10)},  # finite entries whose sum overflows
              "nan and big": {0: big, 1: big, 5: float("nan")}}[plant]
    for i, v in values.items():
        t[i] = v
    want = int((~torch.isfinite(t)).sum())
    assert count_nonfinite(t) == want
    assert finite(t) == (want == 0)


def test_empty_integer_and_matrix_tensors():
    assert finite(torch.empty(0)) and count_nonfinite(torch.empty(0, 3)) == 0
    assert finite(torch.arange(10)) and count_nonfinite(torch.ones(3, dtype=torch.bool)) == 0
    m = torch.full((64, 64), BIG)
    assert finite(m)  # every entry finite, the sum overflows
    m[5, 9] = float("nan")
    assert not finite(m) and count_nonfinite(m) == 1
