"""Reading training data files into records that remember where they came from.

Every record :func:`load_records` returns is a :class:`Record`: a plain ``dict`` of column -> value that also
carries its :class:`Source` (the file and the line of a JSONL, JSON or CSV file, the row of a Parquet file or a
saved dataset). Splitting keeps the same record objects and encoding reads their source, so an error about a
record names the line a user opens in an editor, whichever records the evaluation split took out.

Readers wrap their formats' errors (codecs, JSON, CSV quoting and ragged rows, Parquet, ``datasets``) into
:class:`fourbit._errors.InputFileError`, naming the file and, where there is one, the line.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fourbit._errors import InputFileError
from fourbit._io import read_jsonl_lines

__all__ = ["DATA_SUFFIXES", "Record", "Source", "load_records", "record_error"]

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass(frozen=True)
class Source:
    """Where one record comes from: ``line`` (1-based, JSONL/JSON/CSV) or ``row`` (1-based, Parquet and
    saved datasets, which have no lines)."""

    path: str
    line: int | None = None
    row: int | None = None

    def __str__(self) -> str:
        if self.line is not None:
            return f"{self.path}:{self.line}"
        if self.row is not None:
            return f"{self.path} row {self.row}"
        return self.path

    @property
    def short(self) -> str:
        """``line 35`` / ``row 12``: the position without the file (the file when there is no position)."""
        if self.line is not None:
            return f"line {self.line}"
        return f"row {self.row}" if self.row is not None else self.path


class Record(dict):
    """One record (column -> value), a ``dict`` that also knows its :class:`Source`."""

    __slots__ = ("source",)

    def __init__(self, values: Mapping[str, Any], source: Source):
        super().__init__(values)
        self.source = source


def record_error(record: Mapping[str, Any], index: int, source: str, message: str) -> ValueError:
    """The error for a bad ``record``: an :class:`InputFileError` naming its file and line (or row) when it
    carries a :class:`Source`, else a ``ValueError`` naming ``source`` and its 1-based position."""
    where = getattr(record, "source", None)
    if isinstance(where, Source):
        if where.row is not None:
            return InputFileError(where.path, f"row {where.row}: {message}")
        return InputFileError(where.path, message, line=where.line)
    return ValueError(f"{source}: record {index + 1}: {message}")


def load_records(path: str | os.PathLike) -> list[Record]:
    """Read a dataset file or a saved Hugging Face dataset folder into records.

    Args:
        path: ``.jsonl``, ``.json`` (a list of objects, or an object with a ``data``/``train`` list; JSON Lines
            named ``.json`` are read as JSONL), ``.csv`` (a header row; every value is a string), ``.parquet``,
            or a folder written by ``Dataset.save_to_disk`` (a ``DatasetDict`` uses its ``train`` split).

    Returns:
        The records, each with its :class:`Source`.

    Raises:
        InputFileError: naming the file (and line) for a missing or empty file, an unknown type, text that is
            not UTF-8, malformed JSON, a CSV row with a stray quote or the wrong number of fields, a damaged
            Parquet file or saved dataset.
    """
    p = Path(path)
    if not p.exists():
        raise InputFileError(p, "no such file or folder")
    suffix = p.suffix.lower()
    if p.is_dir():
        records = _read_saved_dataset(p)
    elif suffix == ".jsonl":
        records = _read_jsonl(p)
    elif suffix == ".json":
        records = _read_json(p)
    elif suffix == ".csv":
        records = _read_csv(p)
    elif suffix == ".parquet":
        records = _read_parquet(p)
    else:
        raise InputFileError(p, f"unsupported data file type {suffix!r}: use {', '.join(DATA_SUFFIXES)} or a "
                                "folder saved with Dataset.save_to_disk")
    if not records:
        raise InputFileError(p, "the dataset is empty: it holds no record")
    return records


def _read_text(path: Path) -> str:
    """The file as text (UTF-8, a leading BOM dropped); a bad byte is reported with its line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise InputFileError(path, f"not UTF-8 text (byte {column} of the line); save the file as UTF-8",
                             line=line) from None


def _read_jsonl(path: Path) -> list[Record]:
    # read_jsonl_lines names the file and line of a malformed line or a bad byte
    return [Record(row, Source(str(path), line=n)) for n, row in read_jsonl_lines(path)]


