"""Blockwise quantization: 4-bit (NF4/FP4/INT4) with optional double quantization, and 8-bit blockwise.

The public functions mirror ``bitsandbytes.functional`` and produce the same bytes:

    packed, state = quantize_4bit(weight, quant_type="nf4", blocksize=64, double_quant=True)
    weight_hat = dequantize_4bit(packed, state)

QLoRA (Dettmers et al. 2023), eq. 1 and section 3: each block of ``blocksize`` consecutive elements (of the
flattened tensor) is scaled by its absolute maximum into [-1, 1] and each element is replaced by the index of
the nearest codebook value. Double quantization (section 3, "Double Quantization") quantizes the float32
absmax constants once more, to 8 bits in blocks of 256 after subtracting their mean, which lowers the cost of
the constants from 32/64 = 0.5 to 8/64 + 32/(64*256) = 0.127 bits per parameter.
"""

from __future__ import annotations

import torch

from fourbit.kernels import dispatch
from fourbit.kernels.scales import OUTPUT_DTYPES
from fourbit.kernels.scales import dequantize_absmax as _dequantize_scales
from fourbit.quant.codebooks import QUANT_TYPES, dynamic_map, get_code
from fourbit.quant.state import QuantState

__all__ = [
    "quantize_4bit",
    "dequantize_4bit",
    "quantize_blockwise",
    "dequantize_blockwise",
    "double_quantize_absmax",
    "dequantize_absmax",
    "check_blocksize",
]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DOUBLE_QUANT_BLOCKSIZE = 256


def check_blocksize(blocksize: int, name: str = "blocksize", low: int = 32, high: int = 4096) -> int:
    """Validate a block size: an int, a power of two, within [low, high].

    Raises:
        ValueError: naming ``name`` and the bad value.
    """
    if isinstance(blocksize, bool) or not isinstance(blocksize, int):
        raise ValueError(f"{name} must be an int power of two in [{low}, {high}], got {blocksize!r}")
    if blocksize < low or blocksize > high or blocksize & (blocksize - 1):
        raise ValueError(f"{name} must be a power of two in [{low}, {high}], got {blocksize}")
    return blocksize


def _check_input(x: torch.Tensor, what: str, check_finite: bool = True) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{what} must be float32, float16 or bfloat16, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{what} is empty (shape {tuple(x.shape)}): nothing to quantize")
    if check_finite and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{what} holds {bad} NaN or Inf values (shape {tuple(x.shape)}); cannot quantize")


def _check_dtype(dtype: torch.dtype | None, default: torch.dtype) -> torch.dtype:
    """An output dtype of dequantization: float32/float16/bfloat16, or float64 (float32 values widened)."""
    dtype = default if dtype is None else dtype
    if dtype not in OUTPUT_DTYPES:
        raise TypeError(f"dtype must be float32, float16, bfloat16 or float64, got {dtype}")
    return dtype


def quantize_blockwise(
    x: torch.Tensor, code: torch.Tensor | None = None, blocksize: int = 4096
) -> tuple[torch.Tensor, QuantState]:
    """8-bit blockwise quantization (bitsandbytes' ``quantize_blockwise``, same bytes as its CPU kernel).

    Args:
        x: float tensor of any shape.
        code: [256] float32 codebook; default the signed dynamic map.
        blocksize: elements per block, a power of two in [32, 4096].

    Returns:
        codes: uint8 tensor of ``x.shape``.
        state: QuantState with float32 ``absmax`` [ceil(n / blocksize)] and the code.
    """
    _check_input(x, "x")
    check_blocksize(blocksize)
    code = dynamic_map(signed=True) if code is None else code.float().cpu()
    if code.numel() != 256:
        raise ValueError(f"code must have 256 entries for 8-bit quantization, got {code.numel()}")
    codes, absmax = dispatch.quantize_8bit_blocks(x.reshape(-1), code, blocksize)
    state = QuantState(absmax=absmax, code=code.to(x.device), blocksize=blocksize, dtype=x.dtype,
                       shape=x.shape)
    return codes.view(x.shape), state


