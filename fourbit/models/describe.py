"""What a checkpoint folder holds, checked before it is trusted: its quantization settings and the quant
state of every 4-bit layer, read from the safetensors headers without loading the weights.

``fourbit info`` prints :func:`checkpoint_info`; :func:`fourbit.models.load_model` runs the same checks
(:func:`scan_quantized_layers`) before it builds a model from a 4-bit checkpoint.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fourbit._errors import InputFileError
from fourbit._io import read_json
from fourbit.models.config import quant_config_from_checkpoint
from fourbit.models.locate import (
    CHECKPOINT_FILE,
    FOURBIT_META_FILE,
    check_safetensors_header,
    is_quantized_checkpoint,
    quantization_config_of,
    safetensors_files,
)
from fourbit.quant import QUANT_TYPES

__all__ = ["QuantizedLayer", "checkpoint_info", "scan_quantized_layers"]

_QS_MARK = ".weight.quant_state.bitsandbytes__"


@dataclass
class QuantizedLayer:
    """One 4-bit layer of a checkpoint, as its quant state describes it."""

    name: str
    quant_type: str
    blocksize: int
    shape: tuple[int, ...]
    double_quant: bool

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def _bad(file: Path, key: str, what: str) -> InputFileError:
    return InputFileError(file, f"{key}: {what}; the checkpoint is damaged or was not written by fourbit or "
                                "bitsandbytes")


def scan_quantized_layers(files: list[Path]) -> list[QuantizedLayer]:
    """Read and check the quant state of every 4-bit layer in ``files`` (safetensors).

    Checks, per layer: the 4-bit type is one fourbit knows, the packed JSON state parses, the block size
    is a power of two, the packed weight and the absmax hold as many values as the shape needs.

    Raises:
        InputFileError: naming the file and the tensor at fault.
    """
    from safetensors import SafetensorError, safe_open

    layers = []
    for file in files:
        check_safetensors_header(file)
        try:
            with safe_open(str(file), framework="pt") as handle:
                keys = set(handle.keys())
                shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in keys}
                for key in sorted(k for k in keys if _QS_MARK in k):
                    name, _, qtype = key.partition(_QS_MARK)
                    if qtype not in QUANT_TYPES:
                        raise _bad(file, key, f"4-bit type {qtype!r} is not one of {', '.join(QUANT_TYPES)}")
                    try:
                        meta = json.loads(bytes(handle.get_tensor(key).numpy()).decode("utf-8"))
                    except (ValueError, UnicodeDecodeError) as err:
                        raise _bad(file, key, f"the packed quant state is not JSON ({err})") from None
                    layers.append(_check_layer(file, key, name, qtype, meta, shapes))
        except SafetensorError as err:
            raise InputFileError(file, f"not a readable safetensors file ({err})") from None
    return layers


def _check_layer(file: Path, key: str, name: str, qtype: str, meta: Any, shapes: dict) -> QuantizedLayer:
    if not isinstance(meta, dict):
        raise _bad(file, key, "the packed quant state is not a JSON object")
    if meta.get("quant_type", qtype) != qtype:
        raise _bad(file, key, f"quant_type {meta.get('quant_type')!r} differs from the key's {qtype!r}")
    blocksize, shape = meta.get("blocksize"), meta.get("shape")
    if not isinstance(blocksize, int) or blocksize <= 0 or blocksize & (blocksize - 1):
        raise _bad(file, key, f"blocksize {blocksize!r} is not a positive power of two")
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(s, int) and s > 0 for s in shape)):
        raise _bad(file, key, f"shape {shape!r} is not two positive integers")
    layer = QuantizedLayer(name, qtype, blocksize, tuple(shape), "nested_blocksize" in meta)
    weight, absmax = f"{name}.weight", f"{name}.weight.absmax"
    for needed in (weight, absmax):
        if needed not in shapes:
            raise _bad(file, needed, "missing")
    packed = _numel(shapes[weight])
    if packed != (layer.numel + 1) // 2:
        raise _bad(file, weight, f"holds {packed} packed bytes but the shape {layer.shape} needs "
                                 f"{(layer.numel + 1) // 2}")
    blocks = -(-layer.numel // blocksize)
    if _numel(shapes[absmax]) != blocks:
        raise _bad(file, absmax, f"holds {_numel(shapes[absmax])} values but {blocks} blocks of {blocksize} "
                                 "need one each")
    return layer


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _expert_params(files: list[Path]) -> int:
    """Weights held by 4-bit fused experts (``<w>`` packed ``[E, ceil(n / 2)]`` beside ``<w>_absmax``), read
    from the headers: ``2 * E * ceil(n / 2)``, exact unless an expert matrix has an odd number of elements."""
    from safetensors import safe_open

    total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            keys = set(handle.keys())
            for key in keys:
                packed = key.removesuffix("_absmax")
                if key.endswith(("gate_up_proj_absmax", "down_proj_absmax")) and packed in keys:
                    shape = handle.get_slice(packed).get_shape()
                    if len(shape) == 2:
                        total += 2 * int(shape[0]) * int(shape[1])
    return total


def checkpoint_info(folder: str | os.PathLike) -> dict[str, Any]:
    """What a model or checkpoint folder holds: architecture, quantization settings, layers, sizes.

    Returns:
        A JSON-ready dict: ``folder``, ``architecture``, ``quantized``, ``quantization_config``, ``files``
        (name -> bytes), ``quantized_layers`` (4-bit linear layers), ``quantized_params`` (their weights and the
        4-bit expert weights of :mod:`fourbit.nn.experts`), ``quant_types``, ``fourbit`` (the
        ``fourbit.json`` metadata, when present) and ``warning`` (no weights).

    Raises:
        FileNotFoundError: no ``config.json``.
        InputFileError: a quantization config or a quant state that fourbit cannot load, a damaged weights
            file (naming the file and the field or tensor).
    """
    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} holds no config.json: not a model or checkpoint folder")
    config = read_json(config_file)
    if not isinstance(config, dict):
        raise InputFileError(config_file, f"expected a JSON object, got {type(config).__name__}")
    qc = quantization_config_of(folder)
    quantized = is_quantized_checkpoint(folder)
    if quantized:
        quant_config_from_checkpoint(qc, config_file)
    files = safetensors_files(folder)
    layers = scan_quantized_layers(files)
    info: dict[str, Any] = {
        "folder": str(folder),
        "architecture": (config.get("architectures") or [config.get("model_type")])[0],
        "quantized": quantized,
        "quantization_config": qc,
        "files": {f.name: f.stat().st_size for f in files},
        "quantized_layers": len(layers),
        "quantized_params": sum(layer.numel for layer in layers) + _expert_params(files),
        "quant_types": sorted({layer.quant_type for layer in layers}),
    }
    if quantized and not layers:
        raise InputFileError(config_file, "quantization_config says the model is 4-bit, but its weights hold no "
                                          "4-bit layers; the checkpoint is damaged")
    meta_file = folder / FOURBIT_META_FILE
    if meta_file.is_file():
        info["fourbit"] = read_json(meta_file)
    if not files:
        info["warning"] = f"no {CHECKPOINT_FILE} in the folder"
    return info

