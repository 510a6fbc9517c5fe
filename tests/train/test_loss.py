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
