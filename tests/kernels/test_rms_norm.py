"""The RMSNorm row kernels against float64 autograd, on every vector path."""

from __future__ import annotations

import pytest
import torch

from fourbit.kernels import dispatch


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 5, 576), (9, 4099)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_input_gradient_match_float64(shape: tuple, dtype: torch.dtype, isa: int) -> None:
    gen = torch.Generator().manual_seed(shape[-1])
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    weight = (torch.rand(shape[-1], generator=gen) + 0.5).to(dtype)
    grad = torch.randn(shape, generator=gen).to(dtype)
    eps = 1e-5
    x64 = x.double().requires_grad_()
    want = weight.double() * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    (want_dx,) = torch.autograd.grad(want, x64, grad.double())
    out, rstd = dispatch.rms_norm(x, weight, eps)
    dx = dispatch.rms_norm_backward(x, weight, grad, rstd)
    assert out.dtype == dx.dtype == dtype and out.shape == dx.shape == shape and rstd.shape == shape[:-1]
    # float32 arithmetic: a few ulps; bf16 rounds the normalized row, then the product (2 x 2^-9)
    rtol, atol = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.6e-2, 1e-2)}[dtype]
    torch.testing.assert_close(out.double(), want.detach(), rtol=rtol, atol=atol)
    torch.testing.assert_close(dx.double(), want_dx, rtol=rtol, atol=atol * max(1.0, float(want_dx.abs().max())))


def test_a_weight_of_the_wrong_size_is_refused() -> None:
    with pytest.raises(ValueError, match=r"rms_norm takes x \[..., cols\] and weight \[cols\]"):
        dispatch.rms_norm(torch.randn(2, 8), torch.ones(7), 1e-6)


@pytest.mark.parametrize("shape", [(2, 131, 1031), (70, 4099)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_threaded_path_matches_float64_and_the_one_thread_bytes(shape: tuple, dtype: torch.dtype, isa: int,
                                                                     two_threads) -> None:
    # From 2^18 elements the kernel splits its rows over torch's threads: 3 rows of 1031 per unit of work
    # (262 rows: the last unit holds one), or one row per unit when a row has 4096 values or more. Each row
    # is computed by one thread, so the bytes are those of one thread.
    from fourbit.kernels import cpu

    numel = shape[0] * shape[1] * (shape[2] if len(shape) == 3 else 1)
    assert cpu._threads(numel) == 2
    gen = torch.Generator().manual_seed(11)
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    weight = (torch.rand(shape[-1], generator=gen) + 0.5).to(dtype)
    grad = torch.randn(shape, generator=gen).to(dtype)
    eps = 1e-6
    x64 = x.double().requires_grad_()
    want = weight.double() * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    (want_dx,) = torch.autograd.grad(want, x64, grad.double())
    out, rstd = dispatch.rms_norm(x, weight, eps)
    dx = dispatch.rms_norm_backward(x, weight, grad, rstd)
    rtol, atol = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.6e-2, 1e-2)}[dtype]
    torch.testing.assert_close(out.double(), want.detach(), rtol=rtol, atol=atol)
    torch.testing.assert_close(dx.double(), want_dx, rtol=rtol, atol=atol * max(1.0, float(want_dx.abs().max())))
    torch.set_num_threads(1)
    assert cpu._threads(numel) == 1
    one_out, one_rstd = dispatch.rms_norm(x, weight, eps)
    assert torch.equal(one_out, out) and torch.equal(one_rstd, rstd)
    assert torch.equal(dispatch.rms_norm_backward(x, weight, grad, rstd), dx)
