"""Training data: load records, render them in one of three formats, tokenize, truncate, split.

Files are read through ``datasets`` (JSONL/JSON are parsed here first so that a malformed line is reported
with its file and line number). Formats:

* ``text``: ``{"text": ...}``; loss on every token.
* ``instruction``: ``{"instruction", "input" (optional), "output"}`` rendered with the Alpaca prompt; loss on
  the response (``output``) only unless ``train_on_inputs``.
* ``chat``: ``{"messages": [{"role", "content"}, ...]}`` rendered with the tokenizer's chat template; loss
  on assistant turns only unless ``train_on_inputs``.

Batching (packing, length grouping, the per-epoch order) lives in :mod:`fourbit.train.batching`.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fourbit._io import read_jsonl

__all__ = [
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_NO_INPUT",
    "Encoded",
    "EncodedDataset",
    "IGNORE_INDEX",
    "detect_format",
    "encode_records",
    "load_records",
    "split_records",
]

IGNORE_INDEX = -100

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def load_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a dataset file or a saved HF dataset folder into a list of records.

    Args:
        path: ``.jsonl``, ``.json`` (a list of objects, or an object with a ``data``/``train`` list),
            ``.csv``, ``.parquet``, or a folder written by ``Dataset.save_to_disk`` (a ``DatasetDict`` uses
            its ``train`` split).

    Returns:
        The records (dicts of column -> value).

    Raises:
        ValueError: unknown extension, missing file, malformed JSON (naming file and line), empty dataset.
    """
    p = Path(path)
    if not p.exists():
        raise ValueError(f"data path {str(p)!r} does not exist")
    suffix = p.suffix.lower()
    if p.is_dir():
        import datasets

        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise ValueError(f"{p}: saved DatasetDict has no 'train' split (has {list(ds)})")
            ds = ds["train"]
        rows = ds.to_list()
    elif suffix == ".jsonl":
        rows = read_jsonl(p)
    elif suffix == ".json":
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            # Maybe JSON Lines with a .json name; report the line either way.
            if e.lineno > 1:
                return _nonempty(read_jsonl(p), p)
            raise ValueError(f"{p}:{e.lineno}: malformed JSON ({e.msg})") from None
        if isinstance(doc, dict):
            doc = next((doc[k] for k in ("data", "train") if isinstance(doc.get(k), list)), None)
        if not isinstance(doc, list) or not all(isinstance(r, dict) for r in doc):
            raise ValueError(f"{p}: expected a JSON list of objects (or an object with a 'data' list)")
        rows = doc
    elif suffix in (".csv", ".parquet"):
        import datasets

        reader = datasets.Dataset.from_csv if suffix == ".csv" else datasets.Dataset.from_parquet
        rows = reader(str(p), keep_in_memory=True).to_list()
    else:
        raise ValueError(f"{p}: unsupported data file type {suffix!r} (use .jsonl, .json, .csv, .parquet "
                         "or a saved dataset folder)")
    return _nonempty(rows, p)


def _nonempty(rows: list[dict[str, Any]], path: Path) -> list[dict[str, Any]]:
    if not rows:
        raise ValueError(f"{path}: the dataset is empty")
    return rows


def detect_format(columns: Sequence[str], source: str = "data") -> str:
    """``chat`` if there is a ``messages`` column, ``instruction`` for ``instruction``+``output``, ``text``.

    Raises:
        ValueError: if no known column set is present (lists the columns found).
    """
    cols = set(columns)
    if "messages" in cols:
        return "chat"
    if {"instruction", "output"} <= cols:
        return "instruction"
    if "text" in cols:
        return "text"
    raise ValueError(f"{source}: cannot tell the format from columns {sorted(cols)}; expected 'text', "
                     "'instruction'+'output' or 'messages' (or pass --format and --text-column)")


_REQUIRED = {"text": None, "instruction": ("instruction", "output"), "chat": ("messages",)}


