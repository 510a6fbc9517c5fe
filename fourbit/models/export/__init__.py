"""Export to llama.cpp's GGUF format: a model (4-bit base dequantized, LoRA merged) as one GGUF file with its
tokenizer and chat template and an Ollama Modelfile beside it, or a LoRA adapter alone as a llama.cpp LoRA
GGUF. Files are written through llama.cpp's own ``gguf`` package.

Modules, each read top to bottom: ``kquants`` (llama.cpp's Q4_K / Q6_K block quantization in numpy),
``imatrix`` (importance matrices from calibration text or llama-imatrix files), ``layout`` (architectures, tensor names, Q/K row order, per-tensor types, hyperparameters), ``vocab``
(tokenizer metadata), ``modelfile`` (Ollama), ``writer`` (the streaming, atomic model export) and ``lora``.
"""

from fourbit.models.export.imatrix import importance_matrix, read_imatrix
from fourbit.models.export.layout import ARCHITECTURES, FOUR_BIT_TYPES, GGUF_TYPES
from fourbit.models.export.lora import export_lora_gguf
from fourbit.models.export.modelfile import chat_family, modelfile_for
from fourbit.models.export.writer import ExportResult, check_gguf_output, export_gguf

__all__ = [
    "ARCHITECTURES",
    "FOUR_BIT_TYPES",
    "GGUF_TYPES",
    "ExportResult",
    "chat_family",
    "check_gguf_output",
    "export_gguf",
    "export_lora_gguf",
    "importance_matrix",
    "modelfile_for",
    "read_imatrix",
]
