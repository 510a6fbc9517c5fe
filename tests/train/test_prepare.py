"""prepare_model_for_training: frozen base, fp32 norms, input grads, checkpointing."""

from __future__ import annotations

import torch
from _tiny_models import make_llama

from fourbit.nn.lora import LoRASpec, inject_lora
from fourbit.train.prepare import prepare_model_for_training


def test_prepare_freezes_and_upcasts() -> None:
    model = make_llama().to(torch.bfloat16)
    prepare_model_for_training(model, gradient_checkpointing=True)
    assert not any(p.requires_grad for p in model.parameters())
    assert model.model.norm.weight.dtype == torch.float32
    assert model.model.layers[0].input_layernorm.weight.dtype == torch.float32
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16  # big weights untouched
    assert model.is_gradient_checkpointing
    emb = model.get_input_embeddings()(torch.tensor([[1, 2]]))
    assert emb.requires_grad  # input grads on with checkpointing


def test_adapters_on_upper_layer_only_get_grads() -> None:
    model = make_llama()
    prepare_model_for_training(model)
    inject_lora(model, LoRASpec(r=4, dropout=0.0, target_modules=r"model\.layers\.1\..*proj"))
    torch.nn.init.normal_(model.model.layers[1].self_attn.q_proj.lora_B.weight)
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".layers.1." in n and ".lora_" in n for n in grads)


def _qlora_grads(policy: str | None, dtype: str = "fp32", count: list | None = None):
    """The adapter gradients of one forward/backward of a tiny 4-bit llama with LoRA, under ``policy``
    (None: no checkpointing); ``count`` collects the dequantizations of 4-bit weights."""
    from unittest import mock

    from fourbit.models import QuantConfig, quantize_model
    from fourbit.nn import lora_matmul

    torch.manual_seed(0)
    model = make_llama(num_hidden_layers=3)
    quantize_model(model, QuantConfig(compute_dtype=dtype))
    prepare_model_for_training(model, gradient_checkpointing=policy is not None, input_grads=True,
                               checkpoint_policy=policy or "keep-matmuls")
    inject_lora(model, LoRASpec(r=4, alpha=8, dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    model.train()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    real = lora_matmul.frozen_weight

    def counting(base, dt):
        if count is not None:
            count.append(base)
        return real(base, dt)

    with mock.patch.object(lora_matmul, "frozen_weight", counting):
        model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_checkpoint_policies_give_the_gradients_of_no_checkpointing() -> None:
    plain = _qlora_grads(None)
    for policy in ("auto", "keep-matmuls", "full"):
        grads = _qlora_grads(policy)
        assert grads.keys() == plain.keys()
        for name in plain:
            # the same operations on the same values: recomputation is deterministic on the CPU
            torch.testing.assert_close(grads[name], plain[name], rtol=1e-6, atol=1e-8, msg=name)


def test_keep_matmuls_reuses_the_forward_matmuls_instead_of_recomputing_them() -> None:
    plain, keep, full = [], [], []
    _qlora_grads(None, count=plain)
    _qlora_grads("keep-matmuls", count=keep)
    _qlora_grads("full", count=full)
    layers = 3 * 7  # 3 decoder layers x (q, k, v, o, gate, up, down)
    assert len(plain) == 2 * layers  # forward + backward, one dequantization each per 4-bit layer
    assert len(keep) == 2 * layers  # nothing dequantized again for the recomputation
    assert len(full) == 3 * layers  # forward, recomputation, backward


def test_auto_keeps_matmuls_of_short_sequences_and_recomputes_long_ones(monkeypatch) -> None:
    from fourbit.nn import lora as lora_mod

    short, long = [], []
    _qlora_grads("auto", count=short)  # 12 tokens <= AUTO_KEEP_MAX_SEQ_LEN: like keep-matmuls
    monkeypatch.setattr(lora_mod, "AUTO_KEEP_MAX_SEQ_LEN", 8)  # now 12 tokens are "long": like full
    _qlora_grads("auto", count=long)
    assert len(short) == 2 * 21 and len(long) == 3 * 21


def test_bf16_training_casts_frozen_float_parameters_but_not_buffers() -> None:
    from fourbit.models import QuantConfig, quantize_model

    model = make_llama()
    quantize_model(model, QuantConfig(compute_dtype="bf16"))
    prepare_model_for_training(model, activation_dtype=torch.bfloat16)
    assert model.model.norm.weight.dtype == torch.bfloat16
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.uint8  # packed 4-bit codes untouched
    assert all(b.dtype == torch.float32 for n, b in model.named_buffers() if "inv_freq" in n)
    inject_lora(model, LoRASpec(r=4, dropout=0.0))
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)  # fp32 master adapters
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model.model(torch.tensor([[1, 2, 3]])).last_hidden_state
    assert hidden.dtype == torch.bfloat16  # activations stay bf16 end to end


def test_an_unknown_checkpoint_policy_names_the_field() -> None:
    import pytest

    from fourbit._errors import FieldError

    with pytest.raises(FieldError, match="checkpoint_policy"):
        prepare_model_for_training(make_llama(), gradient_checkpointing=True, checkpoint_policy="some")
