"""Several LoRA adapters over one frozen 4-bit base, chosen per row of a batch.

The server keeps ONE copy of the 4-bit model. Each adapter (``--adapter NAME=DIR``) is read through the
public loader (:func:`fourbit.nn.adapters.load_adapter` injects it, its A/B weights are copied out, and
:func:`fourbit.nn.lora.unload_lora` puts the untouched base back), then every targeted linear layer is
wrapped once by the one LoRA layer, :class:`fourbit.nn.lora.LoRALinear`, in its mixed-batch mode: it holds the
A/B pair of every adapter that targets it (:meth:`~fourbit.nn.lora.LoRALinear.add_row_adapter`).

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
from fourbit.nn.lora import LoRALinear, lora_modules

__all__ = ["AdapterWeights", "install_adapters", "read_adapter", "set_row_adapters"]


@dataclass
class AdapterWeights:
    """One adapter's LoRA pairs by module name: ``{name: (A [r, in], B [out, r], scaling)}``."""

    name: str
    folder: str
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]]


def read_adapter(model: nn.Module, name: str, folder: str | os.PathLike) -> AdapterWeights:
    """Read an adapter folder through :func:`fourbit.nn.adapters.load_adapter` and leave ``model`` as it was.

    Raises:
        FieldError: (field ``adapters``) the folder is missing or the adapter does not fit the model.
    """
    from fourbit.nn.adapters import load_adapter
    from fourbit.nn.lora import unload_lora

    path = Path(folder).expanduser()
    if not path.is_dir():
        raise FieldError("adapters", f"adapter {name!r}: {path} is not a folder")
    try:
        load_adapter(model, path)
    except ValueError as err:
        raise FieldError("adapters", f"adapter {name!r}: {err}") from None
    try:
        if any(m.use_dora for m in lora_modules(model).values()):
            raise FieldError("adapters", f"adapter {name!r}: DoRA adapters are not served in mixed batches yet; "
                                         "merge it (`fourbit merge`) and serve the merged model")
        layers = {
            n: (m.lora_A.weight.detach().clone(), m.lora_B.weight.detach().clone(), float(m.scaling))
            for n, m in lora_modules(model).items()
        }
    finally:
        unload_lora(model)
    return AdapterWeights(name=name, folder=str(path), layers=layers)


def install_adapters(model: nn.Module, adapters: list[AdapterWeights]) -> list[str]:
    """Wrap every layer some adapter targets in a :class:`LoRALinear` of rank 0 in mixed-batch mode (adapter
    ``i`` is row index ``i``).

    Returns:
        The adapter names in index order.

    Raises:
        ValueError: the model already has LoRA layers.
    """
    if lora_modules(model):
        raise ValueError("the model already has LoRA layers")
    names: list[str] = []
    for index, adapter in enumerate(adapters):
        for layer_name, (a, b, scaling) in adapter.layers.items():
            layer = model.get_submodule(layer_name)
            if not isinstance(layer, LoRALinear):
                layer = LoRALinear(layer, r=0)
                model.set_submodule(layer_name, layer)
            device = next((p.device for p in layer.base.parameters()), torch.device("cpu"))
            layer.add_row_adapter(index, a.to(device), b.to(device), scaling)
        names.append(adapter.name)
    return names


def set_row_adapters(model: nn.Module, rows: torch.Tensor | None) -> None:
    """Select the adapter of each batch row (``-1``: base model) for the next forward passes; None: every row
    uses the base model."""
    for m in lora_modules(model).values():
        m.rows = rows if m.row_scaling else None
