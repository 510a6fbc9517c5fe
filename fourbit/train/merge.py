"""Merging a trained adapter into its base: a 16/32-bit model folder that plain ``transformers`` loads.

The adapter is merged onto the weights it was trained against. For a QLoRA adapter those are the base's
*dequantized* 4-bit weights, so the base is quantized exactly as in training (type and double quantization
from the run's ``train_config.yaml``) and every layer is then dequantized; merging onto the original 16-bit
weights instead would add an update learned against other weights. Re-quantizing the merged model to 4 bits
would round most of the small update away, so the result stays 16/32-bit.

The base model and its quantization come from the run that trained the adapter; a different ``model`` or
``quant`` than the run's is refused (naming both) unless ``force`` is given.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fourbit._errors import FieldError
from fourbit._io import atomic_dir, check_output_dir
from fourbit.models import clear_fourbit_info

__all__ = ["MAX_SHARD_BYTES", "MERGE_DTYPES", "MergeBase", "merge_adapter", "merge_base", "plain_for_saving",
           "write_merged_shards"]

MERGE_DTYPES = ("bf16", "fp16", "fp32")

#: The largest merged shard (transformers' default is 5 GB); each tensor is computed and written in turn, so
#: the shard size bounds the files, not the memory.
MAX_SHARD_BYTES = 5 * 10**9
_QUANTS = ("nf4", "fp4", "none")


@dataclass(frozen=True)
class MergeBase:
    """The base an adapter is merged onto.

    Attributes:
        model: model folder / GGUF / hub id (None: the bundled SmolLM2-135M-Instruct).
        quant: ``nf4``, ``fp4`` or ``none`` (the base weights the adapter was trained against).
        double_quant: whether those were double-quantized (changes the dequantized weights slightly).
        source: the file these settings were read from (None: defaults, nothing recorded).
        loftq: the run's settings when it initialised with LoftQ over more than one iteration (its 4-bit base is
            then not the plain quantization of the model, and is rebuilt from them); else None.
    """

    model: str | None
    quant: str
    double_quant: bool
    source: Path | None
    loftq: dict[str, Any] | None = None


def _run_config(adapter_dir: Path) -> Path | None:
    """The ``train_config.yaml`` of the run that trained the adapter: beside it, or for a checkpoint folder
    (``<run>/checkpoints/step-N``) the run's."""
    candidates = [adapter_dir / "train_config.yaml"]
    if adapter_dir.parent.name == "checkpoints":
        candidates.append(adapter_dir.parent.parent / "train_config.yaml")
    return next((p for p in candidates if p.is_file()), None)


