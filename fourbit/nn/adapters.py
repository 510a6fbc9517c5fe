"""LoRA adapters on disk in peft's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensor keys are peft's: ``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight`` and, for
``modules_to_save`` (e.g. a classification ``score`` head), ``base_model.model.<module path>.weight``. So
``peft.PeftModel.from_pretrained(base, dir)`` loads an adapter saved here and :func:`load_adapter` loads one
saved by peft. Files are written atomically; weights are read only through safetensors.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fourbit._errors import FieldError, InputFileError
from fourbit._io import atomic_write_text, check_output_dir, load_safetensors, read_json, save_safetensors

from .lora import (
    LoRASpec,
    _features,
    _is_saved_module,
    find_target_modules,
    inject_lora,
    lora_modules,
    lora_spec,
    replace_with_copy,
    unload_lora,
)

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "adapter_state_dict",
    "load_adapter",
    "load_adapter_weights",
    "read_adapter_config",
    "save_adapter",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."


def adapter_state_dict(model: nn.Module, modules_to_save: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft's key names (detached, contiguous copies).

    Args:
        model: a model with LoRA layers from :func:`fourbit.nn.lora.inject_lora`.
        modules_to_save: fully trained modules to include; default the ones recorded at injection.
    """
    spec = lora_spec(model)
    saved = tuple(modules_to_save if modules_to_save is not None else (spec.modules_to_save if spec else ()))
    out: dict[str, torch.Tensor] = {}
    adapter = _adapter_tensors(model)
    for key, t in adapter.items():
        out[_PREFIX + key] = t.detach().contiguous().clone()
    if saved:
        ids = {id(t) for t in adapter.values()}
        for pname, p in model.named_parameters():
            if _is_saved_module(pname.rpartition(".")[0], saved) and id(p) not in ids:
                out[_PREFIX + pname] = p.detach().contiguous().clone()
    return out


