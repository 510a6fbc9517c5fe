"""One dispatch point for the heavy tensor kernels.

Each function here picks an implementation for its inputs: the Triton kernels (``fourbit.kernels.triton_kernels``)
for CUDA tensors when Triton is importable, the compiled CPU kernels (``fourbit.kernels.cpu``, built on first
use with the system C compiler) for CPU tensors, else the PyTorch reference (``fourbit.kernels.reference``),
which defines the results. Set ``FOURBIT_KERNELS=reference`` to force the reference path everywhere (the fast
kernels are tested to give identical bytes).
Nothing is probed or compiled at import time.
"""

from __future__ import annotations

import os

import torch

from fourbit.kernels import reference

__all__ = [
    "backend_for",
    "quantize_4bit_blocks",
    "dequantize_4bit",
    "quantize_8bit_blocks",
    "dequantize_8bit_blocks",
    "linear_4bit",
]


def _forced() -> str:
    return os.environ.get("FOURBIT_KERNELS", "auto").lower()


def backend_for(t: torch.Tensor):
    """The kernel module for tensor ``t``: triton_kernels (CUDA), cpu (compiled), or reference."""
    if _forced() == "reference":
        return reference
    if t.device.type == "cuda":
        try:
            from fourbit.kernels import triton_kernels
        except ImportError:
            return reference
        return triton_kernels if triton_kernels.available() else reference
    if t.device.type != "cpu":
        return reference
    from fourbit.kernels import cpu

    return cpu if cpu.available() else reference


def quantize_4bit_blocks(flat: torch.Tensor, code: torch.Tensor, blocksize: int):
    return backend_for(flat).quantize_4bit_blocks(flat, code, blocksize)


def dequantize_4bit(packed: torch.Tensor, state, n: int, dtype: torch.dtype) -> torch.Tensor:
    """Dequantize ``n`` values; the compiled kernel also undoes double quantization without a float32 copy."""
    backend = backend_for(packed)
    if backend is reference:
        from fourbit.quant.blockwise import dequantize_absmax

        return reference.dequantize_4bit_blocks(packed, dequantize_absmax(state), state.code.float(),
                                                state.blocksize, n, dtype)
    return backend.dequantize_4bit_blocks(packed, state.absmax, state.code, state.blocksize, n, dtype, state)


def quantize_8bit_blocks(flat: torch.Tensor, code: torch.Tensor, blocksize: int):
    return reference.quantize_8bit_blocks(flat, code, blocksize)


def dequantize_8bit_blocks(codes, absmax, code, blocksize: int, dtype: torch.dtype):
    return reference.dequantize_8bit_blocks(codes, absmax, code, blocksize, dtype)


def linear_4bit(x: torch.Tensor, packed: torch.Tensor, state, out_features: int, in_features: int) -> torch.Tensor:
    """``x @ dequant(W).T`` for a 4-bit W [out_features, in_features] (fused kernel for small batches)."""
    backend = backend_for(x)
    if backend is reference:
        from fourbit.quant.blockwise import dequantize_absmax

        return reference.linear_4bit(x, packed, dequantize_absmax(state), state.code.float(), state.blocksize,
                                     out_features, in_features)
    return backend.linear_4bit(x, packed, state.absmax, state.code, state.blocksize, out_features, in_features,
                               state)
