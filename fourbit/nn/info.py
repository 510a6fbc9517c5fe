"""What fourbit did to a model, in one documented place: :class:`FourbitInfo` at ``model.fourbit_info``.

fourbit changes unmodified transformers models in place (4-bit layers swapped in, LoRA layers injected) and
needs to remember how: the quantization settings (to save a checkpoint that loads the same way), the
footprint measured while quantizing, and the LoRA spec (to save an adapter peft can load). All of it lives
in one small dataclass stored under one attribute, :data:`INFO_ATTR`, instead of several ``fourbit_*``
attributes hung on the model. Read and write it only through :func:`fourbit_info`, :func:`clear_fourbit_info`.

The record is a plain Python attribute: it follows the model through ``copy.deepcopy`` and pickling, and it
is never part of the state dict (so ``save_pretrained`` and ``load_state_dict`` ignore it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fourbit.nn.lora import LoRASpec

__all__ = ["INFO_ATTR", "FourbitInfo", "clear_fourbit_info", "fourbit_info"]

INFO_ATTR = "fourbit_info"


@dataclass
class FourbitInfo:
    """fourbit's record of what it did to one model.

    ``quant_config`` and ``footprint`` are typed ``Any`` here because their classes live in the models layer,
    which comes after nn and imports it (never the reverse, not even for annotations).

    Attributes:
        quant_config: the ``fourbit.models.QuantConfig`` the model was quantized with (None: not quantized
            by fourbit in this process; a loaded checkpoint's settings are read from its layers).
        footprint: the ``fourbit.models.Footprint`` measured when the model was quantized or loaded.
        lora_spec: the :class:`fourbit.nn.lora.LoRASpec` injected into the model (None: no LoRA layers).
        replaced_modules: the model's own modules that a loaded adapter's ``modules_to_save`` replaced by
            trained copies (:func:`fourbit.nn.adapters.load_adapter`), by name: put back by
            :func:`fourbit.nn.lora.unload_lora`, so that unloading leaves the base model as it was.
    """

    quant_config: Any = None
    footprint: Any = None
    lora_spec: LoRASpec | None = None
    replaced_modules: dict[str, Any] = field(default_factory=dict)


def fourbit_info(model: Any) -> FourbitInfo:
    """The :class:`FourbitInfo` of ``model``, created empty (and attached) on first use.

    Example::

        model, tokenizer = fourbit.models.load_model(folder)
        print(fourbit_info(model).footprint.bits_per_param)
    """
    info = model.__dict__.get(INFO_ATTR)
    if not isinstance(info, FourbitInfo):
        info = FourbitInfo()
        # object.__setattr__: a plain attribute even on an nn.Module (never a submodule, buffer or parameter)
        object.__setattr__(model, INFO_ATTR, info)
    return info


def clear_fourbit_info(model: Any) -> None:
    """Forget everything fourbit recorded about ``model`` (e.g. before saving it as a plain float model)."""
    model.__dict__.pop(INFO_ATTR, None)
