"""A fast, memory-lean causal-LM loss: fused linear cross-entropy through ``lm_head``, in chunks of tokens.

Full fp32 logits of a 49k vocabulary are large (batch 4 × 2048 tokens × 49,152 × 4 B = 1.6 GB, plus the same
again for their gradient), and PyTorch's log_softmax + nll_loss and their backward pass over them about eight
times. Here the decoder's hidden states are taken instead, the positions without a label are dropped, and
the remaining tokens go through ``lm_head`` ``chunk_size`` at a time. For a frozen head (QLoRA) each chunk's
loss *and* its gradient are computed in the forward pass (the approach of Liger-Kernel's fused linear
cross-entropy): the logits, then one compiled pass per row (:func:`fourbit.kernels.dispatch.softmax_cross_entropy_`)
that gives ``logsumexp(z) - z[target]`` and writes ``softmax(z) - onehot(target)`` over the logits, then
``dL/dh = (softmax - onehot) · W``. Only ``dL/dh`` ([tokens, hidden], small) is kept for backward, so the
head's matmul is never recomputed and no more than one chunk of logits ever exists. A trainable head takes
the checkpointed path (each chunk's logits recomputed in backward). Both equal ``F.cross_entropy`` on full
logits (tested, with gradients).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fourbit.kernels import dispatch

from .batching import Batch
from .data import IGNORE_INDEX

__all__ = ["causal_lm_loss", "chunked_cross_entropy", "decoder_hidden_states", "token_cross_entropy"]


def _chunk_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight.to(hidden.dtype), None if bias is None else bias.to(hidden.dtype))
    return F.cross_entropy(logits.float(), targets, reduction="sum")


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    """Sum of token cross-entropies of ``hidden · W^T + b`` with a frozen W, b; ``dL/dhidden`` is computed in
    forward, chunk by chunk, and scaled by the incoming gradient in backward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                chunk_size: int) -> torch.Tensor:
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(hidden) if want_grad else None
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):  # the caller chose the dtype
            for s in range(0, hidden.shape[0], chunk_size):
                logits = F.linear(hidden[s:s + chunk_size], weight, bias)
                total += dispatch.softmax_cross_entropy_(logits, targets[s:s + chunk_size], want_grad).sum(
                    dtype=torch.float64)
                if want_grad:
                    torch.mm(logits, weight, out=grad[s:s + chunk_size])
                del logits
        ctx.save_for_backward(grad)
        return total.float()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None, None


class _FrozenHeadTokenCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropies ``[N]`` of ``hidden · W^T + b`` with a frozen W, b: each token's
    ``dL/dhidden`` is computed in forward, chunk by chunk, and scaled by that token's incoming gradient in
    backward (the preference losses weigh every token of a reply by its pair's gradient)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                chunk_size: int) -> torch.Tensor:
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(hidden) if want_grad else None
        losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):  # the caller chose the dtype
            for s in range(0, hidden.shape[0], chunk_size):
                logits = F.linear(hidden[s:s + chunk_size], weight, bias)
                losses[s:s + chunk_size] = dispatch.softmax_cross_entropy_(logits, targets[s:s + chunk_size],
                                                                           want_grad)
                if want_grad:
                    torch.mm(logits, weight, out=grad[s:s + chunk_size])
                del logits
        ctx.save_for_backward(grad)
        return losses

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype)[:, None], None, None, None, None


