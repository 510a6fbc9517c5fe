"""fourbit: QLoRA made cheap. NF4 quantization, LoRA through a frozen 4-bit model, 8-bit paged optimizers,
and document QA with the 4-bit model."""

from fourbit.quant import QuantState, dequantize_4bit, dequantize_blockwise, quantize_4bit, quantize_blockwise

__version__ = "0.1.0"

__all__ = [
    "QuantState",
    "__version__",
    "dequantize_4bit",
    "dequantize_blockwise",
    "quantize_4bit",
    "quantize_blockwise",
]
