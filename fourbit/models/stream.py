"""Quantize a float safetensors checkpoint while reading it: the model is built on the meta device and each
weight is read, quantized and dropped in turn, so at most one layer's float weights exist at a time.

QLoRA's point is a model larger than the machine (section 1: a 65B model on one 48 GB GPU); loading the float
model first and quantizing it afterwards needs the float model's memory (32 GB for an 8B model in float32),
which defeats it. Here:

1. every shard's header is read and checked against the index (a missing or truncated shard, or an index
   naming a tensor its shard does not hold, fails with one line naming the file) before any weight is read;
2. the skeleton is built with its parameters on the meta device (no memory); buffers that are not in the
   checkpoint, such as rotary frequencies, are computed on the CPU by the modules' own ``__init__``;
3. checkpoint keys are mapped to the model's names by transformers' own renaming and conversion rules
   (base-model prefixes, legacy names, per-expert weights fused into 3-D tensors), in the order transformers
   loads them (natural sort of the names), so a layer's weight and bias arrive together;
4. each tensor is read with ``pread`` into ordinary memory and cast to the dtype ``from_pretrained`` would give
   it; as soon as a layer ``QuantConfig`` selects has all its parameters, it is quantized by the same
   :func:`fourbit.models.quantize.quantize_layer` that ``quantize_model`` uses and its float weight dropped.
   The files are not memory-mapped: pages of a mapped file count in the process's RSS until the mapping is
   closed, so mapping a 5 GB shard would cost up to 5 GB of RSS however early each tensor is released.

The result equals ``from_pretrained(dtype=...)`` followed by ``quantize_model`` byte for byte (tests/models).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fourbit._errors import InputFileError
from fourbit.models.config import QuantConfig
from fourbit.models.footprint import tensor_bytes
from fourbit.models.locate import SAFETENSORS_INDEX
from fourbit.models.quantize import finish_quantization, quantization_targets, quantize_named_layer

__all__ = ["CheckpointTensors", "TensorEntry", "can_stream", "meta_skeleton", "parameters_on_meta", "stream_quantize"]

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_HEADER_LIMIT = 100 * 2**20  # safetensors' own limit on the JSON header
_READ_CHUNK = 1 << 30  # os.preadv reads at most ~2 GiB per call on Linux


def release_freed_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc ``malloc_trim``; a no-op elsewhere).

    Weights of a few MB come from the heap once glibc has raised its mmap threshold, and the ones freed after
    quantizing stay mapped: at the end of a streaming load they were 40 % of the growth in resident memory
    (tests/models/test_memory_plan.py's model: 242 MiB resident for 137 MiB of tensors). Trimming after each
    layer keeps the resident set at what the model holds.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies in a safetensors file: ``nbytes`` bytes from absolute offset ``start``."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    nbytes: int


def read_header(file: Path) -> dict[str, TensorEntry]:
    """The tensors a safetensors file lists, each checked to lie inside the file.

    Raises:
        InputFileError: not safetensors, an unknown dtype, or a file shorter than its header says (truncated).
    """
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        (length,) = struct.unpack("<Q", head) if len(head) == 8 else (-1,)
        if not 0 < length <= min(_HEADER_LIMIT, size - 8):
            raise InputFileError(file, "not a readable safetensors file (its header length is wrong); it may be "
                                       "truncated or damaged: copy or write it again")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InputFileError(file, f"not a readable safetensors file (header: {err}); it may be damaged: "
                                       "copy or write it again") from None
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = _DTYPES[info["dtype"]], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise InputFileError(file, f"tensor {name!r}: its header entry is damaged or of a dtype fourbit does "
                                       "not read") from None
        entry = TensorEntry(file, dtype, shape, 8 + length + begin, end - begin)
        numel = 1
        for n in shape:
            numel *= n
        if entry.nbytes != numel * dtype.itemsize or begin < 0:
            raise InputFileError(file, f"tensor {name!r}: its header entry is damaged (size and shape disagree)")
        if entry.start + entry.nbytes > size:
            raise InputFileError(file, f"truncated: tensor {name!r} ends at byte {entry.start + entry.nbytes:,} "
                                       f"but the file has {size:,} bytes; copy or write it again")
        entries[name] = entry
    return entries


class CheckpointTensors:
    """Every tensor of a model folder's safetensors files, read one at a time without memory-mapping.

    Args:
        folder: the model folder.
        files: its weight files (:func:`fourbit.models.locate.safetensors_files`).

    Raises:
        InputFileError: a damaged or truncated file, or an index that names a tensor its shard does not hold.
    """

    def __init__(self, folder: Path, files: list[Path]) -> None:
        self.entries: dict[str, TensorEntry] = {}
        for file in files:
            self.entries.update(read_header(file))
        index = folder / SAFETENSORS_INDEX
        if index.is_file():
            from fourbit._io import read_json

            for name, shard in read_json(index).get("weight_map", {}).items():
                entry = self.entries.get(name)
                if entry is None or entry.file.name != Path(str(shard)).name:
                    raise InputFileError(folder / str(shard), f"holds no tensor {name!r}, but {SAFETENSORS_INDEX} "
                                                              "lists it there: the shard is damaged or from "
                                                              "another model; copy the model folder again")

    def dtype(self) -> torch.dtype:
        """The checkpoint's float dtype: the one most of its floating-point bytes are in (float32 if none)."""
        totals: dict[torch.dtype, int] = {}
        for e in self.entries.values():
            if e.dtype.is_floating_point:
                totals[e.dtype] = totals.get(e.dtype, 0) + e.nbytes
        return max(totals, key=totals.__getitem__) if totals else torch.float32

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor ``name`` in fresh memory, cast to ``dtype`` (when given).

        Raises:
            InputFileError: the file ends before the tensor does (cut since its header was read).
        """
        e = self.entries[name]
        out = torch.empty(e.nbytes, dtype=torch.uint8)
        view, done = memoryview(out.numpy()), 0
        fd = os.open(e.file, os.O_RDONLY)
        try:
            while done < e.nbytes:
                n = os.preadv(fd, [view[done:done + _READ_CHUNK]], e.start + done)
                if n <= 0:
                    raise InputFileError(e.file, f"truncated: it ends inside tensor {name!r}; copy or write it "
                                                 "again")
                done += n
        finally:
            os.close(fd)
        tensor = out.view(e.dtype).reshape(e.shape)
        return tensor if dtype is None or dtype == e.dtype else tensor.to(dtype)


def can_stream() -> bool:
    """Whether this transformers has the key-conversion rules streaming reuses (transformers 5)."""
    try:
        import transformers.conversion_mapping  # noqa: F401
        from transformers.core_model_loading import rename_source_key  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def _no_init() -> Iterator[None]:
    """Build modules without running their random initialisation (weights are overwritten right after)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        yield


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Build modules whose parameters live on the meta device (no memory) while their buffers are computed
    on the CPU as usual: rotary frequencies and other non-persistent buffers are not in the checkpoint, so
    they must be real. Each parameter is allocated uninitialised (untouched pages: no resident memory) and
    moved to meta at once, one at a time."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        with _no_init():
            yield
    finally:
        nn.Module.register_parameter = original


