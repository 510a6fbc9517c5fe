"""One dispatch point for the heavy tensor kernels.

Each function here picks an implementation for its inputs: the Triton kernels (``fourbit.kernels.triton_kernels``)
for CUDA tensors when Triton is importable, the compiled CPU kernels (``fourbit.kernels.cpu``, built on first
use with the system C compiler) for CPU tensors, else the PyTorch reference (``fourbit.kernels.reference``),
which defines the results. Set ``FOURBIT_KERNELS=reference`` to force the reference path everywhere (the fast
kernels are tested to give identical bytes, or float32 results to rounding where they sum in another order).

There are eleven kernels (:data:`KERNELS`), each a function of that name with the reference's signature in every
backend module that has it (and listed in the module's ``__all__``):

    quantize_4bit_blocks(flat, code, blocksize) -> (packed, absmax)
    dequantize_4bit_blocks(packed, scales, code, blocksize, n, dtype) -> [n] dtype
    fused_linear_4bit(x, packed, scales, code, blocksize, out_features, in_features) -> [..., out_features]
        (with its predicate can_fuse(dtype, blocksize, in_features) -> bool)
    quantize_8bit_blocks(flat, code, blocksize) -> (codes, absmax)
    dequantize_8bit_blocks(codes, absmax, code, blocksize, dtype) -> [n] dtype
    softmax_cross_entropy_(logits, targets, write_grad) -> [rows] float32
    swiglu(gate, up) -> gate's shape;  swiglu_backward(gate, up, grad) -> (d_gate, d_up)
    rms_norm(x, weight, eps) -> (y, rstd);  rms_norm_backward(x, weight, grad, rstd) -> dx
    dropout(x, p, seed) -> x's shape (a mask made from the seed: the same seed, the same mask)

The reference has all eleven, the compiled CPU backend the 4-bit three and the six training-row kernels, Triton
the 4-bit three. Where a backend lacks a kernel, :data:`REFERENCE_FALLBACKS` -- the one place this is
decided -- says whether the reference runs on that backend's tensors instead (PyTorch ops on the same device);
any other missing kernel raises ``NotImplementedError`` naming the backend and the kernel.

``scales`` is a :class:`fourbit.kernels.scales.BlockScales`. Nothing is probed or compiled at import time.
"""

from __future__ import annotations

import os
from functools import lru_cache
from types import ModuleType

import torch

from fourbit.kernels import reference
from fourbit.kernels.scales import OUTPUT_DTYPES, SMALL_BATCH_ROWS, BlockScales, check_output_dtype

__all__ = [
    "KERNELS",
    "REFERENCE_FALLBACKS",
    "SMALL_BATCH_ROWS",
    "backend_for",
    "kernel",
    "quantize_4bit_blocks",
    "dequantize_4bit",
    "quantize_8bit_blocks",
    "dequantize_8bit_blocks",
    "linear_4bit",
    "uses_fused_kernel",
    "softmax_cross_entropy_",
    "swiglu",
    "swiglu_backward",
    "rms_norm",
    "rms_norm_backward",
    "dropout",
]

#: Every kernel a backend module may implement, by name.
KERNELS = (
    "quantize_4bit_blocks",
    "dequantize_4bit_blocks",
    "fused_linear_4bit",
    "quantize_8bit_blocks",
    "dequantize_8bit_blocks",
    "softmax_cross_entropy_",
    "swiglu",
    "swiglu_backward",
    "rms_norm",
    "rms_norm_backward",
    "dropout",
)

_TRAINING_ROWS = frozenset({"softmax_cross_entropy_", "swiglu", "swiglu_backward", "rms_norm", "rms_norm_backward",
                            "dropout"})
_EIGHT_BIT = frozenset({"quantize_8bit_blocks", "dequantize_8bit_blocks"})

#: Backend (module name after ``fourbit.kernels.``) -> the kernels it lacks for which the PyTorch reference
#: runs instead, on that backend's tensors: the 8-bit block quantization (optimizer states, small) everywhere,
#: and on GPUs the training rows (PyTorch's fused GPU ops serve; no Triton versions written yet).
REFERENCE_FALLBACKS: dict[str, frozenset[str]] = {
    "cpu": _EIGHT_BIT,
    "triton_kernels": _EIGHT_BIT | _TRAINING_ROWS,
}