@dataclass
class Encoded:
    """One tokenized example. ``labels`` is ``input_ids`` with ignored positions set to ``IGNORE_INDEX``."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class EncodedDataset:
    """Tokenized examples plus the truncation statistics."""

    examples: list[Encoded]
    n_truncated: int = 0
    n_dropped: int = 0
    format: str = "text"
    label_names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def n_tokens(self) -> int:
        return sum(len(e) for e in self.examples)


def _token_ids(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _encode_prompt_response(tokenizer: Any, prompt: str, response: str, train_on_inputs: bool) -> Encoded:
    p_ids = _token_ids(tokenizer, prompt, True)
    r_ids = _token_ids(tokenizer, response, False)
    if tokenizer.eos_token_id is not None:
        r_ids.append(tokenizer.eos_token_id)
    ids = p_ids + r_ids
    labels = list(ids) if train_on_inputs else [IGNORE_INDEX] * len(p_ids) + r_ids
    return Encoded(ids, labels)


def _encode_chat(tokenizer: Any, messages: list[dict[str, Any]], train_on_inputs: bool, where: str) -> Encoded:
    """Render with the chat template; label the assistant turns' spans found by rendering prefixes."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ValueError(f"{where}: 'messages' must be a list of {{'role', 'content'}} objects")
    render = tokenizer.apply_chat_template
    full = render(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(render(messages[:i], tokenize=False, add_generation_prompt=True)) if i else 0
        end = len(render(messages[: i + 1], tokenize=False))
        spans.append((start, end))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if train_on_inputs:
        return Encoded(ids, list(ids))
    labels = [
        t if any(s <= a < e for s, e in spans) else IGNORE_INDEX
        for t, (a, _b) in zip(ids, enc["offset_mapping"], strict=True)
    ]
    return Encoded(ids, labels)


def encode_records(
    records: Sequence[dict[str, Any]],
    tokenizer: Any,
    *,
    format: str = "auto",
    max_length: int = 512,
    train_on_inputs: bool = False,
    text_column: str = "text",
    label_column: str | None = None,
    label_names: Sequence[str] | None = None,
    source: str = "data",
) -> EncodedDataset:
    """Tokenize records for causal-LM training (or classification when ``label_column`` is given).

    Args:
        records: rows from :func:`load_records`.
        tokenizer: a HF tokenizer (fast for ``chat``: offsets locate the assistant spans).
        format: ``auto``/``text``/``instruction``/``chat``.
        max_length: examples longer than this are cut to it (counted in ``n_truncated``); an example left
            with no labelled token is dropped (counted in ``n_dropped``).
        train_on_inputs: put the loss on prompt tokens too.
        text_column: the text column for ``text`` format and classification.
        label_column: classification: the label column; ``labels`` becomes ``[class_index]``.
        label_names: classification: fixed class order (default: sorted distinct labels).
        source: name used in error messages (the file).

    Raises:
        ValueError: missing column, chat data with a tokenizer without a chat template, or no example left.
    """
    if not records:
        raise ValueError(f"{source}: the dataset is empty")
    columns = list(records[0].keys())
    fmt = "text" if label_column else (detect_format(columns, source) if format == "auto" else format)
    need = (text_column,) if fmt == "text" else _REQUIRED[fmt]
    if label_column:
        need = (*need, label_column)
    if fmt == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{source}: chat data needs a tokenizer with a chat template; this tokenizer has none "
                         "(use instruction format or set tokenizer.chat_template)")
    names: list[str] = []
    if label_column:
        names = list(label_names) if label_names else sorted({str(r.get(label_column)) for r in records})
        index = {n: i for i, n in enumerate(names)}
    out = EncodedDataset([], format=fmt, label_names=names)
    for i, row in enumerate(records):
        where = f"{source}: record {i + 1}"
        for c in need:
            if c not in row or row[c] is None:
                raise ValueError(f"{where}: missing column {c!r} (has {sorted(row)})")
        if label_column:
            label = str(row[label_column])
            if label not in index:
                raise ValueError(f"{where}: label {label!r} is not one of {names}")
            ids = _token_ids(tokenizer, str(row[text_column]), True)
            if len(ids) > max_length:
                ids, out.n_truncated = ids[:max_length], out.n_truncated + 1
            out.examples.append(Encoded(ids, [index[label]]))
            continue
        if fmt == "text":
            ex = _encode_prompt_response(tokenizer, "", str(row[text_column]), True)
        elif fmt == "instruction":
            inp = row.get("input") or ""
            tmpl = ALPACA_PROMPT if inp else ALPACA_PROMPT_NO_INPUT
            prompt = tmpl.format(instruction=row["instruction"], input=inp)
            ex = _encode_prompt_response(tokenizer, prompt, str(row["output"]), train_on_inputs)
        else:
            ex = _encode_chat(tokenizer, row["messages"], train_on_inputs, where)
        if len(ex) > max_length:
            out.n_truncated += 1
            ex = Encoded(ex.input_ids[:max_length], ex.labels[:max_length])
        # A causal LM predicts token t from tokens < t: the first label never counts.
        if all(t == IGNORE_INDEX for t in ex.labels[1:]):
            out.n_dropped += 1
            continue
        out.examples.append(ex)
    if not out.examples:
        raise ValueError(f"{source}: no example has a response token left after truncation to "
                         f"max_length={max_length} ({out.n_dropped} dropped); raise --max-length")
    return out


def split_records(
    records: Sequence[dict[str, Any]], eval_fraction: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Deterministic train/eval split: a seeded shuffle, then the last ``eval_fraction`` (at least one record
    when the fraction is > 0 and there are at least two records) is held out."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = int(round(eval_fraction * len(records)))
    if eval_fraction > 0 and len(records) >= 2:
        n_eval = min(max(n_eval, 1), len(records) - 1)
    else:
        n_eval = 0
    train = [records[i] for i in sorted(order[: len(order) - n_eval])]
    held = [records[i] for i in sorted(order[len(order) - n_eval:])]
    return train, held
