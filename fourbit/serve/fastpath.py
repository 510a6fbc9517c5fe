"""Rows of the base model decoded by the compiled batch-1 step of :mod:`fourbit.models.decode`.

A decode step through the model's modules costs hundreds of small PyTorch operations, each paying Python and
dispatch overhead larger than its arithmetic at the sizes a CPU serves; ``fourbit generate`` replaces them by one
compiled call per token (:class:`fourbit.models.decode.Decoder`). The engine uses it for every batch whose rows
all ask for the base model: the prompts are prefilled together through the model's own forward (left-padded, as
for any batch), each row's K/V is copied into a cache of its own (:meth:`Decoder.new_state`), and each step runs
the compiled step once per row (:meth:`Decoder.using`). The rows are decoded one after another, so the weights
are read once per row and step: the batched forward reads them once per step but pays the per-operation overhead
on every layer, which at the model sizes served on a CPU costs more (``benchmarks/bench_serve.py``).

The compiled step computes in float32 and cannot apply LoRA layers: a batch with an adapter row runs the model's
forward (mixed-batch LoRA layers, :mod:`.gathered`). The decoder reads the base layers where they are, so it is
built once with the serving LoRA layers set aside and stays valid while adapters come and go (they wrap the same
base layers, never change them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fourbit.models.decode import Decoder, DecodeState, unsupported_reason
from fourbit.serve.adapters import serving_layers_set_aside

__all__ = ["FastRow", "build_decoder", "prefill_states", "step_row"]



def build_decoder(model: Any, max_len: int) -> tuple[Decoder | None, str | None]:
    """The compiled decoder over ``model``'s base layers, or (None, why it cannot run this model)."""
    with serving_layers_set_aside(model):
        reason = unsupported_reason(model)
        if reason is not None:
            return None, reason
        try:
            return Decoder(model, max_len), None
        except NotImplementedError as err:
            return None, str(err)


@dataclass
class FastRow:
    """One row of a compiled-step batch: its decoding state (``row``, the engine's), its own cache and
    position (``state``) and the token chosen last, which the next step runs (``token``)."""

    row: Any
    state: DecodeState
    token: int


def _kv_layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's (keys, values) ``[batch, kv_heads, tokens, head_dim]`` of a transformers cache."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))


def prefill_states(decoder: Decoder, cache: Any, lengths: list[int], room: list[int]) -> list[DecodeState]:
    """One :class:`DecodeState` per row of a left-padded batched prefill: row ``i`` holds its ``lengths[i]``
    prompt positions (the last ones of the padded width), with cache room for ``room[i]`` more tokens."""
    kv = _kv_layers(cache)
    states = []
    for i, (n, more) in enumerate(zip(lengths, room, strict=True)):
        rows = [(k[i, :, k.shape[2] - n:].float(), v[i, :, v.shape[2] - n:].float()) for k, v in kv]
        states.append(decoder.new_state(n + more, rows))
    return states


def step_row(decoder: Decoder, fast: FastRow) -> int:
    """Run ``fast.token`` through the compiled step in the row's own cache; the row's next token (greedy straight
    from the step when nothing needs the logits, else chosen by the row from them)."""
    sampling = fast.row.req.sampling
    plain = sampling.temperature <= 0 and sampling.logprobs is None and sampling.constraint is None
    with decoder.using(fast.state):
        token, logits = decoder.step(fast.token, logits=not plain)
    return token if plain else fast.row.choose(logits)
