"""A gathered formulation of the mixed-adapter LoRA update: a prototype for ``LoRALinear._forward_rows``.

``LoRALinear._forward_rows`` loops in Python over every adapter a layer holds (a comparison, a ``nonzero``, two
matmuls and an ``index_add`` each): with 100 adapters resident that is 100 iterations per layer per decode step
even when the batch names only 8 of them, and the step costs grow with the adapters resident, not with the
batch. Here a layer's adapters are stacked once (punica / S-LoRA's layout, without their kernels), ``A``
zero-padded to the largest rank and each adapter's scaling folded into its ``B``:

    A_stack [S, r_max, in]        B_stack [S, out, r_max]

and a step gathers each row's pair and runs two batched matmuls over the rows that use an adapter:

    h = bmm(x_rows, A_stack[slot]ᵀ)    update = bmm(h, B_stack[slot]ᵀ)    y = base(x) index_add update

a fixed number of ops whatever the number of adapters resident or in the batch. Rows of the base model (index
-1), and rows whose adapter does not target this layer, get exactly the base layer's output. The padded ranks
are zeros, so the result equals the loop's up to float rounding.

This is a prototype that lives outside the LoRA layer (the layer is owned by :mod:`fourbit.nn.lora`):
:func:`gathered_rows` switches a model's mixed-batch layers to it for a block (``benchmarks/bench_serve.py
--adapters``), so it can be measured against the loop before the layer adopts it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from fourbit.nn.lora import LoRALinear, lora_modules

__all__ = ["RowStacks", "gathered_rows", "gathered_rows_forward", "stack_row_adapters"]


@dataclass
class RowStacks:
    """A layer's row adapters stacked: ``slot_of [max index + 1]`` (an adapter index -> its slot, -1 where the
    adapter does not target this layer), ``a [S, r_max, in]`` and ``b [S, out, r_max]`` (scaling folded in)."""

    slot_of: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor


def stack_row_adapters(layer: LoRALinear) -> RowStacks | None:
    """The row adapters of ``layer`` (:meth:`LoRALinear.add_row_adapter`) stacked; None when it holds none."""
    indices = sorted(layer.row_scaling)
    if not indices:
        return None
    pairs = [(layer.get_buffer(f"row_A_{i}"), layer.get_buffer(f"row_B_{i}"), layer.row_scaling[i]) for i in indices]
    rank = max(a.shape[0] for a, _, _ in pairs)
    a0 = pairs[0][0]
    a_stack = a0.new_zeros((len(pairs), rank, layer.in_features))
    b_stack = a0.new_zeros((len(pairs), layer.out_features, rank))
    for slot, (a, b, scaling) in enumerate(pairs):
        a_stack[slot, : a.shape[0]] = a
        b_stack[slot, :, : b.shape[1]] = b.to(a0.dtype) * scaling
    slot_of = torch.full((indices[-1] + 1,), -1, dtype=torch.long, device=a0.device)
    slot_of[torch.tensor(indices, device=a0.device)] = torch.arange(len(indices), device=a0.device)
    return RowStacks(slot_of, a_stack, b_stack)


def gathered_rows_forward(layer: LoRALinear, x: torch.Tensor, stacks: RowStacks, rows: torch.Tensor) -> torch.Tensor:
    """``base(x)`` plus, on each row ``i`` whose adapter ``rows[i]`` targets this layer, that adapter's update.

    Shapes:
        x: ``[batch, ..., in]``; rows: ``[batch]`` long (-1: base model) -> ``[batch, ..., out]``.
    """
    y = layer.base(x)
    if rows.shape[0] != x.shape[0]:
        raise RuntimeError(f"row adapters set for {rows.shape[0]} rows, batch has {x.shape[0]}")
    known = (rows >= 0) & (rows < stacks.slot_of.shape[0])
    slots = torch.where(known, stacks.slot_of[rows.clamp(0, stacks.slot_of.shape[0] - 1)], -1)
    selected = (slots >= 0).nonzero().flatten()
    if selected.numel() == 0:
        return y
    slots = slots.index_select(0, selected)
    h = x.index_select(0, selected).to(stacks.a.dtype).flatten(1, -2)  # [n, tokens, in]
    h = torch.bmm(h, stacks.a.index_select(0, slots).transpose(1, 2))  # [n, tokens, r_max]
    update = torch.bmm(h, stacks.b.index_select(0, slots).transpose(1, 2))  # [n, tokens, out]
    return y.index_add(0, selected, update.reshape(selected.shape[0], *y.shape[1:]).to(y.dtype))


@contextmanager
def gathered_rows(model: nn.Module) -> Iterator[None]:
    """Inside the block, every mixed-batch LoRA layer of ``model`` computes its row updates by
    :func:`gathered_rows_forward` over stacks built on entry (adapters added or removed inside the block are
    not seen). Outside a mixed batch (``rows`` None) a layer computes as before."""
    patched = []
    for layer in lora_modules(model).values():
        stacks = stack_row_adapters(layer)
        if stacks is None:
            continue

        def forward(x: torch.Tensor, layer: LoRALinear = layer, stacks: RowStacks = stacks) -> torch.Tensor:
            if layer.rows is None:
                return LoRALinear.forward(layer, x)
            return gathered_rows_forward(layer, x, stacks, layer.rows)

        layer.forward = forward  # an instance attribute over the class's method, removed on exit
        patched.append(layer)
    try:
        yield
    finally:
        for layer in patched:
            del layer.forward
