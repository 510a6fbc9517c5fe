"""Importance matrices for GGUF export: how much each input column of each linear layer matters, so the 4-bit
block quantizers spend their precision where the model's activations are (llama.cpp's ``llama-imatrix``).

The statistic is llama-imatrix's: for each linear layer that becomes a quantized GGUF tensor, the mean over the
calibration tokens of each input column's squared activation, E[x_j²] (shape ``[in_features]``). A weight
column that meets large inputs adds large errors to the layer's output, so ``quantize_tensor`` weighs the
rounding error of column j by it (llama.cpp's ``quant_weights``; ``kquants`` says how each type uses them).

:func:`importance_matrix` computes it by running the model over text, keyed by GGUF tensor name
(``blk.3.attn_q.weight``); the model runs as it is, so a LoRA adapter counts as merged. :func:`read_imatrix`
reads a file ``llama-imatrix`` wrote in its GGUF format (``<name>.in_sum2`` and ``<name>.counts``). Rows of
``attn_q``/``attn_k`` are reordered for llama.cpp's rotation (``permute_rows``), columns never are, so the
vectors apply unchanged. The token embedding gets none (a row lookup, not a matrix product: llama.cpp has none
for it either); ``output.weight`` gets the statistic of ``lm_head``'s input, the final norm's output (a tied
output, written as the token embedding, gets none).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fourbit._errors import FieldError, InputFileError

__all__ = ["DEFAULT_WINDOW", "importance_matrix", "read_imatrix"]

#: Tokens per forward pass (llama-imatrix's default context).
DEFAULT_WINDOW = 512


def _linear_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(module name, module) of every linear layer whose weight the GGUF writer stores: LoRA layers (the merged
    weight), 4-bit layers and float ``nn.Linear``; the parts inside a LoRA layer are not listed again."""
    from fourbit.nn.lora import LoRALinear

    from .writer import _is_4bit

    taken: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in taken):
            continue
        if isinstance(module, (LoRALinear, nn.Linear)) or _is_4bit(module):
            taken.append(name)
            yield name, module


def _gguf_names(model: nn.Module) -> dict[str, str]:
    """Module name -> GGUF tensor name of each linear layer (those llama.cpp's map has no name for are left out)."""
    from .layout import gguf_name, tensor_name_map

    name_map = tensor_name_map(model.config)
    names = {}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for name, _module in _linear_layers(model):
        if tied and name == "lm_head":  # the file stores the tied output as the token embedding: no entry
            continue
        try:
            names[name] = gguf_name(name_map, f"{name}.weight")
        except NotImplementedError:
            continue
    return names


def importance_matrix(model: nn.Module, tokenizer, text: str, *, max_tokens: int | None = None,
                      window: int = DEFAULT_WINDOW) -> tuple[dict[str, np.ndarray], int]:
    """llama-imatrix's importance matrix of ``model`` on ``text``: for each linear layer's GGUF tensor, the
    mean over the tokens of each input column's squared activation.

    Args:
        model: a transformers causal LM of a covered architecture, run as it is (4-bit layers, LoRA layers).
        tokenizer: its tokenizer; ``text`` is tokenized without special tokens.
        text: calibration text, other than any text the export is scored on.
        max_tokens: use at most this many tokens (the first); None, all.
        window: tokens per forward pass (at most the model's context); the windows do not overlap.

    Returns:
        ({GGUF tensor name: float32 [in_features]}, tokens used).

    Raises:
        FieldError: ``text`` gives no tokens, or a bad ``max_tokens``/``window``.
    """
    for field, value in (("max_tokens", max_tokens), ("window", window)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise FieldError(field, f"must be a positive integer, got {value!r}")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0][:max_tokens]
    if len(ids) == 0:
        raise FieldError("text", "the calibration text gives no tokens")
    window = min(window, getattr(model.config, "max_position_embeddings", None) or window)
    names = _gguf_names(model)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(key: str):
        def pre(_module, args):
            x = args[0].detach().to(torch.float64).reshape(-1, args[0].shape[-1])
            sums[key] = sums[key] + (x * x).sum(0) if key in sums else (x * x).sum(0)
            counts[key] = counts.get(key, 0) + x.shape[0]
        return pre

    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_pre_hook(hook(key)) for name, key in names.items()]
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(ids), window):
                model(ids[start:start + window].unsqueeze(0))
    finally:
        for handle in handles:
            handle.remove()
        model.train(training)
    return {key: (sums[key] / counts[key]).to(torch.float32).numpy() for key in sums}, len(ids)


def read_imatrix(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The importance matrix in a file ``llama-imatrix`` wrote in its GGUF format: for each tensor
    ``<name>.in_sum2`` (sums of squared inputs) and ``<name>.counts`` (tokens), in_sum2 / counts, keyed by
    ``<name>`` (``blk.3.attn_q.weight``). Entries that saw no token are left out.

    Raises:
        InputFileError: a missing or unreadable file, one that is not llama-imatrix's GGUF format, or a
            mixture-of-experts matrix (several counts per tensor), naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise InputFileError(path, "no such file (an importance matrix written by llama-imatrix, .gguf)")
    try:
        from gguf import GGUFReader

        tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in GGUFReader(path).tensors}
    except Exception as err:  # noqa: BLE001 - any parse failure is the file's fault
        raise InputFileError(path, f"is not a GGUF file llama-imatrix wrote ({type(err).__name__}: {err})") from None
    out = {}
    for key, sums in tensors.items():
        if not key.endswith(".in_sum2"):
            continue
        name = key[: -len(".in_sum2")]
        counts = tensors.get(f"{name}.counts")
        if counts is None or counts.size != 1:
            raise InputFileError(path, f"{key} has {'no' if counts is None else 'several'} counts "
                                       "(a dense model's imatrix has one per tensor)")
        if float(counts.reshape(-1)[0]) > 0:
            out[name] = (sums.reshape(-1) / counts.reshape(-1)[0]).astype(np.float32)
    if not out:
        raise InputFileError(path, "holds no <name>.in_sum2 tensors with counts: not llama-imatrix's GGUF format")
    return out
