"""Fused CPU kernel for the blockwise 8-bit AdamW step, compiled with numba when it is installed (optional).

Per block of ``block_size`` elements, held in two small buffers, it does what the torch-op path in
:mod:`fourbit.optim.functional` does in ~35 whole-chunk operations: dequantize both moments (a gather loop),
update them and the parameter (a separate, branch-free loop that LLVM vectorizes), take the new block maxima
(as integer maxima of the float bit patterns) and requantize with the same lookup-table nearest-code search
(:mod:`fourbit.optim.quant8`). It performs the same float32 operations in the same order, each rounded on
its own (numba does not contract to fused multiply-adds without fastmath), so both paths give bit-identical
results (tested). Measured on this 2-core machine, 1 thread: ~7 ns per parameter against ~18 for the
torch-op path.

Blocks are independent, so for tensors of at least 2^20 elements the loop runs in parallel over blocks on
``torch.get_num_threads()`` threads (numba's work-queue layer); smaller ones run on the calling thread.
Compiled on first use (a few seconds, cached on disk by numba afterwards). Without numba, or for tensors
that are not float32 on the CPU, the torch-op path is used.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch

__all__ = ["numba_available", "adamw_8bit_numba"]

_PARALLEL_MIN_ELEMENTS = 1 << 20


@lru_cache(maxsize=2)
def _kernel(parallel: bool = False) -> Any:
    import numba
    import numpy as np

    # numba's default OpenMP layer clashes with torch's OpenMP runtime (torch ops ran ~20x slower after a
    # numba parallel call in the same process); the simple work-queue layer does not.
    if numba.config.THREADING_LAYER == "default":
        numba.config.THREADING_LAYER = "workqueue"

    @numba.njit(parallel=parallel, cache=True, nogil=True, fastmath=False, error_model="numpy")
    def kernel(p, g, s1, a1, s2, a2, code1, code2, lut1, thr1, lut2, thr2,  # noqa: PLR0913
               beta1, one_minus_beta1, beta2, one_minus_beta2, correction2, eps, decay, step_size, block_size):
        n = p.size
        nb = a1.size
        zero = np.float32(0.0)
        one = np.float32(1.0)
        sign_off = np.int32(0x7FFFFFFF)
        per_task = 64  # blocks per parallel task (buffers are allocated once per task)
        for c in numba.prange((nb + per_task - 1) // per_task):
            mbuf = np.empty(block_size, dtype=np.float32)
            vbuf = np.empty(block_size, dtype=np.float32)
            mbits = mbuf.view(np.int32)
            vbits = vbuf.view(np.int32)
            mx = np.empty(2, dtype=np.int32)
            mxf = mx.view(np.float32)
            for b in range(c * per_task, min(nb, (c + 1) * per_task)):
                start = b * block_size
                end = min(n, start + block_size)
                cnt = end - start
                am1 = a1[b]
                am2 = a2[b]
                # Dequantize (gathers) apart from the arithmetic, so the arithmetic loop vectorizes.
                for j in range(cnt):
                    mbuf[j] = code1[s1[start + j]] * am1
                    vbuf[j] = code2[s2[start + j]] * am2
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
                # Block maxima on the bit patterns: non-negative floats order like their int32 bits.
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

    return kernel


@lru_cache(maxsize=1)
def numba_available() -> bool:
    """Whether numba is installed and the kernel compiles and runs (checked once, lazily, on a dummy block).

    The first check compiles the kernel (~10 s; numba caches it on disk for later processes).
    """
    try:
        import numpy as np

        z = np.zeros(256, dtype=np.float32)
        u = np.zeros(256, dtype=np.uint8)
        a = np.zeros(1, dtype=np.float32)
        code = np.linspace(-1, 1, 256, dtype=np.float32)
        lut = np.zeros(65536, dtype=np.int32)
        one = np.float32(1.0)
        for parallel in (False, True):
            _kernel(parallel)(z.copy(), z, u.copy(), a.copy(), u.copy(), a.copy(), code, code, lut, code, lut,
                              code, one, one, one, one, one, one, one, one, 256)
    except Exception:  # noqa: BLE001 - any failure (not installed, no compiler backend) means: torch path
        return False
    return True


@lru_cache(maxsize=8)
def _tables(cb1: Any, cb2: Any) -> tuple:
    """numpy views of the (cached, CPU) codebook tables, made once per codebook pair."""
    return (cb1.code.numpy(), cb2.code.numpy(), cb1.lut.numpy(), cb1.thresholds.numpy(), cb2.lut.numpy(),
            cb2.thresholds.numpy())


def adamw_8bit_numba(
    param: torch.Tensor,
    grad: torch.Tensor,
    state1: torch.Tensor,
    absmax1: torch.Tensor,
    state2: torch.Tensor,
    absmax2: torch.Tensor,
    cb1: Any,
    cb2: Any,
    *,
    beta1: float,
    beta2: float,
    correction2: float,
    eps: float,
    decay: float,
    step_size: float,
    decayed: bool,
    block_size: int,
) -> None:
    """Run the fused kernel in place (all tensors contiguous CPU; param and grad float32).

    The scalar arguments are the same float32-rounded constants the torch path uses.
    """
    import numba
    import numpy as np

    f32 = np.float32
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    # A parallel launch costs ~0.1-0.2 ms: worth it only for large tensors with more than one thread.
    parallel = threads > 1 and param.numel() >= _PARALLEL_MIN_ELEMENTS
    if parallel and numba.get_num_threads() != threads:
        numba.set_num_threads(threads)
    _kernel(parallel)(
        param.detach().view(-1).numpy(), grad.detach().reshape(-1).numpy(),
        state1.view(-1).numpy(), absmax1.numpy(), state2.view(-1).numpy(), absmax2.numpy(),
        *_tables(cb1, cb2),
        f32(beta1), f32(1.0 - beta1), f32(beta2), f32(1.0 - beta2), f32(correction2), f32(eps),
        f32(decay if decayed else 1.0), f32(step_size), int(block_size),
    )
