"""How big a quantized model is, and what stayed in full precision: :class:`Footprint`,
:func:`model_footprint` and :func:`full_precision_weights` (data only; the command line prints them)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn

from fourbit.nn.linear4bit import Linear4bit
from fourbit.nn.lora import is_conv1d

__all__ = ["Footprint", "full_precision_weights", "model_footprint", "tensor_bytes"]


def _is_4bit(module: nn.Module) -> bool:
    """A fourbit 4-bit module: ``Linear4bit`` or anything holding 4-bit matrices (``quantized_bytes``)."""
    return isinstance(module, Linear4bit) or hasattr(module, "quantized_matrices")


@dataclass
class Footprint:
    """Sizes of a quantized model.

    ``bits_per_param`` counts the packed codes and every quantization constant (absmax or its 8-bit codes,
    the nested absmax and the offset) of the quantized layers: 4 + 32/64 = 4.5 bits at block 64 without
    double quantization, 4 + 8/64 + 32/(64*256) = 4.127 with it (QLoRA, section 3).

    ``full_precision`` reports, per module kind (class name), the weight matrices (parameters of two or more
    dimensions) left in full precision outside the embeddings and the output head: ``{kind: {"matrices": n,
    "params": p}}``; ``full_precision_fraction`` is their share of all such weight-matrix parameters.
    """

    quantized_layers: int = 0
    quantized_params: int = 0
    quantized_bytes: int = 0
    unquantized_linear_bytes: int = 0
    model_bytes_before: int = 0
    model_bytes_after: int = 0
    mean_relative_error: float | None = None
    skipped: list[str] = field(default_factory=list)
    full_precision: dict[str, dict[str, int]] = field(default_factory=dict)
    full_precision_fraction: float = 0.0

    @property
    def bits_per_param(self) -> float:
        return 8.0 * self.quantized_bytes / self.quantized_params if self.quantized_params else 0.0

    @property
    def quantized_fraction(self) -> float:
        """Share of the weight-matrix parameters (outside embeddings and the output head) held in 4 bits."""
        return 1.0 - self.full_precision_fraction if self.quantized_params else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["bits_per_param"] = self.bits_per_param
        return d


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of every distinct parameter and buffer of ``module``, plus the quant states of its 4-bit layers."""
    seen: set[int] = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        key = t.data_ptr() if t.device.type != "meta" else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    for m in module.modules():
        if isinstance(m, Linear4bit):  # its quant state is not a buffer (Experts4bit's are, counted above)
            total += m.quant_state.nbytes()
    return total


def full_precision_weights(model: nn.Module) -> list[tuple[str, str, int]]:
    """Every weight matrix left in full precision, outside the embeddings and the output head.

    Returns:
        ``(parameter name, module kind, number of elements)`` for each parameter of two or more dimensions
        that is not 4-bit and not part of an ``nn.Embedding`` or of ``model.get_output_embeddings()``.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out: list[tuple[str, str, int]] = []
    seen: set[int] = set()
    for name, module in model.named_modules():
        if _is_4bit(module) or isinstance(module, nn.Embedding) or module is head:
            for p in module.parameters():
                seen.add(id(p))  # tied copies elsewhere are the same tensor
            continue
        for pname, p in module.named_parameters(recurse=False):
            if p.dim() < 2 or id(p) in seen:
                continue
            seen.add(id(p))
            out.append((f"{name}.{pname}" if name else pname, type(module).__name__, p.numel()))
    return out


def model_footprint(model: nn.Module) -> Footprint:
    """Measure the footprint of a (possibly partly) quantized model as it is now."""
    fp = Footprint()
    for m in model.modules():
        if isinstance(m, Linear4bit):
            fp.quantized_layers += 1
            fp.quantized_params += m.in_features * m.out_features
            fp.quantized_bytes += m.quantized_bytes()
        elif hasattr(m, "quantized_matrices"):
            fp.quantized_layers += 1
            fp.quantized_params += m.quantized_params()
            fp.quantized_bytes += m.quantized_bytes()
    fp.model_bytes_after = tensor_bytes(model)
    fp.unquantized_linear_bytes = sum(m.weight.numel() * m.weight.element_size()
                                      for m in model.modules() if isinstance(m, nn.Linear) or is_conv1d(m))
    kinds: dict[str, dict[str, int]] = {}
    for _, kind, n in full_precision_weights(model):
        entry = kinds.setdefault(kind, {"matrices": 0, "params": 0})
        entry["matrices"] += 1
        entry["params"] += n
    fp.full_precision = kinds
    left = sum(e["params"] for e in kinds.values())
    total = left + fp.quantized_params
    fp.full_precision_fraction = left / total if total else 0.0
    return fp
