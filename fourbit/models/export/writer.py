"""Write a model (4-bit or float, with or without LoRA layers) as one GGUF file, streaming and atomically.

Each weight is produced when it is written: a 4-bit layer is dequantized, a LoRA layer gives base + scaling·B·A
(merged onto the dequantized 4-bit weights the adapter was trained against, as ``fourbit merge`` does), then
the tensor is reordered and quantized to its GGUF type and appended to the file. Peak memory is the model as
loaded plus one float matrix, never a float copy of the whole model.

The file is written under a temporary name beside ``OUT.gguf`` (``.fourbit-tmp-<pid>-...``), flushed to
disk, and renamed into place only when complete: an interrupted or failed export (disk full, Ctrl-C,
SIGKILL) leaves no file named ``OUT.gguf``, and the next export into the folder removes a killed run's
temporary file.
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fourbit._errors import FieldError
from fourbit._io import TEMP_PREFIX, atomic_write_text, remove_stale_temps

from .layout import (
    FOUR_BIT_TYPES,
    add_hyperparameters,
    arch_of,
    check_type,
    gguf_name,
    permute_rows,
    quantize_tensor,
    rope_freqs,
    tensor_name_map,
    tensor_type,
)

__all__ = ["ExportResult", "check_gguf_output", "export_gguf", "float_tensors", "gguf_temp_file"]

_FILE_TYPES = {"f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0",
               "q4_k_m": "MOSTLY_Q4_K_M"}


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_gguf` wrote.

    Attributes:
        path: the GGUF file.
        modelfile: the Ollama Modelfile beside it (None when not asked for).
        tensor_types: GGML type name -> number of tensors of that type.
        bytes: size of the GGUF file.
        from_4bit: the weights came from 4-bit layers (dequantized, then written in ``gguf_type``).
        requantized: ``from_4bit`` and ``gguf_type`` is a 4-bit type: the dequantized NF4/FP4/INT4 weights
            were quantized a second time, to llama.cpp's 4-bit types.
        notes: lines to show the user (the Modelfile's template family, ...).
    """

    path: Path
    modelfile: Path | None
    tensor_types: dict[str, int]
    bytes: int
    from_4bit: bool
    requantized: bool
    notes: tuple[str, ...] = ()


def check_gguf_output(path: str | os.PathLike, field: str = "gguf_path") -> Path:
    """Refuse a GGUF output path that cannot be written, before any work starts (naming ``field``)."""
    path = Path(path)
    if path.is_dir():
        raise FieldError(field, f"{path} is a folder; give the path of the .gguf file to write")
    if path.suffix.lower() != ".gguf":
        raise FieldError(field, f"{path} does not end in .gguf; llama.cpp and Ollama expect that suffix")
    parent = path.parent if str(path.parent) else Path(".")
    existing = parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise FieldError(field, f"{existing} is a file, not a folder; choose another place for {path.name}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise FieldError(field, f"cannot write into {existing} (permission denied or read-only); choose another "
                                "folder")
    return path


def _is_4bit(module: nn.Module) -> bool:
    from fourbit.nn.lora import is_linear_4bit

    return is_linear_4bit(module) or hasattr(module, "dequantized_module")


def _dequantized(module: nn.Module) -> torch.Tensor:
    """A 4-bit linear layer's weight in float32 and its state-dict layout, dequantized in one pass of the
    kernels (no float layer is built around it, as :func:`fourbit.nn.linear4bit.float_layer` would)."""
    from fourbit.nn.linear4bit import frozen_weight

    weight = frozen_weight(module, torch.float32)
    return weight.t() if getattr(module, "layout", "linear") == "conv1d" else weight


