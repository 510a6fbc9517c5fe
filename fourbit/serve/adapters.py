"""Several LoRA adapters over one frozen 4-bit base, chosen per row of a batch, loaded and unloaded at run time.

The server keeps ONE copy of the 4-bit model. Each adapter (``--adapter NAME=DIR`` at start, or
``POST /v1/load_lora_adapter`` while serving) is read through the public loader
(:func:`fourbit.nn.adapters.load_adapter` injects it, its A/B weights are copied out, and
:func:`fourbit.nn.lora.unload_lora` puts the untouched base back), then every targeted linear layer is
wrapped once by the one LoRA layer, :class:`fourbit.nn.lora.LoRALinear`, in its mixed-batch mode: it holds the
A/B pair of every adapter that targets it (:meth:`~fourbit.nn.lora.LoRALinear.add_row_adapter`).

A batch may mix adapters (punica / S-LoRA style, without the custom kernels): one adapter index per row
(:func:`set_row_adapters` for the layer's own loop; the engine gathers each row's adapter once per batch
instead, :mod:`.gathered`), and a layer computes

    y = base(x) + sum over adapters a of  mask_a * scaling_a * B_a(A_a(x))

where ``mask_a`` selects the rows of adapter ``a``; row index ``-1`` is the plain base model. The update
is computed only on the rows that use the adapter (index_add onto the base output), so a row of the base
model gets exactly the base layer's output and rows never see another row's adapter.

Every function here changes the model's modules, so the engine calls them from its worker thread between two
forward passes (never while one runs).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fourbit._errors import FieldError
from fourbit.nn.lora import LoRALinear, lora_modules

__all__ = ["AdapterWeights", "add_adapter", "check_adapter_folder", "install_adapters", "read_adapter",
           "remove_adapter", "serving_layers_set_aside", "set_row_adapters"]


@dataclass
class AdapterWeights:
    """One adapter's LoRA pairs by module name: ``{name: (A [r, in], B [out, r], scaling)}``."""

    name: str
    folder: str
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]]


def check_adapter_folder(name: str, folder: str | os.PathLike, *, field: str = "adapters") -> dict:
    """What can be checked of an adapter folder without the model: it is a folder, its config is a LoRA
    config fourbit reads, and it is not DoRA (which mixed batches cannot compute yet).

    Returns:
        The adapter's config (:func:`fourbit.nn.adapters.read_adapter_config`).

    Raises:
        FieldError: (field ``field``) naming the adapter, the path and what is wrong.
    """
    from fourbit.nn.adapters import read_adapter_config

    path = Path(folder).expanduser()
    if not path.is_dir():
        why = "is not a folder" if path.exists() else "does not exist"
        raise FieldError(field, f"adapter {name!r}: {path} {why} (an adapter is a folder holding "
                                "adapter_config.json and adapter_model.safetensors)")
    try:
        cfg = read_adapter_config(path)
    except (ValueError, NotImplementedError, OSError) as err:
        raise FieldError(field, f"adapter {name!r}: {_one_line(err)}") from None
    if cfg.get("use_dora"):
        raise FieldError(field, f"adapter {name!r}: DoRA adapters are not served in mixed batches yet; "
                                "merge it (`fourbit merge`) and serve the merged model")
    return cfg


def read_adapter(model: nn.Module, name: str, folder: str | os.PathLike, *,
                 field: str = "adapters") -> AdapterWeights:
    """Read an adapter folder through :func:`fourbit.nn.adapters.load_adapter` and leave ``model`` as it was.

    ``model`` may already serve adapters (its mixed-batch :class:`LoRALinear` layers are set aside while the
    adapter is read, and put back). An adapter that mixed batches cannot compute (DoRA) or that would change
    the base model for every row (peft's ``modules_to_save``) is refused before the model is touched.

    Args:
        field: the name errors carry (``adapters`` for the start-up flag, ``lora_path`` for the endpoint).

    Raises:
        FieldError: (field ``field``) the folder is missing, is not an adapter, or does not fit the model.
    """
    from fourbit.nn.adapters import load_adapter
    from fourbit.nn.lora import unload_lora

    path = Path(folder).expanduser()
    cfg = check_adapter_folder(name, path, field=field)
    present = {n for n, _ in model.named_modules()} | {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    saved = [m for m in (cfg.get("modules_to_save") or ()) if m in present]
    if saved:
        raise FieldError(field, f"adapter {name!r}: it replaces whole modules ({', '.join(saved)}: peft's "
                                "modules_to_save), which one base model shared by every request cannot serve; "
                                "merge it (`fourbit merge`) and serve the merged model")
    with serving_layers_set_aside(model):
        try:
            load_adapter(model, path)
        except (ValueError, NotImplementedError, OSError) as err:
            raise FieldError(field, f"adapter {name!r}: {_one_line(err)}") from None
        try:
            layers = {
                n: (m.lora_A.weight.detach().clone(), m.lora_B.weight.detach().clone(), float(m.scaling))
                for n, m in lora_modules(model).items()
            }
        finally:
            unload_lora(model)
    return AdapterWeights(name=name, folder=str(path), layers=layers)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


@contextmanager
def serving_layers_set_aside(model: nn.Module) -> Iterator[None]:
    """The model without its mixed-batch LoRA layers (their bases in their place) inside the block."""
    serving = lora_modules(model)
    for layer_name, layer in serving.items():
        model.set_submodule(layer_name, layer.base)
    try:
        yield
    finally:
        for layer_name, layer in serving.items():
            model.set_submodule(layer_name, layer)


def add_adapter(model: nn.Module, index: int, adapter: AdapterWeights) -> None:
    """Register ``adapter`` as row index ``index`` on every layer it targets, wrapping a layer in a
    :class:`LoRALinear` of rank 0 (mixed-batch mode) the first time an adapter targets it."""
    for layer_name, (a, b, scaling) in adapter.layers.items():
        layer = model.get_submodule(layer_name)
        if not isinstance(layer, LoRALinear):
            layer = LoRALinear(layer, r=0)
            model.set_submodule(layer_name, layer)
        device = next((p.device for p in layer.base.parameters()), torch.device("cpu"))
        layer.add_row_adapter(index, a.to(device), b.to(device), scaling)


def remove_adapter(model: nn.Module, index: int) -> None:
    """Forget row index ``index`` on every layer; a layer no adapter targets any more gets its base back
    (so it costs nothing more than before any adapter)."""
    for layer_name, layer in lora_modules(model).items():
        layer.remove_row_adapter(index)
        if not layer.row_scaling and layer.r == 0:
            layer.rows = None
            model.set_submodule(layer_name, layer.base)


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
    for index, adapter in enumerate(adapters):
        add_adapter(model, index, adapter)
    return [adapter.name for adapter in adapters]


def set_row_adapters(model: nn.Module, rows: torch.Tensor | None) -> None:
    """Select the adapter of each batch row (``-1``: base model) for the next forward passes; None: every row
    uses the base model."""
    for m in lora_modules(model).values():
        m.rows = rows if m.row_scaling else None