def _adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every LoRA layer's adapter tensors (:meth:`fourbit.nn.lora.LoRALinear.adapter_params`) by their full
    name in the model (``<module path>.lora_A.weight``)."""
    return {f"{name}.{key}": t for name, m in lora_modules(model).items() for key, t in m.adapter_params().items()}


def _target_names_for_config(model: nn.Module, wrapped: list[str]) -> list[str]:
    """Short names (``q_proj``) when they select exactly the wrapped modules, else the full paths."""
    short = sorted({n.rsplit(".", 1)[-1] for n in wrapped})
    try:
        if sorted(find_target_modules(_Unwrapped(model), short)) == sorted(wrapped):
            return short
    except ValueError:
        pass
    return sorted(wrapped)


class _Unwrapped:
    """View of a LoRA model whose ``named_modules`` shows each LoRALinear as its base (for name matching)."""

    def __init__(self, model: nn.Module) -> None:
        self._model = model

    def named_modules(self):
        wrapped = set(lora_modules(self._model))
        for name, m in self._model.named_modules():
            if name in wrapped:
                yield name, m.base
            elif not any(name.startswith(w + ".") for w in wrapped):
                yield name, m

    def get_output_embeddings(self):
        return self._model.get_output_embeddings() if hasattr(self._model, "get_output_embeddings") else None


def _task_type(model: nn.Module) -> str:
    name = type(model).__name__
    return "SEQ_CLS" if name.endswith("ForSequenceClassification") else "CAUSAL_LM"


def save_adapter(
    model: nn.Module,
    folder: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
    modules_to_save: Sequence[str] | None = None,
) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (peft format) into ``folder``.

    Args:
        model: a model with LoRA layers (from :func:`inject_lora` or :func:`load_adapter`).
        folder: output folder (created).
        base_model_name_or_path: recorded in the config for peft's ``AutoPeftModel``.
        modules_to_save: override the fully trained modules recorded at injection.

    Returns:
        The folder.

    Raises:
        FieldError: the model has no LoRA layers, or ``folder`` is a file.
    """
    layers = lora_modules(model)
    if not layers:
        raise FieldError("model", "has no LoRA layers to save; call inject_lora() first")
    spec = lora_spec(model)
    first = next(iter(layers.values()))
    saved = list(modules_to_save if modules_to_save is not None else (spec.modules_to_save if spec else ()))
    config = {
        "peft_type": "LORA",
        "task_type": _task_type(model),
        "base_model_name_or_path": base_model_name_or_path,
        "r": first.r,
        "lora_alpha": first.alpha,
        "lora_dropout": spec.dropout if spec else 0.0,
        "use_rslora": first.use_rslora,
        "target_modules": _target_names_for_config(model, list(layers)),
        "modules_to_save": saved or None,
        "bias": "none",
        # peft's meaning: the wrapped base stores its weight [in, out] (a float Conv1D). A 4-bit layer quantized
        # from a Conv1D stores [out, in], as bitsandbytes does, so an adapter over a 4-bit GPT-2 says False.
        "fan_in_fan_out": any(m.fan_in_fan_out for m in layers.values()),
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": first.use_dora,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    folder = check_output_dir(folder, overwrite=True, field="folder")
    folder.mkdir(parents=True, exist_ok=True)
    # weights first, config last: a folder whose config is there holds its weights (each file is atomic)
    save_safetensors(adapter_state_dict(model, saved), folder / ADAPTER_WEIGHTS)
    atomic_write_text(folder / ADAPTER_CONFIG, json.dumps(config, indent=2) + "\n")
    return folder


def read_adapter_config(folder: str | os.PathLike) -> dict[str, Any]:
    """Read and check an adapter config (peft's or ours).

    ``fan_in_fan_out`` is accepted either way: as peft does, fourbit decides it per layer from the base layer
    (True for a float ``Conv1D``, False otherwise); the A/B tensors have the same layout in both cases.

    Raises:
        InputFileError: not an adapter folder, missing weights, a malformed or non-LoRA config (naming the file).
        NotImplementedError: peft options fourbit does not implement (bias, rank/alpha patterns...).
    """
    folder = Path(folder)
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        raise InputFileError(folder, f"not an adapter folder (no {ADAPTER_CONFIG})")
    if not (folder / ADAPTER_WEIGHTS).is_file():
        pickled = folder / "adapter_model.bin"
        why = f"{pickled.name} is not loaded (unpickling can run code); " if pickled.is_file() else ""
        raise InputFileError(folder, f"no {ADAPTER_WEIGHTS}: {why}fourbit reads adapter weights only from "
                                     "safetensors")
    cfg = read_json(path)
    if not isinstance(cfg, dict):
        raise InputFileError(path, f"expected a JSON object, got {type(cfg).__name__}")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise InputFileError(path, f"peft_type {cfg.get('peft_type')!r} is not LORA")
    unsupported = {
        "bias": lambda v: v not in (None, "none"),
        "rank_pattern": lambda v: bool(v),
        "alpha_pattern": lambda v: bool(v), "layers_to_transform": lambda v: v is not None,
        "lora_bias": lambda v: bool(v),
    }
    for key, bad in unsupported.items():
        if key in cfg and bad(cfg[key]):
            raise NotImplementedError(f"{path}: adapter option {key}={cfg[key]!r} is not supported by fourbit")
    for key in ("r", "lora_alpha", "target_modules"):
        if cfg.get(key) is None:
            raise InputFileError(path, f"missing {key!r}")
    if not isinstance(cfg["r"], int) or isinstance(cfg["r"], bool) or cfg["r"] <= 0:
        raise InputFileError(path, f"r: the LoRA rank must be a positive integer, got {cfg['r']!r}")
    if not isinstance(cfg["lora_alpha"], int | float) or not cfg["lora_alpha"] > 0:
        raise InputFileError(path, f"lora_alpha: must be a number > 0, got {cfg['lora_alpha']!r}")
    targets = cfg["target_modules"]
    if not (isinstance(targets, str) or (isinstance(targets, list) and targets
                                         and all(isinstance(t, str) for t in targets))):
        raise InputFileError(path, f"target_modules: expected a regex or a list of module names, got {targets!r}")
    return cfg


def _strip_key(key: str) -> str:
    """peft key -> module-path key (also accepts keys still holding peft's adapter name, ``.default``)."""
    return re.sub(r"\.(lora_[AB])\.default\.weight$", r".\1.weight", key.removeprefix(_PREFIX))


def load_adapter_weights(model: nn.Module, folder: str | os.PathLike) -> None:
    """Copy the adapter tensors from ``folder`` into a model that already has matching LoRA layers.

    Raises:
        InputFileError: a truncated or damaged weights file; keys that are missing, unexpected or of the wrong
            shape (naming the adapter file, the module and both shapes).
    """
    file = Path(folder) / ADAPTER_WEIGHTS
    tensors = {_strip_key(k): v for k, v in load_safetensors(file).items()}
    expected = _adapter_tensors(model)
    ids = {id(t) for t in expected.values()}
    params = dict(model.named_parameters())
    extra = {k: params[k] for k in tensors if k not in expected and k in params and id(params[k]) not in ids}
    expected.update(extra)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise InputFileError(file, f"the adapter does not fit the model: missing {missing[:4]}"
                                   f"{' ...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
                                   f"{' ...' if len(unexpected) > 4 else ''}; was it trained on another model?")
    bad = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(p.shape)}"
           for k, p in expected.items() if tensors[k].shape != p.shape]
    if bad:
        raise InputFileError(file, f"the adapter's shapes do not fit the model: {'; '.join(bad[:4])}; was it "
                                   "trained on another model?")
    with torch.no_grad():
        for k, p in expected.items():
            p.copy_(tensors[k].to(p.dtype))


