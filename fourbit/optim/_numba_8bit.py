"""Fused CPU kernel for the blockwise 8-bit AdamW step, compiled with numba when it is installed (optional).

:func:`adamw_8bit_numba` updates a list of tensors (one, or the many small matrices of LoRA adapters) in
one kernel call: it checks their layout, then passes their data addresses and sizes to the compiled code of
:mod:`fourbit.optim._numba_8bit_kernel`, so numba's per-call cost is paid once per batch rather than once
per tensor, and nothing is copied or concatenated. That kernel does per block, in registers and two small
buffers, what the torch-op path of :mod:`fourbit.optim.functional` does in ~35 whole-chunk operations, with
bit-identical results (tested).

Blocks are independent, so when a call covers at least 2^20 elements, runs of up to 64 blocks run in parallel on
``torch.get_num_threads()`` threads (numba's work-queue layer); smaller calls run on the calling thread,
because starting the threads costs more than they save there. Compiled on first use (seconds, cached on disk
by numba afterwards). Without numba, or for tensors that are not float32 on the CPU, the torch-op path is
used.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import torch

__all__ = ["numba_available", "adamw_8bit_numba"]

_PARALLEL_MIN_ELEMENTS = 1 << 20
#: Blocks per task: the kernel allocates its buffers once per task, and a task is the unit of parallel work.
_BLOCKS_PER_TASK = 64


@lru_cache(maxsize=1)
def _kernels() -> Any:
    """The compiled kernel module (imports numba; call only after :func:`numba_available`)."""
    import numba

    # numba's default OpenMP layer clashes with torch's OpenMP runtime (torch ops ran far slower after a
    # numba parallel call in the same process); the simple work-queue layer does not.
    if numba.config.THREADING_LAYER == "default":
        numba.config.THREADING_LAYER = "workqueue"
    from fourbit.optim import _numba_8bit_kernel

    return _numba_8bit_kernel


@lru_cache(maxsize=1)
def numba_available() -> bool:
    """Whether numba is installed and the kernels compile and run (checked once, lazily, on a dummy block).

    The first check compiles the kernels (seconds; numba caches them on disk for later processes).
    """
    try:
        import numpy as np

        z = torch.zeros(256)
        u = torch.zeros(256, dtype=torch.uint8)
        a = torch.zeros(1)
        code = np.linspace(-1, 1, 256, dtype=np.float32)
        lut = np.zeros(65536, dtype=np.int32)
        tables = (code, code, lut, code, lut, code)
        for parallel in (False, True):
            _launch(
                [(z.clone(), z, u.clone(), a.clone(), u.clone(), a.clone())], tables, (1.0,) * 8, 256, parallel
            )
    except Exception:  # noqa: BLE001 - any failure (not installed, no compiler backend) means: torch path
        return False
    return True


@lru_cache(maxsize=8)
def _tables(cb1: Any, cb2: Any) -> tuple:
    """numpy views of the (cached, CPU) codebook tables, made once per codebook pair."""
    return (cb1.code.numpy(), cb2.code.numpy(), cb1.lut.numpy(), cb1.thresholds.numpy(), cb2.lut.numpy(),
            cb2.thresholds.numpy())


def _tasks(sizes: Any, block_size: int) -> Any:
    """int64 [K, 3]: (tensor index, first block, end block) for runs of up to ``_BLOCKS_PER_TASK`` blocks."""
    import numpy as np

    per_task = _BLOCKS_PER_TASK
    blocks = (sizes + block_size - 1) // block_size
    counts = (blocks + per_task - 1) // per_task
    tensor = np.repeat(np.arange(sizes.size), counts)
    first = (np.arange(tensor.size) - np.repeat(np.cumsum(counts) - counts, counts)) * per_task
    tasks = np.empty((tensor.size, 3), dtype=np.int64)
    tasks[:, 0] = tensor
    tasks[:, 1] = first
    tasks[:, 2] = np.minimum(first + per_task, blocks[tensor])
    return tasks


def _launch(
    tensors: Sequence[tuple[torch.Tensor, ...]],
    tables: tuple,
    scalars: tuple[float, ...],
    block_size: int,
    parallel: bool,
) -> None:
    """Run the kernel over ``tensors``, each ``(param, grad, state1, absmax1, state2, absmax2)``: contiguous
    CPU tensors of the right dtypes and sizes (checked by the caller)."""
    import numpy as np

    f32 = np.float32
    addresses = np.array([[t.data_ptr() for t in row] for row in tensors], dtype=np.int64)
    sizes = np.array([row[0].numel() for row in tensors], dtype=np.int64)
    kernels = _kernels()
    constants = [f32(x) for x in scalars]
    if parallel:
        kernels.step_parallel(addresses, sizes, _tasks(sizes, block_size), *tables, *constants, int(block_size))
    else:
        kernels.step_serial(addresses, sizes, *tables, *constants, int(block_size))


def _check(row: tuple[torch.Tensor, ...], block_size: int) -> None:
    """The kernel reads and writes raw memory: refuse anything but the exact layout it assumes."""
    p, g, s1, a1, s2, a2 = row
    n = p.numel()
    nb = -(-n // block_size)
    f32, u8 = torch.float32, torch.uint8
    ok = (
        p.dtype is f32 and g.dtype is f32 and a1.dtype is f32 and a2.dtype is f32 and s1.dtype is u8
        and s2.dtype is u8
        and g.numel() == n and s1.numel() == n and s2.numel() == n and a1.numel() == nb and a2.numel() == nb
        and p.is_cpu and g.is_cpu and s1.is_cpu and a1.is_cpu and s2.is_cpu and a2.is_cpu
        and p.is_contiguous() and g.is_contiguous() and s1.is_contiguous() and a1.is_contiguous()
        and s2.is_contiguous() and a2.is_contiguous()
    )
    if not ok:
        raise ValueError(
            "the numba 8-bit kernel needs contiguous CPU tensors: float32 param and grad of n elements, uint8 "
            f"states of n elements and float32 absmax of ceil(n / {block_size}); got "
            + ", ".join(f"{t.dtype}[{t.numel()}]" for t in row)
        )


def adamw_8bit_numba(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    states: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
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
    """Run the fused kernel in place over several tensors at once (one kernel call).

    Args:
        params, grads: float32 CPU tensors (params contiguous; grads are made contiguous if needed).
        states: per tensor ``(state1, absmax1, state2, absmax2)``: contiguous uint8 codes and float32 maxima.
        cb1, cb2: the CPU codebooks of the two moments.
        beta1, beta2, correction2, eps, decay, step_size, decayed: the step's constants, rounded to float32
            here exactly as the torch path rounds them.
        block_size: elements per quantization block.

    Raises:
        ValueError: if a tensor has another layout, dtype or size than the kernel assumes.
    """
    import numba

    # Only addresses are passed (no autograd involved), so parameters need no detach.
    rows = [(p, g.contiguous(), *st) for p, g, st in zip(params, grads, states, strict=True)]
    for row in rows:
        _check(row, block_size)
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    parallel = threads > 1 and sum(row[0].numel() for row in rows) >= _PARALLEL_MIN_ELEMENTS
    if parallel and numba.get_num_threads() != threads:
        numba.set_num_threads(threads)
    scalars = (beta1, 1.0 - beta1, beta2, 1.0 - beta2, correction2, eps, decay if decayed else 1.0, step_size)
    _launch(rows, _tables(cb1, cb2), scalars, block_size, parallel)
