"""Several LoRA adapters over one frozen 4-bit base, chosen per row of a batch.

The server keeps ONE copy of the 4-bit model. Each adapter (``--adapter NAME=DIR``) is read through the
public loader (:func:`fourbit.nn.adapters.load_adapter` injects it, its A/B weights are copied out, and
:func:`fourbit.nn.lora.unload_lora` puts the untouched base back), then every targeted linear layer is
wrapped once by a :class:`MultiLoRALinear` that holds the A/B pair of every adapter that targets it.

A batch may mix adapters (punica / S-LoRA style, without the custom kernels): before each forward the
engine sets one adapter index per row (:func:`set_row_adapters`), and a layer computes

    y = base(x) + sum over adapters a of  mask_a * scaling_a * B_a(A_a(x))

where ``mask_a`` selects the rows of adapter ``a``; row index ``-1`` is the plain base model. The update
is computed only on the rows that use the adapter (index_add onto the base output), so a row of the base
model gets exactly the base layer's output and rows never see another row's adapter.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fourbit._errors import FieldError

__all__ = ["AdapterWeights", "MultiLoRALinear", "install_adapters", "read_adapter", "set_row_adapters"]


@dataclass
class AdapterWeights:
    """One adapter's LoRA pairs by module name: ``{name: (A [r, in], B [out, r], scaling)}``."""

    name: str
    folder: str
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]]


class MultiLoRALinear(nn.Module):
    """A frozen base linear layer plus any number of LoRA adapters, selected per row.

    Args:
        base: ``nn.Linear`` or ``Linear4bit`` (never modified).

    Shapes:
        x: ``[batch, ..., in_features]`` -> ``[batch, ..., out_features]``; ``self.rows`` (set by
        :func:`set_row_adapters`) is a ``[batch]`` long tensor of adapter indices (-1: none) or None (every
        row uses the base model).
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = int(base.in_features), int(base.out_features)
        self.lora_A: dict[int, torch.Tensor] = {}
        self.lora_B: dict[int, torch.Tensor] = {}
        self.scaling: dict[int, float] = {}
        self.rows: torch.Tensor | None = None

    def add(self, index: int, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        if a.shape[1] != self.in_features or b.shape[0] != self.out_features:
            raise ValueError(f"adapter shapes {tuple(a.shape)}/{tuple(b.shape)} do not fit "
                             f"[{self.out_features}, {self.in_features}]")
        self.lora_A[index], self.lora_B[index], self.scaling[index] = a, b, float(scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        rows = self.rows
        if rows is None or not self.lora_A:
            return y
        if rows.shape[0] != x.shape[0]:
            raise RuntimeError(f"row adapters set for {rows.shape[0]} rows, batch has {x.shape[0]}")
        for index, a in self.lora_A.items():
            selected = (rows == index).nonzero().flatten()
            if selected.numel() == 0:
                continue
            h = x.index_select(0, selected).to(a.dtype)
            update = (h @ a.t()) @ self.lora_B[index].t() * self.scaling[index]
            y = y.index_add(0, selected, update.to(y.dtype))
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters={sorted(self.lora_A)}"


def read_adapter(model: nn.Module, name: str, folder: str | os.PathLike) -> AdapterWeights:
    """Read an adapter folder through :func:`fourbit.nn.adapters.load_adapter` and leave ``model`` as it was.

    Raises:
        FieldError: (field ``adapters``) the folder is missing or the adapter does not fit the model.
    """
    from fourbit.nn.adapters import load_adapter
    from fourbit.nn.lora import lora_modules, unload_lora

    path = Path(folder).expanduser()
    if not path.is_dir():
        raise FieldError("adapters", f"adapter {name!r}: {path} is not a folder")
    try:
        load_adapter(model, path)
    except ValueError as err:
        raise FieldError("adapters", f"adapter {name!r}: {err}") from None
    try:
        layers = {
            n: (m.lora_A.weight.detach().clone(), m.lora_B.weight.detach().clone(), float(m.scaling))
            for n, m in lora_modules(model).items()
        }
    finally:
        unload_lora(model)
    return AdapterWeights(name=name, folder=str(path), layers=layers)


def install_adapters(model: nn.Module, adapters: list[AdapterWeights]) -> list[str]:
    """Wrap every layer some adapter targets in a :class:`MultiLoRALinear` (adapter ``i`` is index ``i``).

    Returns:
        The adapter names in index order.
    """
    if any(isinstance(m, MultiLoRALinear) for m in model.modules()):
        raise ValueError("the model already has multi-adapter layers")
    names: list[str] = []
    for index, adapter in enumerate(adapters):
        for layer_name, (a, b, scaling) in adapter.layers.items():
            layer = model.get_submodule(layer_name)
            if not isinstance(layer, MultiLoRALinear):
                layer = MultiLoRALinear(layer)
                model.set_submodule(layer_name, layer)
            device = next((p.device for p in layer.base.parameters()), torch.device("cpu"))
            layer.add(index, a.to(device), b.to(device), scaling)
        names.append(adapter.name)
    return names


def set_row_adapters(model: nn.Module, rows: torch.Tensor | None) -> None:
    """Select the adapter of each batch row (``-1``: base model) for the next forward passes."""
    for m in model.modules():
        if isinstance(m, MultiLoRALinear):
            m.rows = rows
