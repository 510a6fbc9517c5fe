"""How big a quantized model is: :class:`Footprint` and :func:`model_footprint` (data only; the command line
prints it as a table)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn

from fourbit.nn.linear4bit import Linear4bit

__all__ = ["Footprint", "model_footprint", "tensor_bytes"]


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
    fp.model_bytes_after = tensor_bytes(model)
    fp.unquantized_linear_bytes = sum(m.weight.numel() * m.weight.element_size()
                                      for m in model.modules() if isinstance(m, nn.Linear))
    return fp
