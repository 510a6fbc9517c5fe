"""Document loading for RAG: PDF (pypdf), plain text and Markdown, from files or folders.

Each file becomes one :class:`Document` whose text is cleaned (hyphenation across line breaks repaired,
whitespace normalised) and which remembers where each page starts, so every chunk cut from it later can
carry its page label.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "SUPPORTED_SUFFIXES",
    "Document",
    "NoTextError",
    "clean_text",
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


class NoTextError(ValueError):
    """A file holds no extractable text (e.g. a scanned PDF); indexing reports it and skips it."""


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
    """

    doc_id: str
    path: Path
    text: str
    pages: list[tuple[int, str]] = field(default_factory=lambda: [(0, "1")])
    sha256: str = ""

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
        FileNotFoundError: a path does not exist.
        ValueError: a file given by name has an unsupported type, or a folder holds no supported file.
    """
    found: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{raw}: no such file or folder")
        if path.is_dir():
            inside = sorted(
                p.resolve()
                for p in path.rglob("*")
                if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES and not p.name.startswith(".")
            )
            if not inside:
                raise ValueError(
                    f"{raw}: folder holds no supported file ({', '.join(SUPPORTED_SUFFIXES)})"
                )
            found.extend(inside)
        elif path.suffix.lower() in SUPPORTED_SUFFIXES:
            found.append(path.resolve())
        else:
            raise ValueError(
                f"{raw}: unsupported file type {path.suffix!r}; supported: {', '.join(SUPPORTED_SUFFIXES)}"
            )
    return sorted(set(found))


def _load_pdf(path: Path) -> tuple[str, list[tuple[int, str]]]:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(str(path))
    except PdfReadError as err:
        raise ValueError(f"{path}: not a readable PDF ({err})") from err
    if reader.is_encrypted:
        raise ValueError(f"{path}: the PDF is encrypted; decrypt it first (e.g. qpdf --decrypt)")
    try:
        labels = list(reader.page_labels)
    except Exception:  # malformed label trees are common; fall back to 1-based numbers
        labels = []
    parts: list[str] = []
    pages: list[tuple[int, str]] = []
    offset = 0
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
    return "\n\n".join(parts), pages


def load_document(path: str | Path, doc_id: str | None = None) -> Document:
    """Load and clean one PDF, text or Markdown file.

    Args:
        path: the file.
        doc_id: its id; default :func:`doc_id_for`.

    Returns:
        The :class:`Document`.

    Raises:
        ValueError: unsupported type, encrypted or unreadable PDF, or undecodable text.
        NoTextError: the file has no extractable text (a scanned PDF, an empty file).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise ValueError(f"{path}: unsupported file type {suffix!r}; supported: {', '.join(SUPPORTED_SUFFIXES)}")
    if suffix == ".pdf":
        text, pages = _load_pdf(path)
    else:
        try:
            text = clean_text(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not UTF-8 text ({err})") from err
        pages = [(0, "1")]
    if not text.strip():
        kind = "no extractable text (scanned PDF? run OCR first)" if suffix == ".pdf" else "empty file"
        raise NoTextError(f"{path}: {kind}")
    return Document(
        doc_id=doc_id or doc_id_for(path), path=path, text=text, pages=pages, sha256=file_sha256(path)
    )
