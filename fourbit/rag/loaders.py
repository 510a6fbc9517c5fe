"""Document loading for RAG: PDF (pypdf), plain text and Markdown, from files or folders.

Each file becomes one :class:`Document` whose text is cleaned (hyphenation across line breaks repaired,
whitespace normalised) and which remembers where each page starts, so every chunk cut from it later can
carry its page label.

A file that cannot be used raises :class:`fourbit._errors.InputFileError` naming it and saying why: a damaged
or encrypted PDF, binary data in a ``.txt``, text in an encoding that cannot be told apart. Text that is not
UTF-8 is read as Windows-1252 (a superset of Latin-1's printable characters) only when that reading is
unambiguous (see :func:`decode_text`), and the :class:`Document` says so in ``encoding``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fourbit._errors import InputFileError

__all__ = [
    "SUPPORTED_SUFFIXES",
    "Document",
    "NoTextError",
    "clean_text",
    "decode_text",
    "discover_files",
    "doc_id_for",
    "file_sha256",
    "load_document",
    "normalize_whitespace",
]

SUPPORTED_SUFFIXES = (".pdf", ".txt", ".md", ".markdown")

# "effi-\ncient" -> "efficient": a lower-case letter, a hyphen at the end of a line, a lower-case letter.
# Compounds broken at their own hyphen ("4-\nbit", "Self-\nInstruct") keep the hyphen because one side is
# not a lower-case letter; "self-\nattention" loses it, the price every de-hyphenation heuristic pays.
_HYPHEN_BREAK = re.compile(r"([a-z])-[ \t]*\n[ \t]*([a-z])")
_SPACES = re.compile(r"[ \t\f\v\u00a0\u2000-\u200b\u3000]+")
_MANY_NEWLINES = re.compile(r"\n{3,}")
_ANY_WS = re.compile(r"\s+")


class NoTextError(InputFileError):
    """A file holds no extractable text (e.g. a scanned PDF or an empty file)."""


@dataclass
class Document:
    """One loaded file.

    Attributes:
        doc_id: stable identifier (from the file name), the prefix of every chunk id.
        path: the file.
        text: cleaned text of the whole file.
        pages: (character offset where the page starts in ``text``, page label), ascending offsets.
            Text and Markdown files have a single page labelled "1".
        sha256: hash of the file's bytes (incremental indexing compares it).
        encoding: how a text file was decoded ("utf-8" unless :func:`decode_text` chose another).
    """

    doc_id: str
    path: Path
    text: str
    pages: list[tuple[int, str]] = field(default_factory=lambda: [(0, "1")])
    sha256: str = ""
    encoding: str = "utf-8"

    def page_at(self, offset: int) -> str:
        """The label of the page holding character ``offset`` of ``text``."""
        label = self.pages[0][1]
        for start, page_label in self.pages:
            if start > offset:
                break
            label = page_label
        return label


def normalize_whitespace(text: str) -> str:
    """Collapse every run of whitespace (newlines included) to one space; used to compare texts."""
    return _ANY_WS.sub(" ", text).strip()


def clean_text(text: str) -> str:
    """Repair hyphenation across line breaks and normalise whitespace, keeping paragraph breaks.

    Runs of spaces and tabs become one space, trailing spaces go, three or more newlines become two (a
    paragraph break, which the sentence splitter uses as a boundary).
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u00ad", "")
    text = _HYPHEN_BREAK.sub(r"\1\2", text)
    text = _SPACES.sub(" ", text)
    text = "\n".join(line.strip() for line in text.split("\n"))
    text = _MANY_NEWLINES.sub("\n\n", text)
    return text.strip()


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def doc_id_for(path: Path) -> str:
    """Stable document id from a file name: ``guide.pdf`` -> ``guide``; other characters become ``_``."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", path.stem).strip("._-")
    return stem or "doc"


def discover_files(paths: list[str | Path]) -> list[Path]:
    """Expand files and folders (recursively) into the supported files they hold, sorted.

    Args:
        paths: files or folders.

    Returns:
        Resolved paths of every supported file.

    Raises:
        FileNotFoundError: a path does not exist (it is the error's ``filename``).
        InputFileError: a file given by name has an unsupported type, or a folder holds no supported file.
    """
    found: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise FileNotFoundError(errno.ENOENT, "no such file or folder", str(raw))
        if path.is_dir():
            inside = sorted(
                p.resolve()
                for p in path.rglob("*")
                if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES and not p.name.startswith(".")
            )
            if not inside:
                raise InputFileError(raw, f"folder holds no supported file ({', '.join(SUPPORTED_SUFFIXES)})")
            found.extend(inside)
        elif path.suffix.lower() in SUPPORTED_SUFFIXES:
            found.append(path.resolve())
        else:
            raise InputFileError(
                raw, f"unsupported file type {path.suffix!r}; supported: {', '.join(SUPPORTED_SUFFIXES)}"
            )
    return sorted(set(found))


# C0 control characters that never occur in text files (tab, newlines, form feed and escape excepted).
_BINARY_BYTES = frozenset(range(0x00, 0x09)) | frozenset({0x0E, 0x0F}) | frozenset(range(0x10, 0x1B)) | frozenset(
    range(0x1C, 0x20)
)
# Characters other than letters that Western text in Windows-1252 holds above ASCII.
_CP1252_PUNCTUATION = set("\u00a0\u00a1\u00a2\u00a3\u00a5\u00a7\u00a9\u00ab\u00ae\u00b0\u00b1\u00b4"
                          "\u00b7\u00bb\u00bf\u00d7\u00f7\u2013\u2014\u2018\u2019\u201a\u201c\u201d"
                          "\u201e\u2020\u2021\u2022\u2026\u2030\u2039\u203a\u20ac\u2122")


def decode_text(data: bytes, path: str | Path) -> tuple[str, str]:
    """The text of a text file's bytes and the encoding used: UTF-8 (a BOM selects UTF-8 or UTF-16), else
    Windows-1252 when that reading is unambiguous.

    Windows-1252 is accepted only when every byte above ASCII decodes to a letter or common punctuation and
    the accented letters sit inside mostly-ASCII words ("café", "Größe"). Text in another 8-bit encoding
    (Cyrillic, Greek, Central European) read as Windows-1252 fails that test (whole words of accented
    letters, or symbols inside words), so it is refused rather than indexed as gibberish.

    Raises:
        InputFileError: the bytes are binary (control characters), or not UTF-8 and not unambiguously
            Windows-1252.
    """
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16"), "utf-16"
        except UnicodeDecodeError:
            raise InputFileError(path, "starts with a UTF-16 byte order mark but is not UTF-16 text") from None
    sample = data[:65536]
    controls = sum(byte in _BINARY_BYTES for byte in sample)
    if b"\x00" in sample or controls > max(2, len(sample) // 1000):
        raise InputFileError(path, "holds binary data, not text; convert it to text or remove it from the input")
    try:
        return data.decode("utf-8-sig"), "utf-8"
    except UnicodeDecodeError as err:
        utf8_error = err
    try:
        text = data.decode("cp1252")
    except UnicodeDecodeError:
        text = ""
    if text and _plausible_western(text):
        return text, "cp1252"
    raise InputFileError(
        path, f"not UTF-8 text (byte {utf8_error.start}) and its encoding cannot be told for sure; save it as "
              "UTF-8 (e.g. iconv -f LATIN1 -t UTF-8)"
    )


def _plausible_western(text: str) -> bool:
    ascii_letters = other_letters = 0
    for word in re.findall(r"\S+", text):
        if word.isascii():
            continue
        for char in word:
            if char.isascii():
                ascii_letters += char.isalpha()
            elif unicodedata.category(char).startswith("L"):
                other_letters += 1
            elif char not in _CP1252_PUNCTUATION:
                return False
    return other_letters == 0 or ascii_letters >= other_letters


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _pypdf_warnings() -> Iterator[list[str]]:
    """Collect pypdf's logged warnings instead of printing them: they do not name the file ("EOF marker not
    found"); the error or warning raised for the file says what went wrong instead."""
    logger = logging.getLogger("pypdf")
    handler, propagate = _Collect(), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def _damaged(path: Path, err: Exception, where: str = "") -> InputFileError:
    return InputFileError(path, f"not a readable PDF{where} ({err or type(err).__name__}); it may be truncated or "
                                "damaged: export or download it again")


def _load_pdf(path: Path) -> tuple[str, list[tuple[int, str]]]:
    from pypdf import PdfReader

    with _pypdf_warnings() as warnings:
        try:
            reader = PdfReader(str(path))
            encrypted = reader.is_encrypted
        except Exception as err:  # pypdf raises many types (PdfReadError, struct/KeyError on damaged files)
            raise _damaged(path, err) from None
        if any("EOF marker not found" in message for message in warnings):
            # pypdf reads what it can of a cut-off file; indexing part of it would pass for the whole.
            raise InputFileError(path, "the PDF is truncated (it has no end-of-file marker): export or download it "
                                       "again")
        if encrypted:
            raise InputFileError(path, "the PDF is encrypted; decrypt it first (e.g. qpdf --decrypt IN OUT)")
        try:
            labels = list(reader.page_labels)
        except Exception:  # malformed label trees are common; fall back to 1-based numbers
            labels = []
        parts: list[str] = []
        pages: list[tuple[int, str]] = []
        offset = 0
        try:
            for number, page in enumerate(reader.pages):
                page_text = clean_text(page.extract_text() or "")
                if not page_text:
                    continue
                label = labels[number] if number < len(labels) else str(number + 1)
                if parts:
                    offset += 2  # the "\n\n" joining pages
                pages.append((offset, label))
                parts.append(page_text)
                offset += len(page_text)
        except Exception as err:
            raise _damaged(path, err, f" (page {len(pages) + 1})") from None
    return "\n\n".join(parts), pages


def load_document(path: str | Path, doc_id: str | None = None) -> Document:
    """Load and clean one PDF, text or Markdown file.

    Args:
        path: the file.
        doc_id: its id; default :func:`doc_id_for`.

    Returns:
        The :class:`Document`.

    Raises:
        InputFileError: naming the file: unsupported type, unreadable (permissions), damaged or encrypted
            PDF, binary data or an ambiguous encoding in a text file.
        NoTextError: the file has no extractable text (a scanned PDF, an empty file).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise InputFileError(path, f"unsupported file type {suffix!r}; supported: {', '.join(SUPPORTED_SUFFIXES)}")
    encoding = "utf-8"
    try:
        if suffix == ".pdf":
            text, pages = _load_pdf(path)
        else:
            raw, encoding = decode_text(path.read_bytes(), path)
            text, pages = clean_text(raw), [(0, "1")]
        sha = file_sha256(path)
    except OSError as err:
        raise InputFileError(path, f"cannot be read ({err.strerror or err})") from None
    if not text.strip():
        kind = "no extractable text (a scanned PDF? run OCR first)" if suffix == ".pdf" else "empty file"
        raise NoTextError(path, kind)
    return Document(doc_id=doc_id or doc_id_for(path), path=path, text=text, pages=pages, sha256=sha,
                    encoding=encoding)
