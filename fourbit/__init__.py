"""fourbit: QLoRA made cheap. NF4 quantization, LoRA through a frozen 4-bit model, 8-bit paged optimizers,
and document QA with the 4-bit model.

The names below come from :mod:`fourbit.quant` when first used, so that ``import fourbit`` (and the
``fourbit`` command, before it knows what it will do) does not wait seconds for torch: a Ctrl-C while the
command starts then meets the command line's own handling (exit code 130 and one line), not a traceback.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fourbit.quant import (
        QuantState,
        dequantize_4bit,
        dequantize_blockwise,
        quantize_4bit,
        quantize_blockwise,
    )

__version__ = "0.1.0"

__all__ = [
    "QuantState",
    "__version__",
    "dequantize_4bit",
    "dequantize_blockwise",
    "quantize_4bit",
    "quantize_blockwise",
]

_FROM_QUANT = frozenset(__all__) - {"__version__"}


def __getattr__(name: str) -> Any:
    """The public names of :mod:`fourbit.quant`, imported on first use (PEP 562); so are ``fourbit.quant`` and
    ``fourbit.kernels`` themselves, which ``import fourbit`` used to import."""
    if name in _FROM_QUANT or name in ("quant", "kernels"):
        import fourbit.quant

        return getattr(fourbit.quant, name) if name in _FROM_QUANT else globals()[name]
    raise AttributeError(f"module 'fourbit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