def dequantize_blockwise(codes: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`: ``code[q] * absmax[block]``.

    Returns:
        Tensor of ``codes.shape`` and ``dtype`` (default ``state.dtype``).
    """
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    nblocks = -(-codes.numel() // state.blocksize)
    if state.absmax.numel() != nblocks:
        raise ValueError(
            f"state has {state.absmax.numel()} absmax values but {codes.numel()} codes in blocks of "
            f"{state.blocksize} need {nblocks}"
        )
    absmax = dequantize_absmax(state)
    out = dispatch.dequantize_8bit_blocks(codes.reshape(-1), absmax, state.code, state.blocksize,
                                          _check_dtype(dtype, state.dtype or torch.float32))
    return out.view(codes.shape)


def double_quantize_absmax(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, QuantState]:
    """Double quantization (QLoRA section 3): 8-bit blockwise codes of ``absmax - mean(absmax)``.

    Returns:
        (codes uint8 [n_blocks], offset 0-dim float32, nested QuantState with blocksize 256).
    """
    offset = absmax.mean()
    if not bool(torch.isfinite(offset)):
        # The float32 sum of finite absmax values near 3.4e38 overflows; their mean does not. bitsandbytes'
        # float32 mean is kept for every other input (byte compatibility).
        offset = absmax.double().mean().float()
    codes, state2 = quantize_blockwise(absmax - offset, blocksize=DOUBLE_QUANT_BLOCKSIZE)
    state2.shape = None
    return codes, offset, state2


def dequantize_absmax(state: QuantState) -> torch.Tensor:
    """The float32 absmax of ``state``, undoing double quantization when the state is nested.

    (The arithmetic lives in the kernels layer, :func:`fourbit.kernels.scales.dequantize_absmax`.)

    Returns:
        float32 [n_blocks].
    """
    return _dequantize_scales(state.block_scales())


def quantize_4bit(
    weight: torch.Tensor,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
) -> tuple[torch.Tensor, QuantState]:
    """Quantize a tensor to 4 bits in blocks (bitsandbytes' ``quantize_4bit``; same bytes).

    Args:
        weight: float32/float16/bfloat16 tensor of any shape and size (a last partial block is allowed).
        quant_type: "nf4" (default), "fp4" or "int4".
        blocksize: elements per absmax block, a power of two in [32, 4096] (QLoRA uses 64).
        double_quant: quantize the absmax constants to 8 bits as well (bitsandbytes' ``compress_statistics``).

    Returns:
        packed: uint8 [(n + 1) // 2, 1], two codes per byte, the first in the high nibble.
        state: the QuantState to dequantize with.

    Raises:
        TypeError: for a non-float tensor. ValueError: for an empty tensor, NaN/Inf values, a bad quant_type
        or blocksize.
    """
    _check_input(weight, "weight", check_finite=False)  # checked on the absmax below, without another pass
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    check_blocksize(blocksize)
    code = get_code(quant_type)
    packed, absmax = dispatch.quantize_4bit_blocks(weight.reshape(-1), code, blocksize)
    if not bool(torch.isfinite(absmax).all()):
        bad = int((~torch.isfinite(weight)).sum())
        raise ValueError(f"weight holds {bad} NaN or Inf values (shape {tuple(weight.shape)}); cannot quantize")
    code = code.to(weight.device)
    if double_quant:
        qabsmax, offset, state2 = double_quantize_absmax(absmax)
        state = QuantState(absmax=qabsmax, shape=weight.shape, code=code, blocksize=blocksize,
                           quant_type=quant_type, dtype=weight.dtype, offset=offset, state2=state2)
    else:
        state = QuantState(absmax=absmax, shape=weight.shape, code=code, blocksize=blocksize,
                           quant_type=quant_type, dtype=weight.dtype)
    return packed.view(-1, 1), state


def dequantize_4bit(packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Inverse of :func:`quantize_4bit`: ``code[q] * absmax[block]`` computed in float32, then cast.

    Args:
        packed: uint8 tensor with (n + 1) // 2 elements (any shape, e.g. [(n + 1) // 2, 1]).
        state: the QuantState returned with it.
        dtype: output dtype; default ``state.dtype``.

    Returns:
        Tensor of ``state.shape``.

    Raises:
        ValueError: when the packed size, absmax count or quant type do not fit the state.
    """
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise TypeError(f"packed must be a uint8 tensor, got {getattr(packed, 'dtype', type(packed).__name__)}")
    if state.shape is None or state.blocksize is None or state.code is None:
        raise ValueError("state must carry shape, blocksize and code")
    n = state.numel
    if packed.numel() != (n + 1) // 2:
        raise ValueError(
            f"packed tensor has {packed.numel()} bytes but the state's shape {tuple(state.shape)} needs "
            f"{(n + 1) // 2}; the tensor and its quant state do not belong together"
        )
    nblocks = -(-n // state.blocksize)
    if state.absmax.numel() != nblocks:
        raise ValueError(f"state has {state.absmax.numel()} absmax values, expected {nblocks}")
    out = dispatch.dequantize_4bit(packed.reshape(-1), state.block_scales(), state.code, state.blocksize, n,
                                   _check_dtype(dtype, state.dtype or torch.float32))
    return out.view(state.shape)
