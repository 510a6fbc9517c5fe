"""Reference kernels in plain PyTorch: the definition every fast path must reproduce (bit for bit for the
4-bit and 8-bit block quantization; to float32 rounding for the matmul and the training rows).

All eleven kernels of :data:`fourbit.kernels.dispatch.KERNELS` are here: 4-bit quantization, dequantization
and the (unfused) 4-bit matmul; 8-bit block quantization and dequantization; the softmax cross-entropy, SwiGLU
and RMSNorm rows, forward and backward; and dropout with a counter-based mask. They run on any device, and are what the dispatcher runs where
``dispatch.REFERENCE_FALLBACKS`` says a backend lacks a kernel.

The arithmetic follows bitsandbytes' CPU code step by step (reciprocal-multiply for whole blocks, division
for a last partial block, absmax clamped at 1e-38 before taking the reciprocal, ties at a midpoint going to
the lower code), because fourbit's files must be byte-compatible with bitsandbytes'.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from fourbit.kernels.scales import OUTPUT_DTYPES, BlockScales, check_output_dtype, dequantize_absmax

__all__ = [
    "quantize_4bit_blocks",
    "dequantize_4bit_blocks",
    "fused_linear_4bit",
    "can_fuse",
    "linear_4bit",
    "quantize_8bit_blocks",
    "dequantize_8bit_blocks",
    "softmax_cross_entropy_",
    "swiglu",
    "swiglu_backward",
    "dropout",
    "rms_norm",
    "rms_norm_backward",
    "sorted_bounds",
]

_TINY = 1e-38  # bitsandbytes clamps absmax to this before taking the reciprocal (all-zero blocks)


def sorted_bounds(code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Midpoints between neighbouring sorted code values, and the permutation that sorts the code.

    Returns:
        (bounds [15] float32, order [16] int64): value x maps to code index ``order[#(bounds < x)]``.
    """
    order = torch.argsort(code)
    bounds = (code[order[:-1]] + code[order[1:]]) / 2
    return bounds, order