def _replace_saved_modules(model: nn.Module, modules_to_save: Sequence[str]) -> None:
    """Put a copy in place of each module an adapter's ``modules_to_save`` names, for its weights to be loaded
    into, and record the original (``fourbit_info(model).replaced_modules``) for :func:`unload_lora` to put
    back: loading into the model's own module would change the base for good (and, for a head tied to the
    input embeddings, the embeddings with it). peft keeps such a copy too (``ModulesToSaveWrapper``)."""
    for entry in modules_to_save:
        for name in [n for n, _ in model.named_modules() if n == entry or n.endswith("." + entry)]:
            replace_with_copy(model, name)


def load_adapter(model: nn.Module, folder: str | os.PathLike) -> nn.Module:
    """Inject LoRA as the adapter in ``folder`` describes and load its weights (peft or fourbit format).

    The check runs before the model is touched: on any error the model is left unchanged.

    Args:
        model: an unmodified (possibly 4-bit) transformers model.
        folder: adapter folder with ``adapter_config.json`` and ``adapter_model.safetensors``.

    Returns:
        ``model`` with LoRA layers holding the adapter (in eval mode, no dropout); modules the adapter's
        ``modules_to_save`` names are trained copies in place of the model's own, which
        :func:`fourbit.nn.lora.unload_lora` puts back.

    Raises:
        InputFileError: adapter missing, malformed, truncated, or its target modules or shapes do not fit the
            model (naming the file, the module and both shapes).
        NotImplementedError: peft options fourbit does not implement.
    """
    from safetensors import SafetensorError, safe_open

    cfg = read_adapter_config(folder)
    weights = Path(folder) / ADAPTER_WEIGHTS
    targets = cfg["target_modules"]
    targets = targets if isinstance(targets, str) else tuple(targets)
    present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()} | {n for n, _ in model.named_modules()}
    saved = tuple(m for m in (cfg.get("modules_to_save") or ()) if m in present)
    try:
        spec = LoRASpec(r=int(cfg["r"]), alpha=float(cfg["lora_alpha"]),
                        dropout=float(cfg.get("lora_dropout") or 0.0), target_modules=targets,
                        use_rslora=bool(cfg.get("use_rslora", False)), modules_to_save=saved,
                        use_dora=bool(cfg.get("use_dora", False)))
    except (FieldError, TypeError, ValueError) as e:
        raise InputFileError(Path(folder) / ADAPTER_CONFIG, f"not a usable LoRA config: {e}") from None
    try:
        names = find_target_modules(model, spec.target_modules, spec.modules_to_save)
    except FieldError as e:
        raise InputFileError(Path(folder) / ADAPTER_CONFIG, f"the adapter's target modules do not fit the model: "
                                                            f"{e.message}; was it trained on another model?") from None
    # Dry run on shapes before modifying the model.
    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {_strip_key(k): tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise InputFileError(weights, f"not a readable safetensors file ({err}); it may be truncated or "
                                      "damaged: write it again") from None
    problems = []
    for n in names:
        base = model.get_submodule(n)
        in_features, out_features = _features(base)
        want = {f"{n}.lora_A.weight": (spec.r, in_features), f"{n}.lora_B.weight": (out_features, spec.r)}
        if spec.use_dora:
            want[f"{n}.lora_magnitude_vector"] = (out_features,)
        for k, shape in want.items():
            if k not in shapes:
                problems.append(f"missing {k}")
            elif shapes[k] != shape:
                problems.append(f"module {n!r} {k[len(n) + 1:]}: file {shapes[k]} vs model {shape}")
    if problems:
        raise InputFileError(weights, f"the adapter does not fit the model: {'; '.join(problems[:4])}"
                                      f"{' ...' if len(problems) > 4 else ''}; was it trained on another model?")
    inject_lora(model, spec)
    try:
        _replace_saved_modules(model, spec.modules_to_save)
        load_adapter_weights(model, folder)
    except BaseException:
        unload_lora(model)  # the model is left as it was given
        raise
    return model.eval()
