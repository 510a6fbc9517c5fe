"""A LoRA adapter alone as a llama.cpp LoRA GGUF (``llama-cli --lora FILE``), as ``convert_lora_to_gguf.py``
writes one.

Metadata ``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha``; for each adapted matrix
the two factors under the base tensor's GGUF name: ``blk.N.attn_q.weight.lora_a`` (A, [r, in]) and
``.lora_b`` (B, [out, r]). llama.cpp scales each pair by ``alpha / r``, one alpha for the file; fourbit folds
any other scaling (rsLoRA's ``alpha / sqrt(r)``, ranks that differ per layer) into B, so every layer adds
exactly the ``scaling · B·A`` it adds in fourbit. For the ``llama`` architecture B's rows get the same per-head
reordering as the base's q/k rows. Written atomically like the model file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .layout import arch_of, gguf_name, permute_rows, tensor_name_map
from .writer import check_gguf_output, write_atomically

__all__ = ["export_lora_gguf"]


def _pairs(model: nn.Module) -> tuple[list[tuple[str, np.ndarray, np.ndarray]], float]:
    """(GGUF base tensor name, A [r, in], B' [out, r]) for every LoRA layer, B' holding the folded scale."""
    from fourbit.nn.lora import lora_modules, lora_spec

    config = model.config
    arch = arch_of(config)
    spec = lora_spec(model)
    if spec is not None and spec.modules_to_save:
        raise NotImplementedError(f"`adapter`: it trains whole modules too ({', '.join(spec.modules_to_save)}); "
                                  "a llama.cpp LoRA file holds LoRA pairs only: export the merged model instead")
    layers = lora_modules(model)
    if not layers:
        raise ValueError("`adapter`: the model has no LoRA layers to export")
    if any(m.use_dora for m in layers.values()):
        raise NotImplementedError("`adapter`: it is a DoRA adapter, whose magnitude vectors a llama.cpp LoRA file "
                                  "cannot hold: export the merged model (--gguf without --lora-gguf) instead")
    name_map = tensor_name_map(config)
    first = next(iter(layers.values()))
    alpha = float(first.scaling * first.r)
    n_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    out = []
    with torch.no_grad():
        for name, layer in layers.items():
            if layer.fan_in_fan_out:
                raise NotImplementedError(f"`adapter`: layer {name} is a Conv1D (fan_in_fan_out) layer")
            target = gguf_name(name_map, f"{name}.weight")
            a = layer.lora_A.weight.detach().float().cpu()
            b = layer.lora_B.weight.detach().float().cpu() * (layer.scaling * layer.r / alpha)
            if arch.permute_qk and ".attn_q." in f".{target}":
                b = permute_rows(b, config.num_attention_heads)
            elif arch.permute_qk and ".attn_k." in f".{target}":
                b = permute_rows(b, n_kv)
            out.append((target, a.numpy(), b.contiguous().numpy()))
    return out, alpha


def export_lora_gguf(model: nn.Module, gguf_path: str | os.PathLike, *, name: str | None = None) -> Path:
    """Write the LoRA layers of ``model`` as a llama.cpp LoRA adapter GGUF file (float32 factors), atomically.

    Args:
        model: a model with LoRA layers (:func:`fourbit.nn.adapters.load_adapter` or training).
        gguf_path: the ``.gguf`` file to write.
        name: ``general.name``; default the file's stem.

    Returns:
        ``gguf_path`` as a Path.

    Raises:
        FieldError: a bad ``gguf_path``.
        NotImplementedError: an architecture GGUF export does not cover, whole trained modules
            (``modules_to_save``) or LoRA on a layer llama.cpp has no name for.
        OSError: the disk filled up (naming ``gguf_path``); nothing is left at ``gguf_path``.
    """
    import gguf

    out = check_gguf_output(gguf_path)
    pairs, alpha = _pairs(model)

    def fill(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, arch_of(model.config).gguf_arch)
        try:
            writer.add_type(gguf.GGUFType.ADAPTER)
            writer.add_name(name or out.stem)
            writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
            writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
            for target, a, b in pairs:
                writer.add_tensor(f"{target}.lora_a", np.ascontiguousarray(a, dtype=np.float32))
                writer.add_tensor(f"{target}.lora_b", np.ascontiguousarray(b, dtype=np.float32))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()

    write_atomically(out, fill)
    return out
