"""Quantize a model in place: every selected linear-like layer (``nn.Linear``, GPT-2's ``Conv1D``) becomes a
frozen :class:`Linear4bit`, and every fused mixture-of-experts weight a :class:`fourbit.nn.experts.Experts4bit`,
layer by layer (QLoRA, section 3: NF4 storage with double-quantized constants, 16-bit compute).

Nothing is left in full precision silently: the footprint reports, per module kind, the weight matrices that
stayed in full precision, and :class:`UnquantizedWeightsWarning` is raised when they are more than 5 % of the
weight-matrix parameters outside the embeddings and the output head (``skip_modules`` silences it for what it
names).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from fourbit.models.config import QuantConfig
from fourbit.models.footprint import Footprint, full_precision_weights, model_footprint, tensor_bytes
from fourbit.nn.experts import Experts4bit, is_fused_experts
from fourbit.nn.info import fourbit_info
from fourbit.nn.linear4bit import Linear4bit
from fourbit.nn.lora import LoRALinear, is_conv1d
from fourbit.quant.blockwise import dequantize_4bit, dequantize_absmax
from fourbit.quant.state import QuantState

__all__ = ["UNQUANTIZED_WARN_FRACTION", "UnquantizedWeightsWarning", "finish_quantization", "quantization_targets",
           "quantize_layer", "quantize_model", "quantize_named_layer"]

#: warn when more than this share of the weight-matrix parameters (outside embeddings and head) stays float
UNQUANTIZED_WARN_FRACTION = 0.05


class UnquantizedWeightsWarning(UserWarning):
    """More than 5 % of a model's weight-matrix parameters stayed in full precision after quantization."""


def quantize_layer(module: nn.Module, config: QuantConfig, compute_dtype: torch.dtype) -> nn.Module:
    """The 4-bit version of one linear-like layer or fused-experts module (``module`` is read, not changed).

    A ``Conv1D`` (weight ``[in, out]``) is quantized transposed, as transformers' bitsandbytes integration
    does, so the 4-bit weight is ``[out, in]`` like every ``Linear4bit`` and its checkpoint keys and bytes are
    bitsandbytes'; the layer's ``layout`` is ``"conv1d"``, so that a float copy of it is a ``Conv1D`` again.
    """
    kwargs = dict(quant_type=config.quant_type, blocksize=config.blocksize, double_quant=config.double_quant,
                  compute_dtype=compute_dtype)
    if is_fused_experts(module):
        return Experts4bit.from_experts(module, **kwargs)
    return Linear4bit.from_linear(module, **kwargs)


def _weight_of(module: nn.Module) -> torch.Tensor:
    """The float weight ``quantize_layer`` quantizes, ``[out, in]`` (or ``[experts, ...]``), for the error."""
    if is_fused_experts(module):
        return torch.cat([p.detach().float().flatten() for p in module.parameters() if p.dim() == 3])
    w = module.weight.detach().float()
    return w.t() if is_conv1d(module) else w


def quantize_model(
    model: nn.Module, config: QuantConfig | None = None, *, progress: bool = False, measure_error: bool = False
) -> Footprint:
    """Replace every selected linear-like layer of ``model`` by a 4-bit one, in place, layer by layer.

    Quantized: ``nn.Linear`` and transformers' ``Conv1D`` -> :class:`Linear4bit`; the fused 3-D expert
    weights of mixture-of-experts models -> :class:`fourbit.nn.experts.Experts4bit` (NF4 + double
    quantization per expert matrix). Each layer's full-precision weight is released as soon as its 4-bit copy
    exists, so peak memory stays near the unquantized model plus one layer. The config and the footprint are
    recorded in ``fourbit_info(model)`` (:mod:`fourbit.nn.info`), and ``model.config.quantization_config`` is
    set as transformers + bitsandbytes would set it.

    Args:
        model: any torch module (typically a transformers causal LM).
        config: what and how to quantize; default :class:`QuantConfig()`.
        progress: show a tqdm bar over layers.
        measure_error: also compute the mean over layers of ||W - dequant(quant(W))|| / ||W||.

    Returns:
        The :class:`Footprint` (model bytes before and after, bits per quantized parameter, and what stayed
        in full precision per module kind).

    Warns:
        UnquantizedWeightsWarning: more than 5 % of the weight-matrix parameters outside the embeddings and
            the output head stayed in full precision, not counting modules ``skip_modules`` names.

    Raises:
        NotImplementedError: the model has no layer fourbit can quantize (naming its type).
        ValueError: a weight holds NaN or Inf, or cannot be quantized (the message names the module).
    """
    config = config or QuantConfig()
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    compute_dtype = config.resolved_compute_dtype(device)
    before = tensor_bytes(model)
    targets, skipped = quantization_targets(model, config)
    errors: list[float] = []
    iterator = targets
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(targets, desc=f"quantizing to {config.quant_type}", unit="layer")
    for name in iterator:
        layer = model.get_submodule(name)
        q = quantize_named_layer(name, layer, config, compute_dtype, errors if measure_error else None)
        model.set_submodule(name, q)
        del layer, q
    return finish_quantization(model, config, before=before, skipped=skipped,
                               errors=errors if measure_error else None, device=device)


