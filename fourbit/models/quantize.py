"""Quantize a model in place: every selected ``nn.Linear`` becomes a frozen :class:`Linear4bit`, layer by
layer (QLoRA, section 3: NF4 storage with double-quantized constants, 16-bit compute)."""

from __future__ import annotations

import torch
from torch import nn

from fourbit.models.config import QuantConfig
from fourbit.models.footprint import Footprint, model_footprint, tensor_bytes
from fourbit.nn.info import fourbit_info
from fourbit.nn.linear4bit import Linear4bit

__all__ = ["quantize_model"]


def quantize_model(
    model: nn.Module, config: QuantConfig | None = None, *, progress: bool = False, measure_error: bool = False
) -> Footprint:
    """Replace every selected ``nn.Linear`` of ``model`` by a :class:`Linear4bit`, in place, layer by layer.

    Each layer's full-precision weight is released as soon as its 4-bit copy exists, so peak memory stays
    near the unquantized model plus one layer. The config and the footprint are recorded in
    ``fourbit_info(model)`` (:mod:`fourbit.nn.info`), and ``model.config.quantization_config`` is set as
    transformers + bitsandbytes would set it.

    Args:
        model: any torch module (typically a transformers causal LM).
        config: what and how to quantize; default :class:`QuantConfig()`.
        progress: show a tqdm bar over layers.
        measure_error: also compute the mean over layers of ||W - dequant(quant(W))|| / ||W||.

    Returns:
        The :class:`Footprint` (model bytes before and after, bits per quantized parameter).

    Raises:
        ValueError: a weight holds NaN or Inf, or cannot be quantized (the message names the module).
    """
    config = config or QuantConfig()
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    compute_dtype = config.resolved_compute_dtype(device)
    before = tensor_bytes(model)
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
            raise ValueError(f"module {name!r}: {err}") from None
        if measure_error:
            w = linear.weight.detach().float()
            errors.append(float((q.dequantize(torch.float32) - w).norm() / w.norm().clamp(min=1e-30)))
            del w
        model.set_submodule(name, q)
        del linear, q
    fp = model_footprint(model)
    if measure_error:
        fp.mean_relative_error = sum(errors) / len(errors) if errors else 0.0
    fp.model_bytes_before = before
    fp.skipped = skipped
    if hasattr(model, "config"):
        model.config.quantization_config = config.to_bnb_dict(device)
    info = fourbit_info(model)
    info.quant_config, info.footprint = config, fp
    return fp
