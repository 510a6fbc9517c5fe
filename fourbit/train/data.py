"""Training data: records in one of three formats, checked, tokenized, truncated and split.

Files are read by :func:`fourbit.train.records.load_records` (re-exported here): every record remembers its
file and line (or row), through :func:`split_records` and :func:`encode_records`, so an error names the line
to fix whatever records the evaluation split took out. Formats:

* ``text``: ``{"text": ...}``; loss on every token.
* ``instruction``: ``{"instruction", "input" (optional), "output"}`` rendered with the Alpaca prompt; loss on
  the response (``output``) only unless ``train_on_inputs``.
* ``chat``: ``{"messages": [{"role", "content"}, ...]}`` rendered with the tokenizer's chat template; loss
  on assistant turns only unless ``train_on_inputs``.

:func:`check_records` checks records without a tokenizer (columns present, values of the right type: a
string, or a number written as text, never a list or an object; a response to learn from), so a bad file can
be refused before a model is loaded; :func:`encode_records` runs it first. Records without a response (an empty ``output``, text or assistant turn) are skipped with a warning
naming their lines; data in which no record has one is refused.

Batching (packing, length grouping, the per-epoch order) lives in :mod:`fourbit.train.batching`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fourbit._errors import FieldError, InputFileError

from .records import Record, Source, load_records, record_error

__all__ = [
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_NO_INPUT",
    "FORMATS",
    "Encoded",
    "EncodedDataset",
    "IGNORE_INDEX",
    "Record",
    "RecordCheck",
    "Source",
    "check_records",
    "detect_format",
    "encode_records",
    "load_records",
    "split_records",
]

_log = logging.getLogger(__name__)

FORMATS = ("auto", "text", "instruction", "chat")
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
    raise ValueError(f"{source}: {_unknown_format(cols)}")


def _unknown_format(cols: set[str]) -> str:
    return (f"cannot tell the format from the columns {sorted(cols)}; expected 'text', 'instruction'+'output' "
            "or 'messages' (or set `format` and `text_column`)")




def _no_response(fmt: str, text_column: str) -> str:
    """Why a record of format ``fmt`` has no response to learn from."""
    return {"text": f"'{text_column}' is empty", "instruction": "'output' is empty",
            "chat": "no assistant message has content"}[fmt]


def _pair_field(record: Mapping[str, Any]) -> str | None:
    """The first preference field (``chosen``, ``rejected``) of a record, if any."""
    return next((k for k in ("chosen", "rejected") if k in record), None)


def _pair_message(name: str) -> str:
    return (f"preference field '{name}' in a supervised record; a record is either a pair (prompt, chosen, "
            "rejected: train it with `task` dpo or orpo) or a supervised example")


@dataclass
class RecordCheck:
    """What :func:`check_records` found: the resolved ``format`` and the positions (indices into the records)
    of those ``skipped`` for having no response to learn from."""

    format: str
    skipped: list[int] = field(default_factory=list)


def _where(record: Mapping[str, Any], index: int) -> str:
    source = getattr(record, "source", None)
    return source.short if isinstance(source, Source) else f"record {index + 1}"


def _file_of(records: Sequence[Mapping[str, Any]], source: str) -> str:
    """The one file the records come from, else ``source``."""
    paths = {r.source.path for r in records if isinstance(getattr(r, "source", None), Source)}
    return paths.pop() if len(paths) == 1 else source


def _list_positions(records: Sequence[Mapping[str, Any]], indices: Sequence[int], limit: int = 8) -> str:
    """``lines 3, 7, 9`` (or ``rows ...``, ``records ...``), at most ``limit`` of them."""
    places = [_where(records[i], i) for i in indices]  # "line 3", "row 2", "record 4"
    kinds = {p.split()[0] for p in places}
    if len(places) > 1 and len(kinds) == 1:
        text = f"{kinds.pop()}s " + ", ".join(p.split()[1] for p in places[:limit])
    else:
        text = ", ".join(places[:limit])
    return text + (f" and {len(places) - limit} more" if len(places) > limit else "")


def _type_name(value: Any) -> str:
    names = {dict: "an object", list: "a list", tuple: "a list", bool: "true/false", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _is_text(value: Any) -> bool:
    """A value rendered into a prompt as ``str(value)``: a string or a number (not a list, object or bool)."""
    return isinstance(value, str) or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _check_text(record: Mapping[str, Any], column: str, fail: Any) -> str:
    """``str`` of the record's ``column``; ``fail(message)`` builds the error for a missing or wrong value."""
    if column not in record:
        raise fail(f"missing column '{column}' (the record has {sorted(record)})")
    value = record[column]
    if value is None:
        raise fail(f"'{column}' is null; give it a string")
    if not _is_text(value):
        raise fail(f"'{column}' must be a string, found {_type_name(value)}")
    return str(value)


