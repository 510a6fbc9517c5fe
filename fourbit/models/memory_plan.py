"""How much memory quantize, finetune, merge and generate will need, from config.json and the settings alone.

Parameter counts come from the model's skeleton built on the meta device (exact for every architecture
transformers builds, and free: no weight is read). Each command's peak is the sum of what it holds at its
worst moment, named term by term so that a user can see which setting to change:

- ``runtime``: the interpreter with torch and transformers imported (:data:`RUNTIME_BYTES`, measured);
- ``4-bit weights``: quantized parameters x bits / 8, with 4 + 8/64 + 32/(64*256) = 4.127 bits per parameter
  under NF4 + double quantization at block 64 (QLoRA, section 3), 4 + 32/64 = 4.5 without;
- ``float leftovers``: embeddings, norms, biases and an unquantized head, in the dtype the command keeps them
  (the checkpoint's for quantize, generate and merge; float32 for finetune, which loads them so);
- per command, its own working set (below, in each ``_plan_*`` function).

The estimate is of the process's peak resident memory above nothing (what ``ru_maxrss`` reports), within
±15 % of the measured peak for the models tests/models/test_memory_plan.py measures (the growth above the
imported runtime, where the terms live: quantize, generate, finetune at 256 and 4,096 tokens, merge). At the
8B shape (benchmarks/bench_scale.py, RESULTS.md) the finetune plan is 13.1 GiB for 1 x 8,192 tokens against
11.9 measured, and 8.6 for 1 x 1,024 against 6.9: the bf16 embedding stays mapped from the checkpoint and only
the rows a run reads become resident, which the plan does not count on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fourbit._errors import FieldError, InputFileError
from fourbit.models.config import QuantConfig

__all__ = ["RUNTIME_BYTES", "FinetuneSettings", "MemoryPlan", "ModelCounts", "float_bytes_of", "model_counts",
           "plan_memory", "quantized_bytes"]

#: RSS of a process that has imported torch, fourbit and transformers with its modeling code (measured: 463 MiB
#: for a llama on x86-64 Linux, torch 2.x, transformers 5; 258 MiB of it before transformers.modeling_utils)
RUNTIME_BYTES = 470 * 2**20
#: The most the ``auto`` checkpointing policy keeps of the LoRA layers' outputs (see :func:`keeps_matmul_outputs`).
AUTO_KEEP_MAX_BYTES = 2**30
_OPTIMIZER_STATE_BYTES = {32: 8, 8: 2}  # AdamW's two moments per trainable parameter, by state bits


@dataclass(frozen=True)
class FinetuneSettings:
    """The fine-tuning settings that decide memory (``TrainConfig``'s fields of the same names)."""

    max_length: int = 512
    batch_size: int = 4
    lora_r: int = 64
    target_modules: str | tuple[str, ...] = "all-linear"
    optimizer_bits: int = 32
    gradient_checkpointing: bool = False
    checkpoint_policy: str = "auto"
    loss_chunk_size: int = 1024
    compute_bytes: int = 4


@dataclass
class ModelCounts:
    """Parameter counts of a model, from its skeleton (no weights read)."""

    quantized_params: int
    float_params: int
    largest_quantized: int
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    kv_dim: int
    heads: int
    linear_shapes: list[tuple[str, int, int]] = field(default_factory=list)  # (name, in, out) of 4-bit layers

    @property
    def total_params(self) -> int:
        return self.quantized_params + self.float_params


@dataclass
class MemoryPlan:
    """Estimated peak RSS per command, in bytes, each with its terms (``{command: {term: bytes}}``)."""

    terms: dict[str, dict[str, int]]

    def peak(self, command: str) -> int:
        return sum(self.terms[command].values())


def model_counts(folder: str | os.PathLike, config: QuantConfig | None = None) -> ModelCounts:
    """Count the parameters ``config`` quantizes and those that stay float, from ``folder/config.json``.

    Raises:
        FieldError: ``folder`` has no config.json (naming ``model``).
        InputFileError: a config transformers cannot build a causal LM from.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from fourbit.models.quantize import quantization_targets
    from fourbit.models.stream import parameters_on_meta

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FieldError("model", f"{folder} holds no config.json; the plan is made from a model folder's config")
    config = config or QuantConfig()
    try:
        hf_config = AutoConfig.from_pretrained(folder)
        if hasattr(hf_config, "quantization_config"):
            del hf_config.quantization_config  # a 4-bit checkpoint: count its float skeleton
        with parameters_on_meta():
            model = AutoModelForCausalLM.from_config(hf_config)
    except (ValueError, KeyError) as err:
        raise InputFileError(folder / "config.json", f"transformers cannot build a causal LM from it: {err}") \
            from None
    targets, _ = quantization_targets(model, config)
    quantized, shapes = 0, []
    for name in targets:
        module = model.get_submodule(name)
        weights = [p for p in module.parameters(recurse=False) if p.dim() >= 2]
        n = sum(p.numel() for p in weights)
        quantized += n
        if isinstance(module, nn.Linear):
            shapes.append((name, module.in_features, module.out_features))
        elif weights and weights[0].dim() == 2:  # Conv1D: weight [in, out]
            shapes.append((name, weights[0].shape[0], weights[0].shape[1]))
    total = sum(p.numel() for p in model.parameters())
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    hidden = int(getattr(text, "hidden_size", 0) or getattr(text, "n_embd", 0))
    heads = int(getattr(text, "num_attention_heads", 0) or getattr(text, "n_head", 1))
    head_dim = int(getattr(text, "head_dim", 0) or hidden // max(heads, 1))
    kv_heads = int(getattr(text, "num_key_value_heads", 0) or heads)
    return ModelCounts(
        quantized_params=quantized, float_params=total - quantized,
        largest_quantized=max((i * o for _, i, o in shapes), default=0),
        layers=int(getattr(text, "num_hidden_layers", 0) or getattr(text, "n_layer", 0)), hidden=hidden,
        intermediate=int(getattr(text, "intermediate_size", 0) or getattr(text, "n_inner", 0) or 4 * hidden),
        vocab=int(text.vocab_size), kv_dim=kv_heads * head_dim, heads=heads, linear_shapes=shapes)


def quantized_bytes(params: int, config: QuantConfig) -> int:
    """Bytes of ``params`` 4-bit parameters with their constants (QLoRA, section 3)."""
    blocks = -(-params // config.blocksize)
    if config.double_quant:
        return params // 2 + blocks + 4 * -(-blocks // 256) + 4
    return params // 2 + 4 * blocks


def plan_memory(counts: ModelCounts, config: QuantConfig, *, float_bytes: int = 2,
                finetune: FinetuneSettings | None = None, new_tokens: int = 256, prompt_tokens: int = 512,
                merge_bytes: int = 2) -> MemoryPlan:
    """Estimated peak RSS of quantize, generate, finetune and merge.

    Args:
        counts: from :func:`model_counts`.
        config: the quantization.
        float_bytes: bytes per element of the checkpoint's float dtype (2 for bf16/fp16, 4 for fp32).
        finetune: the fine-tuning settings (default ``FinetuneSettings()``, TrainConfig's defaults).
        new_tokens, prompt_tokens: the generation's length.
        merge_bytes: bytes per element of the merged weights (2 for bf16/fp16).
    """
    q4 = quantized_bytes(counts.quantized_params, config)
    terms = {
        "quantize": _plan_quantize(counts, q4, float_bytes),
        "generate": _plan_generate(counts, q4, float_bytes, prompt_tokens + new_tokens),
        "finetune": _plan_finetune(counts, q4, finetune or FinetuneSettings()),
        "merge": _plan_merge(counts, q4, float_bytes, merge_bytes),
    }
    return MemoryPlan(terms)


def _plan_quantize(c: ModelCounts, q4: int, float_bytes: int) -> dict[str, int]:
    """Streaming quantization (:mod:`fourbit.models.stream`), then the save. The float leftovers stay in the
    checkpoint's dtype. The working set on top is the largest weight alive once as read and once in float32
    inside the quantizer; the save streams tensor by tensor (:func:`fourbit._io.save_safetensors`) and adds
    nothing that counts."""
    return {"runtime": RUNTIME_BYTES, "4-bit weights": q4, "float leftovers": c.float_params * float_bytes,
            "largest weight being quantized": c.largest_quantized * (float_bytes + 4)}


def _plan_generate(c: ModelCounts, q4: int, float_bytes: int, tokens: int) -> dict[str, int]:
    """A 4-bit checkpoint loaded as saved, a KV cache of ``tokens`` positions in the leftovers' dtype, one
    layer's weight dequantized to float32 for the prompt's matmuls, and the prompt's logits in float32: the
    transformers path (``--decoder hf``). The compiled decode step's own buffers (an int8 copy of the head, a
    float32 KV cache) are not planned yet."""
    return {"runtime": RUNTIME_BYTES, "4-bit weights": q4, "float leftovers": c.float_params * float_bytes,
            "KV cache": 2 * c.layers * c.kv_dim * tokens * float_bytes,
            "one weight dequantized": c.largest_quantized * 4, "logits": tokens * c.vocab * 4}


def _lora_params(c: ModelCounts, s: FinetuneSettings) -> int:
    """Trainable parameters: r x (in + out) for each targeted 4-bit layer."""
    names = s.target_modules
    chosen = [(n, i, o) for n, i, o in c.linear_shapes
              if names == "all-linear" or (isinstance(names, tuple) and n.rsplit(".", 1)[-1] in names)]
    return sum(s.lora_r * (i + o) for _, i, o in chosen)


def kept_matmul_output_bytes(c: ModelCounts, s: FinetuneSettings) -> int:
    """What the ``keep-matmuls`` checkpointing policy keeps: every LoRA layer's output (q, k, v, o, gate, up,
    down) for every token of every layer, in the compute dtype."""
    per_token = (3 * c.hidden + 2 * c.kv_dim + 2 * c.intermediate) * s.compute_bytes
    return s.batch_size * s.max_length * c.layers * per_token


def keeps_matmul_outputs(c: ModelCounts, s: FinetuneSettings) -> bool:
    """Whether a run with these settings keeps the LoRA layers' outputs through gradient checkpointing.

    ``keep-matmuls`` always does and ``full`` never; ``auto`` does for sequences of up to
    :data:`fourbit.nn.lora_matmul.AUTO_KEEP_MAX_SEQ_LEN` tokens when what it keeps costs at most
    :data:`AUTO_KEEP_MAX_BYTES`: it saves a matmul pass (about a fifth of the step) but at 8B and 1,024
    tokens it would keep 2.6 GiB in bf16, half as much again as the 4-bit weights; there memory is the point."""
    from fourbit.nn.lora_matmul import AUTO_KEEP_MAX_SEQ_LEN

    if not s.gradient_checkpointing or s.checkpoint_policy == "full":
        return False
    if s.checkpoint_policy == "keep-matmuls":
        return True
    return s.max_length <= AUTO_KEEP_MAX_SEQ_LEN and kept_matmul_output_bytes(c, s) <= AUTO_KEEP_MAX_BYTES


def _plan_finetune(c: ModelCounts, q4: int, s: FinetuneSettings) -> dict[str, int]:
    """The 4-bit base with its float leftovers in the compute dtype (training casts them so), the adapter with
    its gradient and AdamW's two moments, the activations autograd keeps, and the loss's logits chunk.

    Activations per token and decoder layer (compute dtype): the input of every linear layer and the output
    of every matmul it feeds (hidden: q, o, two norms, the residuals, x4 for attention's inputs and outputs;
    intermediate: gate, up, their product and activation), plus attention's softmax statistics (heads, float32):
    transformers runs attention through torch's ``scaled_dot_product_attention``, whose CPU kernel never holds
    the heads x length x length probabilities (at 8,192 tokens on the 8B shape they would be 8 GiB per layer;
    benchmarks/RESULTS.md measures the step), and the batch's boolean mask (length x length). In a layer's
    backward its gradients are alive beside its activations: one more set (measured on a 2-layer model at
    1,024-4,096 tokens, fp32: 205 KB per token against 98 KB planned before that term). With gradient
    checkpointing each layer's input is kept, and one layer's full set while it is recomputed; the
    ``keep-matmuls`` policy (``auto`` up to 1,024 tokens) also keeps every LoRA layer's output (q, k, v, o,
    gate, up, down) so that the recomputation skips the matmuls."""
    tokens = s.batch_size * s.max_length
    lora = _lora_params(c, s)
    per_layer = (10 * c.hidden + 2 * c.kv_dim + 4 * c.intermediate) * s.compute_bytes + 4 * c.heads
    mask = s.batch_size * s.max_length * s.max_length
    if s.gradient_checkpointing:
        kept = kept_matmul_output_bytes(c, s) if keeps_matmul_outputs(c, s) else 0
        activations = tokens * c.layers * c.hidden * s.compute_bytes + kept + 2 * tokens * per_layer + mask
    else:
        activations = tokens * (c.layers + 1) * per_layer + mask
    chunk = min(tokens, s.loss_chunk_size or tokens)
    return {"runtime": RUNTIME_BYTES, "4-bit weights": q4, "float leftovers": c.float_params * s.compute_bytes,
            "adapter, gradient and optimizer": lora * (8 + _OPTIMIZER_STATE_BYTES.get(s.optimizer_bits, 8)),
            "activations": activations, "logits chunk": 3 * chunk * c.vocab * 4,
            "one weight dequantized": c.largest_quantized * s.compute_bytes}


def _plan_merge(c: ModelCounts, q4: int, float_bytes: int, merge_bytes: int) -> dict[str, int]:
    """``fourbit merge`` of a 4-bit base (:func:`fourbit.train.merge.write_merged_shards`): the 4-bit model with
    its float leftovers in the checkpoint's dtype and the adapter, and one layer at a time merged in float32
    (the dequantized weight and the update ``s·B·A``, summed in place) and cast to the merged dtype for
    writing."""
    return {"runtime": RUNTIME_BYTES, "4-bit weights": q4, "float leftovers": c.float_params * float_bytes,
            "one layer merged": c.largest_quantized * (2 * 4 + merge_bytes)}


def float_bytes_of(folder: str | os.PathLike) -> int:
    """Bytes per element of the folder's float weights (from the safetensors headers; 2 when it has none)."""
    from fourbit.models.locate import safetensors_files
    from fourbit.models.stream import CheckpointTensors

    folder = Path(folder)
    files = safetensors_files(folder)
    if not files:
        return 2
    dtype = CheckpointTensors(folder, files).dtype()
    return torch.empty(0, dtype=dtype).element_size()
