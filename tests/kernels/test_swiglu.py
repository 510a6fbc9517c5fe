"""The SwiGLU kernels (silu(gate) * up and its gradient) against float64 autograd, on every vector path."""

from __future__ import annotations

import pytest
import torch

from fourbit.kernels import dispatch


def _float64(gate, up, grad):
    g = gate.double().requires_grad_()
    u = up.double().requires_grad_()
    out = torch.nn.functional.silu(g) * u
    dg, du = torch.autograd.grad(out, (g, u), grad.double())
    return out.detach(), dg, du


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5, 17), (16385,), (64, 1536)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_backward_match_float64(shape: tuple, dtype: torch.dtype, isa: int) -> None:
    gen = torch.Generator().manual_seed(len(shape))
    gate = (torch.randn(shape, generator=gen) * 6).to(dtype)  # |gate| up to ~25: both tails of the sigmoid
    up, grad = torch.randn(shape, generator=gen).to(dtype), torch.randn(shape, generator=gen).to(dtype)
    want, want_dg, want_du = _float64(gate, up, grad)
    out = dispatch.swiglu(gate, up)
    d_gate, d_up = dispatch.swiglu_backward(gate, up, grad)
    assert out.dtype == d_gate.dtype == d_up.dtype == dtype and out.shape == shape
    # float32 arithmetic (exp to ~1e-7 relative): a few float32 ulps; bf16 results add one bf16 rounding (2^-9)
    rtol, atol = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (8e-3, 1e-5)}[dtype]
    for got, ref in ((out, want), (d_gate, want_dg), (d_up, want_du)):
        torch.testing.assert_close(got.double(), ref, rtol=rtol, atol=atol)


def test_nan_propagates_and_large_gates_saturate(isa: int) -> None:
    gate = torch.tensor([float("nan"), 1.0, 100.0, -100.0, 0.0])
    up = torch.tensor([1.0, float("nan"), 1.0, 1.0, float("inf")])
    out = dispatch.swiglu(gate, up)
    assert torch.isnan(out[0]) and torch.isnan(out[1]) and torch.isnan(out[4])  # silu(0) * inf = 0 * inf
    assert out[2] == 100.0 and abs(float(out[3])) < 1e-30  # silu(x) -> x and -> 0 in the tails
    d_gate, d_up = dispatch.swiglu_backward(gate, up, torch.ones(5))
    assert torch.isnan(d_gate[0]) and torch.isnan(d_gate[1]) and d_gate[2] == 1.0 and abs(float(d_gate[3])) < 1e-30


def test_mismatched_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="gate .* and up .* differ in shape"):
        dispatch.swiglu(torch.randn(3, 4), torch.randn(3, 5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_threaded_path_matches_float64_and_the_one_thread_bytes(dtype: torch.dtype, isa: int,
                                                                     two_threads) -> None:
    # From 2^18 elements the kernel runs on torch's threads, in chunks of 16384 elements: 257 x 1031 gives 17
    # chunks, the last one partial, split over 2 threads. Each element is computed alone, so the bytes are
    # those of one thread.
    from fourbit.kernels import cpu

    shape = (257, 1031)
    assert cpu._threads(shape[0] * shape[1]) == 2
    gen = torch.Generator().manual_seed(7)
    gate = (torch.randn(shape, generator=gen) * 6).to(dtype)
    up, grad = torch.randn(shape, generator=gen).to(dtype), torch.randn(shape, generator=gen).to(dtype)
    out = dispatch.swiglu(gate, up)
    d_gate, d_up = dispatch.swiglu_backward(gate, up, grad)
    want, want_dg, want_du = _float64(gate, up, grad)
    rtol, atol = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (8e-3, 1e-5)}[dtype]
    for got, ref in ((out, want), (d_gate, want_dg), (d_up, want_du)):
        torch.testing.assert_close(got.double(), ref, rtol=rtol, atol=atol)
    torch.set_num_threads(1)
    assert cpu._threads(gate.numel()) == 1
    assert torch.equal(dispatch.swiglu(gate, up), out)
    one_dg, one_du = dispatch.swiglu_backward(gate, up, grad)
    assert torch.equal(one_dg, d_gate) and torch.equal(one_du, d_up)
