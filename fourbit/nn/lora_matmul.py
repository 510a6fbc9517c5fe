"""The fused LoRA training node and selective checkpointing of its outputs.

:class:`LoRAMatMul` computes QLoRA's layer (Eq. 5), base and adapter, as one autograd node;
:func:`keep_matmul_outputs` is the checkpointing policy that keeps its outputs so that a recomputation skips the
matmuls. :class:`fourbit.nn.lora.LoRALinear` uses both.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterator
from contextvars import ContextVar

import torch

from fourbit.nn.linear4bit import frozen_weight

__all__ = ["AUTO_KEEP_MAX_SEQ_LEN", "LoRAMatMul", "keep_matmul_outputs"]


class _MatmulOutputs:
    """What the forward pass of a checkpointed segment kept of its LoRA layers, in call order: each layer's
    output and its ``h · A^T``, with the output's version counter (an output changed in place is not reused)."""

    def __init__(self, max_seq_len: int | None = None) -> None:
        self.kept: deque[tuple[torch.Tensor, torch.Tensor, int]] = deque()
        self.mode: str | None = None
        self.max_seq_len = max_seq_len

    def keeps(self, x: torch.Tensor) -> bool:
        """Whether to keep the output for input ``x`` ([batch, seq, features] or [tokens, features])."""
        seq = x.shape[-2] if x.dim() >= 3 else x.shape[0]
        return self.max_seq_len is None or seq <= self.max_seq_len

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        with self._as("record"):
            yield

    @contextlib.contextmanager
    def replaying(self) -> Iterator[None]:
        with self._as("replay"):
            yield
        self.kept.clear()  # whatever the recomputation did not reach (it may stop early) is not needed again

    @contextlib.contextmanager
    def _as(self, mode: str) -> Iterator[None]:
        token = _KEPT_OUTPUTS.set(self)
        self.mode = mode
        try:
            yield
        finally:
            _KEPT_OUTPUTS.reset(token)
            self.mode = None


#: The kept outputs of the checkpointed segment being run or recomputed, if any: context, not module state, since
#: one policy object serves every LoRA layer of the segment. The recomputation enters its context in the thread
#: that recomputes, so it is seen there.
_KEPT_OUTPUTS: ContextVar[_MatmulOutputs | None] = ContextVar("fourbit_kept_matmul_outputs", default=None)


#: Sequence length up to which the ``auto`` checkpointing policy keeps matmul outputs. Beyond it attention, which
#: is recomputed anyway and grows with the square of the length, dominates the recomputation: at 2,048 tokens
#: keeping the outputs saved 5% of the step for 1.5 GB more memory (SmolLM2-135M, fp32; benchmarks/RESULTS.md).
AUTO_KEEP_MAX_SEQ_LEN = 1024


def keep_matmul_outputs(
    max_seq_len: int | None = None,
) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """A selective activation-checkpointing policy: the ``context_fn`` of ``torch.utils.checkpoint.checkpoint``
    (non-reentrant), also given by :func:`fourbit.train.prepare.prepare_model_for_training`.

    Plain checkpointing recomputes a whole decoder layer in backward, its matmuls included, which costs about a
    third of the step. Under this policy the forward pass keeps the output of every LoRA layer of the segment
    (``[tokens, out]`` in the compute dtype, and ``h · A^T``), and the recomputation takes them back instead of
    dequantizing and multiplying again: only the cheap parts (norms, rotary embeddings, activation functions,
    attention) run twice. It keeps about ``(q + k + v + o + gate + up + down widths) × tokens`` values per layer
    (for SmolLM2-135M, 5,184 × tokens × 2 bytes in bf16) on top of plain checkpointing, still far below no
    checkpointing.

    Args:
        max_seq_len: keep outputs only for sequences of at most this many tokens (None: any length); longer
            ones are recomputed in full (bind it with ``functools.partial`` to make a ``context_fn``).

    Returns:
        (forward context, recomputation context), sharing what the forward kept.
    """
    outputs = _MatmulOutputs(max_seq_len)
    return outputs.recording(), outputs.replaying()


class LoRAMatMul(torch.autograd.Function):
    """QLoRA's layer (Eq. 5) as one autograd node, for training:

        y = x · W^T + b + (h · A^T) · (s B)^T          (h = x, or dropout(x))
        dL/dx = g · W [+ (g · sB) · A when h is x]     dL/dh = (g · sB) · A
        dL/dA = (g · sB)^T · h                          dL/dB = s · g^T · (h · A^T)

    with every matmul in the compute dtype ``dtype``. The low-rank product is added into the base output by
    ``addmm`` (no separate pass over ``[tokens, out]`` for the update or its scaling) and in backward the
    low-rank input gradient into the base one likewise. It saves ``h`` (the base's input: nothing extra without
    dropout), ``h · A^T`` (``[tokens, r]``) and nothing of W: a 4-bit W is dequantized again in backward
    (QLoRA, section 3: the gradient flows through the frozen 4-bit weight, no 16-bit copy is stored). The base
    term is the frozen matmul of :class:`fourbit.nn.linear4bit.FrozenMatMul4bit` (the same
    :func:`~fourbit.nn.linear4bit.frozen_weight` read in forward and again in backward), fused into this node.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, h: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                base: torch.nn.Module, scaling: float, dtype: torch.dtype) -> torch.Tensor:
        shape = x.shape
        xc = x.to(dtype)
        x2 = xc.reshape(-1, shape[-1])
        h2 = x2 if h is x else h.reshape(-1, shape[-1]).to(dtype)
        a = lora_a.to(dtype)
        b = (lora_b * scaling).to(dtype)
        kept = _KEPT_OUTPUTS.get()
        out = None
        if kept is not None and kept.mode == "replay" and kept.kept:
            out, xa, version = kept.kept.popleft()
            if out._version != version or out.shape[:-1] != shape[:-1]:
                out = None  # changed in place by the model since, or another input: recompute
        if out is None:
            # computed in x's own shape, so that the output is not a view (models may add to it in place)
            out = torch.nn.functional.linear(xc, frozen_weight(base, dtype),
                                             None if base.bias is None else base.bias.to(dtype))
            xa = h2 @ a.t()
            out.view(-1, out.shape[-1]).addmm_(xa, b.t())
            if kept is not None and kept.mode == "record" and kept.keeps(x):
                # detached aliases (same storage and version counter, no autograd identity of their own)
                kept.kept.append((out.detach(), xa.detach(), out._version))
        ctx.base, ctx.scaling, ctx.dtype, ctx.same_input = base, scaling, dtype, h is x
        ctx.shapes = (shape, h.shape)
        ctx.save_for_backward(h2, xa, a, b)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        h2, xa, a, b = ctx.saved_tensors
        x_shape, h_shape = ctx.shapes
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(ctx.dtype)
        gb = g @ b  # [tokens, r]: the gradient at the low-rank bottleneck
        grad_x = grad_h = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ frozen_weight(ctx.base, ctx.dtype)
            if ctx.same_input:
                grad_x.addmm_(gb, a)
            grad_x = grad_x.view(x_shape)
        if ctx.needs_input_grad[1] and not ctx.same_input:
            grad_h = (gb @ a).view(h_shape)
        if ctx.needs_input_grad[2]:
            grad_a = gb.t() @ h2
        if ctx.needs_input_grad[3]:
            grad_b = (xa.t() @ g).t().contiguous() * ctx.scaling  # 2x faster than g^T @ xa in BLAS, same sums
        return grad_x, grad_h, grad_a, grad_b, None, None, None
