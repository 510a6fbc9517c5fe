"""The fused LoRA training path (one autograd node for base + adapter) against the plain module composition."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fourbit.nn.fused import fused_kernels
from fourbit.nn.linear4bit import Linear4bit
from fourbit.nn.lora import LoRALinear
from fourbit.nn.lora_matmul import LoRAMatMul


def _layer(base_kind: str, in_f: int, out_f: int, dropout: float = 0.0, bias: bool = True) -> LoRALinear:
    torch.manual_seed(0)
    if base_kind == "conv1d":
        from transformers.pytorch_utils import Conv1D

        base = Conv1D(out_f, in_f)
        nn.init.normal_(base.weight, std=0.1)
    else:
        base = nn.Linear(in_f, out_f, bias=bias)
        if base_kind == "4bit":
            base = Linear4bit.from_linear(base, compute_dtype=torch.float32)
    layer = LoRALinear(base, r=5, alpha=10, dropout=dropout)
    nn.init.normal_(layer.lora_B.weight, std=0.1)  # a non-zero update, so that every gradient is exercised
    return layer.train()


def _run(layer: LoRALinear, x: torch.Tensor, fused: bool, autocast: bool = False, seed: int = 0):
    """Output and the gradients of x, A and B for a fixed upstream gradient."""
    x = x.detach().clone().requires_grad_()
    layer.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout mask on both paths
    with fused_kernels(fused), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
    upstream = torch.linspace(-1, 1, y.numel()).view_as(y).to(y.dtype)
    y.backward(upstream)
    return y.detach(), x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad


@pytest.mark.parametrize("base_kind", ["4bit", "linear", "conv1d"])
@pytest.mark.parametrize("shape", [(7, 64), (2, 3, 128), (1, 64)])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_equals_plain_in_float32_forward_and_backward(base_kind: str, shape: tuple, dropout: float) -> None:
    in_f = shape[-1]
    layer = _layer(base_kind, in_f, 33, dropout)
    x = torch.randn(*shape)
    fused = _run(layer, x, True)
    plain = _run(layer, x, False)
    assert LoRAMatMul is not None and fused[0].dtype == torch.float32
    # the same float32 products; only the summation order of the update differs (addmm vs a separate add)
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_the_fused_path_is_taken_in_training_and_not_at_inference() -> None:
    layer = _layer("4bit", 64, 32)
    x = torch.randn(4, 64, requires_grad=True)
    y = layer(x)
    assert type(y.grad_fn).__name__ == "LoRAMatMulBackward"
    with fused_kernels(False):
        assert type(layer(x).grad_fn).__name__ != "LoRAMatMulBackward"
    with torch.no_grad():
        assert layer(x).grad_fn is None


@pytest.mark.parametrize("base_kind", ["4bit", "linear"])
def test_fused_under_bf16_autocast_matches_plain_within_bf16_rounding(base_kind: str) -> None:
    layer = _layer(base_kind, 128, 48)
    if base_kind == "4bit":
        layer.base.compute_dtype = torch.bfloat16
    x = torch.randn(16, 128)
    fy, fx, fa, fb = _run(layer, x, True, autocast=True)
    py, px, pa, pb = _run(layer, x, False, autocast=True)
    # both compute every matmul in bf16; they round at different points (the plain path adds the update in
    # the output dtype after its own bf16 rounding, the fused one inside addmm), so they agree to a few bf16
    # ulps (2^-8 relative) of the largest values
    assert fy.dtype == torch.bfloat16 and fa.dtype == pa.dtype == torch.float32
    for a, b in ((fy, py), (fx, px), (fa, pa), (fb, pb)):
        scale = b.float().abs().max()
        assert (a.float() - b.float()).abs().max() <= 2 ** -6 * scale, (a, b)


def test_a_4bit_base_is_dequantized_in_backward_not_saved() -> None:
    """QLoRA keeps no 16-bit copy of W between forward and backward: the saved tensors are h, h·A^T, A, sB."""
    layer = _layer("4bit", 256, 512)
    x = torch.randn(8, 256, requires_grad=True)
    y = layer(x)
    saved = [t for t in y.grad_fn.saved_tensors]
    assert sorted(tuple(t.shape) for t in saved) == sorted([(8, 256), (8, 5), (5, 256), (512, 5)])


def test_fused_path_works_under_gradient_checkpointing() -> None:
    from torch.utils.checkpoint import checkpoint

    layer = _layer("4bit", 64, 32)
    x = torch.randn(5, 64, requires_grad=True)
    checkpoint(layer, x, use_reentrant=False).sum().backward()
    g_ckpt = (x.grad.clone(), layer.lora_A.weight.grad.clone())
    x.grad = None
    layer.zero_grad(set_to_none=True)
    layer(x).sum().backward()
    torch.testing.assert_close(g_ckpt[0], x.grad)
    torch.testing.assert_close(g_ckpt[1], layer.lora_A.weight.grad)


def test_keep_matmuls_recomputes_an_output_the_model_changed_in_place() -> None:
    """A kept output that the model modified in place (Falcon adds into its MLP output) is not reused."""
    from torch.utils.checkpoint import checkpoint

    from fourbit.nn.lora import keep_matmul_outputs

    layer = _layer("4bit", 64, 64)
    x = torch.randn(3, 64)

    def block(inp):
        y = layer(inp)
        y += inp  # in place on the LoRA layer's output
        return torch.tanh(layer(y))

    grads = []
    for context_fn in (None, keep_matmul_outputs):
        xi = x.clone().requires_grad_()
        layer.zero_grad(set_to_none=True)
        if context_fn is None:
            block(xi).sum().backward()
        else:
            checkpoint(block, xi, use_reentrant=False, context_fn=context_fn).sum().backward()
        grads.append((xi.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
