"""Shard the frozen 4-bit base of a LoRA model over the ranks with FSDP2 (``torch.distributed.fsdp.fully_shard``).

QLoRA's memory is the base; its gradients are the adapter's. So only the base is sharded: each decoder layer
becomes one FSDP2 group holding its packed NF4 weights (``Linear4bit.weight``, uint8) and its norms; each rank
keeps ``1/N`` of those bytes, and FSDP2 all-gathers a layer's bytes just before its forward and again before its
backward, then frees them. The adapter (LoRA weights, ``modules_to_save``) is left out of the groups
(``ignored_params``): every rank keeps it whole, the trainer sums its gradients over the ranks, and checkpoints
and the saved adapter are the same as in a single-process run.

``Linear4bit`` needs no special case: its quantization constants are registered buffers, which FSDP2 keeps whole
on every rank (0.127 of the 4.127 bits per parameter: 3 % of the base), and the frozen matmul reads the weight
from the module in forward and again in backward (:class:`fourbit.nn.linear4bit.FrozenMatMul4bit`), so it
multiplies by whatever FSDP2 has gathered there. All-gathering bytes is exact, so a sharded run computes the
same numbers as a replicated one. A mixed-precision policy that casts parameters (``param_dtype``) would cast the
packed bytes to floats and silently destroy the weights; it is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fourbit._errors import FieldError
from fourbit.nn.linear4bit import Linear4bit

__all__ = ["ShardReport", "decoder_layers", "shard_4bit_base"]

@dataclass
class ShardReport:
    """Bytes of the sharded base: ``local`` on this rank, ``total`` over all ranks (both without the adapter and
    the parts left whole: embeddings, final norm, output head); ``replicated``: the decoder layers' buffers (the
    4-bit quantization constants, about 3 % of the base), which every rank keeps whole."""

    local: int
    total: int
    layers: int
    replicated: int = 0


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a transformers causal LM or classifier (``model.get_decoder().layers``).

    Raises:
        NotImplementedError: a model without such a list.
    """
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "base_model", None)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise NotImplementedError(f"`distributed` fsdp shards a model layer by layer and {type(model).__name__} "
                                  "has no list of decoder layers (`get_decoder().layers`); use `distributed` ddp")
    return layers


def _local_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def shard_4bit_base(model: nn.Module, *, param_dtype: torch.dtype | None = None, mesh: Any = None) -> ShardReport:
    """Shard each decoder layer's frozen weights over the ranks of the default process group (FSDP2).

    Call after the adapter is injected (its trainable parameters stay whole on every rank) and before the
    optimizer is built. The model is modified in place and stays sharded.

    Args:
        model: a transformers model with LoRA, 4-bit or not.
        param_dtype: FSDP2's mixed-precision parameter dtype; refused when a layer holds integer tensors
            (packed 4-bit weights, 8-bit quantization constants), which it would cast.
        mesh: an FSDP2 device mesh (default: all ranks).

    Returns:
        A :class:`ShardReport` of this rank's bytes.

    Raises:
        FieldError: ``param_dtype`` with a 4-bit base (``param_dtype``).
        NotImplementedError: a model without decoder layers.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    layers = decoder_layers(model)
    if param_dtype is not None:
        integer = [n for n, p in layers.named_parameters() if not p.is_floating_point()]
        integer += [n for n, m in layers.named_modules() if isinstance(m, Linear4bit)]
        if integer:
            raise FieldError("param_dtype", f"a mixed-precision policy casting parameters to {param_dtype} would "
                                            f"cast the packed 4-bit bytes and their constants ({integer[0]}) to "
                                            "floats, destroying them; leave `param_dtype` unset (the 4-bit layers "
                                            "compute in their own compute dtype)")
    for layer in layers:
        ignored = {p for p in layer.parameters() if p.requires_grad}
        fully_shard(layer, mesh=mesh, reshard_after_forward=True, ignored_params=ignored,
                    mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype))
    local = total = replicated = 0
    for layer in layers:
        for p in layer.parameters():
            if not p.requires_grad:
                local += _local_bytes(p)
                total += p.numel() * p.element_size()
        replicated += sum(b.numel() * b.element_size() for b in layer.buffers())
    return ShardReport(local, total, len(layers), replicated)
