"""The Triton kernels themselves (``@triton.jit``); imported only by :mod:`fourbit.kernels.triton_kernels`.

This module imports Triton at the top, so it is imported lazily, on the first kernel call. Set
``TRITON_INTERPRET=1`` before the first import of Triton to run the same kernels on the CPU with NumPy.

Exactness. Each kernel reproduces :mod:`fourbit.kernels.reference` bit for bit, except the fused matmul (its
float32 sums run in another order). Three things make that true on a GPU and in the interpreter alike:

* bf16 is rounded by hand (integer round-to-nearest-even on the float32 bits) and bf16 inputs are widened by
  a shift: Triton's interpreter truncates in ``.to(tl.bfloat16)``, while torch and the GPU round to nearest.
* Divisions use ``tl.math.div_rn`` (IEEE round-to-nearest ``div.rn.f32``, not the approximate ``div.full``),
  and no libdevice function is called (libdevice is linked with flush-to-zero).
* The host launches every kernel with ``enable_fp_fusion=False``: the double-quantized absmax is
  ``code2[q] * absmax2 + offset``, rounded after the multiply and again after the add, as the reference
  computes it; a fused multiply-add rounds once and can differ in the last bit.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["dequantize_kernel", "quantize_kernel", "linear_kernel"]

# KIND / OUT_KIND / IN_KIND / X_KIND (constexpr): 0 float32, 1 float16, 2 bfloat16 (passed as int16 views).


@triton.jit
def _bf16_round(w):
    """float32 -> the float32 bits of the nearest bf16 (ties to even; NaN stays NaN), as uint32."""
    u = w.to(tl.uint32, bitcast=True)
    lsb = (u >> 16) & 1
    rounded = ((u + 0x7FFF + lsb) >> 16) << 16
    is_nan = (u & 0x7FFFFFFF) > 0x7F800000
    return tl.where(is_nan, ((u >> 16) | 0x40) << 16, rounded)


@triton.jit
def _round_to(w, KIND: tl.constexpr):
    """float32 -> float32 holding the value rounded to ``KIND`` (torch's ``.to(dtype).float()``)."""
    if KIND == 2:
        return _bf16_round(w).to(tl.float32, bitcast=True)
    elif KIND == 1:
        return w.to(tl.float16).to(tl.float32)
    else:
        return w


@triton.jit
def _store_as(ptr, w, mask, KIND: tl.constexpr):
    """Store float32 ``w`` as ``KIND``; for bf16 ``ptr`` points into an int16 view of the output."""
    if KIND == 2:
        bits = (_bf16_round(w) >> 16).to(tl.uint16).to(tl.int16, bitcast=True)
        tl.store(ptr, bits, mask=mask)
    elif KIND == 1:
        tl.store(ptr, w.to(tl.float16), mask=mask)
    else:
        tl.store(ptr, w, mask=mask)


@triton.jit
def _load_f32(ptr, mask, KIND: tl.constexpr):
    """Load as float32; for bf16 ``ptr`` points into an int16 view (widened exactly by a 16-bit shift)."""
    if KIND == 2:
        bits = tl.load(ptr, mask=mask, other=0).to(tl.uint16, bitcast=True).to(tl.uint32) << 16
        return bits.to(tl.float32, bitcast=True)
    else:
        return tl.load(ptr, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _block_scale(b, mask, absmax_ptr, qabsmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, log2_bs2,
                 NESTED: tl.constexpr):
    """absmax of blocks ``b``; nested (QLoRA section 3): ``code2[q[b]] * absmax2[b >> log2_bs2] + offset``."""
    if NESTED:
        q = tl.load(qabsmax_ptr + b, mask=mask, other=0).to(tl.int32)
        c2 = tl.load(code2_ptr + q)
        a2 = tl.load(absmax2_ptr + (b >> log2_bs2), mask=mask, other=0.0)
        prod = c2 * a2  # rounded here (the launch disables fp fusion), then the add rounds again
        return prod + tl.load(offset_ptr)
    else:
        return tl.load(absmax_ptr + b, mask=mask, other=0.0)


@triton.jit
def dequantize_kernel(packed_ptr, absmax_ptr, qabsmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, code_ptr,
                      out_ptr, n, log2_bs2, NESTED: tl.constexpr, OUT_KIND: tl.constexpr, HALF: tl.constexpr,
                      ROWS: tl.constexpr):
    """out[i] = code[q_i] * absmax[block] for ROWS blocks of 2 * HALF elements (one scale load per block)."""
    pid = tl.program_id(0).to(tl.int64)
    blk = pid * ROWS + tl.arange(0, ROWS)
    j = blk[:, None] * HALF + tl.arange(0, HALF)[None, :]  # byte index [ROWS, HALF]
    byte = tl.load(packed_ptr + j, mask=j < (n + 1) // 2, other=0).to(tl.int32)
    hi = tl.load(code_ptr + (byte >> 4))
    lo = tl.load(code_ptr + (byte & 15))
    scale = _block_scale(blk, blk * (2 * HALF) < n, absmax_ptr, qabsmax_ptr, code2_ptr, absmax2_ptr,
                         offset_ptr, log2_bs2, NESTED)[:, None]
    w = tl.interleave(hi * scale, lo * scale)  # [ROWS, 2 * HALF] in element order
    e = blk[:, None] * (2 * HALF) + tl.arange(0, 2 * HALF)[None, :]
    _store_as(out_ptr + e, w, e < n, OUT_KIND)


@triton.jit
def quantize_kernel(x_ptr, bounds_ptr, order_ptr, packed_ptr, absmax_ptr, n, nblocks, full_blocks,
                    IN_KIND: tl.constexpr, HALF: tl.constexpr, ROWS: tl.constexpr):
    """Quantize ROWS blocks of 2 * HALF elements: absmax, scale, clamp, nearest code, pack two per byte."""
    pid = tl.program_id(0).to(tl.int64)
    blk = pid * ROWS + tl.arange(0, ROWS)
    j = tl.arange(0, HALF)
    e_hi = blk[:, None] * (2 * HALF) + 2 * j[None, :]  # elements 2j -> high nibble, 2j + 1 -> low nibble
    e_lo = e_hi + 1
    a = _load_f32(x_ptr + e_hi, e_hi < n, IN_KIND)
    c = _load_f32(x_ptr + e_lo, e_lo < n, IN_KIND)  # the pad element of an odd tensor reads 0.0
    fa = tl.abs(a)
    fc = tl.abs(c)
    finite_a = fa <= 3.4028234663852886e38
    finite_c = fc <= 3.4028234663852886e38
    bad = tl.max((~finite_a | ~finite_c).to(tl.int32), axis=1) > 0
    m = tl.maximum(tl.max(tl.where(finite_a, fa, 0.0), axis=1), tl.max(tl.where(finite_c, fc, 0.0), axis=1))
    clamped = tl.maximum(m, 1e-38)
    whole = blk < full_blocks
    # Whole blocks multiply by the reciprocal, a last partial block divides (bitsandbytes' CPU arithmetic).
    recip = tl.math.div_rn(tl.full([ROWS], 1.0, tl.float32), clamped)
    den = clamped[:, None] + tl.zeros([ROWS, HALF], tl.float32)
    sa = tl.where(whole[:, None], a * recip[:, None], tl.math.div_rn(a, den))
    sc = tl.where(whole[:, None], c * recip[:, None], tl.math.div_rn(c, den))
    sa = tl.where(sa < -1.0, -1.0, tl.where(sa > 1.0, 1.0, sa))  # NaN stays NaN (and counts no midpoint)
    sc = tl.where(sc < -1.0, -1.0, tl.where(sc > 1.0, 1.0, sc))
    # torch.bucketize(s, bounds): the number of sorted midpoints strictly below s, then the code's order.
    ia = tl.zeros([ROWS, HALF], tl.int32)
    ic = tl.zeros([ROWS, HALF], tl.int32)
    for t in tl.static_range(15):
        bound = tl.load(bounds_ptr + t)
        ia += (bound < sa).to(tl.int32)
        ic += (bound < sc).to(tl.int32)
    qa = tl.load(order_ptr + ia)
    qc = tl.load(order_ptr + ic)
    byte = ((qa << 4) | qc).to(tl.uint8)
    tl.store(packed_ptr + blk[:, None] * HALF + j[None, :], byte, mask=e_hi < n)
    nan = tl.full([ROWS], 0x7FC00000, tl.uint32).to(tl.float32, bitcast=True)
    absmax = tl.where(bad, nan, tl.where(whole, m, clamped))
    tl.store(absmax_ptr + blk, absmax, mask=blk < nblocks)


@triton.jit
def linear_kernel(x_ptr, packed_ptr, absmax_ptr, qabsmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, code_ptr,
                  out_ptr, M, N, K, stride_xm, log2_bs, log2_bs2, k_split, NESTED: tl.constexpr,
                  X_KIND: tl.constexpr, OUT_KIND: tl.constexpr, M_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, ROW_SCALE: tl.constexpr, DOT_BF16: tl.constexpr):
    """out[m, r] = sum_k x[m, k] * W[r, k] for BLOCK_N output features; W decoded tile by tile in registers.

    Program (i, s) covers features [i * BLOCK_N, (i + 1) * BLOCK_N) and the K range
    [s * k_split, (s + 1) * k_split) (k_split a multiple of BLOCK_K). With one K split it stores the result
    as X_KIND; with several (split-K, more programs in flight for decoding) it stores float32 partial sums
    into out[s] and the host adds them up.

    Each weight element is decoded as the reference does (``code * absmax`` in float32, rounded to the
    input dtype), so products with bf16/fp16 inputs are exact and only the float32 sum order differs.
    ``ROW_SCALE``: K is a multiple of the block size and BLOCK_K divides the block size, so a tile row lies
    in one block (one scale per row) and its bytes are contiguous. Otherwise (odd K, blocks spanning rows)
    every element finds its own byte, nibble and block.
    ``DOT_BF16``: bf16 tiles go to ``tl.dot`` as bf16 (tensor cores). The interpreter multiplies bf16 tiles
    as raw integers, so there the host passes False and the same exact bf16 values are multiplied as
    float32 (products of bf16 values are exact in float32 either way; the sums are float32 in both).
    """
    pid = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    rm = tl.arange(0, M_PAD)
    mmask = rm < M
    if M_PAD == 1:
        acc = tl.zeros([BLOCK_N], tl.float32)
    else:
        acc = tl.zeros([M_PAD, BLOCK_N], tl.float32)
    k_lo = pid_k * k_split
    for k0 in range(k_lo, tl.minimum(K, k_lo + k_split), BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        kmask = rk < K
        if ROW_SCALE:
            start = rn * K + k0  # even: K is a multiple of the (even) block size
            jb = (start >> 1)[:, None] + tl.arange(0, BLOCK_K // 2)[None, :]
            byte = tl.load(packed_ptr + jb, mask=nmask[:, None], other=0).to(tl.int32)
            scale = _block_scale(start >> log2_bs, nmask, absmax_ptr, qabsmax_ptr, code2_ptr, absmax2_ptr,
                                 offset_ptr, log2_bs2, NESTED)[:, None]
            hi = tl.load(code_ptr + (byte >> 4)) * scale
            w = tl.interleave(hi, tl.load(code_ptr + (byte & 15)) * scale)
            w = tl.where(nmask[:, None], _round_to(w, X_KIND), 0.0)
        else:
            wmask = nmask[:, None] & kmask[None, :]
            e = rn[:, None] * K + rk[None, :]
            byte = tl.load(packed_ptr + (e >> 1), mask=wmask, other=0).to(tl.int32)
            q = tl.where((e & 1) == 0, byte >> 4, byte & 15)
            scale = _block_scale(e >> log2_bs, wmask, absmax_ptr, qabsmax_ptr, code2_ptr, absmax2_ptr,
                                 offset_ptr, log2_bs2, NESTED)
            w = tl.where(wmask, _round_to(tl.load(code_ptr + q) * scale, X_KIND), 0.0)
        xt = _load_f32(x_ptr + rm[:, None] * stride_xm + rk[None, :], mmask[:, None] & kmask[None, :], X_KIND)
        if M_PAD == 1:
            acc += tl.sum(w * xt, axis=1)
        else:
            # x and w hold values exact in X_KIND: bf16/fp16 tensor-core products are exact, fp32 uses IEEE.
            if X_KIND == 2 and DOT_BF16:
                acc += tl.dot(xt.to(tl.bfloat16), tl.trans(w.to(tl.bfloat16)))
            elif X_KIND == 1:
                acc += tl.dot(xt.to(tl.float16), tl.trans(w.to(tl.float16)))
            else:
                acc += tl.dot(xt, tl.trans(w), input_precision="ieee")
    out_ptr += pid_k.to(tl.int64) * M * N
    if M_PAD == 1:
        _store_as(out_ptr + rn, acc, nmask, OUT_KIND)
    else:
        _store_as(out_ptr + rm[:, None] * N + rn[None, :], acc, mmask[:, None] & nmask[None, :], OUT_KIND)