def quantization_targets(model: nn.Module, config: QuantConfig) -> tuple[list[str], list[str]]:
    """The names of the layers ``config`` quantizes and of those it skips (linear, Conv1D, fused experts).

    Names only: holding the modules would keep every float weight alive until the end. Works on a skeleton
    whose parameters are on the meta device.

    Raises:
        NotImplementedError: the model has no such layer besides its output head (naming its type).
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    # A LoRA layer's insides are never quantized: its adapter trains in float, and its base is 4-bit already
    # (LoftQ quantizes the targets itself before the rest of the model is quantized).
    inside_lora = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, LoRALinear))
    candidates = [name for name, m in model.named_modules()
                  if (isinstance(m, nn.Linear) or is_conv1d(m) or is_fused_experts(m))
                  and not (inside_lora and name.startswith(inside_lora))]
    already = any(isinstance(m, Linear4bit | Experts4bit) for m in model.modules())
    if not already and not [n for n in candidates if model.get_submodule(n) is not head]:
        kind = getattr(getattr(model, "config", None), "model_type", None)
        raise NotImplementedError(f"fourbit cannot quantize a {type(model).__name__}"
                                  f"{f' ({kind!r} model)' if kind else ''}: it has no linear, Conv1D or "
                                  "fused-experts layer to hold 4-bit weights")
    return ([name for name in candidates if config.selects(name)],
            [name for name in candidates if not config.selects(name)])


def quantize_named_layer(name: str, layer: nn.Module, config: QuantConfig, compute_dtype: torch.dtype,
                         errors: list[float] | None = None) -> nn.Module:
    """:func:`quantize_layer` on the layer called ``name``, appending its relative weight error to ``errors``
    (when given): ||W - dequant(quant(W))|| / ||W||.

    Raises:
        ValueError: naming the module, for a weight that cannot be quantized (NaN or Inf).
    """
    try:
        q = quantize_layer(layer, config, compute_dtype)
    except ValueError as err:
        raise ValueError(f"module {name!r}: {err}") from None
    if errors is not None:
        errors.append(_relative_error(layer, q))
    return q


def _relative_error(layer: nn.Module, q: nn.Module, chunk: int = 1 << 20) -> float:
    """||W - dequant(quant(W))|| / ||W||, for a linear layer ``chunk`` elements at a time: at 8B the whole
    weight three times over in float32 (the weight, its dequantized copy, their difference) would be 0.7 GB
    above what streaming quantization otherwise holds. Squared norms are float32 dot products per chunk
    (relative error ~1e-6, far below the 4 digits reported): float64 sums took half of ``fourbit quantize``."""
    if not isinstance(q, Linear4bit):
        w = _weight_of(layer)
        w_hat = torch.cat([t.flatten() for t in q.dequantize(torch.float32)])
        return float((w_hat - w.flatten()).norm() / w.norm().clamp(min=1e-30))
    weight = layer.weight.detach()
    flat = (weight.t() if is_conv1d(layer) else weight).reshape(-1)
    state = q.quant_state
    absmax = dequantize_absmax(state)
    step = chunk - chunk % (2 * state.blocksize)
    diff = total = 0.0  # float32 dot products within a chunk (BLAS), summed across chunks in float64
    for s in range(0, flat.numel(), step):
        w = flat[s:s + step].float()
        part = QuantState(absmax=absmax[s // state.blocksize:-(-(s + w.numel()) // state.blocksize)],
                          shape=(w.numel(),), code=state.code, blocksize=state.blocksize,
                          quant_type=state.quant_type, dtype=torch.float32)
        w_hat = dequantize_4bit(q.weight.reshape(-1)[s // 2:(s + w.numel() + 1) // 2], part, torch.float32)
        total += float(torch.dot(w, w))
        w_hat.sub_(w)
        diff += float(torch.dot(w_hat, w_hat))
    return math.sqrt(diff) / max(math.sqrt(total), 1e-30)


def finish_quantization(model: nn.Module, config: QuantConfig, *, before: int, skipped: list[str],
                        errors: list[float] | None, device: torch.device | str = "cpu") -> Footprint:
    """Measure the quantized model, warn about what stayed float, and record what was done (the footprint
    and config in ``fourbit_info(model)``, ``model.config.quantization_config``); returns the footprint."""
    fp = model_footprint(model)
    if errors is not None:
        fp.mean_relative_error = sum(errors) / len(errors) if errors else 0.0
    fp.model_bytes_before = before
    fp.skipped = skipped
    _warn_if_left_unquantized(model, config, fp)
    if hasattr(model, "config"):
        model.config.quantization_config = config.to_bnb_dict(device)
    info = fourbit_info(model)
    info.quant_config, info.footprint = config, fp
    return fp


def _warn_if_left_unquantized(model: nn.Module, config: QuantConfig, fp: Footprint) -> None:
    left = [(name, kind, n) for name, kind, n in full_precision_weights(model)
            if not config.skips(name.rpartition(".")[0])]
    total = fp.quantized_params + sum(n for _, _, n in full_precision_weights(model))
    unexplained = sum(n for _, _, n in left)
    if total and unexplained > UNQUANTIZED_WARN_FRACTION * total:
        kinds: dict[str, int] = {}
        for _, kind, n in left:
            kinds[kind] = kinds.get(kind, 0) + n
        listed = ", ".join(f"{k} ({n:,d} params)" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1]))
        warnings.warn(f"{100 * unexplained / total:.1f}% of the weight-matrix parameters of this "
                      f"{type(model).__name__} stayed in full precision: {listed} (left out by `include`, or of a kind "
                      "fourbit does not quantize: it quantizes nn.Linear, Conv1D and fused experts); name such "
                      "modules in `skip_modules` to keep them float without this warning", UnquantizedWeightsWarning, stacklevel=4)