def _check_messages(messages: Any, fail: Any) -> bool:
    """Check a chat record's ``messages``; True when an assistant message has content."""
    if not isinstance(messages, list) or not messages:
        raise fail(f"'messages' must be a non-empty list of {{'role', 'content'}} objects, found "
                   f"{_type_name(messages) if messages != [] else 'an empty list'}")
    has_response = False
    for n, message in enumerate(messages, 1):
        if not isinstance(message, dict):
            raise fail(f"'messages' item {n} must be an object with 'role' and 'content', found "
                       f"{_type_name(message)}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                found = "nothing" if key not in message else _type_name(message[key])
                raise fail(f"'messages' item {n}: '{key}' must be a string, found {found}")
        if message["role"] == "assistant" and message["content"].strip():
            has_response = True
    return has_response


def check_records(
    records: Sequence[Mapping[str, Any]],
    *,
    format: str = "auto",
    text_column: str = "text",
    label_column: str | None = None,
    source: str = "data",
) -> RecordCheck:
    """Check records for training without tokenizing them: every record has the columns of its format, with
    values of the right type, and at least one record has a response to learn from.

    Args:
        records: rows from :func:`load_records` (errors name their file and line) or plain dicts (errors name
            ``source`` and the record's 1-based position).
        format: ``auto``/``text``/``instruction``/``chat``.
        text_column: the text column for ``text`` format and classification.
        label_column: classification: the label column (the format is then ``text``).
        source: the name of the data in errors about plain dicts.

    Returns:
        A :class:`RecordCheck`: the format, and the records to skip because their response is empty.

    Raises:
        InputFileError: naming the file and line (or row) of a record with a missing column, a null, or a
            value of the wrong type (a list or an object where a string belongs); or naming the file when the
            data is empty or no record has a response to learn from. ``ValueError`` for plain dicts.
        FieldError: an unknown ``format``.
    """
    if format not in FORMATS:
        raise FieldError("format", f"must be one of {', '.join(FORMATS)}; got {format!r}")
    if not records:
        raise ValueError(f"{source}: the dataset is empty")
    first = records[0]
    if isinstance(first, Mapping) and not label_column and format == "auto" and _pair_field(first):
        raise record_error(first, 0, source, _pair_message(_pair_field(first)))
    if label_column:
        fmt = "text"
    elif format == "auto":
        cols = set(first)
        try:
            fmt = detect_format(cols)
        except ValueError:
            raise record_error(first, 0, source, _unknown_format(cols)) from None
    else:
        fmt = format
    result = RecordCheck(fmt)
    for i, record in enumerate(records):
        def fail(message: str, record: Mapping[str, Any] = record, i: int = i) -> ValueError:
            return record_error(record, i, source, message)

        if not isinstance(record, Mapping):
            raise fail(f"expected an object (column: value), found {_type_name(record)}")
        if _pair_field(record):
            raise fail(_pair_message(_pair_field(record)))
        if label_column:
            _check_text(record, text_column, fail)
            value = record.get(label_column)
            label = str(value) if isinstance(value, bool) else _check_text(record, label_column, fail)
            if not label.strip():
                raise fail(f"'{label_column}' is empty; every record needs a label")
            continue
        if fmt == "text":
            has_response = bool(_check_text(record, text_column, fail).strip())
        elif fmt == "instruction":
            _check_text(record, "instruction", fail)
            if record.get("input") is not None and not _is_text(record["input"]):
                raise fail(f"'input' must be a string, found {_type_name(record['input'])}")
            has_response = bool(_check_text(record, "output", fail).strip())
        else:
            if "messages" not in record or record["messages"] is None:
                raise fail(f"missing column 'messages' (the record has {sorted(record)})")
            has_response = _check_messages(record["messages"], fail)
        if not has_response:
            result.skipped.append(i)
    if len(result.skipped) == len(records):
        what = _no_response(fmt, text_column)
        raise InputFileError(_file_of(records, source),
                             f"no record has a response to learn from ({what} on "
                             f"{_list_positions(records, result.skipped)}); fill in the responses")
    return result


@dataclass
class Encoded:
    """One tokenized example. ``labels`` is ``input_ids`` with ignored positions set to ``IGNORE_INDEX``."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class EncodedDataset:
    """Tokenized examples plus the statistics: examples truncated, dropped (no response token left after
    truncation), skipped (no response at all; :func:`check_records`) and plain-text documents split."""

    examples: list[Encoded]
    n_truncated: int = 0
    n_dropped: int = 0
    n_split: int = 0  # plain-text documents cut into several max_length pieces (``split_long_text``)
    format: str = "text"
    label_names: list[str] = field(default_factory=list)
    n_skipped: int = 0

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


def _encode_chat(tokenizer: Any, messages: list[dict[str, Any]], train_on_inputs: bool) -> Encoded:
    """Render with the chat template; label the assistant turns' spans found by rendering prefixes.
    ``messages`` passed :func:`check_records`."""
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
    records: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    *,
    format: str = "auto",
    max_length: int = 512,
    train_on_inputs: bool = False,
    text_column: str = "text",
    label_column: str | None = None,
    label_names: Sequence[str] | None = None,
    source: str = "data",
    split_long_text: bool = False,
) -> EncodedDataset:
    """Check (:func:`check_records`) and tokenize records for causal-LM training (or classification when
    ``label_column`` is given).

    Args:
        records: rows from :func:`load_records` (or plain dicts).
        tokenizer: a HF tokenizer (fast for ``chat``: offsets locate the assistant spans).
        format: ``auto``/``text``/``instruction``/``chat``.
        max_length: examples longer than this are cut to it (counted in ``n_truncated``); an example left
            with no labelled token is dropped (counted in ``n_dropped``).
        train_on_inputs: put the loss on prompt tokens too.
        text_column: the text column for ``text`` format and classification.
        label_column: classification: the label column; ``labels`` becomes ``[class_index]``.
        label_names: classification: fixed class order (default: sorted distinct labels).
        source: the name of the data in errors about plain dicts (records from files name their own).
        split_long_text: plain text (``text`` format) longer than ``max_length`` is cut into consecutive
            ``max_length`` pieces, each its own example (counted in ``n_split``), instead of being truncated:
            language modelling on documents loses no text (the trainer sets this with ``packing``).

    Returns:
        An :class:`EncodedDataset`. Records without a response are skipped (``n_skipped``) with a warning
        naming their lines.

    Raises:
        InputFileError: see :func:`check_records`; a label not in ``label_names`` (naming file and line).
        ValueError: chat data with a tokenizer without a chat template.
        FieldError: ``max_length``, when truncation leaves no example with a response token.
    """
    check = check_records(records, format=format, text_column=text_column, label_column=label_column,
                          source=source)
    if check.format == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{_file_of(records, source)}: chat data needs a tokenizer with a chat template; this "
                         "tokenizer has none (use the instruction format or set tokenizer.chat_template)")
    names: list[str] = []
    if label_column:
        names = list(label_names) if label_names else sorted({str(r[label_column]) for r in records})
    encoder = _Encoder(tokenizer, check.format, max_length, train_on_inputs, text_column, split_long_text, source,
                       label_column, {n: i for i, n in enumerate(names)})
    out = EncodedDataset([], format=check.format, label_names=names, n_skipped=len(check.skipped))
    if check.skipped:
        _log.warning(f"{_file_of(records, source)}: skipping {len(check.skipped)} of {len(records)} records with "
                     f"no response to learn from ({_no_response(check.format, text_column)}): "
                     f"{_list_positions(records, check.skipped)}")
    skipped = set(check.skipped)
    for i, row in enumerate(records):
        if i not in skipped:
            encoder.add(out, row, i)
    if not out.examples:
        raise FieldError("max_length", f"no example of {_file_of(records, source)} has a response token left "
                                       f"after truncation to {max_length} tokens ({out.n_dropped} dropped); "
                                       "raise `max_length`")
    return out


@dataclass
class _Encoder:
    """How :func:`encode_records` turns one checked record into examples: its options, resolved."""

    tokenizer: Any
    format: str
    max_length: int
    train_on_inputs: bool
    text_column: str
    split_long_text: bool
    source: str
    label_column: str | None = None
    label_index: dict[str, int] = field(default_factory=dict)

    def add(self, out: EncodedDataset, row: Mapping[str, Any], i: int) -> None:
        """Encode record ``i`` and add its examples (and what was truncated, split or dropped) to ``out``."""
        if self.label_column:
            out.examples.append(self._classified(out, row, i))
        else:
            self._add_pieces(out, self._example(row))

    def _classified(self, out: EncodedDataset, row: Mapping[str, Any], i: int) -> Encoded:
        """Classification: the text, truncated to ``max_length``, labelled with the class index."""
        label = str(row[self.label_column])
        if label not in self.label_index:
            raise record_error(row, i, self.source, f"label {label!r} is not one of the training labels "
                                                    f"{list(self.label_index)}")
        ids = _token_ids(self.tokenizer, str(row[self.text_column]), True)
        if len(ids) > self.max_length:
            ids, out.n_truncated = ids[:self.max_length], out.n_truncated + 1
        return Encoded(ids, [self.label_index[label]])

    def _example(self, row: Mapping[str, Any]) -> Encoded:
        """The whole record as one example, in its format."""
        if self.format == "text":
            return _encode_prompt_response(self.tokenizer, "", str(row[self.text_column]), True)
        if self.format == "instruction":
            inp = "" if row.get("input") is None else str(row["input"])
            tmpl = ALPACA_PROMPT if inp else ALPACA_PROMPT_NO_INPUT
            prompt = tmpl.format(instruction=str(row["instruction"]), input=inp)
            return _encode_prompt_response(self.tokenizer, prompt, str(row["output"]), self.train_on_inputs)
        return _encode_chat(self.tokenizer, row["messages"], self.train_on_inputs)

    def _add_pieces(self, out: EncodedDataset, ex: Encoded) -> None:
        """Add ``ex`` cut to ``max_length``: split into consecutive pieces (plain text with ``split_long_text``)
        or truncated; a piece left without a response token is dropped."""
        n = self.max_length
        pieces = [ex]
        if len(ex) > n and self.format == "text" and self.split_long_text:
            out.n_split += 1
            pieces = [Encoded(ex.input_ids[s:s + n], ex.labels[s:s + n]) for s in range(0, len(ex), n)]
        elif len(ex) > n:
            out.n_truncated += 1
            pieces = [Encoded(ex.input_ids[:n], ex.labels[:n])]
        for piece in pieces:
            # A causal LM predicts token t from tokens < t: the first label never counts.
            if all(t == IGNORE_INDEX for t in piece.labels[1:]):
                out.n_dropped += 1
            else:
                out.examples.append(piece)


def split_records(
    records: Sequence[dict[str, Any]], eval_fraction: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Deterministic train/eval split: a seeded shuffle, then the last ``eval_fraction`` (at least one record
    when the fraction is > 0 and there are at least two records) is held out. Both parts keep file order and
    hold the same record objects, so each still names its file and line."""
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
