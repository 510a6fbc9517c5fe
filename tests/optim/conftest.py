"""Fixtures for the optimizer tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Run each test on one intra-op thread (restored afterwards).

    The optimizer steps here are many small tensor operations; on a shared machine OpenMP's thread
    hand-offs cost far more than the arithmetic (two orders of magnitude for small AdamW steps under load).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
