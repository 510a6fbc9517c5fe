"""What a GGUF file of a Llama-family model holds: tensor names, the Q/K row order, each tensor's type, and the
model's hyperparameters, as llama.cpp's ``convert_hf_to_gguf.py`` and ``llama-quantize`` lay them out.

- Names come from llama.cpp's own map (``gguf.get_tensor_name_map``): ``model.layers.3.self_attn.q_proj`` ->
  ``blk.3.attn_q``.
- For the ``llama`` architecture (Llama, Mistral), llama.cpp's rotary embedding pairs neighbouring dimensions
  while transformers pairs each half of a head with the other, so the converter reorders the rows of
  ``q_proj`` and ``k_proj`` per head (``LlamaModel.permute``); Qwen2 uses the half-split rotation and keeps its
  rows.
- Types follow llama-quantize's choices for the same file type (``llama_tensor_get_type``): 1-D tensors stay
  F32; for q4_0 and q4_k_m the output matrix (or the token embedding when it is tied to the output) is Q6_K;
  q4_k_m gives ``attn_v`` and ``ffn_down`` of the first and last eighth of the layers, and of every third layer
  between, Q6_K and everything else Q4_K; a row whose length is not a whole number of blocks falls back as
  llama.cpp does (Q4_K -> Q5_0, Q6_K -> Q8_0, then F16).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fourbit._errors import FieldError

__all__ = ["ARCHITECTURES", "FOUR_BIT_TYPES", "GGUF_TYPES", "Arch", "add_hyperparameters", "arch_of", "check_type",
           "gguf_name", "permute_rows", "quantize_tensor", "reference_quantize", "rope_freqs", "tensor_type"]

GGUF_TYPES = ("f16", "bf16", "q8_0", "q4_0", "q4_k_m")
FOUR_BIT_TYPES = ("q4_0", "q4_k_m")


@dataclass(frozen=True)
class Arch:
    """A transformers architecture and how llama.cpp stores it."""

    gguf_arch: str  # general.architecture
    permute_qk: bool  # reorder q/k rows for llama.cpp's neighbour-pair rotation


ARCHITECTURES = {"llama": Arch("llama", True), "mistral": Arch("llama", True), "qwen2": Arch("qwen2", False)}


def arch_of(config: Any) -> Arch:
    """The :class:`Arch` of a transformers config.

    Raises:
        NotImplementedError: an architecture GGUF export does not cover, named.
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise NotImplementedError(f"`model`: GGUF export covers the {', '.join(ARCHITECTURES)} architectures; "
                                  f"this model is {model_type}")
    if getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None):
        raise NotImplementedError(f"`model`: GGUF export does not cover mixture-of-experts {model_type} models")
    return ARCHITECTURES[model_type]


