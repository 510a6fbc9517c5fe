"""4-bit mixture-of-experts weights: per-expert NF4 + double quantization, a forward that dequantizes only the
routed experts, input gradients only, exact round trips, shapes the block size does not divide."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from fourbit.nn.experts import Experts4bit, is_fused_experts
from fourbit.quant import dequantize_4bit, quantize_4bit


def _mixtral_experts(hidden: int = 64, intermediate: int = 96, experts: int = 4, seed: int = 0):
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    config = transformers.MixtralConfig(hidden_size=hidden, intermediate_size=intermediate,
                                        num_local_experts=experts, num_experts_per_tok=2)
    torch.manual_seed(seed)
    module = MixtralExperts(config)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.02)
    return module


def _routing(tokens: int, experts: int, k: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, k, generator=g), dim=-1)
    return index, weights


def test_each_expert_matrix_is_quantized_on_its_own():
    experts = _mixtral_experts()
    assert is_fused_experts(experts)
    q = Experts4bit.from_experts(experts, compute_dtype=torch.float32)
    for name in ("gate_up_proj", "down_proj"):
        for i in range(4):
            packed, state = quantize_4bit(getattr(experts, name)[i].detach(), "nf4", 64, True)
            assert torch.equal(getattr(q, name)[i], packed.view(-1)), "the bytes of quantize_4bit(W_e)"
            assert q.expert_state(name, i).equals(state)
            assert torch.equal(q.dequantize()[0 if name == "gate_up_proj" else 1][i], dequantize_4bit(packed, state))


def test_forward_equals_the_float_experts_on_the_dequantized_weights():
    experts = _mixtral_experts()
    q = Experts4bit.from_experts(experts, compute_dtype=torch.float32)
    reference = q.dequantized_module(torch.float32)
    assert type(reference) is type(experts)
    x = torch.randn(13, 64)
    index, weights = _routing(13, 4)
    torch.testing.assert_close(q(x, index, weights), reference(x, index, weights), rtol=1e-5, atol=1e-6)


def test_only_routed_experts_are_dequantized(monkeypatch):
    from fourbit.nn import experts as experts_module

    q = Experts4bit.from_experts(_mixtral_experts(experts=8), compute_dtype=torch.float32)
    calls = []
    real = experts_module.dequantize_4bit

    def spy(packed, state, dtype=None):
        calls.append(packed.data_ptr())
        return real(packed, state, dtype)

    monkeypatch.setattr(experts_module, "dequantize_4bit", spy)
    index = torch.tensor([[1, 5], [5, 1], [1, 5]])
    q(torch.randn(3, 64), index, torch.full((3, 2), 0.5))
    expected = {getattr(q, n)[i].data_ptr() for n in ("gate_up_proj", "down_proj") for i in (1, 5)}
    assert set(calls) == expected and len(calls) == 4, "one dequantization per routed expert matrix, no more"


def test_backward_gives_the_input_gradient_and_saves_only_packed_weights():
    q = Experts4bit.from_experts(_mixtral_experts(), compute_dtype=torch.float32)
    reference = q.dequantized_module(torch.float32)
    x = torch.randn(7, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    index, weights = _routing(7, 4)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = q(x, index, weights)
    y.square().sum().backward()
    reference(x_ref, index, weights).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in q.parameters())
    biggest_float = max((t.numel() for t in saved if t.is_floating_point() and t.dim() == 2
                         and t.shape[-1] in (64, 96) and t.shape[0] in (192, 64)), default=0)
    assert biggest_float == 0, "no dequantized expert matrix is kept for backward"


@pytest.mark.parametrize("double_quant", [True, False])
def test_a_shape_the_blocksize_does_not_divide_is_padded_and_exact(double_quant):
    experts = _mixtral_experts(hidden=36, intermediate=50)  # 100*36 and 36*50 are not multiples of 64
    q = Experts4bit.from_experts(experts, double_quant=double_quant, compute_dtype=torch.float32)
    err = (q.dequantize()[0] - experts.gate_up_proj).norm() / experts.gate_up_proj.norm()
    assert float(err) < 0.15, "NF4's usual ~10% relative error on Gaussian weights, padding included"
    x = torch.randn(5, 36)
    index, weights = _routing(5, 4)
    torch.testing.assert_close(q(x, index, weights), q.dequantized_module()(x, index, weights), rtol=1e-5,
                               atol=1e-6)
    copy_ = Experts4bit(4, 36, 50, experts.act_fn, double_quant=double_quant)
    copy_.load_state_dict(q.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(copy_.state_dict().values(), q.state_dict().values(),
                                                 strict=True))


def test_casting_the_model_keeps_the_quantization_constants_in_float32():
    q = Experts4bit.from_experts(_mixtral_experts(), double_quant=False)
    before = copy.deepcopy(q.state_dict())
    q.to(torch.bfloat16)
    after = q.state_dict()
    assert q.gate_up_proj.dtype == torch.uint8 and after["gate_up_proj_absmax"].dtype == torch.float32
    assert before.keys() == after.keys() and all(torch.equal(before[k], v) for k, v in after.items())


def test_footprint_counts_the_experts():
    from test_architectures import make_model

    from fourbit.models import QuantConfig, quantize_model

    model = make_model("mixtral")
    expert_params = sum(m.gate_up_proj.numel() + m.down_proj.numel() for m in model.modules()
                        if is_fused_experts(m))
    linear_params = sum(m.weight.numel() for n, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear) and n != "lm_head")
    fp = quantize_model(model, QuantConfig(compute_dtype="fp32"))
    assert fp.quantized_params == expert_params + linear_params
    assert 4.12 < fp.bits_per_param < 4.14  # 4 + 8/64 + 32/(64*256) + a float32 offset per expert matrix


def test_generate_with_4bit_experts():
    from test_architectures import dequantized_copy, make_model

    from fourbit.models import QuantConfig, quantize_model

    model = make_model("qwen3_moe")
    quantize_model(model, QuantConfig(compute_dtype="fp32"))
    reference = dequantized_copy(model)
    ids = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(0))
    out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=256)
    assert out.shape[1] > 5
    expected = reference.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=256)
    assert torch.equal(out, expected), "greedy decoding sees the same logits as the dequantized float model"
