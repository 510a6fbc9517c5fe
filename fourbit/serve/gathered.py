"""Mixed-adapter batches with each row's adapter gathered once per batch, not looked up at every step.

The LoRA layer's own mixed-batch mode (``LoRALinear._forward_rows``) loops, at every layer of every decode step,
over the adapters the batch names: a ``unique``, and per adapter a ``nonzero``, an ``index_select``, two matmuls,
a scaling and an ``index_add``. A batch of 8 rows naming 8 adapters costs 8 times the operations of one naming a
single adapter, and at the sizes a CPU serves each operation's overhead outweighs its arithmetic: that loop is
where a mixed batch lost its throughput (``benchmarks/bench_serve.py --adapters``). Which adapter each row uses
changes only when rows join or leave, so here it is gathered then (punica / S-LoRA's layout, without their
kernels): per layer, each row's ``A`` transposed and zero-padded to the batch's largest rank, and its ``B`` with
its scaling folded in,

    A_rows [batch, in, r_max]        B_rows [batch, r_max, out]

and a step is two batched matmuls added onto the base output, whatever the number of adapters in the batch or
resident:

    y = base(x) + bmm(bmm(x, A_rows), B_rows)

When every row uses the same adapter the pair is that adapter's own (``y = base(x) + (x Aᵀ)(s B)ᵀ``, plain
matmuls). A row of the base model (index -1), or whose adapter does not target the layer, has zeros: it gets
exactly the base layer's output (``y + 0``). A layer no row's adapter targets computes only its base.

:class:`RowGather` installs this as the mixed-batch computation of the model's LoRA layers (each layer's
``_forward_rows``, the hook the layer's ``forward`` calls while ``rows`` is set), so the layer class is unchanged
and a layer outside a gathered batch computes as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fourbit.nn.lora import LoRALinear, lora_modules

__all__ = ["GatheredRows", "RowGather", "gather_rows"]


@dataclass
class GatheredRows:
    """One layer's adapters for the rows of a batch: ``a [in, r]`` and ``b [r, out]`` (every row the same
    adapter), ``a [batch, in, r_max]`` and ``b [batch, r_max, out]`` (a mix), or both None (no row's adapter
    targets the layer). The scaling is folded into ``b``."""

    base: nn.Module
    a: torch.Tensor | None
    b: torch.Tensor | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base(x)`` plus each row's update. Shapes: ``x [batch, ..., in]`` -> ``[batch, ..., out]``."""
        y = self.base(x)
        if self.a is None:
            return y
        h = x.to(self.a.dtype)
        if self.a.dim() == 2:
            return y + ((h @ self.a) @ self.b).to(y.dtype)
        if self.a.shape[0] != x.shape[0]:
            raise RuntimeError(f"row adapters gathered for {self.a.shape[0]} rows, batch has {x.shape[0]}")
        update = torch.bmm(torch.bmm(h.reshape(x.shape[0], -1, x.shape[-1]), self.a), self.b)
        return y + update.reshape(y.shape).to(y.dtype)

    def select(self, index: torch.Tensor) -> None:
        """Keep the rows ``index`` (in that order), as the batch does when rows finish."""
        if self.a is not None and self.a.dim() == 3:
            self.a, self.b = self.a.index_select(0, index), self.b.index_select(0, index)


def gather_rows(layer: LoRALinear, rows: list[int]) -> GatheredRows:
    """``layer``'s row adapters (:meth:`LoRALinear.add_row_adapter`) gathered for a batch whose row ``i`` uses
    adapter ``rows[i]`` (-1: the base model)."""
    used = {index: layer.row_scaling[index] for index in rows if index in layer.row_scaling}
    if not used:
        return GatheredRows(layer.base, None, None)
    pairs = {index: (layer.get_buffer(f"row_A_{index}"), layer.get_buffer(f"row_B_{index}")) for index in used}
    if len(set(rows)) == 1:
        (index, (a, b)), = pairs.items()
        return GatheredRows(layer.base, a.t(), (b * used[index]).t())
    a0 = next(iter(pairs.values()))[0]
    rank = max(a.shape[0] for a, _ in pairs.values())
    a_rows = a0.new_zeros((len(rows), layer.in_features, rank))
    b_rows = a0.new_zeros((len(rows), rank, layer.out_features))
    for i, index in enumerate(rows):
        if index in pairs:
            a, b = pairs[index]
            a_rows[i, :, : a.shape[0]] = a.t()
            b_rows[i, : b.shape[1]] = b.t().to(a0.dtype) * used[index]
    return GatheredRows(layer.base, a_rows, b_rows)


class RowGather:
    """The adapters of a running batch's rows, gathered into every mixed-batch LoRA layer of ``model``.

    The engine calls :meth:`use` before each forward pass with the batch's adapter index per row (it gathers
    only when they changed), :meth:`select` when rows leave the batch, :meth:`clear` when the batch ends or the
    model's adapters change. Not thread-safe: the engine's worker alone calls it.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.rows: list[int] | None = None
        self._layers: list[tuple[LoRALinear, GatheredRows]] = []

    def use(self, rows: list[int]) -> None:
        """Gather for a batch whose row ``i`` uses adapter ``rows[i]`` (-1: the base model)."""
        if rows == self.rows:
            return
        self.clear()
        self.rows = list(rows)
        if all(index < 0 for index in rows):
            return
        for layer in lora_modules(self.model).values():
            if not layer.row_scaling:
                continue
            gathered = gather_rows(layer, rows)
            device = gathered.a.device if gathered.a is not None else torch.device("cpu")
            layer.rows = torch.tensor(rows, dtype=torch.long, device=device)
            layer._forward_rows = gathered.forward  # the layer's mixed-batch hook, for this batch
            self._layers.append((layer, gathered))

    def select(self, keep: list[int]) -> None:
        """Rows ``keep`` (positions, in order) stay in the batch; the others have left."""
        if self.rows is None:
            return
        self.rows = [self.rows[i] for i in keep]
        for layer, gathered in self._layers:
            index = torch.tensor(keep, dtype=torch.long, device=layer.rows.device)
            gathered.select(index)
            layer.rows = layer.rows.index_select(0, index)

    def clear(self) -> None:
        """Every layer back to its own computation, with no rows selected."""
        for layer, _ in self._layers:
            layer.rows = None
            layer.__dict__.pop("_forward_rows", None)
        self._layers, self.rows = [], None