def float_tensors(model: nn.Module) -> Iterator[tuple[str, tuple[int, ...], Callable[[], torch.Tensor], bool]]:
    """``(name, shape, load, from_4bit)`` for every parameter of ``model`` under its transformers state-dict
    name; ``load()`` gives the tensor a merged float model would hold (4-bit layers dequantized and LoRA layers
    merged, in float32; float parameters in their own dtype, converted later in row chunks: an 8B's embedding in
    float32 is 2.1 GB). Tied duplicates appear once."""
    from fourbit.nn.linear4bit import float_layer
    from fourbit.nn.lora import LoRALinear, _features, is_linear_4bit

    seen: set[int] = set()
    handled: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in handled):
            continue
        prefix = f"{name}." if name else ""
        if isinstance(module, LoRALinear):
            handled.append(name)
            base = module._unmerged_base if module._unmerged_base is not None else module.base
            in_f, out_f = _features(base)
            yield (f"{prefix}weight", (out_f, in_f), lambda m=module: m.merged_linear(torch.float32).weight,
                   _is_4bit(base))
            if base.bias is not None:
                yield f"{prefix}bias", (out_f,), lambda b=base: b.bias.detach().float(), False
        elif _is_4bit(module):
            handled.append(name)
            in_f, out_f = _features(module)
            load = _dequantized if is_linear_4bit(module) else (lambda m: float_layer(m).weight)
            yield f"{prefix}weight", (out_f, in_f), lambda m=module, f=load: f(m), True
            if module.bias is not None:
                yield f"{prefix}bias", (out_f,), lambda m=module: m.bias.detach().float(), False
        else:
            for pname, param in module.named_parameters(recurse=False):
                if id(param) in seen:
                    continue
                seen.add(id(param))
                yield f"{prefix}{pname}", tuple(param.shape), lambda p=param: p.detach(), False


@dataclass
class _Planned:
    name: str
    shape: tuple[int, ...]
    qtype: object
    load: Callable[[], torch.Tensor]
    permute_heads: int | None
    from_4bit: bool
    importance: np.ndarray | None = None  # one weight per column for the 4-bit block types (an imatrix)


def _plan(model: nn.Module, gguf_type: str) -> list[_Planned]:
    """Every tensor of the file in order, with its GGUF name and type."""
    config = model.config
    arch = arch_of(config)
    name_map = tensor_name_map(config)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    entries = [(n, s, f, q) for n, s, f, q in float_tensors(model) if not (tied and n == "lm_head.weight")]
    named = [(gguf_name(name_map, n), n, s, f, q) for n, s, f, q in entries]
    has_output = any(g == "output.weight" for g, *_ in named)
    n_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    plan = []
    freqs = rope_freqs(config)
    if freqs is not None:
        shape = (freqs.numel(),)
        qtype = tensor_type("rope_freqs.weight", shape, gguf_type, config.num_hidden_layers, has_output)
        plan.append(_Planned("rope_freqs.weight", shape, qtype, lambda: freqs, None, False))
    for gname, _hf_name, shape, load, from_4bit in named:
        heads = None
        if arch.permute_qk and ".attn_q." in f".{gname}":
            heads = config.num_attention_heads
        elif arch.permute_qk and ".attn_k." in f".{gname}":
            heads = n_kv
        qtype = tensor_type(gname, shape, gguf_type, config.num_hidden_layers, has_output)
        plan.append(_Planned(gname, tuple(shape), qtype, load, heads, from_4bit))
    return plan


