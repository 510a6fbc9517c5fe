"""The numba-compiled 8-bit AdamW kernel (imported only by :mod:`fourbit.optim._numba_8bit`, when numba is
installed; this module imports numba at the top so that numba can cache the compiled functions on disk).

One call updates any number of tensors: the caller passes their data addresses and sizes.
:func:`step_serial` walks them in order; :func:`step_parallel` spreads a list of tasks (runs of up to 64 blocks
of one tensor) over numba's threads. Both call :func:`_run_blocks`, which does per block what the torch-op path of
:mod:`fourbit.optim.functional` does: dequantize both moments (a gather loop), update them and the parameter
(a separate, branch-free loop that LLVM vectorizes), take the new block maxima (as integer maxima of the float
bit patterns) and requantize with the lookup-table nearest-code search of :mod:`fourbit.optim.quant8`. The
float32 operations are the same, in the same order, each rounded on its own (numba does not contract to
fused multiply-adds without fastmath), so both paths give bit-identical results (tested).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import types
from numba.extending import intrinsic

# Columns of the address table: one row per tensor.
P, G, S1, A1, S2, A2 = range(6)


@intrinsic
def _float32_pointer(typingctx, address):  # noqa: ARG001 - numba's intrinsic signature
    sig = types.CPointer(types.float32)(types.int64)

    def codegen(context, builder, signature, args):  # noqa: ARG001
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

    return sig, codegen


@intrinsic
def _uint8_pointer(typingctx, address):  # noqa: ARG001 - numba's intrinsic signature
    sig = types.CPointer(types.uint8)(types.int64)

    def codegen(context, builder, signature, args):  # noqa: ARG001
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

    return sig, codegen


@numba.njit(cache=True, nogil=True, fastmath=False, error_model="numpy")
def _run_blocks(t, first, stop, addresses, sizes, code1, code2, lut1, thr1, lut2, thr2,  # noqa: PLR0913
                beta1, one_minus_beta1, beta2, one_minus_beta2, correction2, eps, decay, step_size, block_size):
    """Update blocks ``first`` to ``stop - 1`` of tensor ``t``."""
    n = sizes[t]
    nb = (n + block_size - 1) // block_size
    p = numba.carray(_float32_pointer(addresses[t, P]), n)
    g = numba.carray(_float32_pointer(addresses[t, G]), n)
    s1 = numba.carray(_uint8_pointer(addresses[t, S1]), n)
    a1 = numba.carray(_float32_pointer(addresses[t, A1]), nb)
    s2 = numba.carray(_uint8_pointer(addresses[t, S2]), n)
    a2 = numba.carray(_float32_pointer(addresses[t, A2]), nb)
    zero = np.float32(0.0)
    one = np.float32(1.0)
    sign_off = np.int32(0x7FFFFFFF)
    mbuf = np.empty(block_size, dtype=np.float32)
    vbuf = np.empty(block_size, dtype=np.float32)
    mbits = mbuf.view(np.int32)
    vbits = vbuf.view(np.int32)
    mx = np.empty(2, dtype=np.int32)
    mxf = mx.view(np.float32)
    for b in range(first, stop):
        start = b * block_size
        end = min(n, start + block_size)
        cnt = end - start
        am1 = a1[b]
        am2 = a2[b]
        # 1. Dequantize (gathers) apart from the arithmetic, so the arithmetic loop vectorizes.
        for j in range(cnt):
            mbuf[j] = code1[s1[start + j]] * am1
            vbuf[j] = code2[s2[start + j]] * am2
        # 2 and 3. Update the moments and the parameter.
        pb = p[start:end]
        gb = g[start:end]
        for j in range(cnt):
            gj = gb[j]
            m = mbuf[j] * beta1 + gj * one_minus_beta1
            v = vbuf[j] * beta2 + (gj * gj) * one_minus_beta2
            # decay is exactly 1.0 without weight decay, and x * 1.0 == x.
            pb[j] = pb[j] * decay + step_size * (m / (np.sqrt(v) / correction2 + eps))
            mbuf[j] = m
            vbuf[j] = v
        # 4. Requantize. Block maxima on the bit patterns: non-negative floats order like their int32 bits.
        mx1 = np.int32(0)
        mx2 = np.int32(0)
        for j in range(cnt):
            x = mbits[j] & sign_off
            if x > mx1:
                mx1 = x
            y = vbits[j]
            if y > mx2:
                mx2 = y
        mx[0] = mx1
        mx[1] = mx2
        f1 = mxf[0]
        f2 = mxf[1]
        a1[b] = f1
        a2[b] = f2
        sc1 = f1 if f1 > zero else one
        sc2 = f2 if f2 > zero else one
        for j in range(cnt):
            mbuf[j] = mbuf[j] / sc1
            vbuf[j] = vbuf[j] / sc2
        for j in range(cnt):
            lo = lut1[(mbits[j] >> 16) + 32768]
            if mbuf[j] > thr1[lo]:
                lo += 1
            s1[start + j] = lo
            lo = lut2[(vbits[j] >> 16) + 32768]
            if vbuf[j] > thr2[lo]:
                lo += 1
            s2[start + j] = lo


@numba.njit(cache=True, nogil=True, fastmath=False, error_model="numpy")
def step_serial(addresses, sizes, code1, code2, lut1, thr1, lut2, thr2,  # noqa: PLR0913
                beta1, one_minus_beta1, beta2, one_minus_beta2, correction2, eps, decay, step_size, block_size):
    """Update every tensor, block by block, on the calling thread."""
    for t in range(sizes.size):
        blocks = (sizes[t] + block_size - 1) // block_size
        _run_blocks(t, 0, blocks, addresses, sizes, code1, code2, lut1, thr1, lut2, thr2, beta1,
                    one_minus_beta1, beta2, one_minus_beta2, correction2, eps, decay, step_size, block_size)


@numba.njit(parallel=True, cache=True, nogil=True, fastmath=False, error_model="numpy")
def step_parallel(addresses, sizes, tasks, code1, code2, lut1, thr1, lut2, thr2,  # noqa: PLR0913
                  beta1, one_minus_beta1, beta2, one_minus_beta2, correction2, eps, decay, step_size, block_size):
    """Run the tasks (rows of ``tensor, first block, stop block``) on numba's threads. Blocks are
    independent, so the results are those of :func:`step_serial`."""
    for task in numba.prange(tasks.shape[0]):
        _run_blocks(tasks[task, 0], tasks[task, 1], tasks[task, 2], addresses, sizes, code1, code2, lut1, thr1,
                    lut2, thr2, beta1, one_minus_beta1, beta2, one_minus_beta2, correction2, eps, decay,
                    step_size, block_size)
