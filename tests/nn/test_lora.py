"""LoRA layer, injection, merge and the parameter report, checked against peft on a tiny llama."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _tiny_models import make_llama
from torch import nn

from fourbit._errors import FieldError
from fourbit.nn.info import fourbit_info
from fourbit.nn.lora import (
    LoRALinear,
    LoRASpec,
    find_target_modules,
    inject_lora,
    lora_modules,
    lora_spec,
    merge_and_unload,
    trainable_parameters,
    trainable_parameters_report,
)


def _peft():
    """peft is a test oracle (the dev extra): imported only by the tests that compare against it."""
    import peft

    return peft


def _tiny_llama(seed: int = 0):
    return make_llama(seed, vocab_size=256, max_position_embeddings=128, pad_token_id=None).eval()


def _randomize_b(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in lora_modules(model).values():
        with torch.no_grad():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.05)


def test_lora_forward_formula_and_init() -> None:
    torch.manual_seed(0)
    base = nn.Linear(64, 96)
    layer = LoRALinear(base, r=8, alpha=16, dropout=0.0)
    # peft init: B = 0, A ~ U(-b, b) with Kaiming-uniform a=sqrt(5) -> b = 1/sqrt(fan_in)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    assert layer.lora_A.weight.abs().max() <= 1 / math.sqrt(64)
    x = torch.randn(3, 5, 64)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)
    nn.init.normal_(layer.lora_B.weight)
    expected = base(x) + 2.0 * (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    # fp32 matmuls in a different association order: 1e-5 relative is float32 rounding
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert not base.weight.requires_grad and layer.lora_A.weight.requires_grad


def test_rslora_scaling() -> None:
    assert LoRALinear(nn.Linear(8, 8), r=16, alpha=16, use_rslora=True).scaling == pytest.approx(4.0)
    assert LoRALinear(nn.Linear(8, 8), r=16, alpha=16).scaling == pytest.approx(1.0)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_matches_peft_logits_and_report(use_rslora: bool) -> None:
    peft = _peft()
    ours = _tiny_llama()
    theirs = copy.deepcopy(ours)
    names = inject_lora(ours, LoRASpec(r=8, alpha=16, dropout=0.0, use_rslora=use_rslora))
    _randomize_b(ours)
    cfg = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                          use_rslora=use_rslora)
    pm = peft.get_peft_model(theirs, cfg)
    peft_targets = {n.removeprefix("base_model.model.") for n, m in pm.named_modules()
                    if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert set(names) == peft_targets  # "all-linear" selects the same modules (lm_head excluded)
    sd = {}
    for n, m in lora_modules(ours).items():
        sd[f"base_model.model.{n}.lora_A.default.weight"] = m.lora_A.weight
        sd[f"base_model.model.{n}.lora_B.default.weight"] = m.lora_B.weight
    missing = pm.load_state_dict(sd, strict=False)
    assert not missing.unexpected_keys
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        # same fp32 math in the same order: only reduction-order noise
        torch.testing.assert_close(ours(ids).logits, pm(ids).logits, rtol=1e-5, atol=1e-5)
    t, a = pm.get_nb_trainable_parameters()
    assert trainable_parameters(ours) == (t, a)
    assert trainable_parameters_report(ours).startswith(f"trainable params: {t:,d} || all params: {a:,d}")


def test_report_counts_tied_weights_once() -> None:
    peft = _peft()
    model = make_llama(0, vocab_size=256, num_hidden_layers=1, tie_word_embeddings=True, pad_token_id=None,
                       max_position_embeddings=2048)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    inject_lora(model, LoRASpec(r=4, target_modules=("q_proj",)))
    assert trainable_parameters(model) == theirs.get_nb_trainable_parameters()


def test_named_targets_and_errors() -> None:
    model = _tiny_llama()
    assert find_target_modules(model, ["q_proj", "v_proj"]) == [
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    ]
    with pytest.raises(ValueError, match="matched no linear module"):
        find_target_modules(model, ["nope"])
    with pytest.raises(ValueError, match="Embedding"):
        find_target_modules(model, ["embed_tokens"])
    inject_lora(model, LoRASpec(r=4, target_modules=("q_proj",)))
    with pytest.raises(ValueError, match="already has LoRA"):
        inject_lora(model, LoRASpec(r=4))
    for bad in ({"r": 0}, {"alpha": 0}, {"dropout": 1.0}, {"target_modules": ()}):
        with pytest.raises(FieldError) as refused:
            LoRASpec(**bad)
        assert refused.value.field == next(iter(bad))


def test_merge_unmerge_plain_base() -> None:
    model = _tiny_llama()
    inject_lora(model, LoRASpec(r=8, alpha=16, dropout=0.0))
    _randomize_b(model)
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        ref = model(ids).logits
        w0 = {n: m.base.weight.clone() for n, m in lora_modules(model).items()}
        for m in lora_modules(model).values():
            m.merge()
        # merged weight W + sBA in fp32: rounding of the add only
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-5)
        for m in lora_modules(model).values():
            m.unmerge()
        for n, m in lora_modules(model).items():
            torch.testing.assert_close(m.base.weight, w0[n], rtol=0, atol=1e-6)
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-5)
        merge_and_unload(model)
        assert not lora_modules(model)
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-5)


def test_safe_merge_rejects_nan() -> None:
    layer = LoRALinear(nn.Linear(8, 8), r=2, alpha=2)
    with torch.no_grad():
        layer.lora_B.weight.fill_(float("nan"))
    w = layer.base.weight.clone()
    with pytest.raises(ValueError, match="NaN"):
        layer.merge()
    assert torch.equal(layer.base.weight, w) and not layer.merged


# ------------------------------------------------------------------------------------------- QLoRA (4-bit)
def _quantize(model: nn.Module) -> nn.Module:
    from fourbit.nn import Linear4bit

    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and not name.endswith("lm_head"):
            model.set_submodule(name, Linear4bit.from_linear(m, compute_dtype=torch.float32))
    return model


def test_qlora_layer_forward_backward() -> None:
    from fourbit.nn import Linear4bit

    torch.manual_seed(0)
    base = Linear4bit.from_linear(nn.Linear(64, 96), compute_dtype=torch.float32)
    layer = LoRALinear(base, r=8, alpha=16)
    nn.init.normal_(layer.lora_B.weight, std=0.1)
    x = torch.randn(4, 64, requires_grad=True)
    y = layer(x)
    w = base.dequantize(torch.float32)
    ref = x @ w.T + base.bias + 2.0 * (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    # the 4-bit path dequantizes then matmuls in fp32: same math as the reference up to fp32 rounding
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    assert base.weight.grad is None and not base.weight.requires_grad
    assert layer.lora_A.weight.grad is not None and layer.lora_B.weight.grad is not None
    assert x.grad is not None


def test_qlora_report_counts_logical_params_and_merge_to_16bit() -> None:
    plain = _tiny_llama()
    q = _quantize(copy.deepcopy(plain))
    inject_lora(plain, LoRASpec(r=8))
    inject_lora(q, LoRASpec(r=8, dropout=0.0))
    assert trainable_parameters(q) == trainable_parameters(plain)  # 4-bit weights count as in*out
    _randomize_b(q)
    ids = torch.randint(0, 256, (2, 8))
    layers = lora_modules(q)
    originals = {n: m.base for n, m in layers.items()}
    with torch.no_grad():
        ref = q(ids).logits
        for m in layers.values():
            m.merge(dtype=torch.float32)
            assert isinstance(m.base, nn.Linear) and m.base.weight.dtype == torch.float32
        # merged = dequantized W + sBA exactly as the unmerged forward computes it: fp32 rounding only
        torch.testing.assert_close(q(ids).logits, ref, rtol=1e-4, atol=1e-4)
        for n, m in layers.items():
            m.unmerge()
            assert m.base is originals[n]  # the 4-bit layer comes back untouched
        torch.testing.assert_close(q(ids).logits, ref, rtol=0, atol=0)
        merge_and_unload(q)  # default dtype: the embeddings' (float32 here)
        q_proj = q.model.layers[0].self_attn.q_proj
        assert type(q_proj) is nn.Linear and q_proj.weight.dtype == torch.float32
        torch.testing.assert_close(q(ids).logits, ref, rtol=1e-4, atol=1e-4)


def test_qlora_merge_bf16_layer_accepts_fp32_activations() -> None:
    from fourbit.nn import Linear4bit

    torch.manual_seed(0)
    layer = LoRALinear(Linear4bit.from_linear(nn.Linear(64, 96), compute_dtype=torch.float32), r=4, alpha=8)
    nn.init.normal_(layer.lora_B.weight, std=0.1)
    x = torch.randn(3, 64)
    with torch.no_grad():
        ref = layer(x)
        layer.merge()  # default: a bfloat16 layer
        assert layer.base.weight.dtype == torch.bfloat16
        out = layer(x)
    assert out.dtype == torch.float32
    # bf16 weights and activations: 8 mantissa bits -> ~1% relative
    torch.testing.assert_close(out, ref, rtol=0.03, atol=0.03)


def test_unload_lora_restores_the_exact_base_model(tiny_llama):
    import torch

    from fourbit.models import QuantConfig, quantize_model
    from fourbit.nn.lora import LoRASpec, inject_lora, lora_modules, unload_lora

    quantize_model(tiny_llama, QuantConfig(compute_dtype="fp32"))
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        before = tiny_llama(ids).logits
        inject_lora(tiny_llama, LoRASpec(r=4, alpha=8, target_modules="all-linear"))
        for m in lora_modules(tiny_llama).values():
            torch.nn.init.normal_(m.lora_B.weight)  # a trained-looking adapter changes the output
        assert not torch.equal(tiny_llama(ids).logits, before)
        unload_lora(tiny_llama)
        assert not lora_modules(tiny_llama)
        assert torch.equal(tiny_llama(ids).logits, before)


def test_lora_spec_lives_in_fourbit_info() -> None:
    model = _tiny_llama()
    spec = LoRASpec(r=4, target_modules=("q_proj",))
    inject_lora(model, spec)
    assert lora_spec(model) is spec and fourbit_info(model).lora_spec is spec
    assert not hasattr(model, "fourbit_lora_spec")
    merge_and_unload(model)
    assert lora_spec(model) is None


def test_merged_4bit_layer_state_dict_holds_no_old_base() -> None:
    """A merge replaces the 4-bit base by a 16-bit layer; the 4-bit layer is kept for an exact unmerge, but
    outside the module tree: the merged model's state dict is that of a plain model, nothing beside it."""
    plain = _tiny_llama()
    q = _quantize(copy.deepcopy(plain))
    inject_lora(q, LoRASpec(r=4, dropout=0.0))
    _randomize_b(q)
    layer = q.model.layers[0].self_attn.q_proj
    original = layer.base
    layer.merge(dtype=torch.float32)
    assert sorted(layer.state_dict()) == ["base.weight", "lora_A.weight", "lora_B.weight"]
    assert not [k for k in q.state_dict() if "unmerged" in k]
    assert original not in list(q.modules())
    layer.unmerge()
    assert layer.base is original
    merge_and_unload(q, dtype=torch.float32)
    assert sorted(q.state_dict()) == sorted(plain.state_dict()), "merged: exactly a plain model's keys"
    assert all(type(m) is not type(original) for m in q.modules())


