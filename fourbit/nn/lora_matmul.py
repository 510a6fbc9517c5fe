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

from fourbit.kernels import dispatch
from fourbit.nn.linear4bit import frozen_weight

__all__ = ["AUTO_KEEP_MAX_SEQ_LEN", "LoRADropout", "LoRAMatMul", "SeededDropout", "keep_matmul_outputs"]


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

        y = x · W^T + b + (h · A^T) · (s B)^T          h = x, or x ⊙ M / (1 - p) with dropout
        dL/dx = g · W + ((g · sB) · A) ⊙ M / (1 - p)
        dL/dA = (g · sB)^T · h                          dL/dB = s · g^T · (h · A^T)

    with every matmul in the compute dtype ``dtype``. The low-rank product is added into the base output by
    ``addmm`` (no separate pass over ``[tokens, out]`` for the update or its scaling) and in backward the
    low-rank input gradient into the base one likewise. It saves ``x`` (the base's input), ``h · A^T``
    (``[tokens, r]``) and nothing of W: a 4-bit W is dequantized again in backward (QLoRA, section 3: the
    gradient flows through the frozen 4-bit weight, no 16-bit copy is stored). The base term is the frozen matmul
    of :class:`fourbit.nn.linear4bit.FrozenMatMul4bit` (the same :func:`~fourbit.nn.linear4bit.frozen_weight`
    read in forward and again in backward), fused into this node.

    Dropout (probability ``p``) is one pass of :func:`fourbit.kernels.dispatch.dropout`, whose mask ``M`` is made
    from ``seed``: backward makes ``h`` and the mask again from the seed, so dropout keeps nothing more than no
    dropout does (``x`` is saved either way) and costs one pass each way.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, base: torch.nn.Module,
                scaling: float, dtype: torch.dtype, p: float = 0.0, seed: int = 0) -> torch.Tensor:
        shape = x.shape
        xc = x.to(dtype)
        x2 = xc.reshape(-1, shape[-1])
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
            xa = _dropped(x2, p, seed) @ a.t()
            out.view(-1, out.shape[-1]).addmm_(xa, b.t())
            if kept is not None and kept.mode == "record" and kept.keeps(x):
                # detached aliases (same storage and version counter, no autograd identity of their own)
                kept.kept.append((out.detach(), xa.detach(), out._version))
        ctx.base, ctx.scaling, ctx.dtype, ctx.p, ctx.seed = base, scaling, dtype, p, seed
        ctx.x_shape = shape
        ctx.save_for_backward(x2, xa, a, b)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x2, xa, a, b = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(ctx.dtype)
        gb = g @ b  # [tokens, r]: the gradient at the low-rank bottleneck
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ frozen_weight(ctx.base, ctx.dtype)
            if ctx.p:
                grad_x.add_(_dropped(gb @ a, ctx.p, ctx.seed))  # d(x ⊙ M / (1-p))/dx: the same mask
            else:
                grad_x.addmm_(gb, a)
            grad_x = grad_x.view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            grad_a = gb.t() @ _dropped(x2, ctx.p, ctx.seed)
        if ctx.needs_input_grad[2]:
            grad_b = (xa.t() @ g).t().contiguous() * ctx.scaling  # 2x faster than g^T @ xa in BLAS, same sums
        return grad_x, grad_a, grad_b, None, None, None, None, None


def _dropped(t: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """``t`` through the seeded dropout (the same mask for the same seed and shape), or ``t`` itself for p = 0."""
    return dispatch.dropout(t.contiguous(), p, seed) if p else t


class SeededDropout(torch.autograd.Function):
    """``x ⊙ M / (1 - p)`` with the mask made from ``seed`` (:func:`fourbit.kernels.dispatch.dropout`); backward
    makes the same mask again instead of keeping it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
        ctx.p, ctx.seed = p, seed
        return dispatch.dropout(x.contiguous(), p, seed)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return dispatch.dropout(grad.contiguous(), ctx.p, ctx.seed), None, None


class LoRADropout(torch.nn.Module):
    """LoRA's dropout on the adapter input (peft's ``lora_dropout``), with a mask made from a seed drawn from
    torch's generator at each training forward: the fused node and the plain path draw the same seed and so
    drop the same elements, a checkpointed segment's recomputation (which restores the generator) draws it again,
    and nothing of the mask is stored. Identity in eval mode.

    Args:
        p: the dropout probability, in (0, 1).
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 < p < 1.0:
            raise ValueError(f"LoRADropout: p must be in (0, 1), got {p!r}")
        self.p = float(p)

    def draw(self) -> tuple[float, int]:
        """``(p, seed)`` for one training forward, or ``(0.0, 0)`` in eval mode (no dropout, no draw)."""
        if not self.training:
            return 0.0, 0
        return self.p, int(torch.randint(0, 2**62, (), dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, seed = self.draw()
        return SeededDropout.apply(x, p, seed) if p else x

    def extra_repr(self) -> str:
        return f"p={self.p}"
