"""The softmax cross-entropy row kernel (loss and softmax - onehot in place) against a float64 reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fourbit.kernels import cpu, dispatch, reference


def _float64_reference(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and gradient from F.cross_entropy in float64 (an independent computation)."""
    z = logits.double().requires_grad_()
    losses = F.cross_entropy(z, targets, reduction="none")
    (grad,) = torch.autograd.grad(losses.sum(), z)
    return losses.detach(), grad


@pytest.mark.parametrize("vocab", [1, 2, 17, 1000, 1024, 1025, 49152])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_and_gradient_match_float64(vocab: int, dtype: torch.dtype, isa: int) -> None:
    g = torch.Generator().manual_seed(vocab)
    rows = 5
    logits = (torch.randn(rows, vocab, generator=g) * 4).to(dtype)
    logits[0, 0] = 30.0  # a dominant logit: probabilities near 0 and 1 in one row
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[0] = 0
    want_loss, want_grad = _float64_reference(logits, targets)
    work = logits.clone()
    losses = dispatch.softmax_cross_entropy_(work, targets)
    assert losses.dtype == torch.float32 and losses.shape == (rows,)
    # float32 arithmetic (exp good to ~1e-7 relative, sums of 1024 terms then float64): a few float32 ulps of
    # the loss, whose size is the logsumexp (|logits| up to ~30 here)
    torch.testing.assert_close(losses.double(), want_loss, rtol=2e-6, atol=2e-5)
    # p = exp(z - logsumexp) with a float32 logsumexp of size up to ~30 carries up to ulp(30) = 1.9e-6 of
    # absolute error in its exponent, so up to ~4e-6 relative error in p; bf16 adds its rounding (2^-9)
    rtol = {torch.float32: 5e-6, torch.bfloat16: 4e-3}[dtype]
    torch.testing.assert_close(work.double(), want_grad, rtol=rtol, atol=rtol / 4)


def test_without_gradient_the_logits_are_left_alone(isa: int) -> None:
    logits = torch.randn(3, 300)
    before = logits.clone()
    targets = torch.tensor([0, 150, 299])
    losses = dispatch.softmax_cross_entropy_(logits, targets, write_grad=False)
    assert torch.equal(logits, before)
    torch.testing.assert_close(losses.double(), _float64_reference(before, targets)[0], rtol=2e-6, atol=2e-6)


def test_compiled_kernel_agrees_with_the_pytorch_reference(isa: int) -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 4099, generator=g) * 3
    targets = torch.randint(0, 4099, (64,), generator=g)
    a, b = logits.clone(), logits.clone()
    ours, theirs = cpu.softmax_cross_entropy_(a, targets, True), reference.softmax_cross_entropy_(b, targets, True)
    # first each side against float64, so that a disagreement names the side that moved
    exact = _float64_reference(logits, targets)[0]
    torch.testing.assert_close(ours.double(), exact, rtol=2e-6, atol=2e-5, msg=lambda m: f"compiled kernel vs float64: {m}")
    torch.testing.assert_close(theirs.double(), exact, rtol=2e-6, atol=2e-5, msg=lambda m: f"PyTorch reference vs float64: {m}")
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_a_row_with_nan_or_inf_gives_nan_not_a_number_that_looks_fine(isa: int) -> None:
    logits = torch.randn(4, 100)
    logits[1, 5] = float("nan")
    logits[2, 7] = float("inf")
    logits[3, 9] = float("-inf")
    targets = torch.tensor([0, 1, 2, 3])
    work = logits.clone()
    losses = dispatch.softmax_cross_entropy_(work, targets)
    assert torch.isfinite(losses[0]) and torch.isfinite(work[0]).all()
    # a NaN or infinite logit must surface (the trainer stops on a non-finite loss), never be hidden
    assert torch.isnan(losses[1:]).all()
    assert torch.isnan(work[1:]).all()


def test_out_of_range_targets_and_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="target 10 is out of bounds for a vocabulary of 10"):
        dispatch.softmax_cross_entropy_(torch.randn(2, 10), torch.tensor([3, 10]))
    with pytest.raises(ValueError, match="target -1"):
        dispatch.softmax_cross_entropy_(torch.randn(2, 10), torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match=r"logits \[rows, vocab\] and targets \[rows\]"):
        dispatch.softmax_cross_entropy_(torch.randn(2, 10), torch.tensor([1, 2, 3]))
    assert dispatch.softmax_cross_entropy_(torch.randn(0, 10), torch.zeros(0, dtype=torch.long)).shape == (0,)