def meta_skeleton(folder: Path, dtype: torch.dtype) -> nn.Module:
    """The causal LM ``folder/config.json`` describes, its parameters on the meta device, in ``dtype``.

    Raises:
        InputFileError: transformers cannot read the config, or builds no causal LM from it.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config_file = folder / "config.json"
    try:
        config = AutoConfig.from_pretrained(folder)
        with parameters_on_meta():
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (ValueError, KeyError) as err:
        raise InputFileError(config_file, f"transformers cannot build a causal LM from this config: {err}") \
            from None


@dataclass
class _Load:
    """What one streaming load tracks: the model, its checkpoint, and the layers waiting for parameters."""

    model: nn.Module
    tensors: CheckpointTensors
    config: QuantConfig
    compute_dtype: torch.dtype
    pending: set[str]
    errors: list[float] | None
    sources: dict[str, Path]

    def assign(self, key: str, value: torch.Tensor) -> None:
        """Make ``value`` the parameter or buffer ``key`` (as ``from_pretrained`` sets it), then quantize its
        layer if that layer now has all its parameters."""
        owner, _, attr = key.rpartition(".")
        module = self.model.get_submodule(owner)
        ref = getattr(module, attr)
        if tuple(value.shape) != tuple(ref.shape):
            raise InputFileError(self.sources.get(key, "?"), f"tensor for {key!r} has shape {tuple(value.shape)}, "
                                                              f"config.json needs {tuple(ref.shape)}")
        if attr in module._buffers:
            module._buffers[attr] = value
        else:
            module._parameters[attr] = nn.Parameter(value, requires_grad=value.is_floating_point())
        if owner in self.pending and not any(p.is_meta for p in module.parameters(recurse=False)):
            self.quantize(owner)

    def quantize(self, name: str) -> None:
        """Swap the layer ``name`` for its 4-bit version; its float weight goes with the old module."""
        layer = self.model.get_submodule(name)
        try:
            q = quantize_named_layer(name, layer, self.config, self.compute_dtype, self.errors)
        except ValueError as err:  # NaN/Inf: name the file the weight came from
            source = self.sources.get(f"{name}.weight") or next(iter(self.sources.values()))
            raise InputFileError(source, str(err)) from None
        self.model.set_submodule(name, q)
        self.pending.discard(name)
        del layer
        release_freed_memory()


def _load_plan(model: nn.Module, tensors: CheckpointTensors, sources: dict[str, Path]) -> dict:
    """``{first model key: transformers WeightTransform}`` with a reader for every checkpoint tensor, as
    ``convert_and_load_state_dict_in_model`` (transformers 5) builds it; fills ``sources`` (model key ->
    file). Checkpoint tensors the model has no place for are left out, as ``from_pretrained`` leaves them."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        WeightConverter,
        WeightRenaming,
        dot_natural_key,
        rename_source_key,
    )

    mapping = get_model_conversion_mapping(model)
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    meta_state = model.state_dict()
    prefix = model.base_model_prefix
    plan: dict = {}
    for key in sorted(tensors.entries, key=dot_natural_key):
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, meta_state)
        if renamed not in meta_state and key in meta_state:
            renamed, pattern = rename_source_key(key, [], [], prefix, meta_state)
        if renamed not in meta_state:
            continue
        if pattern is not None:
            transform = plan.setdefault(renamed, copy.deepcopy(by_pattern[pattern]))
        else:
            transform, pattern = plan.setdefault(renamed, WeightRenaming(key, renamed)), key
        transform.add_tensor(renamed, key, pattern, _reader(tensors, key, meta_state[renamed].dtype))
        sources.setdefault(renamed, tensors.entries[key].file)
    return plan