def _attach_importance(plan: list[_Planned], importance: dict[str, np.ndarray], gguf_type: str) -> None:
    """Give each planned tensor its importance vector, checked. A column that never saw input (importance 0)
    would let a block's whole weight go to 0 and its scale with it, so zeros are raised to 1e-6 of the
    tensor's mean importance (all zeros: the tensor quantizes as without)."""
    if gguf_type not in FOUR_BIT_TYPES:
        raise FieldError("importance", f"weighs the 4-bit types ({', '.join(FOUR_BIT_TYPES)}); {gguf_type} does "
                                       "not use an importance matrix")
    by_name = {item.name: item for item in plan}
    if importance and not set(importance) & set(by_name):
        raise FieldError("importance", f"none of its tensors ({', '.join(sorted(importance)[:3])}, ...) is in this "
                                       "model's GGUF file: an importance matrix of another model?")
    for name, values in importance.items():
        item = by_name.get(name)
        if item is None:  # as llama-quantize, entries for tensors the file does not hold are passed over
            continue
        vector = np.asarray(values, dtype=np.float32).reshape(-1)
        if len(item.shape) != 2 or vector.shape[0] != item.shape[-1]:
            raise FieldError("importance", f"{name} has {vector.shape[0]} values; the tensor {tuple(item.shape)} "
                                           f"needs one per column")
        if not np.all(np.isfinite(vector)) or (vector < 0).any():
            raise FieldError("importance", f"{name} holds negative, NaN or Inf values")
        mean = float(vector.mean())
        if mean > 0:
            item.importance = np.maximum(vector, np.float32(1e-6 * mean))


#: Elements converted to float32 and quantized at a time: GGML types quantize within rows, so row chunks give the
#: bytes of the whole tensor without its float32 copy.
_CHUNK_ELEMENTS = 1 << 24


