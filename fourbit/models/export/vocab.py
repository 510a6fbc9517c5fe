"""The tokenizer as GGUF metadata (``tokenizer.ggml.*`` and ``tokenizer.chat_template``), as llama.cpp's
``convert_hf_to_gguf.py`` writes it for a byte-level BPE vocabulary (its ``_set_vocab_gpt2``).

Tokens in id order with their types (normal, control for special added tokens, user-defined for other added
tokens, unused for ids the tokenizer lacks), the merges, the special token ids and the chat template, the last
three through llama.cpp's own ``gguf.SpecialVocab`` reading the tokenizer's saved files. llama.cpp splits text
with the regex named by ``tokenizer.ggml.pre``; the name is read off the tokenizer's pre-tokenizer, and a
pre-tokenizer fourbit cannot name is refused rather than written as a guess (the model would get text split
differently than in training). A model that came from a GGUF file keeps that file's tokenizer metadata
verbatim.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["add_tokenizer", "copy_tokenizer_fields", "pre_tokenizer_name"]

# The split regexes of the pre-tokenizers llama.cpp names (its llama-vocab.cpp), as tokenizer.json spells them.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}
_LOOKS_SPECIAL = re.compile(r"^(<\|.*\|>|<[a-z_]+>|\[[A-Z_]+\]|</?s>)$")


def _byte_level(step: dict[str, Any], use_regex: bool) -> bool:
    return step.get("type") == "ByteLevel" and bool(step.get("use_regex", True)) == use_regex


def pre_tokenizer_name(tokenizer) -> str:
    """llama.cpp's name (``tokenizer.ggml.pre``) for the byte-level BPE ``tokenizer``'s way of splitting text.

    Raises:
        NotImplementedError: not a byte-level BPE tokenizer, or one that splits text in a way fourbit cannot
            name for llama.cpp (naming what it found).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise NotImplementedError(f"`tokenizer`: {type(tokenizer).__name__} is not a fast (tokenizers) tokenizer; "
                                  "GGUF export needs one")
    spec = json.loads(backend.to_str())
    model_type = (spec.get("model") or {}).get("type")
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if model_type == "BPE" and len(steps) == 1 and _byte_level(steps[0], True):
        return "gpt-2"
    if model_type == "BPE" and kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") \
            and _byte_level(steps[1], True):
        return "smollm"
    if model_type == "BPE" and kinds == ["Split", "ByteLevel"] and _byte_level(steps[1], False):
        name = _SPLITS.get((steps[0].get("pattern") or {}).get("Regex"))
        if name is not None:
            return name
    raise NotImplementedError(
        f"`tokenizer`: a {model_type} tokenizer with pre-tokenizer {kinds or 'none'} is not one fourbit can "
        "describe to llama.cpp (byte-level BPE of the GPT-2, SmolLM, Llama-3 or Qwen2 kind); sentencepiece "
        "tokenizers (Llama-2, Mistral-7B-v0.1) are not exported yet")


def _tokens(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens in id order and their llama.cpp token types (as ``get_vocab_base`` does)."""
    from gguf import TokenType

    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(int(TokenType.UNUSED))
        elif token in added:
            special = getattr(decoder.get(i), "special", False) or bool(_LOOKS_SPECIAL.match(token))
            tokens.append(token)
            types.append(int(TokenType.CONTROL if special else TokenType.USER_DEFINED))
        else:
            tokens.append(token)
            types.append(int(TokenType.NORMAL))
    return tokens, types


def add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """Write ``tokenizer`` (a byte-level BPE fast tokenizer) into the GGUF ``writer``'s metadata.

    Args:
        writer: a ``gguf.GGUFWriter`` before its header is written.
        tokenizer: the model's transformers tokenizer.
        vocab_size: the model's embedding rows (ids past the tokenizer's become ``[PAD<id>]``, unused).

    Raises:
        NotImplementedError: a tokenizer llama.cpp would split differently (see :func:`pre_tokenizer_name`).
    """
    from gguf import SpecialVocab

    pre = pre_tokenizer_name(tokenizer)
    tokens, types = _tokens(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory(prefix="fourbit-gguf-vocab-") as folder:
        tokenizer.save_pretrained(folder)
        special = SpecialVocab(Path(folder), load_merges=True, n_vocab=vocab_size)
    if special.chat_template is None and getattr(tokenizer, "chat_template", None):
        special.chat_template = tokenizer.chat_template
    special.add_to_gguf(writer, quiet=True)


def copy_tokenizer_fields(writer, source: Path) -> None:
    """Copy every ``tokenizer.*`` field of the GGUF file ``source`` into ``writer``, value and type as stored."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(source))
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        main = field.types[0]
        sub = field.types[-1] if main == GGUFValueType.ARRAY else None
        value = field.contents()
        if main == GGUFValueType.ARRAY and not value:
            continue
        writer.add_key_value(name, value, main, sub_type=sub)