def _reader(tensors: CheckpointTensors, key: str, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    """A deferred read (transformers' "sync loading": it calls the function when the layer is converted)."""
    return lambda: tensors.read(key, dtype)


def stream_quantize(folder: Path, files: list[Path], config: QuantConfig, dtype: torch.dtype | None = None, *,
                    progress: bool = False, measure_error: bool = False) -> nn.Module:
    """Load the float model in ``folder`` straight into 4 bits, one layer's float weights at a time.

    Args:
        folder: a checked Hugging Face model folder (config.json and safetensors weights).
        files: its weight files.
        config: what and how to quantize.
        dtype: dtype of what stays float (embeddings, norms, an unquantized head) and of the weights as they
            are quantized; default the checkpoint's own dtype.
        progress: show a progress bar over the tensors.
        measure_error: record the mean relative weight error in the footprint.

    Returns:
        The 4-bit model in eval mode; ``fourbit_info(model)`` holds its footprint and config.

    Raises:
        InputFileError: a damaged, truncated or missing shard, an index naming a tensor its shard lacks, a
            config transformers cannot build, weights that do not fit the config, or a NaN/Inf weight (naming
            the file and the module).
        NotImplementedError: a model with no layer fourbit can quantize.
    """
    tensors = CheckpointTensors(folder, files)
    model = meta_skeleton(folder, dtype or tensors.dtype())
    targets, skipped = quantization_targets(model, config)
    compute_dtype = config.resolved_compute_dtype("cpu")
    before = tensor_bytes(model)
    load = _Load(model, tensors, config, compute_dtype, set(targets), [] if measure_error else None, {})
    plan = _load_plan(model, tensors, load.sources)
    items = list(plan.items())
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc=f"reading and quantizing to {config.quant_type}", unit="tensor")
    for first_key, transform in items:
        realized = transform.convert(first_key, model=model, config=model.config)
        plan[first_key] = None  # the transform holds nothing now; drop it all the same
        for key, value in realized.items():
            load.assign(key, value[0] if isinstance(value, list) else value)
        del realized
    _finish_load(load, folder)
    _recompute_buffers(model)
    finish_quantization(model, config, before=before, skipped=skipped, errors=load.errors)
    _generation_config(model, folder)
    return model.eval()


