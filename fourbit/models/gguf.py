"""Load a GGUF file (llama.cpp's format) through transformers, which dequantizes it to float weights.

The file is parsed once by the ``gguf`` package first, so that a truncated or damaged file fails with one
line naming it instead of a ``struct.error`` from deep inside the parser.
"""

from __future__ import annotations

import struct
from pathlib import Path

import torch

from fourbit._errors import InputFileError

__all__ = ["check_gguf", "load_gguf"]

_GGUF_MAGIC = b"GGUF"
_PARSE_ERRORS = (ValueError, KeyError, IndexError, struct.error, OSError, RuntimeError, UnicodeDecodeError)


def check_gguf(path: Path) -> None:
    """Parse the header, metadata and tensor table of the GGUF file ``path``.

    Raises:
        InputFileError: not a GGUF file, or cut short / damaged (naming the file).
    """
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != _GGUF_MAGIC:
        raise InputFileError(path, "not a GGUF file (it does not start with the GGUF magic bytes); it may be "
                                   "truncated or of another format")
    from gguf import GGUFReader

    try:
        GGUFReader(str(path))
    except _PARSE_ERRORS as err:
        raise InputFileError(path, f"not a complete GGUF file ({type(err).__name__}: {err}); it may be "
                                   "truncated: download or convert it again") from None


def load_gguf(path: Path, torch_dtype: torch.dtype):
    """(model, tokenizer) from a GGUF file, weights dequantized to ``torch_dtype``.

    Raises:
        InputFileError: a damaged file, or an architecture transformers cannot load from GGUF.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_gguf(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch_dtype)
    except _PARSE_ERRORS as err:
        raise InputFileError(
            path,
            f"cannot load GGUF file: {err}. transformers loads GGUF files of the architectures it supports "
            "(llama, mistral, qwen2, phi3, gpt2, ...); convert other models to a Hugging Face folder",
        ) from None
    return model, tokenizer