def quantize_4bit_blocks(
    flat: torch.Tensor, code: torch.Tensor, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax 4-bit quantization of a flat tensor (QLoRA eq. 1 per block, nearest code value).

    Args:
        flat: [n] float tensor (any float dtype; computed in float32).
        code: [16] float32 codebook.
        blocksize: elements per block.

    Returns:
        packed: [(n + 1) // 2] uint8, element 2i in the high nibble, 2i+1 in the low nibble.
        absmax: [ceil(n / blocksize)] float32.
    """
    a = flat.reshape(-1).float()
    n = a.numel()
    rem = n % blocksize
    full = n - rem
    blocks = a[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=-1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=_TINY)).view(-1, 1), -1, 1).reshape(-1)
    if rem:
        last = a[full:].abs().max().clamp(min=_TINY)
        absmax = torch.cat([absmax, last.view(1)])
        scaled = torch.cat([scaled, torch.clamp(a[full:] / last, -1, 1)])
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    bounds, order = sorted_bounds(code.to(scaled.device))
    q = order[torch.bucketize(scaled, bounds)].to(torch.uint8)
    packed = (q[0::2] << 4) | q[1::2]
    return packed, absmax


def dequantize_4bit_blocks(
    packed: torch.Tensor, scales: BlockScales, code: torch.Tensor, blocksize: int, n: int, dtype: torch.dtype
) -> torch.Tensor:
    """Inverse of :func:`quantize_4bit_blocks`: ``code[q] * absmax[block]`` in float32, then cast to ``dtype``.

    Args:
        packed: [(n + 1) // 2] uint8 (any shape with that many elements).
        scales: the block scales (plain or nested; see :class:`fourbit.kernels.scales.BlockScales`).
        code: [16] float32 codebook. blocksize: elements per block. n: number of values.
        dtype: float32, float16, bfloat16, or float64 (the float32 values widened, exactly).

    Returns:
        [n] tensor of ``dtype``.

    Raises:
        TypeError: for any other ``dtype``.
    """
    check_output_dtype(dtype)
    absmax = dequantize_absmax(scales)
    code = code.float()
    p = packed.reshape(-1)
    # One 256-entry table of (high, low) code pairs turns two nibble lookups into one gather per byte.
    pairs = torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1).to(p.device)
    values = pairs[p.long()].reshape(-1)[:n]
    rem = n % blocksize
    full = n - rem
    out = torch.empty(n, dtype=torch.float32, device=p.device)
    out[:full] = (values[:full].view(-1, blocksize) * absmax[: full // blocksize].view(-1, 1)).reshape(-1)
    if rem:
        out[full:] = values[full:] * absmax[-1]
    return out.to(dtype)


_LUT_BINS = 65536


@lru_cache(maxsize=8)
def _nearest_code_lut(code_bytes: bytes) -> torch.Tensor:
    code = torch.frombuffer(bytearray(code_bytes), dtype=torch.float32)
    midpoints = 0.5 * (code[:-1] + code[1:])
    grid = -1.0 + (2.0 * torch.arange(_LUT_BINS, dtype=torch.float32)) / (_LUT_BINS - 1)
    return torch.searchsorted(midpoints, grid).to(torch.uint8)


def quantize_8bit_blocks(
    flat: torch.Tensor, code: torch.Tensor, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit quantization with bitsandbytes' CPU rounding rule.

    bitsandbytes' CPU kernel does not round to the nearest code value directly: it maps x / absmax onto a
    grid of 65536 bins over [-1, 1] (bin = trunc(((v + 1) * 0.5) * 65535 + 0.5)) and looks the bin up in a
    table holding the code index nearest to the bin's centre. Values near a midpoint between two code values
    can therefore land on the farther one. An all-zero block gets absmax 0 and codes 0.

    Args:
        flat: [n] float tensor. code: [256] sorted float32 codebook. blocksize: elements per block.

    Returns:
        codes: [n] uint8; absmax: [ceil(n / blocksize)] float32.
    """
    a = flat.reshape(-1).float()
    n = a.numel()
    nblocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(a, (0, nblocks * blocksize - n)).view(nblocks, blocksize)
    absmax = padded.abs().amax(dim=-1)
    inverse = torch.where(absmax == 0, torch.zeros_like(absmax), 1.0 / absmax)
    scaled = (padded * inverse.view(-1, 1)).clamp_(-1, 1)
    bins = (((scaled + 1) * 0.5) * (_LUT_BINS - 1) + 0.5).long()
    lut = _nearest_code_lut(code.detach().float().cpu().contiguous().numpy().tobytes())
    codes = lut.to(a.device)[bins]
    codes[absmax == 0] = 0
    return codes.reshape(-1)[:n], absmax


def dequantize_8bit_blocks(
    codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, dtype: torch.dtype
) -> torch.Tensor:
    """``code[q] * absmax[block]`` in float32, cast to ``dtype``. Returns [n]."""
    q = codes.reshape(-1)
    n = q.numel()
    nblocks = -(-n // blocksize)
    values = torch.nn.functional.pad(code[q.long()], (0, nblocks * blocksize - n)).view(nblocks, blocksize)
    return (values * absmax.view(-1, 1)).reshape(-1)[:n].to(dtype)


def linear_4bit(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: BlockScales,
    code: torch.Tensor,
    blocksize: int,
    out_features: int,
    in_features: int,
) -> torch.Tensor:
    """``x @ dequant(W).T`` with W [out_features, in_features] stored 4-bit: the weight dequantized to
    ``x.dtype``, then ``torch.nn.functional.linear`` in ``x.dtype`` (the definition the fused kernels approach).

    Args:
        x: [..., in_features] float32, float16, bfloat16 or float64.

    Returns:
        [..., out_features] tensor of ``x.dtype``.
    """
    n = out_features * in_features
    weight = dequantize_4bit_blocks(packed, scales, code, blocksize, n, x.dtype).view(out_features, in_features)
    return torch.nn.functional.linear(x, weight)


def can_fuse(dtype: torch.dtype, blocksize: int, in_features: int) -> bool:
    """Whether :func:`fused_linear_4bit` takes these inputs (the reference takes every output dtype)."""
    return dtype in OUTPUT_DTYPES


#: The reference has no fused kernel: its "fused" matmul is the definition itself.
fused_linear_4bit = linear_4bit


def softmax_cross_entropy_(logits: torch.Tensor, targets: torch.Tensor, write_grad: bool) -> torch.Tensor:
    """Per-row cross-entropy ``logsumexp(x) - x[target]`` of ``logits`` [rows, vocab] (float32 arithmetic),
    and with ``write_grad`` the gradient ``softmax(x) - onehot(target)`` written over ``logits`` in place.

    Args:
        logits: [rows, vocab] float32 or bfloat16 (float16 too), contiguous.
        targets: [rows] int64 in [0, vocab).

    Returns:
        [rows] float32 losses.
    """
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    losses = lse - x.gather(1, targets.view(-1, 1)).squeeze(1)
    if write_grad:
        grad = torch.exp(x - lse.unsqueeze(1))
        grad[torch.arange(x.shape[0], device=x.device), targets] -= 1.0
        logits.copy_(grad)
    return losses


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (the gated MLP's activation), computed in float32 and returned in ``gate``'s dtype."""
    g = gate.float()
    return (torch.nn.functional.silu(g) * up.float()).to(gate.dtype)


def swiglu_backward(gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`swiglu` for ``gate`` and ``up`` given the output gradient ``grad``:
    ``d_gate = grad · up · s · (1 + gate · (1 - s))`` and ``d_up = grad · gate · s`` with ``s = sigmoid(gate)``."""
    g, u, d = gate.float(), up.float(), grad.float()
    s = torch.sigmoid(g)
    return (d * u * s * (1 + g * (1 - s))).to(gate.dtype), (d * g * s).to(up.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama's RMSNorm of the rows of ``x`` [..., cols]: ``weight * (x / sqrt(mean(x²) + eps))``, the
    normalized row computed in float32 and rounded to ``x``'s dtype before the weight (as transformers does).

    Returns:
        (output in ``x``'s dtype, per-row ``1 / sqrt(mean(x²) + eps)`` in float32 for the backward pass).
    """
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1) + eps)
    return (weight.to(x.dtype) * (xf * rstd.unsqueeze(-1)).to(x.dtype)).to(x.dtype), rstd


def rms_norm_backward(x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """The input gradient of :func:`rms_norm` for a frozen weight:
    ``rstd · (g - xhat · mean(g · xhat))`` with ``g = grad · weight`` and ``xhat = x · rstd``."""
    r = rstd.unsqueeze(-1)
    xhat = x.float() * r
    g = grad.float() * weight.float()
    return (r * (g - xhat * (g * xhat).mean(-1, keepdim=True))).to(x.dtype)


def dropout_threshold(p: float) -> int:
    """The 32-bit threshold below which a hashed element is dropped: ``round(p · 2^32)``."""
    return min(int(round(p * 2**32)), 2**32 - 1)


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finalizer on int64 tensors holding uint32 values (products wrap; the low 32 bits
    are kept)."""
    mask = 0xFFFFFFFF
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & mask
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & mask
    return h ^ (h >> 16)


def dropout_mask(n: int, p: float, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The keep mask of :func:`dropout` for ``n`` elements: element ``i`` is kept when
    ``fmix32(fmix32(i ^ seed_lo) ^ seed_hi ^ (i >> 32)) >= dropout_threshold(p)`` (a counter-based mask: the
    same seed gives the same mask, so backward makes it again instead of keeping it)."""
    seed &= 2**64 - 1
    i = torch.arange(n, dtype=torch.int64, device=device)
    h = _fmix32((i & 0xFFFFFFFF) ^ (seed & 0xFFFFFFFF))
    h = _fmix32(h ^ (seed >> 32) ^ (i >> 32))
    return h >= dropout_threshold(p)


def dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Inverted dropout with a mask made from ``seed`` (:func:`dropout_mask` over ``x``'s elements in row-major
    order): ``x · mask / (1 - p)``, the product in float32 (float64 for float64 inputs), in ``x``'s dtype.

    Raises:
        ValueError: ``p`` outside [0, 1).
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout: p must be in [0, 1), got {p!r}")
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    keep = dropout_mask(x.numel(), p, seed, x.device).view(x.shape)
    scale = torch.tensor(1.0 / (1.0 - p), dtype=torch.float32).to(work)
    return (x.to(work) * torch.where(keep, scale, torch.zeros((), dtype=work))).to(x.dtype)