def _tensor_bytes(load: Callable[[], torch.Tensor], heads: int | None, qtype,
                  importance: np.ndarray | None = None) -> np.ndarray:
    with torch.no_grad():
        values = load().detach().cpu()
        if heads is not None:
            values = permute_rows(values.float(), heads)
        row_elements = max(1, values[0].numel()) if values.ndim > 1 and len(values) else 1
        rows = values.split(max(1, _CHUNK_ELEMENTS // row_elements)) if values.ndim > 1 else (values,)
        parts = []
        for part in rows:
            part = part.float()
            if part.numel() and not all(torch.isfinite(v) for v in torch.aminmax(part)):  # one pass, no copy
                raise ValueError("holds NaN or Inf values")
            parts.append(quantize_tensor(part.numpy(), qtype, importance))
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def gguf_temp_file(out: Path) -> Path:
    """A temporary name beside ``out`` that :func:`fourbit._io.remove_stale_temps` clears once its process is
    gone."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out.parent)
    return out.parent / f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{out.name}"


def write_atomically(out: Path, fill: Callable[[Path], None], before_rename: Callable[[], None] = lambda: None):
    """Run ``fill(tmp)`` on a temporary file beside ``out``, sync it and rename it to ``out``; on any failure
    the temporary file is removed and an out-of-space error names ``out``."""
    tmp = gguf_temp_file(out)
    try:
        fill(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        before_rename()
        os.replace(tmp, out)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno in (errno.ENOSPC, errno.EDQUOT) and err.filename in (None, str(tmp)):
            raise OSError(err.errno, os.strerror(err.errno), str(out)) from err
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _nbytes(shape: tuple[int, ...], qtype) -> int:
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * size


def _write_file(tmp: Path, model: nn.Module, tokenizer, gguf_type: str, plan: list[_Planned],
                source_gguf: Path | None, name: str) -> None:
    """Header, metadata and tensor table, then each tensor as it is computed (one float matrix at a time)."""
    import gguf

    from .vocab import add_tokenizer, copy_tokenizer_fields

    config = model.config
    arch = arch_of(config)
    writer = gguf.GGUFWriter(None, arch.gguf_arch)
    try:
        add_hyperparameters(writer, config, arch, int(getattr(gguf.LlamaFileType, _FILE_TYPES[gguf_type])), name)
        if source_gguf is not None:
            copy_tokenizer_fields(writer, source_gguf)
        else:
            add_tokenizer(writer, tokenizer, config.vocab_size)
        for item in plan:  # the tensor table needs every size before any data is written
            writer.add_tensor_info(item.name, item.shape, np.dtype(np.float32), _nbytes(item.shape, item.qtype),
                                   raw_dtype=item.qtype)
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for item in plan:
            try:
                data = _tensor_bytes(item.load, item.permute_heads, item.qtype, item.importance)
            except ValueError as err:
                raise ValueError(f"`model`: tensor {item.name} {err}") from None
            writer.write_tensor_data(data)
        for fout in writer.fout or []:
            fout.flush()
    finally:
        writer.close()


def _model_name(model: nn.Module) -> str:
    source = str(getattr(model.config, "name_or_path", "") or getattr(model.config, "_name_or_path", "") or "")
    return Path(source.rstrip("/")).name.removesuffix(".gguf") or "model"


def export_gguf(
    model: nn.Module,
    tokenizer,
    gguf_path: str | os.PathLike,
    *,
    gguf_type: str = "f16",
    modelfile: bool = True,
    source_gguf: str | os.PathLike | None = None,
    name: str | None = None,
    importance: dict[str, np.ndarray] | None = None,
) -> ExportResult:
    """Write ``model`` as a llama.cpp GGUF file (and an Ollama Modelfile beside it), atomically.

    Args:
        model: a transformers causal LM of a covered architecture (llama, mistral, qwen2); its 4-bit layers are
            dequantized and its LoRA layers merged as each weight is written.
        tokenizer: its tokenizer (a byte-level BPE fast tokenizer), written into the metadata with its chat
            template; ignored when ``source_gguf`` is given.
        gguf_path: the ``.gguf`` file to write (replaced only once the new one is complete).
        gguf_type: ``f16``, ``bf16``, ``q8_0``, ``q4_0`` or ``q4_k_m`` (llama-quantize's mix).
        modelfile: also write ``<name>.Modelfile`` for ``ollama create``.
        source_gguf: the GGUF file the model was loaded from: its tokenizer metadata is copied verbatim.
        name: ``general.name``; default the model folder's name.
        importance: an importance matrix, {GGUF tensor name: float32 [columns]}
            (:func:`fourbit.models.export.imatrix.importance_matrix` or ``read_imatrix``), for ``q4_0`` and
            ``q4_k_m``: each listed tensor's Q4_0/Q5_0/Q4_K/Q6_K blocks weigh column j's rounding error by it, as
            llama-quantize does with ``--imatrix``; tensors not listed (the token embedding) quantize as without.

    Returns:
        :class:`ExportResult`.

    Raises:
        FieldError: a bad ``gguf_type`` or ``gguf_path`` (a folder, not ``.gguf``, not writable), or an
            ``importance`` with another type than q4_0/q4_k_m, naming none of the file's tensors, or with a vector
            of the wrong length or with negative or non-finite values.
        NotImplementedError: an architecture, tokenizer or rotary scaling that is not exported, named.
        ValueError: a weight holding NaN or Inf (naming the tensor).
        OSError: the disk filled up (naming ``gguf_path``); nothing is left at ``gguf_path``.
    """
    from .modelfile import modelfile_for

    check_type(gguf_type)
    out = check_gguf_output(gguf_path)
    source = Path(source_gguf) if source_gguf is not None else None
    plan = _plan(model, gguf_type)
    if importance is not None:
        _attach_importance(plan, importance, gguf_type)
    from_4bit = any(item.from_4bit for item in plan)
    text, notes = modelfile_for(out.name, tokenizer) if modelfile else (None, ())
    modelfile_path = out.with_suffix(".Modelfile") if modelfile else None

    def fill(tmp: Path) -> None:
        _write_file(tmp, model, tokenizer, gguf_type, plan, source, name or _model_name(model))

    def write_modelfile() -> None:
        if modelfile_path is not None:
            atomic_write_text(modelfile_path, text)

    write_atomically(out, fill, before_rename=write_modelfile)
    counts: dict[str, int] = {}
    for item in plan:
        counts[item.qtype.name] = counts.get(item.qtype.name, 0) + 1
    return ExportResult(out, modelfile_path, counts, out.stat().st_size, from_4bit,
                        from_4bit and gguf_type in FOUR_BIT_TYPES, tuple(notes))
