"""4-bit models: load a causal LM (folder, hub id, GGUF file, or the bundled SmolLM2), quantize it to 4 bits
in place, measure its footprint, and save / load 4-bit checkpoints in bitsandbytes' format.

A fourbit checkpoint is a folder that ``transformers`` + ``bitsandbytes`` load with
``AutoModelForCausalLM.from_pretrained(dir)``: ``model.safetensors`` with bitsandbytes' state-dict keys and a
``config.json`` whose ``quantization_config`` says ``quant_method: bitsandbytes``. Checkpoints that
``transformers`` + ``bitsandbytes`` saved load here the same way, without bitsandbytes installed.

Modules, each read top to bottom: ``config`` (:class:`QuantConfig`), ``footprint``, ``quantize``, ``locate``
(bundled model, folder checks), ``gguf``, ``describe`` (checkpoint checks and ``fourbit info``), ``load``,
``save``. What fourbit did to a model (its quantization config, footprint and LoRA spec) is recorded in one
place, ``fourbit_info(model)`` (:mod:`fourbit.nn.info`).

Quantized: ``nn.Linear``, transformers' ``Conv1D`` (GPT-2 family; stored transposed, as bitsandbytes does) and
the fused 3-D expert weights of mixture-of-experts models (:mod:`fourbit.nn.experts`). What stays in full
precision is reported per module kind in the footprint, with a warning above 5 % of the weight matrices.
"""

from fourbit.models.config import QuantConfig, quant_config_from_checkpoint
from fourbit.models.describe import QuantizedLayer, checkpoint_info, scan_quantized_layers
from fourbit.models.footprint import Footprint, full_precision_weights, model_footprint
from fourbit.models.gguf import check_gguf, load_gguf
from fourbit.models.load import load_model
from fourbit.models.locate import (
    BUNDLED_GGUF,
    BUNDLED_PACKAGE,
    CHECKPOINT_FILE,
    FOURBIT_META_FILE,
    bundled_model_path,
    check_model_folder,
    is_quantized_checkpoint,
)
from fourbit.models.quantize import UnquantizedWeightsWarning, quantize_model
from fourbit.models.save import save_quantized
from fourbit.nn.info import FourbitInfo, clear_fourbit_info, fourbit_info

__all__ = [
    "BUNDLED_GGUF",
    "BUNDLED_PACKAGE",
    "CHECKPOINT_FILE",
    "FOURBIT_META_FILE",
    "Footprint",
    "FourbitInfo",
    "QuantConfig",
    "QuantizedLayer",
    "UnquantizedWeightsWarning",
    "bundled_model_path",
    "check_gguf",
    "check_model_folder",
    "checkpoint_info",
    "clear_fourbit_info",
    "fourbit_info",
    "full_precision_weights",
    "is_quantized_checkpoint",
    "load_gguf",
    "load_model",
    "model_footprint",
    "quant_config_from_checkpoint",
    "quantize_model",
    "save_quantized",
    "scan_quantized_layers",
]