def test_adapter_params_are_the_protocol_for_the_trainable_tensors() -> None:
    from fourbit.nn.lora import mark_only_lora_trainable

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    inject_lora(model, LoRASpec(r=2, alpha=4, dropout=0.0))
    layers = lora_modules(model)
    expected = {id(p) for m in layers.values() for p in m.adapter_params().values()}
    assert len(expected) == 4 and set(next(iter(layers.values())).adapter_params()) == {"lora_A.weight",
                                                                                        "lora_B.weight"}
    for p in model.parameters():
        p.requires_grad_(True)
    mark_only_lora_trainable(model)
    assert {id(p) for p in model.parameters() if p.requires_grad} == expected


def test_adapters_disabled_gives_the_base_model_and_comes_back() -> None:
    from fourbit.nn.lora import adapters_disabled

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    x = torch.randn(3, 8)
    base_out = model(x)
    inject_lora(model, LoRASpec(r=2, alpha=4, dropout=0.0))
    for m in lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B.weight)
    adapted = model(x)
    assert not torch.allclose(adapted, base_out)
    with adapters_disabled(model):
        assert torch.equal(model(x), base_out)
        with torch.enable_grad():  # the training path too: no adapter term, no adapter gradient
            x2 = x.clone().requires_grad_(True)
            model(x2).sum().backward()
        assert all(p.grad is None for m in lora_modules(model).values() for p in m.adapter_params().values())
    assert torch.equal(model(x), adapted)
    next(iter(lora_modules(model).values())).merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        with adapters_disabled(model):
            pass
