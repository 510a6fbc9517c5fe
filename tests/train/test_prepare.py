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
