"""Quantization math: codebooks, blockwise 4-bit and 8-bit quantization, double quantization, QuantState."""

from fourbit.quant.blockwise import (
    check_blocksize,
    dequantize_4bit,
    dequantize_absmax,
    dequantize_blockwise,
    double_quantize_absmax,
    quantize_4bit,
    quantize_blockwise,
)
from fourbit.quant.codebooks import QUANT_TYPES, dynamic_map, fp4_code, get_code, int4_code, nf4_code
from fourbit.quant.state import QuantState

__all__ = [
    "QUANT_TYPES",
    "QuantState",
    "check_blocksize",
    "dequantize_4bit",
    "dequantize_absmax",
    "dequantize_blockwise",
    "double_quantize_absmax",
    "dynamic_map",
    "fp4_code",
    "get_code",
    "int4_code",
    "nf4_code",
    "quantize_4bit",
    "quantize_blockwise",
]
