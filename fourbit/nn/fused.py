"""Fused training kernels and the switch that turns them off.

Training a 4-bit model through PyTorch modules spends much of its time outside the matmuls: every elementwise
step of every layer is its own pass over memory, with its own allocation and autograd node. fourbit fuses the
pieces that cost most on the CPU, each tested against the plain PyTorch computation forward and backward:

- LoRA over the frozen base as one autograd node (:class:`fourbit.nn.lora.LoRALinear`, :class:`fourbit.nn.lora_matmul.LoRAMatMul`);
- the gated MLP's ``silu(gate) * up`` as one pass forward and one backward (:func:`swiglu`,
  :func:`fuse_gated_mlps`);
- Llama's RMSNorm as one pass per row each way (:func:`rms_norm`, :func:`fuse_rms_norms`);
- the output head's cross-entropy with its gradient computed in forward (``fourbit.train.loss``).

:func:`fused_kernels` turns all but the last off inside a block (the plain reference path).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from contextvars import ContextVar

import torch
from torch import nn

from fourbit.kernels import dispatch

__all__ = ["enabled", "fuse_gated_mlps", "fuse_rms_norms", "fused_kernels", "rms_norm", "swiglu"]

#: Whether the fused paths are on in this context (the trainer sets it from ``TrainConfig.fused_kernels``).
_FUSED: ContextVar[bool] = ContextVar("fourbit_fused_kernels", default=True)


def enabled() -> bool:
    """Whether the fused training paths are on (they are unless :func:`fused_kernels` turned them off)."""
    return _FUSED.get()


@contextlib.contextmanager
def fused_kernels(on: bool = True) -> Iterator[None]:
    """Turn the fused LoRA, gated-MLP and RMSNorm paths on or off inside the block (on by default). Off, the
    layers run the plain composition of PyTorch modules: the reference the fused paths are tested against.

    A context variable, not a global: it holds for this thread (and task) only, so two models trained side by
    side keep their own setting. Backward and checkpoint recomputation on the CPU run in the calling thread."""
    token = _FUSED.set(bool(on))
    try:
        yield
    finally:
        _FUSED.reset(token)


class _SwiGLU(torch.autograd.Function):
    """``silu(gate) * up``; saves ``gate`` and ``up`` only (autograd's composition also keeps ``silu(gate)``)."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return dispatch.swiglu(gate, up)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        return dispatch.swiglu_backward(gate, up, grad.contiguous())


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (Shazeer 2020, the SwiGLU of Llama-family MLPs) in float32 arithmetic, returned in the
    inputs' common dtype; one pass forward and one backward on the CPU's compiled kernels.

    Raises:
        ValueError: ``gate`` and ``up`` of different shapes.
    """
    dtype = torch.promote_types(gate.dtype, up.dtype)
    return _SwiGLU.apply(gate.to(dtype).contiguous(), up.to(dtype).contiguous())


def _gated_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if not _FUSED.get():
        return type(self).forward(self, x)
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def _is_llama_mlp(module: nn.Module) -> bool:
    """A module whose forward is exactly ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` with a SiLU: the code
    of transformers' ``LlamaMLP.forward``, which Mistral, Qwen2/3, SmolLM and others copy. Compared as bytecode
    (instructions and names), so a family with another forward keeps its own."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    if not _has_forward_of(module, LlamaMLP.forward):
        return False
    act = getattr(module, "act_fn", None)
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def fuse_gated_mlps(model: nn.Module) -> int:
    """Make every Llama-style gated MLP of ``model`` compute ``silu(gate) * up`` with :func:`swiglu` (its
    projections, LoRA or 4-bit, are untouched). The modules keep their class; only their ``forward`` changes,
    and it falls back to the class's own inside ``fused_kernels(False)``.

    Returns:
        How many modules were changed.
    """
    return _install_forward(model, _is_llama_mlp, _gated_mlp_forward)


class _RMSNorm(torch.autograd.Function):
    """RMSNorm with a frozen weight; saves the input and the per-row reciprocal RMS (autograd's composition
    keeps four tensors of the input's size)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        out, rstd = dispatch.rms_norm(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        return dispatch.rms_norm_backward(x, weight, grad.contiguous(), rstd), None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm (Zhang & Sennrich 2019): ``weight · x / sqrt(mean(x²) + eps)`` over the last dimension,
    statistics in float32, result in ``x``'s dtype; ``weight`` is frozen (no gradient) and of ``x``'s dtype."""
    return _RMSNorm.apply(x.contiguous(), weight.detach(), float(eps))


def _rms_norm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    if not _FUSED.get() or self.weight.requires_grad or hidden_states.dtype != self.weight.dtype:
        return type(self).forward(self, hidden_states)
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _has_forward_of(module: nn.Module, reference) -> bool:
    """Whether ``module``'s class computes exactly ``reference`` (same bytecode and names).

    Why bytecode and nothing sturdier: transformers copies ``LlamaMLP`` and ``LlamaRMSNorm`` into each family
    as new classes ("Copied from"), with no common base class, marker or registry, so neither ``isinstance``
    nor a class-name list finds them all, and a name list would also catch the families whose forward differs
    (Gemma's ``1 + weight`` norm, GELU MLPs). Equal bytecode and names is the one test that says "this forward
    computes what the fused kernel computes"; a new copy is fused without a change here, and a changed one falls
    back to its own forward, which is always correct."""
    forward = getattr(type(module), "forward", None)
    code, ref = getattr(forward, "__code__", None), reference.__code__
    return code is not None and code.co_code == ref.co_code and code.co_names == ref.co_names


def fuse_rms_norms(model: nn.Module) -> int:
    """Make every module whose forward is transformers' ``LlamaRMSNorm.forward`` (Mistral, Qwen2/3, SmolLM and
    others copy it; Gemma's ``1 + weight`` form differs and is left alone) run :func:`rms_norm` while its
    weight is frozen and of the input's dtype (training), else its own forward.

    Returns:
        How many modules were changed.
    """
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return _install_forward(model, lambda m: _has_forward_of(m, LlamaRMSNorm.forward), _rms_norm_forward)


def _install_forward(model: nn.Module, matches, forward) -> int:
    """Give every module of ``model`` that ``matches`` (and has no forward of its own yet) ``forward`` as its
    instance forward; return how many."""
    count = 0
    for module in model.modules():
        if "forward" not in vars(module) and matches(module):
            module.forward = types.MethodType(forward, module)
            count += 1
    return count