def _forced() -> str:
    """``FOURBIT_KERNELS``: "reference" forces the PyTorch reference everywhere; anything else picks by device."""
    return os.environ.get("FOURBIT_KERNELS", "auto").lower()


def backend_for(t: torch.Tensor) -> ModuleType:
    """The kernel module for tensor ``t``: triton_kernels (CUDA), cpu (compiled), or reference (forced, other
    devices, no Triton, or no C compiler; the compiled backend warns once when it cannot be built)."""
    if _forced() == "reference":
        return reference
    if t.is_cpu:
        cpu = _compiled_cpu()
        return cpu if cpu.available() else reference
    if t.is_cuda:
        try:
            from fourbit.kernels import triton_kernels
        except ImportError:
            return reference
        return triton_kernels if triton_kernels.available() else reference
    return reference


@lru_cache(maxsize=1)
def _compiled_cpu():
    from fourbit.kernels import cpu  # imported on first use: nothing is built at import time

    return cpu


def kernel(backend: ModuleType, name: str):
    """The function ``name`` (one of :data:`KERNELS`) of ``backend``, or the reference's where
    :data:`REFERENCE_FALLBACKS` names it for that backend.

    Raises:
        NotImplementedError: ``backend`` lacks ``name`` and no fallback is declared for it.
    """
    if name in getattr(backend, "__all__", ()):
        return getattr(backend, name)
    short = backend.__name__.rpartition(".")[2]
    if name in REFERENCE_FALLBACKS.get(short, ()):
        return getattr(reference, name)
    raise NotImplementedError(f"the {short} kernels have no {name} (and dispatch.REFERENCE_FALLBACKS names no "
                              f"fallback for it)")


def _kernel(t: torch.Tensor, name: str):
    """:func:`kernel` ``name`` of the backend for tensor ``t``."""
    return kernel(backend_for(t), name)


def quantize_4bit_blocks(flat: torch.Tensor, code: torch.Tensor, blocksize: int):
    """Blockwise absmax 4-bit codes of ``flat`` (see :func:`fourbit.kernels.reference.quantize_4bit_blocks`)."""
    return _kernel(flat, "quantize_4bit_blocks")(flat, code, blocksize)