def _finish_load(load: _Load, folder: Path) -> None:
    """Tie what the config ties (the head to the embeddings), quantize layers whose weight came from a tie,
    and refuse a model with parameters the checkpoint did not hold."""
    model = load.model
    missing = {n for n, p in model.named_parameters(remove_duplicate=False) if p.is_meta}
    if missing and hasattr(model, "tie_weights"):
        try:
            model.tie_weights(missing_keys=set(missing))
        except TypeError:  # older transformers
            model.tie_weights()
    for name in sorted(load.pending):
        if not any(p.is_meta for p in model.get_submodule(name).parameters(recurse=False)):
            load.quantize(name)
    still = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still:
        raise InputFileError(folder, f"the weights do not fit config.json: missing {still[:5]}"
                                     f"{f' and {len(still) - 5} more' if len(still) > 5 else ''}")


def _recompute_buffers(model: nn.Module) -> None:
    """Recompute the buffers the checkpoint does not hold (rotary tables) as ``from_pretrained`` does: by the
    model's own ``_init_weights`` run after loading, in float32 arithmetic. The skeleton's ``__init__`` ran
    under the checkpoint's dtype, which for some models (GPT-J's sinusoid table) rounds an intermediate to
    bf16. Every loaded tensor is flagged initialised first, so the init functions leave it alone; modules of
    remote code, whose init may not check the flag, are left as built unless they hold no parameter."""
    init = getattr(model, "_init_weights", None)
    if init is None:
        return
    custom = bool(getattr(model, "is_custom_code", lambda: False)())
    for t in list(model.parameters()) + list(model.buffers()):
        t._is_hf_initialized = True
    with torch.no_grad():
        for module in model.modules():
            names = [n for n in module._non_persistent_buffers_set if module._buffers.get(n) is not None]
            if not names or (custom and next(module.parameters(recurse=False), None) is not None):
                continue
            for n in names:
                module._buffers[n]._is_hf_initialized = False
            init(module)


def _generation_config(model: nn.Module, folder: Path) -> None:
    """The folder's generation_config.json, as ``from_pretrained`` would load it (none: the config's)."""
    if not (folder / "generation_config.json").is_file() or not hasattr(model, "generation_config"):
        return
    from transformers import GenerationConfig

    with contextlib.suppress(OSError, ValueError):
        model.generation_config = GenerationConfig.from_pretrained(folder)
