"""Save a 4-bit model as a checkpoint folder in bitsandbytes' format, atomically.

The folder holds ``model.safetensors`` (bitsandbytes' state-dict keys), ``config.json`` with a
``quantization_config`` that transformers + bitsandbytes understand, ``fourbit.json`` (fourbit's version,
quantization settings and footprint), the generation config and the tokenizer. It is written into a
temporary folder beside its destination and swapped in whole (:func:`fourbit._io.atomic_dir`): a save that
fails (disk full) or is killed never leaves a half-written folder that looks complete, and an existing
checkpoint is replaced only once the new one is finished.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from fourbit._errors import FieldError
from fourbit._io import TEMP_PREFIX, atomic_dir, atomic_write_text, check_output_dir, save_safetensors
from fourbit.models.config import QuantConfig
from fourbit.models.footprint import model_footprint
from fourbit.models.locate import CHECKPOINT_FILE, FOURBIT_META_FILE
from fourbit.nn.info import fourbit_info
from fourbit.nn.linear4bit import Linear4bit

__all__ = ["save_quantized"]


def save_quantized(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None, *, overwrite: bool = False) -> Path:
    """Save a 4-bit model as a bitsandbytes-format checkpoint folder, atomically.

    Args:
        model: a model quantized by :func:`fourbit.models.quantize_model` or loaded 4-bit.
        out_dir: the checkpoint folder to write.
        tokenizer: saved with the model when given.
        overwrite: replace an existing, non-empty ``out_dir`` (only once the new folder is complete).

    Returns:
        ``out_dir`` as a Path.

    Raises:
        FieldError: ``model`` holds no 4-bit layer; ``out_dir`` is a file, is not empty (without
            ``overwrite``) or cannot be written.
        OSError: a failed write (disk full), naming the file in ``out_dir``; nothing is left half-written.
    """
    out = Path(out_dir)
    if not any(isinstance(m, Linear4bit) for m in model.modules()):
        raise FieldError("model", "holds no 4-bit layers: quantize it first (fourbit.models.quantize_model)")
    check_output_dir(out, overwrite=overwrite, field="out_dir")
    qconfig = fourbit_info(model).quant_config or QuantConfig(**_quant_config_from_layers(model))
    first = next(iter(model.parameters()))
    config = model.config.to_dict()
    config["quantization_config"] = qconfig.to_bnb_dict(first.device)
    meta = {"fourbit_version": _version(), "quant_config": asdict(qconfig),
            "footprint": model_footprint(model).as_dict()}
    with _naming_final_paths(out), atomic_dir(out) as tmp:
        save_safetensors(_unique_tensors(model.state_dict()), tmp / CHECKPOINT_FILE)
        atomic_write_text(tmp / "config.json", json.dumps(config, indent=2, default=str) + "\n")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        atomic_write_text(tmp / FOURBIT_META_FILE, json.dumps(meta, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out


@contextlib.contextmanager
def _naming_final_paths(out: Path) -> Iterator[None]:
    """Rewrite a failed write's file name from the temporary folder to ``out``: the user knows ``out``, and
    the temporary folder is gone by the time they read the message."""
    try:
        yield
    except OSError as err:
        path = Path(str(err.filename or ""))
        temp = path.parent
        if err.errno is None or temp.parent != out.parent or temp == out or not temp.name.startswith(TEMP_PREFIX):
            raise
        raise type(err)(err.errno, err.strerror or os.strerror(err.errno), str(out / path.name)) from err


def _unique_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop tied duplicates (safetensors refuses shared storage); keep the first name of each storage."""
    seen: dict[tuple, str] = {}
    out = {}
    for key, t in state.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and ident in seen:
            continue
        seen[ident] = key
        out[key] = t.contiguous()
    return out


def _quant_config_from_layers(model: nn.Module) -> dict:
    """The settings of a model fourbit did not quantize in this process (e.g. a loaded checkpoint)."""
    layer = next(m for m in model.modules() if isinstance(m, Linear4bit))
    qs = layer.quant_state
    quantized = {n for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    skipped = tuple(sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                            if isinstance(m, nn.Linear) and n not in quantized}))
    return {"quant_type": qs.quant_type, "blocksize": qs.blocksize, "double_quant": qs.nested,
            "compute_dtype": str(layer.compute_dtype).removeprefix("torch."), "skip_modules": skipped}


def _version() -> str:
    from fourbit import __version__

    return __version__
