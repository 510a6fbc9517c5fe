"""The state of a batch being decoded: each row's sampling and stop handling (:class:`Row`), and the rows decoded
together through the model's forward with their shared KV cache (:class:`Batch`), for :mod:`.engine`."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Batch", "Row", "left_pad", "mergeable"]


class Row:
    """Decoding state of one request (an :class:`fourbit.serve.engine.GenRequest`) inside a batch."""

    def __init__(self, req: Any, tokenizer: Any, end_ids: set[int]) -> None:
        self.req, self.tokenizer, self.end_ids = req, tokenizer, end_ids
        self.ids = req.output_ids
        self.sent = 0  # characters of the decoded text already handed out
        seed = req.sampling.seed if req.sampling.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.hold = max((len(s) for s in req.sampling.stop), default=1) - 1

    def choose(self, logits: torch.Tensor) -> int:
        """The next token from a row of logits ``[vocab]``: within what the constraint allows, picked, and its
        log-probability reported when asked for."""
        s = self.req.sampling
        token = self.pick(logits if s.constraint is None else s.constraint.mask(logits))
        if s.constraint is not None:
            s.constraint.consume(token)
        if s.logprobs is not None and token not in self.end_ids:
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            top = torch.topk(logprobs, s.logprobs) if s.logprobs else None
            self.req.sink("logprob", {"token": token, "logprob": float(logprobs[token]),
                                      "top": [] if top is None else list(zip(top.indices.tolist(),
                                                                             top.values.tolist(), strict=True))})
        return token

    def pick(self, logits: torch.Tensor) -> int:
        """The next token from a row of logits ``[vocab]``: argmax, or a top-p sample at the temperature."""
        s = self.req.sampling
        if s.temperature <= 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.float() / s.temperature, dim=-1)
        if s.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_probs, 0) - sorted_probs < s.top_p
            keep[0] = True
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def push(self, token: int) -> bool:
        """Record ``token``, hand out the new text; True when the row is finished."""
        req = self.req
        if token in self.end_ids:
            self._flush(None)
            req.finish_reason = "stop"
            return True
        self.ids.append(token)
        req.completion_tokens += 1
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for stop in req.sampling.stop:
            at = text.find(stop, max(0, self.sent - len(stop)))
            if at >= 0:
                self._flush(text[:at])
                req.finish_reason = "stop"
                return True
        if req.completion_tokens >= req.sampling.max_tokens:
            self._flush(text)
            req.finish_reason = "length"
            return True
        if not text.endswith("\ufffd"):
            ready = len(text) - self.hold
            if ready > self.sent:
                req.sink("delta", text[self.sent:ready])
                self.sent = ready
        return False

    def _flush(self, text: str | None) -> None:
        if text is None:
            text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if len(text) > self.sent:
            self.req.sink("delta", text[self.sent:])
            self.sent = len(text)



def mergeable(cache: Any) -> bool:
    """True for a cache whose layers are plain growing key/value tensors (what :meth:`Batch.merge` pads)."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)


@dataclass
class Batch:
    """Rows decoded together: their KV cache, the pending input tokens ``ids [B, t]``, the attention
    ``mask [B, cached + t]`` (0 on left padding), ``positions [B, t]`` and adapter indices ``[B]``."""

    rows: list[Row]
    cache: Any
    ids: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    adapters: torch.Tensor

    def rows_cache(self, keep: list[int]) -> Any:
        """The cache of rows ``keep`` only (the whole cache when every row is kept)."""
        if len(keep) < len(self.rows):
            self.cache.batch_select_indices(torch.tensor(keep, dtype=torch.long, device=self.mask.device))
        return self.cache

    def select(self, keep: list[int]) -> None:
        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask, self.positions, self.adapters = self.mask[index], self.positions[index], self.adapters[index]
        self.rows = [self.rows[i] for i in keep]

    def merge(self, other: Batch) -> None:
        """Append ``other``'s rows (both hold one pending token per row): the shorter cache and mask are
        left-padded (masked out, so they change nothing) to a common length, then stacked."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([left_pad(mine.keys, width - 1), left_pad(theirs.keys, width - 1)], dim=0)
            mine.values = torch.cat([left_pad(mine.values, width - 1), left_pad(theirs.values, width - 1)], dim=0)
        self.mask = torch.cat([left_pad(self.mask, width), left_pad(other.mask, width)], dim=0)
        self.ids = torch.cat([self.ids, other.ids], dim=0)
        self.positions = torch.cat([self.positions, other.positions], dim=0)
        self.adapters = torch.cat([self.adapters, other.adapters], dim=0)
        self.rows = self.rows + other.rows


def left_pad(x: torch.Tensor, length: int) -> torch.Tensor:
    """Zeros on the left of dim -2 (KV ``[B, H, T, D]``) or dim -1 (a mask ``[B, T]``) up to ``length``."""
    dim = -2 if x.dim() == 4 else -1
    missing = length - x.shape[dim]
    if missing <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)