def dequantize_4bit(packed: torch.Tensor, scales: BlockScales, code: torch.Tensor, blocksize: int, n: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """Dequantize ``n`` values to ``dtype`` (float32/float16/bfloat16, or float64: float32 widened exactly).

    Raises:
        TypeError: for any other ``dtype``.
    """
    check_output_dtype(dtype)
    return _kernel(packed, "dequantize_4bit_blocks")(packed, scales, code, blocksize, n, dtype)


def quantize_8bit_blocks(flat: torch.Tensor, code: torch.Tensor, blocksize: int):
    """Blockwise 8-bit codes of ``flat`` (see :func:`fourbit.kernels.reference.quantize_8bit_blocks`)."""
    return _kernel(flat, "quantize_8bit_blocks")(flat, code, blocksize)


def dequantize_8bit_blocks(codes, absmax, code, blocksize: int, dtype: torch.dtype):
    """``code[q] * absmax[block]`` as ``dtype`` (see :func:`fourbit.kernels.reference.dequantize_8bit_blocks`)."""
    return _kernel(codes, "dequantize_8bit_blocks")(codes, absmax, code, blocksize, dtype)


def uses_fused_kernel(x: torch.Tensor, blocksize: int, in_features: int) -> bool:
    """True when :func:`linear_4bit` runs the backend's fused 4-bit matmul for ``x``: at most
    :data:`SMALL_BATCH_ROWS` rows, and a dtype and shape the backend's fused kernel takes."""
    return _fuses(backend_for(x), x, blocksize, in_features)


def _fuses(backend, x: torch.Tensor, blocksize: int, in_features: int) -> bool:
    rows = x.numel() // in_features if in_features else 0
    return 0 < rows <= SMALL_BATCH_ROWS and backend.can_fuse(x.dtype, blocksize, in_features)


def linear_4bit(x: torch.Tensor, packed: torch.Tensor, scales: BlockScales, code: torch.Tensor, blocksize: int,
                out_features: int, in_features: int) -> torch.Tensor:
    """``x @ dequant(W).T`` for a 4-bit W [out_features, in_features], computed in ``x.dtype``.

    Up to :data:`SMALL_BATCH_ROWS` rows: the backend's fused kernel (float32 sums; it never writes the
    full-precision weight). Otherwise, and for inputs the fused kernel does not take (float64 on the compiled
    and Triton backends): the weight dequantized to ``x.dtype``, then ``torch.nn.functional.linear``.

    Args:
        x: [..., in_features] float32, float16, bfloat16 or float64.

    Returns:
        [..., out_features] tensor of ``x.dtype``.

    Raises:
        TypeError: ``x`` of another dtype. ValueError: ``x``'s last dimension is not ``in_features``.
    """
    if x.dtype not in OUTPUT_DTYPES:
        raise TypeError(f"x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"x has shape {tuple(x.shape)}, expected a last dimension of in_features={in_features}")
    backend = backend_for(x)
    if _fuses(backend, x, blocksize, in_features):
        fused = kernel(backend, "fused_linear_4bit")
        return fused(x, packed, scales, code, blocksize, out_features, in_features)
    dequantize = kernel(backend, "dequantize_4bit_blocks")
    weight = dequantize(packed, scales, code, blocksize, out_features * in_features, x.dtype)
    return torch.nn.functional.linear(x, weight.view(out_features, in_features))


def softmax_cross_entropy_(logits: torch.Tensor, targets: torch.Tensor, write_grad: bool = True) -> torch.Tensor:
    """Per-row cross-entropy of ``logits`` [rows, vocab] against ``targets`` [rows], and with ``write_grad``
    its gradient ``softmax - onehot`` written over ``logits`` (see
    :func:`fourbit.kernels.reference.softmax_cross_entropy_`). The compiled CPU kernel reads each row three
    times; other devices use the reference.

    Raises:
        ValueError: wrong shapes, or a target outside ``[0, vocab)`` (it would index past the row).
    """
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"softmax_cross_entropy_ takes logits [rows, vocab] and targets [rows], got "
                         f"{tuple(logits.shape)} and {tuple(targets.shape)}")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= logits.shape[1]):
        bad = targets[(targets < 0) | (targets >= logits.shape[1])][0]
        raise ValueError(f"target {int(bad)} is out of bounds for a vocabulary of {logits.shape[1]}")
    if not logits.shape[0]:
        return logits.new_zeros(0, dtype=torch.float32)
    return _kernel(logits, "softmax_cross_entropy_")(logits, targets, write_grad)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` in ``gate``'s dtype (float32 arithmetic): one compiled pass on the CPU.

    Raises:
        ValueError: ``gate`` and ``up`` of different shapes.
    """
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ in shape")
    return _kernel(gate, "swiglu")(gate, up)


def swiglu_backward(gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of :func:`swiglu` for ``gate`` and ``up`` (see :func:`fourbit.kernels.reference.swiglu_backward`)."""
    return _kernel(gate, "swiglu_backward")(gate, up, grad)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama's RMSNorm over the last dimension of ``x`` [..., cols] and the reciprocal RMS of each row
    ([...], float32; see :func:`fourbit.kernels.reference.rms_norm`): one compiled pass per row on the CPU.

    Raises:
        ValueError: a weight whose size is not ``x``'s last dimension.
    """
    if x.dim() == 0 or weight.shape != x.shape[-1:]:
        raise ValueError(f"rms_norm takes x [..., cols] and weight [cols], got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    return _kernel(x, "rms_norm")(x, weight, eps)


def rms_norm_backward(x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """The input gradient of :func:`rms_norm` for a frozen weight."""
    return _kernel(x, "rms_norm_backward")(x, weight, grad, rstd)


def dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Inverted dropout whose mask is made from ``seed`` (:func:`fourbit.kernels.reference.dropout`): the same
    ``(x.shape, p, seed)`` gives the same mask on every backend, so backward makes it again from the seed.

    Raises:
        ValueError: ``p`` outside [0, 1).
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout: p must be in [0, 1), got {p!r}")
    return _kernel(x, "dropout")(x, p, seed)
