"""Preparing a (4-bit) model for adapter training (QLoRA, Section 3 and Appendix B).

The base stays frozen; norms and other small parameters (1-D: norm weights, biases) are kept in float32
for stable statistics, unless training computes in bf16: then every frozen float parameter (embeddings,
norms, a plain output head) is cast to bf16 so that activations stay bf16 end to end instead of being
promoted to float32 by a float32 norm weight and cast back before every matmul (the norms still compute
their statistics in float32 inside). Input embeddings require grad so that activation checkpointing has a
graph to recompute into; checkpointing is the non-reentrant variant (it works with frozen inputs and
keyword args).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from fourbit._errors import FieldError
from fourbit.nn.fused import fuse_gated_mlps, fuse_rms_norms

__all__ = ["CHECKPOINT_POLICIES", "prepare_model_for_training"]

#: Gradient-checkpointing policies: keep the matmul outputs for sequences up to 1,024 tokens (auto), always
#: (keep-matmuls), or never (full: recompute everything).
CHECKPOINT_POLICIES = ("auto", "keep-matmuls", "full")


def prepare_model_for_training(
    model: nn.Module, *, gradient_checkpointing: bool = False, input_grads: bool | None = None,
    activation_dtype: torch.dtype | None = None, checkpoint_policy: str = "auto",
) -> nn.Module:
    """Freeze every parameter, upcast 1-D floating parameters to float32 (or cast every floating parameter to
    ``activation_dtype``), give Llama-style gated MLPs and RMSNorms their fused kernels (:mod:`fourbit.nn.fused`),
    enable input grads and (optionally) non-reentrant gradient checkpointing. Modifies ``model`` in place and
    returns it.

    Call before :func:`fourbit.nn.lora.inject_lora` (which makes the adapters trainable again).

    Args:
        model: a transformers model, with ``nn.Linear`` or ``Linear4bit`` layers.
        gradient_checkpointing: recompute decoder-layer activations in backward (less memory, ~30% slower).
        input_grads: make the input embeddings' output require grad (peft's ``enable_input_require_grads``),
            which checkpointed segments need to have a graph. Default: on with gradient checkpointing, off
            without it, because it forces backward through every layer even when only the upper layers
            carry adapters.
        activation_dtype: the dtype training computes in, when it is not float32 (bf16 under autocast): the
            frozen float parameters are cast to it. Buffers (e.g. rotary frequencies) are left alone.
        checkpoint_policy: with gradient checkpointing, ``"keep-matmuls"`` keeps the LoRA layers' outputs and
            recomputes only the cheap parts of each layer (:func:`fourbit.nn.lora.keep_matmul_outputs`);
            ``"full"`` recomputes everything (least memory); ``"auto"`` keeps them for sequences of up to
            :data:`fourbit.nn.lora.AUTO_KEEP_MAX_SEQ_LEN` tokens, where the matmuls dominate the
            recomputation, and recomputes longer ones in full, where attention does.
    """
    if checkpoint_policy not in CHECKPOINT_POLICIES:
        raise FieldError("checkpoint_policy", f"must be one of {', '.join(CHECKPOINT_POLICIES)}, got "
                                              f"{checkpoint_policy!r}")
    for p in model.parameters():
        p.requires_grad_(False)
        if not p.is_floating_point():
            continue
        if activation_dtype is not None and activation_dtype != torch.float32:
            if p.dtype != activation_dtype:
                p.data = p.data.to(activation_dtype)
        elif p.ndim <= 1 and p.dtype != torch.float32:
            p.data = p.data.float()
    fuse_gated_mlps(model)
    fuse_rms_norms(model)
    if input_grads is None:
        input_grads = gradient_checkpointing
    if input_grads and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    if gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise NotImplementedError(f"{type(model).__name__} does not support gradient checkpointing; run "
                                      "without `gradient_checkpointing`")
        kwargs = {"use_reentrant": False}
        if checkpoint_policy != "full":
            from fourbit.nn.lora import AUTO_KEEP_MAX_SEQ_LEN, keep_matmul_outputs

            limit = AUTO_KEEP_MAX_SEQ_LEN if checkpoint_policy == "auto" else None
            kwargs["context_fn"] = functools.partial(keep_matmul_outputs, limit)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if hasattr(model, "config"):
            model.config.use_cache = False
    return model