def token_cross_entropy(
    hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, chunk_size: int = 1024
) -> torch.Tensor:
    """Per-token cross-entropies ``-log softmax(head(hidden))[target]`` (float32 ``[N]``), ``chunk_size`` tokens
    at a time for a frozen head (as :func:`chunked_cross_entropy`, keeping one chunk of logits at most), else
    from the full logits of the ``N`` tokens.

    Args:
        hidden: ``[N, H]`` hidden states of the tokens that carry a label.
        head: the output projection (``[V, H]`` weight, optional bias).
        targets: ``[N]`` token ids.
        chunk_size: tokens per chunk; ``0`` computes all logits at once (the plain reference path).
    """
    weight, bias = head.weight, getattr(head, "bias", None)
    head_trains = weight.requires_grad or (bias is not None and bias.requires_grad)
    if hidden.shape[0] == 0:
        return hidden.sum(-1).float() * 0.0
    if chunk_size <= 0 or (head_trains and torch.is_grad_enabled()):
        logits = F.linear(hidden, weight.to(hidden.dtype), None if bias is None else bias.to(hidden.dtype))
        return F.cross_entropy(logits.float(), targets, reduction="none")
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    return _FrozenHeadTokenCrossEntropy.apply(hidden.to(dtype), weight.detach().to(dtype),
                                              None if bias is None else bias.detach().to(dtype), targets, chunk_size)


def chunked_cross_entropy(
    hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, chunk_size: int = 1024
) -> torch.Tensor:
    """Sum of token cross-entropies of ``head(hidden)`` against ``targets``, ``chunk_size`` tokens at a time.

    The logits are computed in the autocast dtype when autocast is on (as ``head(hidden)`` would), else in
    ``hidden``'s dtype; the loss itself always in float32 (summed in float64).

    Args:
        hidden: ``[N, H]`` hidden states of the tokens that carry a label.
        head: the output projection (``nn.Linear``, ``[V, H]`` weight, optional bias).
        targets: ``[N]`` token ids (no ``IGNORE_INDEX``: select the labelled positions first).
        chunk_size: tokens per chunk; ``0`` computes all logits at once with ``F.cross_entropy`` (the plain
            reference path).

    Returns:
        Scalar float32 sum over the ``N`` tokens (divide by the token count for the mean).
    """
    weight = head.weight
    bias = getattr(head, "bias", None)
    if hidden.shape[0] == 0:
        return hidden.sum().float() * 0.0
    if chunk_size <= 0:
        return _chunk_loss_sum(hidden, weight, bias, targets)
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    head_trains = weight.requires_grad or (bias is not None and bias.requires_grad)
    if not (head_trains and torch.is_grad_enabled()):
        return _FrozenHeadCrossEntropy.apply(hidden.to(dtype), weight.detach().to(dtype),
                                             None if bias is None else bias.detach().to(dtype), targets,
                                             chunk_size)
    if hidden.shape[0] <= chunk_size:
        return _chunk_loss_sum(hidden, weight, bias, targets)
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[s:s + chunk_size], targets[s:s + chunk_size]
        total = total + checkpoint(_chunk_loss_sum, h, weight, bias, t, use_reentrant=False)
    return total


def decoder_hidden_states(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Final hidden states ``[B, T, H]`` of a transformers causal LM, without computing logits.

    Raises:
        NotImplementedError: for models whose logits are not a plain ``lm_head(hidden)`` (soft-capping or
            logit scaling), where the chunked loss would differ from the model's own.
    """
    cfg = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if cfg is not None and getattr(cfg, attr, None) not in (None, 1.0):
            raise NotImplementedError(f"chunked loss does not support models with config.{attr}; "
                                      "set `loss_chunk_size` to 0")
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    out = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                  position_ids=batch.position_ids, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def causal_lm_loss(model: nn.Module, batch: Batch, *, chunk_size: int = 1024) -> torch.Tensor:
    """Summed next-token loss over the batch's labelled tokens (float32 scalar).

    With ``chunk_size > 0`` the loss goes through :func:`chunked_cross_entropy` on the labelled positions
    only; with ``0`` it uses the model's full logits (reference path).
    """
    labels = batch.labels[:, 1:]
    keep = labels != IGNORE_INDEX
    if chunk_size > 0:
        hidden = decoder_hidden_states(model, batch)[:, :-1][keep]
        return chunked_cross_entropy(hidden, model.get_output_embeddings(), labels[keep], chunk_size)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   position_ids=batch.position_ids, use_cache=False).logits[:, :-1]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
