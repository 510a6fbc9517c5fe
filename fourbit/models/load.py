"""Load a causal LM and its tokenizer from a model folder, a GGUF file, a hub id or the bundled SmolLM2, and
quantize it to 4 bits in place; or load a 4-bit checkpoint (fourbit's or bitsandbytes') as saved.

Every file is checked before it is used, and a file that cannot be used fails with one line naming it
(:class:`fourbit._errors.InputFileError`): truncated or damaged safetensors, pickled weights (never
unpickled), cut GGUF files, quantization settings or quant states fourbit cannot load.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from fourbit._errors import InputFileError
from fourbit._io import load_safetensors
from fourbit.models.config import QuantConfig, quant_config_from_checkpoint
from fourbit.models.describe import scan_quantized_layers
from fourbit.models.footprint import model_footprint
from fourbit.models.gguf import load_gguf
from fourbit.models.locate import (
    CHECKPOINT_FILE,
    bundled_model_path,
    check_model_folder,
    has_tokenizer,
    is_quantized_checkpoint,
    quantization_config_of,
    safetensors_files,
)
from fourbit.models.quantize import quantize_model
from fourbit.models.stream import can_stream, stream_quantize
from fourbit.models.stream import parameters_on_meta as _parameters_on_meta
from fourbit.nn.experts import Experts4bit, is_fused_experts
from fourbit.nn.info import fourbit_info
from fourbit.nn.linear4bit import Linear4bit, parse_dtype
from fourbit.nn.lora import is_conv1d

__all__ = ["load_model"]


def load_model(
    model: str | os.PathLike | None = None,
    *,
    quant: QuantConfig | None = QuantConfig(),  # noqa: B008 - frozen default, never mutated
    torch_dtype: torch.dtype | None = None,
    progress: bool = False,
    measure_error: bool = False,
):
    """Load a causal LM and its tokenizer, quantized to 4 bits unless ``quant`` is None.

    Args:
        model: None for the bundled SmolLM2-135M-Instruct; a ``.gguf`` file; a Hugging Face model folder
            (safetensors weights); a folder holding a 4-bit fourbit/bitsandbytes checkpoint (loaded as saved;
            ``quant`` then only sets the compute dtype); or a hub id (needs network access).
        quant: how to quantize; None loads the model unquantized.
        torch_dtype: dtype of the unquantized parameters (norms, embeddings, lm_head) and of the weights as
            they are quantized; default: the checkpoint's own dtype (float32 for a GGUF file).
        progress: show a progress bar while quantizing.
        measure_error: record the mean relative weight error of the quantized layers in the footprint.

    A float model folder is quantized while it is read (:mod:`fourbit.models.stream`): the float model is never
    whole in memory, only one layer's weights at a time. GGUF files, hub ids and ``quant=None`` go through
    transformers' ``from_pretrained`` (then :func:`quantize_model`), as does every folder when the installed
    transformers predates the key-conversion rules streaming reuses (transformers < 5).

    Returns:
        (model, tokenizer); the model is in eval mode. ``fourbit_info(model).footprint``
        (:mod:`fourbit.nn.info`) holds the footprint when the model is 4-bit.

    Raises:
        FileNotFoundError: a path that does not exist (and is not a hub id), a folder without config.json.
        InputFileError: a file that cannot be used, named: damaged or truncated weights, pickled weights only,
            a cut GGUF file or one of an architecture transformers cannot load, a broken 4-bit checkpoint.
    """
    from transformers import AutoModelForCausalLM

    source = bundled_model_path() if model is None else Path(model).expanduser()
    if source.exists():
        if source.is_file():
            if source.suffix != ".gguf":
                raise InputFileError(source, "not a .gguf file; pass a model folder or a GGUF file")
            lm, tokenizer = load_gguf(source, torch_dtype or torch.float32)
        elif is_quantized_checkpoint(source):
            lm, tokenizer = _load_quantized_checkpoint(source, quant.compute_dtype if quant else None)
            fourbit_info(lm).footprint = model_footprint(lm)
            return lm, tokenizer
        else:
            files = check_model_folder(source)
            tokenizer = _tokenizer(source)
            if quant is not None and _streamable(source):
                lm = stream_quantize(source, files, quant, torch_dtype, progress=progress,
                                     measure_error=measure_error)
                return lm, tokenizer
            lm = _from_pretrained(source, torch_dtype)
    else:
        name = str(model)
        looks_local = name.startswith((".", "/", "~")) or name.endswith((".gguf", "/")) or name.count("/") > 1
        if looks_local:
            raise FileNotFoundError(f"model path {name!r} does not exist")
        from transformers import AutoTokenizer

        try:
            lm = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype or "auto")
            tokenizer = AutoTokenizer.from_pretrained(name)
        except OSError as err:
            raise FileNotFoundError(
                f"{name!r} is neither an existing path nor a model id that could be loaded from the hub: {err}"
            ) from None
    lm.eval()
    if quant is not None:
        quantize_model(lm, quant, progress=progress, measure_error=measure_error)
        _release_weight_files(lm)
    return lm, tokenizer


def _streamable(folder: Path) -> bool:
    """Whether the float model in ``folder`` can be quantized while it is read: transformers has the
    key-conversion rules streaming reuses, and the config names no other quantization method (such a model is
    left to transformers' own loader)."""
    return can_stream() and quantization_config_of(folder) is None


def _release_weight_files(model: nn.Module) -> None:
    """Copy the parameters that stayed in full precision (embeddings, norms, the head) out of the weight files.

    transformers memory-maps safetensors files and leaves tensors that need no conversion as views of the
    mapping; one such view keeps the whole file mapped, and every page quantization read stays in the process's
    resident memory (for SmolLM2-135M: 600 MB of an fp32 checkpoint whose 4-bit model needs 190 MB). Copies
    of the few float tensors let the mapping go.
    """
    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point():
                param.data = param.data.clone()
        for module in model.modules():
            for name, buf in module.named_buffers(recurse=False):
                if buf is not None and buf.is_floating_point():
                    setattr(module, name, buf.clone())


def _from_pretrained(folder: Path, torch_dtype: torch.dtype | None):
    """transformers' loader on a checked folder, its errors named (``torch_dtype`` None: the checkpoint's)."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype or _checkpoint_dtype(folder))
    except (SafetensorError, ValueError, KeyError, RuntimeError) as err:
        raise InputFileError(folder, f"transformers cannot load this model folder: {err}") from None
    except OSError as err:
        if err.errno is not None:  # a real file-system error (permissions, I/O): keep it as it is
            raise
        raise InputFileError(folder, f"transformers cannot load this model folder: {err}") from None


def _checkpoint_dtype(folder: Path) -> torch.dtype:
    """The float dtype most of the folder's weight bytes are in (what streaming keeps by default)."""
    from fourbit.models.stream import CheckpointTensors

    return CheckpointTensors(folder, safetensors_files(folder)).dtype()


def _tokenizer(folder: Path):
    """The folder's tokenizer, or None when it has no tokenizer files."""
    if not has_tokenizer(folder):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as err:  # noqa: BLE001 - tokenizers raises bare Exception for a damaged tokenizer.json
        raise InputFileError(folder, f"cannot load the tokenizer ({type(err).__name__}: {err}); its tokenizer "
                                     "files are damaged") from None


def _checkpoint_keys(files: list[Path]) -> set[str]:
    """Every tensor name in ``files`` (headers only; the files were checked already)."""
    from safetensors import safe_open

    keys: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            keys.update(handle.keys())
    return keys


def _install_4bit_skeleton(model: nn.Module, layers: list, files: list[Path], compute: torch.dtype,
                           dtype: torch.dtype) -> None:
    """Swap the meta skeleton's layers that the checkpoint holds in 4 bits for empty 4-bit layers on the meta
    device (``load_state_dict(assign=True)`` then gives them the checkpoint's tensors and settings), checking that
    each is a linear layer of the right shape.

    Raises:
        InputFileError: a 4-bit layer the model does not have, or of another shape (naming the file).
    """
    config = model.config
    for layer in layers:
        try:
            linear = model.get_submodule(layer.name)
        except AttributeError:
            linear = None
        if not (isinstance(linear, nn.Linear) or is_conv1d(linear)):
            raise InputFileError(files[0], f"4-bit layer {layer.name!r} is not a linear layer of a "
                                           f"{config.model_type} model; the weights do not fit config.json")
        in_features, out_features = (linear.weight.shape if is_conv1d(linear)
                                     else (linear.in_features, linear.out_features))
        if layer.shape != (out_features, in_features):
            raise InputFileError(files[0], f"4-bit layer {layer.name!r} has shape {layer.shape}, the model "
                                           f"needs {(out_features, in_features)}")
        # a meta skeleton: loading assigns the checkpoint's tensors (and quantization settings) to it
        shell = Linear4bit(in_features, out_features, linear.bias is not None, compute, device="meta",
                           layout="conv1d" if is_conv1d(linear) else "linear")
        model.set_submodule(layer.name, shell)
    keys = _checkpoint_keys(files)
    for name, module in list(model.named_modules()):
        if is_fused_experts(module) and f"{name}.gate_up_proj_absmax" in keys:
            e, two_i, h = module.gate_up_proj.shape
            with torch.device("meta"):
                shell = Experts4bit(e, h, two_i // 2, module.act_fn, compute_dtype=compute,
                                    quant_type=layers[0].quant_type, blocksize=layers[0].blocksize,
                                    double_quant=f"{name}.gate_up_proj_offset" in keys, dtype=dtype)
            shell._set_template(module)
            model.set_submodule(name, shell)


def _load_quantized_checkpoint(folder: Path, compute_dtype: str | None) -> tuple[nn.Module, object]:
    """Build the model's skeleton with its parameters on the meta device, swap in empty 4-bit layers where
    the checkpoint has them, and fill it from the safetensors (``assign``: the loaded tensors become the
    parameters, nothing is copied); everything is checked first (settings, quant states, then sizes).

    The float weights are never materialised, so peak memory while loading stays near the checkpoint's size
    (``benchmarks/bench_load.py`` measures it)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config_file = folder / "config.json"
    qc = quantization_config_of(folder) or {}
    quant_config_from_checkpoint(qc, config_file)  # refuse settings fourbit cannot load, naming the field
    files = safetensors_files(folder)
    if not files:
        raise InputFileError(folder / CHECKPOINT_FILE, "missing: the 4-bit checkpoint has no weights file")
    layers = scan_quantized_layers(files)
    if not layers:
        raise InputFileError(files[0], "holds no 4-bit quant states, but config.json says the model is 4-bit")
    try:
        config = AutoConfig.from_pretrained(folder)
    except (ValueError, KeyError) as err:
        raise InputFileError(config_file, f"transformers cannot read this config: {err}") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # we build the model unquantized, then swap in Linear4bit
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    requested = compute_dtype if compute_dtype not in (None, "auto") else None
    compute = parse_dtype(requested or qc.get("bnb_4bit_compute_dtype") or qc.get("compute_dtype") or "fp32")
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    _install_4bit_skeleton(model, layers, files, compute, dtype)
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(load_safetensors(file))
    try:
        result = model.load_state_dict(tensors, strict=False, assign=True)
    except (RuntimeError, ValueError) as err:
        raise InputFileError(folder, f"the weights do not fit config.json: {' '.join(str(err).split())[:400]}") \
            from None
    del tensors
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in result.missing_keys if k not in tied and not k.endswith("lm_head.weight")]
    if missing or result.unexpected_keys:
        raise InputFileError(folder, f"the weights do not fit config.json: missing {missing[:5]}, unexpected "
                                     f"{result.unexpected_keys[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still_meta:
        raise InputFileError(folder, f"the weights do not fit config.json: missing {still_meta[:5]}")
    model.config.quantization_config = qc
    model.eval()
    return model, _tokenizer(folder)
