"""Chunked cross-entropy equals F.cross_entropy on full logits, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _tiny_models import make_llama

from fourbit.train.batching import Batch
from fourbit.train.loss import causal_lm_loss, chunked_cross_entropy


@pytest.mark.parametrize("chunk", [1, 7, 64, 0])
def test_chunked_ce_matches_reference(chunk: int) -> None:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(16, 300, dtype=torch.float64)
    targets = torch.randint(0, 300, (50,), generator=g)
    ours = chunked_cross_entropy(hidden, head, targets, chunk)
    gh, gw = torch.autograd.grad(ours, (hidden, head.weight))
    ref = F.cross_entropy(F.linear(hidden, head.weight, head.bias), targets, reduction="sum")
    rh, rw = torch.autograd.grad(ref, (hidden, head.weight))
    # our chunks upcast logits to float32 before the softmax: fp32 rounding, not float64
    torch.testing.assert_close(ours.double(), ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(gh, rh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-6)


def test_model_loss_chunked_equals_full_logits() -> None:
    model = make_llama()
    ids = torch.randint(0, 256, (2, 20))
    labels = ids.clone()
    labels[:, :6] = -100
    batch = Batch(ids, labels, torch.ones_like(ids), None, int(ids.numel()))
    lora_free = [p for p in model.parameters()]
    full = causal_lm_loss(model, batch, chunk_size=0)
    g_full = torch.autograd.grad(full, lora_free)
    chunked = causal_lm_loss(model, batch, chunk_size=5)
    g_chunk = torch.autograd.grad(chunked, lora_free)
    # identical fp32 math except summation order across chunks
    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=1e-5)
    for a, b in zip(g_chunk, g_full, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 7, 64, 4096])
@pytest.mark.parametrize("bias", [False, True])
def test_frozen_head_fused_loss_and_gradient_match_float64(chunk: int, bias: bool) -> None:
    """A frozen head (QLoRA) takes the fused path: loss and dL/dhidden computed in forward, chunk by chunk."""
    g = torch.Generator().manual_seed(chunk)
    hidden = torch.randn(50, 16, generator=g, requires_grad=True)
    head = torch.nn.Linear(16, 300, bias=bias).requires_grad_(False)
    targets = torch.randint(0, 300, (50,), generator=g)
    ours = chunked_cross_entropy(hidden, head, targets, chunk)
    assert ours.dtype == torch.float32 and ours.grad_fn is not None
    (gh,) = torch.autograd.grad(ours * 0.25, hidden)  # the saved gradient is scaled by the incoming one
    h64 = hidden.detach().double().requires_grad_()
    ref = F.cross_entropy(F.linear(h64, head.weight.double(), None if head.bias is None else head.bias.double()),
                          targets, reduction="sum")
    (rh,) = torch.autograd.grad(ref * 0.25, h64)
    # float32 logits, float32 softmax sums: float32 rounding against float64
    torch.testing.assert_close(ours.double(), ref, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(gh.double(), rh, rtol=1e-5, atol=1e-6)


def test_frozen_head_fused_loss_under_bf16_autocast_matches_the_plain_bf16_path() -> None:
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(40, 32, generator=g, requires_grad=True)
    head = torch.nn.Linear(32, 500, bias=False).requires_grad_(False)
    targets = torch.randint(0, 500, (40,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = chunked_cross_entropy(hidden, head, targets, 16)
        ref = chunked_cross_entropy(hidden, head, targets, 0)  # full bf16 logits, F.cross_entropy in float32
    (gh,) = torch.autograd.grad(ours, hidden)
    (rh,) = torch.autograd.grad(ref, hidden)
    # the same bf16 logits on both sides; the loss is float32 arithmetic on them
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-3)
    # the gradient: softmax - onehot rounded to bf16 (2^-9 relative) before the bf16 matmul, as autocast does
    torch.testing.assert_close(gh, rh, rtol=2e-2, atol=2e-2)
    assert gh.dtype == torch.float32 and (gh - rh).abs().mean() < 2e-3


def test_without_grad_the_fused_path_gives_the_loss_only() -> None:
    hidden = torch.randn(30, 8)
    head = torch.nn.Linear(8, 50).requires_grad_(False)
    targets = torch.randint(0, 50, (30,))
    with torch.no_grad():
        ours = chunked_cross_entropy(hidden, head, targets, 4)
    assert ours.grad_fn is None
    torch.testing.assert_close(ours, F.cross_entropy(head(hidden), targets, reduction="sum"), rtol=1e-6, atol=1e-4)


def test_qlora_model_loss_and_adapter_gradients_equal_the_full_logits_path() -> None:
    from fourbit.models import QuantConfig, quantize_model
    from fourbit.nn.fused import fused_kernels
    from fourbit.nn.lora import LoRASpec, inject_lora
    from fourbit.train.prepare import prepare_model_for_training

    torch.manual_seed(0)
    model = make_llama()
    quantize_model(model, QuantConfig(compute_dtype="fp32"))
    prepare_model_for_training(model)
    inject_lora(model, LoRASpec(r=4, alpha=8, dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)  # a trained-looking adapter, so that every gradient is non-zero
    ids = torch.randint(0, 256, (2, 24))
    labels = ids.clone()
    labels[:, :5] = -100
    batch = Batch(ids, labels, torch.ones_like(ids), None, int(ids.numel()))
    params = [p for p in model.parameters() if p.requires_grad]
    fused = causal_lm_loss(model, batch, chunk_size=8)
    g_fused = torch.autograd.grad(fused, params)
    with fused_kernels(False):
        plain = causal_lm_loss(model, batch, chunk_size=0)
        g_plain = torch.autograd.grad(plain, params)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-4)
    for a, b in zip(g_fused, g_plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
