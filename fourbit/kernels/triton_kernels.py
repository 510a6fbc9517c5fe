"""Triton GPU kernels for 4-bit quantization, dequantization and the fused small-batch 4-bit matmul.

Same contract as :mod:`fourbit.kernels.cpu` (and, bit for bit, :mod:`fourbit.kernels.reference`):

* :func:`quantize_4bit_blocks` - blockwise absmax quantization to NF4/FP4/INT4 codes, two per byte.
* :func:`dequantize_4bit_blocks` - codes back to fp32/fp16/bf16; with a double-quantized state the 8-bit
  absmax is decoded inside the same kernel (nested absmax -> absmax -> values, one pass, no float32 copy).
* :func:`fused_linear_4bit` - ``x @ dequant(W).T`` for up to
  :data:`fourbit.kernels.scales.SMALL_BATCH_ROWS` input rows (decoding): a kernel that decodes weight tiles
  in registers and never writes the full-precision weight (split over K when the output features alone give
  too few programs to fill the GPU). The dispatcher sends larger batches to :func:`dequantize_4bit_blocks`
  and ``torch.nn.functional.linear``.

These are the three kernels this backend has (its ``__all__``); for the others (8-bit blocks, the training
rows) the dispatcher runs the PyTorch reference on the GPU, as ``dispatch.REFERENCE_FALLBACKS`` declares.

Why Triton: one source compiles for NVIDIA and AMD GPUs, and Triton's interpreter (``TRITON_INTERPRET=1``,
set before Triton is first imported) runs the very same kernels on CPU tensors with NumPy, so the kernels are
tested for exactness on machines without a GPU (tests/kernels/test_triton.py). The kernels are in
:mod:`fourbit.kernels.triton_jit`, imported on first use: importing this module never imports Triton or
probes hardware.
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch

from fourbit.kernels import reference
from fourbit.kernels.scales import SMALL_BATCH_ROWS, BlockScales, check_output_dtype

__all__ = ["available", "quantize_4bit_blocks", "dequantize_4bit_blocks", "can_fuse", "fused_linear_4bit"]

_KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_DEQUANT_BYTES = 1024  # bytes per dequantization program (whole blocks: one block when blocksize > 2048)
_QUANT_ELEMENTS = 2048  # elements per quantization program (several small blocks, or one large one)
_LINEAR_BLOCK_N = 16  # output features per fused-matmul program
_LAUNCH = {"enable_fp_fusion": False}  # see fourbit.kernels.triton_jit: multiply and add round separately


@lru_cache(maxsize=1)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available() -> bool:
    """True when Triton imports and can run: a CUDA (or ROCm) device is present, or ``TRITON_INTERPRET=1``.

    False when ``FOURBIT_KERNELS=reference`` forces the PyTorch reference. Called lazily by the dispatcher.
    """
    if os.environ.get("FOURBIT_KERNELS", "auto").lower() == "reference":
        return False
    if not _triton_importable():
        return False
    return _interpreting() or torch.cuda.is_available()


def _jit():
    from fourbit.kernels import triton_jit

    return triton_jit


def _log2(blocksize: int, name: str) -> int:
    blocksize = int(blocksize)
    if blocksize < 2 or blocksize & (blocksize - 1):
        raise ValueError(f"{name} must be a power of two >= 2 for the Triton kernels, got {blocksize}")
    return blocksize.bit_length() - 1


@lru_cache(maxsize=16)
def _bounds_and_order_cached(code_bytes: bytes, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    code = torch.frombuffer(bytearray(code_bytes), dtype=torch.float32)
    bounds, order = reference.sorted_bounds(code)
    return bounds.contiguous().to(device), order.to(torch.int32).contiguous().to(device)


def _bounds_and_order(code: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return _bounds_and_order_cached(code.detach().float().cpu().contiguous().numpy().tobytes(), str(device))


def _as_kernel_tensor(t: torch.Tensor) -> torch.Tensor:
    """bf16 tensors cross into the kernels as int16 views (the kernels round and widen bf16 by hand)."""
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def _float_code(code: torch.Tensor, device: torch.device) -> torch.Tensor:
    return code.detach().to(device=device, dtype=torch.float32).contiguous()


def _scale_args(scales: BlockScales, device: torch.device) -> tuple[list, int, bool]:
    """Kernel arguments for the block scales: [absmax, qabsmax, code2, absmax2, offset], log2 of the nested
    block size, and whether the scales are nested. Pointers a kernel variant does not read get a placeholder.
    The offset goes as a pointer: no host sync for ``.item()``."""
    scales = scales.to(device)
    if scales.nested:
        q = scales.absmax
        args = [q, q, scales.code2, scales.absmax2, scales.offset]
        return args, _log2(scales.blocksize2, "blocksize2"), True
    a = scales.absmax
    return [a, a, a, a, a], 0, False


def quantize_4bit_blocks(flat: torch.Tensor, code: torch.Tensor,
                         blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract and bytes as :func:`fourbit.kernels.reference.quantize_4bit_blocks`.

    Args:
        flat: [n] float32/float16/bfloat16 tensor on the GPU (a CPU tensor under the interpreter).
        code: [16] float32 codebook (NF4, FP4, INT4; need not be sorted).
        blocksize: elements per block, a power of two up to 8192 (others fall back to the reference).

    Returns:
        packed: [(n + 1) // 2] uint8, the first element of each pair in the high nibble.
        absmax: [ceil(n / blocksize)] float32, NaN for a block holding NaN or Inf.
    """
    x = flat.reshape(-1)
    if x.dtype not in _KINDS or blocksize < 2 or blocksize & (blocksize - 1) or blocksize > 8192:
        return reference.quantize_4bit_blocks(flat, code, blocksize)
    x = x.contiguous()
    n = x.numel()
    nblocks = -(-n // blocksize)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(nblocks, dtype=torch.float32, device=x.device)
    if n == 0:
        return packed, absmax
    bounds, order = _bounds_and_order(code, x.device)
    rows = max(1, _QUANT_ELEMENTS // blocksize)
    _jit().quantize_kernel[(_cdiv(nblocks, rows),)](
        _as_kernel_tensor(x), bounds, order, packed, absmax, n, nblocks, n // blocksize,
        IN_KIND=_KINDS[x.dtype], HALF=blocksize // 2, ROWS=rows, num_warps=8 if blocksize >= 2048 else 4,
        **_LAUNCH)
    return packed, absmax


def dequantize_4bit_blocks(packed: torch.Tensor, scales: BlockScales, code: torch.Tensor, blocksize: int,
                           n: int, dtype: torch.dtype) -> torch.Tensor:
    """Same contract and bytes as :func:`fourbit.kernels.reference.dequantize_4bit_blocks`.

    Args:
        packed: [(n + 1) // 2] uint8 codes (any shape with that many elements).
        scales: the block scales; nested ones are decoded inside the kernel as
            ``code2[q] * absmax2[b // blocksize2] + offset`` (float32, in that order), with no float32 copy.
        code: [16] float32 codebook. blocksize: a power of two. n: number of values.
        dtype: float32/float16/bfloat16, or float64 (the float32 result widened, exactly).

    Returns:
        [n] tensor of ``dtype`` on ``packed``'s device.
    """
    check_output_dtype(dtype)
    if dtype not in _KINDS:
        return dequantize_4bit_blocks(packed, scales, code, blocksize, n, torch.float32).to(dtype)
    device = packed.device
    out = torch.empty(n, dtype=dtype, device=device)
    if n == 0:
        return out
    _log2(blocksize, "blocksize")
    args, log2_bs2, nested = _scale_args(scales, device)
    half = blocksize // 2
    rows = max(1, _DEQUANT_BYTES // half)
    _jit().dequantize_kernel[(_cdiv(-(-n // blocksize), rows),)](
        packed.reshape(-1).contiguous(), *args, _float_code(code, device), _as_kernel_tensor(out), n,
        log2_bs2, NESTED=nested, OUT_KIND=_KINDS[dtype], HALF=half, ROWS=rows, num_warps=4, **_LAUNCH)
    return out


def can_fuse(dtype: torch.dtype, blocksize: int, in_features: int) -> bool:
    """The fused kernel reads float32/float16/bfloat16 inputs; block sizes are powers of two."""
    return dtype in _KINDS and blocksize >= 2 and blocksize & (blocksize - 1) == 0


def fused_linear_4bit(x: torch.Tensor, packed: torch.Tensor, scales: BlockScales, code: torch.Tensor,
                      blocksize: int, out_features: int, in_features: int) -> torch.Tensor:
    """``x @ dequant(W).T`` for W [out_features, in_features] stored 4-bit, in one kernel; in ``x.dtype``.

    Each weight element is decoded exactly as the reference decodes it (``code * absmax`` in float32, rounded
    to ``x.dtype``) and the products are summed in float32, so the result equals the reference's up to the
    order of the float32 sums (and the final rounding to ``x.dtype``).

    Args:
        x: [..., in_features] float32/float16/bfloat16 with at most ``SMALL_BATCH_ROWS`` rows.
        packed, scales, code, blocksize: as for :func:`dequantize_4bit_blocks`.

    Returns:
        [..., out_features] tensor of ``x.dtype``.

    Raises:
        TypeError / ValueError: inputs :func:`can_fuse` refuses, or more than ``SMALL_BATCH_ROWS`` rows
        (the dispatcher never passes them).
    """
    if x.dtype not in _KINDS:
        raise TypeError(f"the fused Triton kernel takes float32, float16 or bfloat16 inputs, got {x.dtype}")
    rows = x.numel() // in_features if in_features else 0
    if x.shape[-1] != in_features or not 0 < rows <= SMALL_BATCH_ROWS:
        raise ValueError(f"the fused Triton kernel takes 1 to {SMALL_BATCH_ROWS} rows of in_features={in_features},"
                         f" got x of shape {tuple(x.shape)}")
    device = x.device
    x2 = x.reshape(rows, in_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    args, log2_bs2, nested = _scale_args(scales, device)
    log2_bs = _log2(blocksize, "blocksize")
    # tl.dot needs at least 16 rows (a power of two); one row is a plain multiply-and-sum
    m_pad = 1 if rows == 1 else max(16, 1 << (rows - 1).bit_length())
    # Tiles of 16 x 64 keep the kernel near 40-110 registers on sm_90 (ptxas -v); float32 tl.dot runs on
    # FMA units and spills beyond K = 32. tl.dot needs K >= 16.
    block_k = max(16, min(32 if x.dtype == torch.float32 and m_pad > 1 else 64, blocksize))
    # K a multiple of the block size: BLOCK_K (a power of two <= blocksize) divides both, one scale per row.
    row_scale = in_features % blocksize == 0 and block_k <= blocksize
    k_tiles = _cdiv(in_features, block_k)
    k_split = _cdiv(k_tiles, _split_k(out_features, k_tiles, device)) * block_k
    splits = _cdiv(in_features, k_split)
    if splits == 1:
        out = torch.empty(rows, out_features, dtype=x.dtype, device=device)
    else:  # float32 partial sums per K range, added below (a fixed order: deterministic, unlike atomics)
        out = torch.empty(splits, rows, out_features, dtype=torch.float32, device=device)
    _jit().linear_kernel[(_cdiv(out_features, _LINEAR_BLOCK_N), splits)](
        _as_kernel_tensor(x2), packed.reshape(-1).contiguous(), *args, _float_code(code, device),
        _as_kernel_tensor(out), rows, out_features, in_features, x2.stride(0), log2_bs, log2_bs2, k_split,
        NESTED=nested, X_KIND=_KINDS[x.dtype], OUT_KIND=_KINDS[out.dtype], M_PAD=m_pad,
        BLOCK_N=_LINEAR_BLOCK_N, BLOCK_K=block_k, ROW_SCALE=row_scale, DOT_BF16=not _interpreting(),
        num_warps=4, **_LAUNCH)
    if splits > 1:
        out = out.sum(0).to(x.dtype)
    return out.view(*x.shape[:-1], out_features)


@lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _split_k(out_features: int, k_tiles: int, device: torch.device) -> int:
    """How many K ranges to split the fused matmul into: enough programs for ~8 per SM (decoding reads each
    weight byte once, so the kernel is bound by how many loads are in flight), at least 4 tiles each.
    One range off CUDA (the interpreter). Returns a count in [1, k_tiles]."""
    if device.type != "cuda" or _interpreting():
        return 1
    programs = _cdiv(out_features, _LINEAR_BLOCK_N)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return max(1, min(_cdiv(8 * _sm_count(index), programs), k_tiles // 4, 16))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
