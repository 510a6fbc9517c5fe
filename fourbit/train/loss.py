"""A memory-lean causal-LM loss: cross-entropy through ``lm_head`` in chunks of tokens.

Full fp32 logits of a 49k vocabulary are large (batch 4 × 2048 tokens × 49,152 × 4 B = 1.6 GB, plus the same
again for their gradient). Here the decoder's hidden states are taken instead, the positions without a label
are dropped, and the remaining tokens go through ``lm_head`` + cross-entropy ``chunk_size`` at a time, each
chunk under activation checkpointing so that its logits are recomputed in backward rather than kept. Peak
extra memory is one chunk of logits. The sum equals ``F.cross_entropy`` on full logits (tested, with grads).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .batching import Batch
from .data import IGNORE_INDEX

__all__ = ["causal_lm_loss", "chunked_cross_entropy", "decoder_hidden_states"]


def _chunk_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight.to(hidden.dtype), None if bias is None else bias.to(hidden.dtype))
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def chunked_cross_entropy(
    hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, chunk_size: int = 1024
) -> torch.Tensor:
    """Sum of token cross-entropies of ``head(hidden)`` against ``targets``, ``chunk_size`` tokens at a time.

    Args:
        hidden: ``[N, H]`` hidden states of the tokens that carry a label.
        head: the output projection (``nn.Linear``, ``[V, H]`` weight, optional bias).
        targets: ``[N]`` token ids (no ``IGNORE_INDEX``: select the labelled positions first).
        chunk_size: tokens per chunk; ``0`` computes all logits at once (the plain reference path).

    Returns:
        Scalar float32 sum over the ``N`` tokens (divide by the token count for the mean).
    """
    weight = head.weight
    bias = getattr(head, "bias", None)
    if hidden.shape[0] == 0:
        return hidden.sum().float() * 0.0
    if chunk_size <= 0 or hidden.shape[0] <= chunk_size:
        return _chunk_loss_sum(hidden, weight, bias, targets)
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[s:s + chunk_size], targets[s:s + chunk_size]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss_sum, h, weight, bias, t, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(h, weight, bias, t)
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
