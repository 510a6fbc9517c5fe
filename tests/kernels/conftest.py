"""Fixtures of the kernel tests."""

from __future__ import annotations

import pytest
import torch

from fourbit.kernels import cpu


@pytest.fixture(params=[2, 1, 0], ids=lambda level: cpu.ISA_NAMES[level])
def isa(request):
    """Run the test on one vector path of the one compiled build (AVX-512, AVX2, plain C), where the CPU has it;
    skipped where no C compiler built the kernels."""
    if not cpu.available():
        pytest.skip("no C compiler: the compiled kernels are not built")
    best = cpu.set_isa(2)
    if request.param > best:
        pytest.skip(f"this CPU has no {cpu.ISA_NAMES[request.param]}")
    assert cpu.set_isa(request.param) == request.param
    yield request.param
    cpu.set_isa(best)


@pytest.fixture
def two_threads():
    """torch, and so the compiled kernels (which take torch's thread count from 2^18 elements up), on two
    threads for the test; the count before is restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)
