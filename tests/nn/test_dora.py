"""DoRA (Liu et al. 2024) on float and 4-bit bases: against float64 math, against peft, merge, files."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import peft
import pytest
import torch
from _tiny_models import make_llama
from torch import nn
from transformers.pytorch_utils import Conv1D

from fourbit._errors import FieldError
from fourbit.nn import Linear4bit
from fourbit.nn.adapters import load_adapter, save_adapter
from fourbit.nn.linear4bit import frozen_weight
from fourbit.nn.lora import LoRALinear, LoRASpec, inject_lora, lora_modules, merge_and_unload
from fourbit.nn.lora_matmul import LoRADropout


def _base(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return {"linear": lambda: nn.Linear(96, 64), "conv1d": lambda: Conv1D(64, 96),
            "4bit": lambda: Linear4bit.from_linear(nn.Linear(96, 64), compute_dtype="fp32")}[kind]()


def _trained(layer: LoRALinear, seed: int = 1) -> LoRALinear:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.2, generator=g)
        layer.lora_magnitude_vector.mul_(1 + 0.1 * torch.randn(layer.out_features, generator=g))
    return layer


def _reference(layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    """DoRA's eq. 5 in float64 on the dequantized weight: W' = m · (W + sBA) / ||W + sBA||_row."""
    w = frozen_weight(layer.base, torch.float64)
    v = w + layer.scaling * layer.lora_B.weight.double() @ layer.lora_A.weight.double()
    w_dora = layer.lora_magnitude_vector.double()[:, None] * v / v.norm(dim=1, keepdim=True)
    bias = None if layer.base.bias is None else layer.base.bias.double()
    return nn.functional.linear(x.double(), w_dora, bias)


@pytest.mark.parametrize("kind", ["linear", "conv1d", "4bit"])
def test_forward_and_magnitude_init_equal_the_float64_definition(kind: str) -> None:
    layer = LoRALinear(_base(kind), 8, 16.0, use_dora=True)
    w = frozen_weight(layer.base, torch.float64)
    # a fresh adapter: B = 0, m = ||W||_row, so the layer is the base
    torch.testing.assert_close(layer.lora_magnitude_vector.double(), w.norm(dim=1), rtol=1e-6, atol=0)
    _trained(layer)
    x = torch.randn(3, 5, 96)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            # fp32 against float64: the norm by its expansion plus two matmuls, well inside 1e-5
            torch.testing.assert_close(layer(x).double(), _reference(layer, x), rtol=1e-5, atol=1e-5)


def test_the_norm_is_a_constant_for_autograd_and_the_magnitude_trains() -> None:
    layer = _trained(LoRALinear(_base("4bit"), 4, 8.0, use_dora=True))
    x = torch.randn(6, 96, requires_grad=True)
    g = torch.randn(6, 64)
    layer(x).backward(g)
    params = layer.adapter_params()
    assert set(params) == {"lora_A.weight", "lora_B.weight", "lora_magnitude_vector"}
    # reference gradients: eq. 5 with ||V + ΔV|| detached (section 4.3), in float64
    a, b, m = (p.detach().double().requires_grad_(True) for p in params.values())
    w = frozen_weight(layer.base, torch.float64)
    v = w + layer.scaling * b @ a
    out = nn.functional.linear(x.detach().double(), m[:, None] * v / v.norm(dim=1, keepdim=True).detach(),
                               layer.base.bias.double())
    out.backward(g.double())
    for ours, ref in zip(params.values(), (a, b, m), strict=True):
        torch.testing.assert_close(ours.grad.double(), ref.grad, rtol=1e-4, atol=1e-5)
    assert layer.base.weight.grad is None


def test_autograd_keeps_no_copy_of_the_4bit_weight() -> None:
    layer = _trained(LoRALinear(Linear4bit.from_linear(nn.Linear(512, 256), compute_dtype="fp32"), 4, 8.0,
                                use_dora=True))
    sizes = []
    x = torch.randn(8, 512, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        y = layer(x)
    assert max(sizes) < 256 * 512  # activations and adapter tensors only, never W [256, 512]
    y.sum().backward()


def _tiny():
    return make_llama(0, vocab_size=256, max_position_embeddings=128, pad_token_id=0).eval()


def _perturb(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def test_peft_loads_fourbit_dora_adapter_and_fourbit_loads_peft_s(tmp_path: Path) -> None:
    base = _tiny()
    ours = copy.deepcopy(base)
    inject_lora(ours, LoRASpec(r=4, alpha=8, dropout=0.0, use_dora=True))
    _perturb(ours)
    save_adapter(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["use_dora"] is True
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, rtol=1e-5, atol=1e-5)
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "up_proj"], use_dora=True))
        _perturb(pm, seed=3)
        pm.save_pretrained(str(tmp_path / "peft"))
        loaded = load_adapter(copy.deepcopy(base), tmp_path / "peft")
        assert all(m.use_dora for m in lora_modules(loaded).values())
        torch.testing.assert_close(loaded(ids).logits, pm.eval()(ids).logits, rtol=1e-5, atol=1e-5)


def test_training_path_with_dropout_equals_peft() -> None:
    base = _tiny()
    ours = copy.deepcopy(base)
    inject_lora(ours, LoRASpec(r=4, alpha=8, dropout=0.2, use_dora=True))
    _perturb(ours)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.2, target_modules="all-linear", use_dora=True))
    with torch.no_grad():
        for n, m in lora_modules(ours).items():
            peft_layer = theirs.get_submodule(f"base_model.model.{n}")
            peft_layer.lora_A["default"].weight.copy_(m.lora_A.weight)
            peft_layer.lora_B["default"].weight.copy_(m.lora_B.weight)
            peft_layer.lora_magnitude_vector["default"].weight.copy_(m.lora_magnitude_vector)
            # fourbit's dropout (its mask made from a seed drawn from torch's generator) in peft's layer too: with
            # the same draws in the same order, both drop the same elements
            peft_layer.lora_dropout["default"] = LoRADropout(0.2)
    ours.train()
    theirs.train()
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(7)
    loss_ours = ours(input_ids=ids, labels=ids).loss
    torch.manual_seed(7)
    loss_theirs = theirs(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss_ours, loss_theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "conv1d", "4bit"])
def test_merge_equals_the_definition_and_unmerge_restores(kind: str) -> None:
    layer = _trained(LoRALinear(_base(kind), 4, 8.0, use_dora=True))
    x = torch.randn(7, 96)
    with torch.no_grad():
        before = layer(x)
        merged = layer.merged_linear(torch.float32)
        torch.testing.assert_close(merged(x).double(), _reference(layer, x), rtol=1e-5, atol=1e-5)
        layer.merge(dtype=torch.float32)
        torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
        layer.unmerge()
        torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)


def test_merge_and_unload_matches_peft_merge() -> None:
    base = _tiny()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "down_proj"], use_dora=True))
    _perturb(pm)
    ours = copy.deepcopy(base)
    inject_lora(ours, LoRASpec(r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "down_proj"), use_dora=True))
    with torch.no_grad():
        for n, m in lora_modules(ours).items():
            layer = pm.get_submodule(f"base_model.model.{n}")
            m.lora_A.weight.copy_(layer.lora_A["default"].weight)
            m.lora_B.weight.copy_(layer.lora_B["default"].weight)
            m.lora_magnitude_vector.copy_(layer.lora_magnitude_vector["default"].weight)
    merged_theirs = pm.merge_and_unload()
    merged_ours = merge_and_unload(ours, torch.float32)
    theirs_sd = merged_theirs.state_dict()
    for name, tensor in merged_ours.state_dict().items():
        torch.testing.assert_close(tensor, theirs_sd[name], rtol=1e-5, atol=1e-6)


def test_dora_needs_a_rank() -> None:
    with pytest.raises(FieldError, match="use_dora"):
        LoRALinear(nn.Linear(8, 8), 0, use_dora=True)


def test_a_dora_adapter_on_a_4bit_model_gives_peft_s_logits_on_the_dequantized_model(tmp_path: Path) -> None:
    from fourbit.models import QuantConfig, quantize_model

    float_model = _tiny()
    q = copy.deepcopy(float_model)
    quantize_model(q, QuantConfig(compute_dtype="fp32"))
    dequantized = copy.deepcopy(q)
    for name, m in list(dequantized.named_modules()):
        if isinstance(m, Linear4bit):
            dequantized.set_submodule(name, m.to_float(torch.float32))
    inject_lora(q, LoRASpec(r=4, alpha=8, dropout=0.0, use_dora=True))
    _perturb(q)
    save_adapter(q, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(dequantized, str(tmp_path / "a")).eval()
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, q(ids).logits, rtol=1e-5, atol=1e-5)


def test_mixed_batch_serving_refuses_a_dora_adapter(tmp_path: Path) -> None:
    from fourbit.serve.adapters import read_adapter

    model = _tiny()
    inject_lora(model, LoRASpec(r=4, alpha=8, dropout=0.0, use_dora=True))
    save_adapter(model, tmp_path / "a")
    base = _tiny()
    with pytest.raises(FieldError, match="DoRA"):
        read_adapter(base, "d", tmp_path / "a")
    assert not lora_modules(base)  # the model is left as it was
