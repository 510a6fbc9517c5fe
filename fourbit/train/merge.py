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

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fourbit._errors import FieldError
from fourbit._io import atomic_dir, check_output_dir
from fourbit.models import clear_fourbit_info

__all__ = ["MERGE_DTYPES", "MergeBase", "merge_adapter", "merge_base", "plain_for_saving"]

MERGE_DTYPES = ("bf16", "fp16", "fp32")
_QUANTS = ("nf4", "fp4", "none")


@dataclass(frozen=True)
class MergeBase:
    """The base an adapter is merged onto.

    Attributes:
        model: model folder / GGUF / hub id (None: the bundled SmolLM2-135M-Instruct).
        quant: ``nf4``, ``fp4`` or ``none`` (the base weights the adapter was trained against).
        double_quant: whether those were double-quantized (changes the dequantized weights slightly).
        source: the file these settings were read from (None: defaults, nothing recorded).
    """

    model: str | None
    quant: str
    double_quant: bool
    source: Path | None


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
    return MergeBase(model if model is not None else saved_model, quant or saved_quant or "nf4", saved_dq, source)


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


def merge_adapter(
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    model: str | os.PathLike | None = None,
    quant: str | None = None,
    dtype: str = "bf16",
    overwrite: bool = False,
    force: bool = False,
) -> Path:
    """Merge the adapter in ``adapter_dir`` into its base and write the model (with tokenizer) to ``out_dir``.

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

    Returns:
        ``out_dir``.

    Raises:
        FieldError: a bad ``dtype``/``quant``, an ``out_dir`` that cannot or must not be written, a base other
            than the run's without ``force``.
        ValueError: an adapter folder that is missing, damaged or does not fit the model.
        OSError: the disk filled up (the old ``out_dir`` is left as it was).
    """
    import torch

    from fourbit.models import QuantConfig, load_model
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
    merged, tokenizer = load_model(base.model, quant=qc, torch_dtype=torch.float32)
    load_adapter(merged, adapter_dir)
    merge_and_unload(merged, dtype=torch.float32)
    _dequantize_rest(merged)  # 4-bit layers the adapter did not target
    merged = merged.to({"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype])
    plain_for_saving(merged)
    with atomic_dir(out_dir) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out_dir
