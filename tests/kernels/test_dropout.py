"""Dropout with a counter-based mask: the compiled kernel gives the reference's bytes on every vector path; the
mask is the seed's alone, keeps 1 - p of the elements, and looks random."""

from __future__ import annotations

import math

import pytest
import torch

from fourbit.kernels import cpu, dispatch, reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1,), (7, 13), (3, 1031), (40_000,)])
def test_compiled_kernel_gives_the_reference_bytes(isa, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    for p, seed in ((0.1, 12345), (0.5, 2**63 + 99), (0.0, 7)):
        assert torch.equal(cpu.dropout(x, p, seed), reference.dropout(x, p, seed))


def test_threads_do_not_change_the_mask() -> None:
    x = torch.randn(300_000)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu.dropout(x, 0.1, 3)
        torch.set_num_threads(2)
        two = cpu.dropout(x, 0.1, 3)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_the_mask_is_the_seed_s_and_keeps_one_minus_p() -> None:
    n, p = 1_000_000, 0.1
    keep = reference.dropout_mask(n, p, 42)
    assert torch.equal(keep, reference.dropout_mask(n, p, 42))
    other = reference.dropout_mask(n, p, 43)
    # 4-sigma binomial bounds: the kept share is 1 - p, and two seeds' masks agree as independent ones would
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(int(keep.sum()) - n * (1 - p)) < 4 * sigma
    both = int((keep == other).sum())
    agree = (1 - p) ** 2 + p**2
    assert abs(both - n * agree) < 4 * math.sqrt(n * agree * (1 - agree))
    # neighbours are independent: P(keep_i and keep_{i+1}) = (1 - p)^2
    pairs = int((keep[1:] & keep[:-1]).sum())
    assert abs(pairs - (n - 1) * (1 - p) ** 2) < 4 * math.sqrt(n * (1 - p) ** 2 * (1 - (1 - p) ** 2))


def test_values_are_scaled_by_one_over_keep_probability_and_p_is_checked() -> None:
    x = torch.ones(1000, dtype=torch.float64)
    y = dispatch.dropout(x, 0.2, 5)
    assert set(y.unique().tolist()) <= {0.0, 1.25}
    with pytest.raises(ValueError, match="p must be in"):
        dispatch.dropout(x, 1.0, 5)