def _read_json(path: Path) -> list[Record]:
    text = _read_text(path)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # a first complete value followed by more: JSON Lines named .json
            return _read_jsonl(path)
        where = f"{err.msg} column" if err.msg.endswith(" at") else f"{err.msg}, column"
        raise InputFileError(path, f"not valid JSON ({where} {err.colno}); it may be truncated",
                             line=err.lineno) from None
    key = None
    if isinstance(doc, dict):
        key = next((k for k in ("data", "train") if isinstance(doc.get(k), list)), None)
        if key is None:
            raise InputFileError(path, "expected a JSON list of objects, or an object with a 'data' or 'train' "
                                       f"list; found an object with keys {sorted(doc)[:10]}", line=1)
        doc = doc[key]
    elif not isinstance(doc, list):
        raise InputFileError(path, f"expected a JSON list of objects, found {_json_type(doc)}", line=1)
    lines = _json_item_lines(text, key)
    out = []
    for item, line in zip(doc, lines, strict=True):
        if not isinstance(item, dict):
            raise InputFileError(path, f"expected a JSON object (one record), found {_json_type(item)}", line=line)
        out.append(Record(item, Source(str(path), line=line)))
    return out


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "true/false", type(None): "null"}
    return names.get(type(value), "a number")


_WS = re.compile(r"[ \t\n\r]*")


def _json_item_lines(text: str, key: str | None) -> list[int]:
    """The 1-based line on which each element of the document's top-level list starts (of ``doc[key]`` when
    the document is an object). ``text`` is known to be valid JSON: each element is skipped with the C
    decoder's ``raw_decode``, so this costs about one more parse."""
    decoder = json.JSONDecoder()

    def skip(pos: int) -> int:
        return _WS.match(text, pos).end()

    pos = skip(0)
    if key is not None:  # find the last `key` of the top-level object (json.loads keeps the last duplicate)
        start, pos = None, skip(pos + 1)
        while text[pos] != "}":
            name, pos = decoder.raw_decode(text, pos)
            pos = skip(skip(pos) + 1)  # the colon
            if name == key:
                start = pos
            _, pos = decoder.raw_decode(text, pos)
            pos = skip(pos)
            if text[pos] == ",":
                pos = skip(pos + 1)
        pos = start
    offsets, pos = [], skip(pos + 1)  # after "["
    while text[pos] != "]":
        offsets.append(pos)
        _, pos = decoder.raw_decode(text, pos)
        pos = skip(pos)
        if text[pos] == ",":
            pos = skip(pos + 1)
    lines, line, last = [], 1, 0
    for offset in offsets:
        line += text.count("\n", last, offset)
        lines.append(line)
        last = offset
    return lines


def _read_csv(path: Path) -> list[Record]:
    """A CSV file with a header row, read with the standard ``csv`` module in strict mode: every value is a
    string (an empty cell is ``""``), a quote inside an unquoted field or a quoted field never closed is an
    error, and so is a row with more or fewer fields than the header."""
    reader = csv.reader(io.StringIO(_read_text(path), newline=""), strict=True)
    header: list[str] | None = None
    out: list[Record] = []
    start = 1
    while True:
        start = reader.line_num + 1  # the line this row starts on (a quoted field may span lines)
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            raise InputFileError(path, f"malformed CSV ({err}): check the quotes in this row; a field that holds "
                                       'a quote or a comma must be quoted, with its quotes doubled ("")',
                                 line=start) from None
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if header is None:
            header = [h.strip() for h in row]
            dupes = sorted({h for h in header if header.count(h) > 1})
            if dupes or not all(header):
                what = f"repeats the column {dupes[0]!r}" if dupes else "has a column without a name"
                raise InputFileError(path, f"the header row {what}", line=start)
            continue
        if len(row) != len(header):
            raise InputFileError(path, f"this row has {len(row)} fields but the header has {len(header)} "
                                       f"({', '.join(header)}); quote fields that contain commas", line=start)
        out.append(Record(dict(zip(header, row, strict=True)), Source(str(path), line=start)))
    return out


def _rows(path: Path, rows: Iterable[dict[str, Any]]) -> list[Record]:
    return [Record(r, Source(str(path), row=i + 1)) for i, r in enumerate(rows)]


def _read_parquet(path: Path) -> list[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise InputFileError(path, f"not a readable Parquet file ({err}); it may be truncated or damaged") from None
    return _rows(path, table.to_pylist())


def _read_saved_dataset(path: Path) -> list[Record]:
    import datasets
    import pyarrow as pa

    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, pa.ArrowException, json.JSONDecodeError, KeyError) as err:
        raise InputFileError(path, "not a dataset folder written by Dataset.save_to_disk, or a damaged one "
                                   f"({type(err).__name__}: {err}); give a data file or a saved dataset folder"
                             ) from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise InputFileError(path, f"the saved DatasetDict has no 'train' split (it has {list(ds)})")
        ds = ds["train"]
    return _rows(path, ds.to_list())
