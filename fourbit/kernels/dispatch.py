"""One dispatch point for the heavy tensor kernels.

Each function here picks an implementation for its inputs: the compiled CPU kernels (``fourbit.kernels.cpu``,
built on first use with the system C compiler) for CPU tensors, else the PyTorch reference
(``fourbit.kernels.reference``), which defines the results. Set ``FOURBIT_KERNELS=reference`` to force the
reference path everywhere (the compiled kernels are tested to give identical bytes).
Nothing is probed or compiled at import time.
"""

from __future__ import annotations

import os

import torch

from fourbit.kernels import reference

__all__ = [
    "backend_for",
    "quantize_4bit_blocks",
    "dequantize_4bit_blocks",
    "quantize_8bit_blocks",
    "dequantize_8bit_blocks",
    "linear_4bit",
]


def _forced() -> str:
    return os.environ.get("FOURBIT_KERNELS", "auto").lower()


def backend_for(t: torch.Tensor):
    """The kernel module to use for tensor ``t``: ``fourbit.kernels.cpu`` or ``fourbit.kernels.reference``."""
    if _forced() == "reference" or t.device.type != "cpu":
        return reference
    from fourbit.kernels import cpu

    return cpu if cpu.available() else reference


def quantize_4bit_blocks(flat: torch.Tensor, code: torch.Tensor, blocksize: int):
    return backend_for(flat).quantize_4bit_blocks(flat, code, blocksize)


def dequantize_4bit_blocks(packed, absmax, code, blocksize: int, n: int, dtype: torch.dtype):
    return backend_for(packed).dequantize_4bit_blocks(packed, absmax, code, blocksize, n, dtype)


def quantize_8bit_blocks(flat: torch.Tensor, code: torch.Tensor, blocksize: int):
    return reference.quantize_8bit_blocks(flat, code, blocksize)


def dequantize_8bit_blocks(codes, absmax, code, blocksize: int, dtype: torch.dtype):
    return reference.dequantize_8bit_blocks(codes, absmax, code, blocksize, dtype)


def linear_4bit(x, packed, absmax, code, blocksize: int, out_features: int, in_features: int):
    return backend_for(x).linear_4bit(x, packed, absmax, code, blocksize, out_features, in_features)