def _rope(config: Any) -> tuple[float, dict[str, Any]]:
    """(rope theta, scaling parameters) from a transformers 4 or 5 config."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = dict(getattr(config, "rope_scaling", None) or params)
    theta = getattr(config, "rope_theta", None) or params.get("rope_theta") or 10000.0
    return float(theta), scaling


def _head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def add_hyperparameters(writer, config: Any, arch: Arch, file_type: int, name: str) -> None:
    """``general.*`` and ``<arch>.*`` keys as ``convert_hf_to_gguf.py`` writes them.

    Raises:
        NotImplementedError: a rotary scaling llama.cpp's architecture would not reproduce, named.
    """
    from gguf import GGML_QUANT_VERSION, RopeScalingType

    writer.add_type("model")
    writer.add_name(name)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    theta, scaling = _rope(config)
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    head_dim = _head_dim(config)
    if arch.gguf_arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(scaling["original_max_position_embeddings"]))
    elif kind not in ("default", "llama3"):  # llama3 is a rope_freqs tensor (rope_freqs below)
        raise NotImplementedError(f"`model`: rotary scaling {kind!r} is not exported to GGUF")
    writer.add_file_type(file_type)
    writer.add_quantization_version(GGML_QUANT_VERSION)


def rope_freqs(config: Any) -> torch.Tensor | None:
    """The ``rope_freqs.weight`` tensor of Llama-3.1-style rotary scaling (``LlamaModel.generate_extra_tensors``),
    else None."""
    import math

    _, scaling = _rope(config)
    if scaling.get("rope_type", scaling.get("type")) != "llama3":
        return None
    theta, _ = _rope(config)
    dim = _head_dim(config)
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = scaling.get("factor", 8.0)
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_len = scaling.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_len / high:
            factors.append(1.0)
        elif wavelen > old_len / low:
            factors.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def tensor_name_map(config: Any):
    """llama.cpp's tensor name map (``gguf.get_tensor_name_map``) for the config's architecture and depth.

    Raises:
        NotImplementedError: an architecture GGUF export does not cover (:func:`arch_of`), named.
    """
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    gguf_arch = arch_of(config).gguf_arch
    code = next(k for k, v in MODEL_ARCH_NAMES.items() if v == gguf_arch)
    return get_tensor_name_map(code, config.num_hidden_layers)


def gguf_name(name_map, hf_name: str) -> str:
    """llama.cpp's name for the transformers tensor ``hf_name``.

    Raises:
        NotImplementedError: a tensor llama.cpp's map for the architecture has no name for.
    """
    mapped = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if mapped is None:
        raise NotImplementedError(f"`model`: tensor {hf_name} has no llama.cpp name for this architecture")
    return mapped


def permute_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """``LlamaModel.permute``: per head, rows ``[first half, second half]`` become interleaved pairs.
    ``weight`` is [n_head · head_dim, ...] (a weight or a bias, or a LoRA B)."""
    head_rows = weight.shape[0] // n_head
    return (weight.reshape(n_head, 2, head_rows // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape))


def _more_bits(layer: int, n_layers: int) -> bool:
    """llama-quantize's ``use_more_bits``: the first and last eighth of the layers and every third between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def tensor_type(name: str, shape: tuple[int, ...], gguf_type: str, n_layers: int, has_output: bool):
    """The ``GGMLQuantizationType`` llama.cpp gives tensor ``name`` (numpy shape ``shape``) in a ``gguf_type``
    file."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as T

    if len(shape) < 2:
        return T.F32
    default = {"f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_k_m": T.Q4_K}[gguf_type]
    chosen = default
    if gguf_type in FOUR_BIT_TYPES:
        if name == "output.weight" or (not has_output and name == "token_embd.weight"):
            chosen = T.Q6_K
        elif gguf_type == "q4_k_m" and (".attn_v." in name or ".ffn_down." in name):
            chosen = T.Q6_K if _more_bits(int(name.split(".")[1]), n_layers) else T.Q4_K
    columns = shape[-1]
    if columns % GGML_QUANT_SIZES[chosen][0]:
        chosen = {T.Q4_K: T.Q5_0, T.Q6_K: T.Q8_0}.get(chosen, T.F16)
    if columns % GGML_QUANT_SIZES[chosen][0]:
        chosen = T.F16
    return chosen


def _compiled_kernels():
    """fourbit's compiled CPU kernels when they run here (a C compiler built them, and ``FOURBIT_KERNELS`` is
    not ``reference``), else None."""
    from fourbit.kernels.dispatch import backend_for

    backend = backend_for(torch.empty(0))
    return backend if hasattr(backend, "quantize_ggml") else None


def reference_quantize(values: np.ndarray, qtype, importance: np.ndarray | None = None) -> np.ndarray:
    """:func:`quantize_tensor` in numpy: ``gguf.quants`` for Q8_0, :mod:`.kquants` for Q4_0, Q5_0, Q4_K and
    Q6_K. The reference the compiled kernels match byte for byte."""
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    from .kquants import quantize_q4_0, quantize_q4_k, quantize_q5_0, quantize_q6_k

    if qtype == T.F32:
        return values.astype(np.float32)
    if qtype == T.F16:
        return values.astype(np.float16)
    weighted = {T.Q4_K: quantize_q4_k, T.Q6_K: quantize_q6_k, T.Q4_0: quantize_q4_0, T.Q5_0: quantize_q5_0}
    if qtype in weighted:
        return weighted[qtype](values, importance)
    return quants.quantize(values, qtype)


def quantize_tensor(values: np.ndarray, qtype, importance: np.ndarray | None = None) -> np.ndarray:
    """``values`` (float32, numpy layout, finite) in GGML type ``qtype``: float arrays for F32/F16, bytes
    otherwise. Q8_0, Q4_0, Q5_0, Q4_K and Q6_K run fourbit's compiled kernels (``csrc/ggml_quants.c``, on every
    core) where they are available, else :func:`reference_quantize`, which gives the same bytes.

    ``importance`` (float32 [columns], or None) weighs each column's rounding error, as llama-quantize's
    importance matrix does (``quant_weights``): Q4_0, Q5_0, Q4_K and Q6_K use it; Q8_0 and the float types
    ignore it."""
    kernels = _compiled_kernels()
    if kernels is None or qtype.name not in kernels.GGML_BLOCKS or values.ndim < 1:
        return reference_quantize(values, qtype, importance)
    rows = np.ascontiguousarray(values, dtype=np.float32)
    if not rows.flags.writeable:  # torch.from_numpy wants a writable array; the kernel only reads it
        rows = rows.copy()
    weights = None if importance is None else torch.from_numpy(np.array(importance, dtype=np.float32).reshape(-1))
    return kernels.quantize_ggml(torch.from_numpy(rows), qtype.name, weights).numpy()


def check_type(gguf_type: str, field: str = "gguf_type") -> str:
    """``gguf_type`` if it is one of :data:`GGUF_TYPES`, else a :class:`FieldError` naming ``field``."""
    if gguf_type not in GGUF_TYPES:
        raise FieldError(field, f"must be one of {', '.join(GGUF_TYPES)}; got {gguf_type!r}")
    return gguf_type
