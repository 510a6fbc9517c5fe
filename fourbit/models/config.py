"""How to quantize a model: :class:`QuantConfig`, and its round trip through a checkpoint's
``quantization_config`` (the dict transformers writes for ``BitsAndBytesConfig``)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import torch

from fourbit._errors import FieldError, InputFileError
from fourbit.nn.linear4bit import COMPUTE_DTYPES, resolve_compute_dtype
from fourbit.quant import QUANT_TYPES, check_blocksize

__all__ = ["QuantConfig", "quant_config_from_checkpoint"]


@dataclass
class QuantConfig:
    """How to quantize a model's linear layers.

    Attributes:
        quant_type: "nf4" (QLoRA default), "fp4" or "int4" (:data:`fourbit.quant.QUANT_TYPES`).
        blocksize: absmax block size, power of two in [32, 4096] (QLoRA: 64).
        double_quant: quantize the absmax constants to 8 bits (QLoRA: True).
        compute_dtype: "auto", "bf16", "fp16" or "fp32": the matmul dtype of the 4-bit layers. "auto" picks
            bf16 on GPUs and on CPUs with native bf16 arithmetic (AMX / AVX512-BF16), else fp32: on an AVX2-only
            CPU, torch's bf16 matmul emulates bf16 and runs several times slower than fp32.
        skip_modules: module names (or name suffixes) kept in full precision; QLoRA keeps ``lm_head``.
        include: if given, only linear layers whose name ends with one of these are quantized.

    Raises:
        FieldError: a bad value, naming the field (``quant_type``, ``blocksize``, ``compute_dtype``).
    """

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: str = "auto"
    skip_modules: tuple[str, ...] = ("lm_head",)
    include: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.quant_type not in QUANT_TYPES:
            raise FieldError("quant_type", f"must be one of {', '.join(QUANT_TYPES)}, got {self.quant_type!r}")
        try:
            check_blocksize(self.blocksize, "blocksize")
        except ValueError as err:
            raise FieldError("blocksize", f"must be a power of two in [32, 4096], got {self.blocksize!r}") from err
        if self.compute_dtype != "auto" and str(self.compute_dtype).lower().removeprefix("torch.") not in COMPUTE_DTYPES:
            raise FieldError("compute_dtype", f"must be auto, bf16, fp16 or fp32, got {self.compute_dtype!r}")
        self.skip_modules = tuple(self.skip_modules)
        if self.include is not None:
            self.include = tuple(self.include)

    def skips(self, name: str) -> bool:
        """Whether ``skip_modules`` names the module called ``name`` (or one of its parents)."""
        return _names(name, self.skip_modules)

    def selects(self, name: str) -> bool:
        """Whether the linear layer called ``name`` is quantized under this config."""
        if self.skips(name):
            return False
        return self.include is None or _names(name, self.include)

    def resolved_compute_dtype(self, device: torch.device | str = "cpu") -> torch.dtype:
        """The compute dtype for layers on ``device`` ("auto" resolved)."""
        return resolve_compute_dtype(self.compute_dtype, device)

    def to_bnb_dict(self, device: torch.device | str = "cpu") -> dict:
        """The ``quantization_config`` transformers writes for the equivalent ``BitsAndBytesConfig``."""
        if self.quant_type == "int4":
            # bitsandbytes has no INT4 4-bit type: such checkpoints are fourbit-only.
            return {"quant_method": "fourbit", **asdict(self)}
        return {
            "quant_method": "bitsandbytes",
            "_load_in_4bit": True,
            "_load_in_8bit": False,
            "load_in_4bit": True,
            "load_in_8bit": False,
            "llm_int8_threshold": 6.0,
            "llm_int8_skip_modules": list(self.skip_modules) or None,
            "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_has_fp16_weight": False,
            "bnb_4bit_quant_type": self.quant_type,
            "bnb_4bit_use_double_quant": self.double_quant,
            "bnb_4bit_compute_dtype": str(self.resolved_compute_dtype(device)).removeprefix("torch."),
            "bnb_4bit_quant_storage": "uint8",
        }


def _names(name: str, patterns: tuple[str, ...]) -> bool:
    """``name`` equals a pattern or ends with ``"." + pattern``."""
    return any(name == p or name.endswith("." + p) for p in patterns)


def quant_config_from_checkpoint(qc: dict[str, Any], config_file: str | os.PathLike) -> QuantConfig:
    """The :class:`QuantConfig` a checkpoint's ``quantization_config`` describes (fourbit's or bitsandbytes').

    Args:
        qc: the ``quantization_config`` dict of the checkpoint's ``config.json``.
        config_file: that file, for the error.

    Raises:
        InputFileError: naming ``config_file`` and the field, when a value is not one fourbit can load
            (an unknown quant type, a bad block size or compute dtype).
    """
    if str(qc.get("quant_method")) == "fourbit":
        fields = {k: qc[k] for k in ("quant_type", "blocksize", "double_quant", "compute_dtype") if k in qc}
        names = {k: f"quantization_config.{k}" for k in fields}
    else:
        fields = {"quant_type": qc.get("bnb_4bit_quant_type", "fp4"),  # bitsandbytes' default type is fp4
                  "double_quant": bool(qc.get("bnb_4bit_use_double_quant", False))}
        names = {"quant_type": "quantization_config.bnb_4bit_quant_type"}
        if qc.get("bnb_4bit_compute_dtype") is not None:
            fields["compute_dtype"] = qc["bnb_4bit_compute_dtype"]
            names["compute_dtype"] = "quantization_config.bnb_4bit_compute_dtype"
    skip = qc.get("skip_modules", qc.get("llm_int8_skip_modules")) or ()
    try:
        return QuantConfig(**fields, skip_modules=tuple(skip))
    except FieldError as err:
        raise InputFileError(config_file, f"{names.get(err.field, err.field)}: {err.message}; the checkpoint "
                                          "is damaged or was not written by fourbit or bitsandbytes") from None
