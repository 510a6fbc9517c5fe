"""LoftQ (Li et al. 2023): Q + s·B·A starts closer to W than Q alone; the layers and files stay right."""

from __future__ import annotations

import copy

import pytest
import torch
from _tiny_models import make_llama
from torch import nn

from fourbit._errors import FieldError
from fourbit.models import QuantConfig, quantize_model
from fourbit.nn import Linear4bit
from fourbit.nn.linear4bit import frozen_weight
from fourbit.nn.loftq import inject_loftq, loftq_decompose, low_rank
from fourbit.nn.lora import LoRASpec, lora_modules
from fourbit.quant import dequantize_4bit, quantize_4bit


def test_low_rank_is_the_truncated_svd() -> None:
    g = torch.Generator().manual_seed(0)
    m = torch.randn(40, 9, generator=g, dtype=torch.float64) @ torch.randn(9, 70, generator=g, dtype=torch.float64)
    big_l, big_r = low_rank(m, 9)  # rank 9 exactly: recovered to float32 precision
    torch.testing.assert_close((big_l @ big_r).double(), m, rtol=1e-4, atol=1e-4)
    u, s, vh = torch.linalg.svd(m)
    best3 = (u[:, :3] * s[:3]) @ vh[:3]
    l3, r3 = low_rank(m, 3)
    torch.testing.assert_close((l3 @ r3).double(), best3, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_more_iterations_never_start_farther_from_w(quant_type: str) -> None:
    w = torch.randn(128, 192, generator=torch.Generator().manual_seed(1))
    packed, state = quantize_4bit(w, quant_type, 64, True)
    plain = (w - dequantize_4bit(packed, state, torch.float32)).norm()
    errors = []
    for iters in (1, 2, 4):
        q_packed, q_state, big_l, big_r = loftq_decompose(w, 8, iters, quant_type=quant_type)
        errors.append((w - dequantize_4bit(q_packed, q_state, torch.float32) - big_l @ big_r).norm())
    assert errors[0] < plain  # T = 1: plain Q plus the best rank-8 fit of its error
    assert errors[-1] <= errors[0] * 1.001
    with pytest.raises(FieldError, match="loftq_iter"):
        loftq_decompose(w, 8, 0)


def test_inject_loftq_builds_4bit_lora_layers_that_start_at_q_plus_lr() -> None:
    model = make_llama(0).eval()
    reference = copy.deepcopy(model)
    spec = LoRASpec(r=4, alpha=16, dropout=0.0)
    names = inject_loftq(model, spec, num_iter=2)
    quantize_model(model, QuantConfig(compute_dtype="fp32"))
    layers = lora_modules(model)
    assert sorted(layers) == sorted(names) and all(isinstance(m.base, Linear4bit) for m in layers.values())
    for name, m in layers.items():
        w = reference.get_submodule(name).weight.detach()
        q_only = frozen_weight(m.base, torch.float32)
        start = m.merged_linear(torch.float32).weight  # Q + s·B·A with fourbit's scaling
        assert (w - start).norm() < (w - q_only).norm()
    plain = copy.deepcopy(reference)
    quantize_model(plain, QuantConfig(compute_dtype="fp32"))
    ids = torch.randint(0, 250, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        target = reference(ids).logits
        assert (model(ids).logits - target).norm() < (plain(ids).logits - target).norm()


def test_loftq_needs_the_float_weights() -> None:
    model = nn.Sequential(Linear4bit.from_linear(nn.Linear(64, 64), compute_dtype="fp32"))
    with pytest.raises(FieldError, match="init_lora_weights"):
        inject_loftq(model, LoRASpec(r=2, alpha=2, dropout=0.0))


def test_loftq_with_dora_starts_at_the_same_weight() -> None:
    model = nn.Sequential(nn.Linear(96, 64))
    layer_w = model[0].weight.detach().clone()
    inject_loftq(model, LoRASpec(r=4, alpha=8, dropout=0.0, use_dora=True))
    m = lora_modules(model)["0"]
    x = torch.randn(5, 96)
    with torch.no_grad():
        start = frozen_weight(m.base, torch.float32) + m.scaling * m.lora_B.weight @ m.lora_A.weight
        torch.testing.assert_close(m(x), nn.functional.linear(x, start, m.base.bias), rtol=1e-5, atol=1e-5)
        assert (layer_w - start).norm() < (layer_w - frozen_weight(m.base, torch.float32)).norm()