def _same_model(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return a == b
    return os.path.abspath(a) == os.path.abspath(b) if Path(a).exists() or Path(b).exists() else a == b


def merge_base(
    adapter_dir: str | os.PathLike,
    *,
    model: str | os.PathLike | None = None,
    quant: str | None = None,
    force: bool = False,
) -> MergeBase:
    """The base to merge ``adapter_dir`` onto: the run's recorded model and quantization, checked against
    what the caller asks for.

    Args:
        adapter_dir: a run folder written by ``fourbit finetune`` (or one of its checkpoints), or any peft
            LoRA adapter folder.
        model: the base model; default the one recorded with the adapter.
        quant: ``nf4``, ``fp4`` or ``none``; default the run's (``nf4`` when nothing is recorded).
        force: merge onto a ``model``/``quant`` other than the run's.

    Raises:
        FieldError: ``quant`` unknown, or ``model``/``quant`` differ from the run's without ``force``.
        ValueError: a damaged ``train_config.yaml`` (naming it).
    """
    from fourbit.nn.adapters import read_adapter_config

    from .config import TrainConfig, load_yaml_overrides

    adapter_dir = Path(adapter_dir)
    if quant is not None and quant not in _QUANTS:
        raise FieldError("quant", f"must be one of {', '.join(_QUANTS)}; got {quant!r}")
    adapter_cfg = read_adapter_config(adapter_dir)
    source = _run_config(adapter_dir)
    if source is not None:
        saved = {**TrainConfig().to_dict(), **load_yaml_overrides(source)}
        saved_model, saved_quant, saved_dq = saved["model"], saved["quant"], bool(saved["double_quant"])
    else:
        saved_model, saved_quant, saved_dq = adapter_cfg.get("base_model_name_or_path"), None, True
    model = None if model is None else str(model)
    if model is not None and source is not None and not _same_model(model, saved_model) and not force:
        raise FieldError("model", f"the adapter in {adapter_dir} was trained on "
                                  f"{saved_model or 'the bundled SmolLM2-135M-Instruct'} (see {source}), not "
                                  f"{model}: leave out `model`, or pass `force` to merge onto {model} anyway")
    if quant is not None and saved_quant is not None and quant != saved_quant and not force:
        raise FieldError("quant", f"the adapter in {adapter_dir} was trained on a {saved_quant} base (see "
                                  f"{source}), not {quant}: leave out `quant`, or pass `force` to merge onto "
                                  f"{quant} anyway")
    loftq = None
    if source is not None and saved.get("init_lora_weights") == "loftq" and int(saved.get("loftq_iter", 1)) > 1:
        loftq = {k: saved[k] for k in ("model", "quant", "double_quant", "lora_r", "lora_alpha", "target_modules",
                                       "use_rslora", "use_dora", "init_lora_weights", "loftq_iter")}
    return MergeBase(model if model is not None else saved_model, quant or saved_quant or "nf4", saved_dq, source,
                     loftq)


def plain_for_saving(model: Any) -> Any:
    """Drop the loading-time quantization markers (GGUF's hf_quantizer, quantization_config, fourbit's
    footprint) from a model whose weights are now plain tensors, so ``save_pretrained`` writes a normal
    16-bit folder. Returns the model."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    for attr in ("quantization_config", "fourbit"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    clear_fourbit_info(model)
    return model


def _dequantize_rest(model: Any) -> None:
    """Replace every remaining 4-bit layer (linear, Conv1D-born or experts) with its float32 form in the layer's
    own class and layout (``nn.Linear`` [out, in], GPT-2's ``Conv1D`` [in, out], the original experts module)."""
    import torch

    from fourbit.nn.experts import Experts4bit
    from fourbit.nn.linear4bit import Linear4bit, float_layer

    for name, m in list(model.named_modules()):
        if isinstance(m, Experts4bit):
            model.set_submodule(name, m.dequantized_module(torch.float32).requires_grad_(False))
        elif isinstance(m, Linear4bit):
            model.set_submodule(name, float_layer(m, torch.float32))


def _merged_entries(model: Any, dtype: Any) -> list[tuple[str, Any, tuple[int, ...], Any]]:
    """What ``save_pretrained`` of the merged model would write, computed one tensor at a time: ``(key, dtype,
    shape, produce)`` in state-dict order, where ``produce()`` makes that tensor (a LoRA layer merged and a 4-bit
    layer dequantized through :func:`fourbit.nn.linear4bit.float_layer`, in the layer's layout). A tied
    parameter is written once, under its first name (as transformers drops ``lm_head.weight`` tied to the input
    embeddings)."""
    from fourbit.nn.linear4bit import Linear4bit, float_layer, is_conv1d
    from fourbit.nn.lora import LoRALinear

    entries, seen, inside = [], set(), ()
    for name, module in model.named_modules():
        if inside and name.startswith(inside):
            continue
        prefix = f"{name}." if name else ""
        if isinstance(module, LoRALinear | Linear4bit):
            inside = (prefix,)
            make = (lambda m=module: m.merged_linear(dtype)) if isinstance(module, LoRALinear) else \
                (lambda m=module: float_layer(m, dtype))
            base = module.base if isinstance(module, LoRALinear) else module
            base = getattr(module, "_unmerged_base", None) or base
            conv = is_conv1d(base) or getattr(base, "layout", "linear") == "conv1d"
            out_f, in_f = module.out_features, module.in_features
            entries.append((prefix + "weight", dtype, (in_f, out_f) if conv else (out_f, in_f),
                            lambda make=make: make().weight))
            if base.bias is not None:
                entries.append((prefix + "bias", dtype, (out_f,), lambda make=make: make().bias))
            continue
        tensors = dict(module._parameters)
        tensors.update({k: v for k, v in module._buffers.items() if k not in module._non_persistent_buffers_set})
        for key, t in tensors.items():
            if t is None or id(t) in seen:
                continue
            seen.add(id(t))
            out_dtype = dtype if t.is_floating_point() else t.dtype
            entries.append((prefix + key, out_dtype, tuple(t.shape), lambda t=t, d=out_dtype: t.detach().to(d)))
    return entries


def write_merged_shards(model: Any, folder: str | os.PathLike, dtype: Any,
                        max_shard_bytes: int = MAX_SHARD_BYTES) -> list[Path]:
    """Write the merged weights of a 4-bit model with LoRA layers as transformers' sharded safetensors, one tensor
    in memory at a time: peak memory is the 4-bit model plus one layer's float weight, whatever the model's size.

    The files are ``model.safetensors`` (one shard) or ``model-0000i-of-0000n.safetensors`` with
    ``model.safetensors.index.json``, each at most ``max_shard_bytes`` (a larger single tensor gets a shard of
    its own), each written under a temporary name and renamed when complete.

    Returns:
        The shard files.
    """
    from fourbit._io import SafetensorsStreamWriter, atomic_write_text, tensor_nbytes
    from fourbit.models.stream import release_freed_memory

    entries = _merged_entries(model, dtype)
    shards: list[list] = [[]]
    size = 0
    for entry in entries:
        nbytes = tensor_nbytes(entry[1], entry[2])
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    folder = Path(folder)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for shard, file in zip(shards, names, strict=True):
        writer = SafetensorsStreamWriter(folder / file, [(k, d, s) for k, d, s, _ in shard])
        try:
            for key, _, _, produce in shard:
                writer.write(key, produce())
                release_freed_memory()  # the merged layer's buffers, heap-allocated below glibc's mmap threshold
        except BaseException:
            writer.abort()
            raise
        writer.close()
    if len(shards) > 1:
        total = sum(tensor_nbytes(d, s) for _, d, s, _ in entries)
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: file for shard, file in zip(shards, names, strict=True) for k, *_ in shard}}
        atomic_write_text(folder / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
    return [folder / n for n in names]


def _streamable(model: Any) -> bool:
    """Whether transformers saves this model's state dict under its own keys (no weight conversion on save, no
    4-bit experts, whose float form is the original module's): then :func:`write_merged_shards` writes what
    ``save_pretrained`` would, without building the float model."""
    from fourbit.nn.experts import Experts4bit

    if any(isinstance(m, Experts4bit) for m in model.modules()):
        return False
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:
        return True
    return not get_checkpoint_conversion_mapping(getattr(model.config, "model_type", None))


def _load_base(base: MergeBase, qc: Any) -> tuple[Any, Any]:
    """The base model as the adapter was trained on it: LoftQ's rebuilt 4-bit base, else ``load_model``. The
    float leftovers (embeddings, norms, head) stay in the checkpoint's dtype for a 4-bit base: the written bytes
    are the same as through float32, and an 8B's untied bf16 embeddings and head take 2 GB instead of 4."""
    import torch

    from fourbit.models import load_model

    if base.loftq is not None:
        from .config import TrainConfig
        from .loading import load_loftq_model

        return load_loftq_model(TrainConfig(**{**base.loftq, "model": base.model}), with_adapter=False)
    return load_model(base.model, quant=qc, torch_dtype=None if qc is not None else torch.float32)


def merge_adapter(
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    model: str | os.PathLike | None = None,
    quant: str | None = None,
    dtype: str = "bf16",
    overwrite: bool = False,
    force: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Merge the adapter in ``adapter_dir`` into its base and write the model (with tokenizer) to ``out_dir``.

    A 4-bit base is merged and written one layer at a time (:func:`write_merged_shards`): peak memory is the
    4-bit model plus one layer, so an 8B merges on a machine that cannot hold it in 16 bits.

    Everything that can be checked (adapter files, output folder, base and quantization, dtype) is checked
    before the model is loaded; the folder is written beside ``out_dir`` and swapped in whole, so an older
    ``out_dir`` is replaced only by a complete merge.

    Args:
        adapter_dir: the adapter (a ``fourbit finetune`` run folder, one of its checkpoints, or a peft folder).
        out_dir: the merged model's folder.
        model: the base; default the one recorded with the adapter (see :func:`merge_base`).
        quant: the base's quantization during training; default the run's.
        dtype: ``bf16``, ``fp16`` or ``fp32`` for the merged weights.
        overwrite: replace an existing, non-empty ``out_dir``.
        force: merge onto another ``model``/``quant`` than the run's.
        max_shard_bytes: the largest weight file (transformers' sharded layout beyond it).

    Returns:
        ``out_dir``.

    Raises:
        FieldError: a bad ``dtype``/``quant``, an ``out_dir`` that cannot or must not be written, a base other
            than the run's without ``force``.
        ValueError: an adapter folder that is missing, damaged or does not fit the model.
        OSError: the disk filled up (the old ``out_dir`` is left as it was).
    """
    import torch

    from fourbit.models import QuantConfig
    from fourbit.nn.adapters import load_adapter
    from fourbit.nn.lora import merge_and_unload

    if dtype not in MERGE_DTYPES:
        raise FieldError("dtype", f"must be one of {', '.join(MERGE_DTYPES)}; got {dtype!r}")
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    inputs = [adapter_dir] + ([model] if model is not None and Path(model).exists() else [])
    check_output_dir(out_dir, overwrite=overwrite, field="out_dir", inputs=inputs)
    base = merge_base(adapter_dir, model=model, quant=quant, force=force)
    qc = None if base.quant == "none" else QuantConfig(quant_type=base.quant, double_quant=base.double_quant,
                                                       compute_dtype="fp32")
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    merged, tokenizer = _load_base(base, qc)
    load_adapter(merged, adapter_dir)
    with atomic_dir(out_dir) as tmp:
        if qc is not None and _streamable(merged):  # one layer's float weights at a time
            write_merged_shards(merged, tmp, torch_dtype, max_shard_bytes)
            plain_for_saving(merged)
            merged.config.dtype = torch_dtype
            merged.config.save_pretrained(tmp)
            if getattr(merged, "generation_config", None) is not None:
                merged.generation_config.save_pretrained(tmp)
        else:
            merge_and_unload(merged, dtype=torch.float32)
            _dequantize_rest(merged)  # 4-bit layers the adapter did not target
            merged = merged.to(torch_dtype)
            plain_for_saving(merged)
            merged.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out_dir
