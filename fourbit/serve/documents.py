"""Document endpoints' work, off the event loop: grounded answer prompts and uploads into the index.

Uploads are checked before anything is written: a supported suffix (.pdf, .txt, .md, .markdown), content
that matches it (a PDF starts with ``%PDF-``; text is UTF-8 without NUL bytes), a size limit. The stored
name is the upload's base name reduced to ``[A-Za-z0-9._-]``, so it never leaves the upload folder. The
file is then indexed the way ``rag index`` does it (:func:`fourbit.rag.index.build_index`): a re-upload
of the same bytes re-embeds nothing, a changed file replaces only the records that changed.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Any

from fourbit.rag.grounding import DEFAULT_EVIDENCE_TOKENS, evidence_budget, grounded_prompt
from fourbit.serve.errors import APIError

__all__ = ["ingest_upload", "prepare_answer", "safe_upload_name", "upload_folder"]

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
_SUFFIXES = (".pdf", ".txt", ".md", ".markdown")  # fourbit.rag.loaders.SUPPORTED_SUFFIXES


def prepare_answer(engine: Any, question: str, retriever: str, top_k: int,
                   max_tokens: int | None = None) -> tuple[list[int], list[dict], list[dict]]:
    """Retrieve parents, pick the evidence sentences that fit, and build the answer prompt.

    Returns:
        (prompt token ids, evidence rows ``{text, source, page, parent_id, score}``, source rows
        ``{id, source, page, score, text}`` with each parent's whole text).

    Raises:
        APIError: the index is empty.
    """
    from fourbit.rag.prompts import answer_prompt
    from fourbit.rag.retrieval import Retriever

    if engine.store.count() == 0:
        raise APIError(400, "the index holds no documents yet: upload one first (POST /v1/documents)",
                       param="question")
    parents = Retriever(engine.store, engine.embedder, retriever, top_k).retrieve(question)
    bare = len(engine.chat_prompt(answer_prompt(question, [""])))
    budget = evidence_budget(engine.context_window, bare, max_tokens or engine.default_max_tokens,
                             cap=DEFAULT_EVIDENCE_TOKENS)

    def count(text: str) -> int:
        return len(engine.encode(text))

    evidence, messages = grounded_prompt(question, parents, engine.embedder, token_budget=budget, count_tokens=count)
    prompt_ids = engine.chat_prompt(messages)
    sources = [{"id": p.id, "source": p.source, "page": p.page, "score": round(float(p.score), 4), "text": p.text}
               for p in parents]
    return prompt_ids, [e.as_dict() for e in evidence], sources


def safe_upload_name(filename: str) -> str:
    """The name an upload is stored under: its base name in ``[A-Za-z0-9._-]``, with a supported suffix.

    Raises:
        APIError: 415 for an unsupported suffix.
    """
    base = PurePosixPath(filename.replace("\\", "/")).name
    suffix = PurePosixPath(base).suffix.lower()
    if suffix not in _SUFFIXES:
        raise APIError(415, f"file {base!r}: unsupported type {suffix or '(none)'!r}; upload one of "
                            f"{', '.join(_SUFFIXES)}", param="file", code="unsupported_file_type")
    stem = _UNSAFE.sub("_", base[: -len(suffix)]).strip("._-")[:100] or "document"
    return stem + suffix


def upload_folder(engine: Any) -> Path:
    """Where uploads are stored: ``engine.upload_dir``, else ``uploads/`` inside a local index's folder."""
    if engine.upload_dir:
        return Path(engine.upload_dir)
    location = str(engine.store.location)
    if location.startswith(("http://", "https://")):
        raise APIError(400, "uploads need a local folder: the server was started with a Chroma server and no "
                            "upload folder", param="file")
    return Path(location) / "uploads"


def _check_content(name: str, data: bytes) -> None:
    if not data:
        raise APIError(400, f"file {name!r} is empty", param="file")
    if name.lower().endswith(".pdf"):
        if not data.startswith(b"%PDF-"):
            raise APIError(415, f"file {name!r} does not start like a PDF (%PDF-)", param="file",
                           code="unsupported_file_type")
        return
    if b"\x00" in data:
        raise APIError(415, f"file {name!r} holds binary data, not text", param="file", code="unsupported_file_type")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise APIError(415, f"file {name!r} is not UTF-8 text (byte {err.start})", param="file",
                       code="unsupported_file_type") from None


def ingest_upload(engine: Any, filename: str, data: bytes, max_bytes: int) -> dict[str, Any]:
    """Check, store and index one uploaded document.

    Returns:
        ``{"filename", "status": "indexed" | "unchanged", "parents", "embedded", "deleted"}``.

    Raises:
        APIError: 413 too large, 415 wrong type, 400 no text or unreadable.
    """
    from fourbit._io import atomic_write_bytes
    from fourbit.rag.index import build_index

    name = safe_upload_name(filename)
    if len(data) > max_bytes:
        raise APIError(413, f"file {name!r} is over the upload limit of {max_bytes} bytes", param="file")
    _check_content(name, data)
    folder = upload_folder(engine)
    folder.mkdir(parents=True, exist_ok=True)
    path = (folder / name).resolve()
    if path.parent != folder.resolve():  # cannot happen with a sanitized base name; never trust it
        raise APIError(400, f"file {filename!r}: not a plain file name", param="file")
    with engine.index_lock:
        existed = path.exists()
        old = path.read_bytes() if existed else None
        if old != data:
            atomic_write_bytes(path, data)
        try:
            report = build_index([path], engine.store, engine.embedder, engine.index_config, progress=False)
        except ValueError as err:
            report, failure = None, str(err)
        else:
            problems = report.skipped  # a file named explicitly raises; skipped is the safety net
            failure = problems[0][1] if problems else None
        if failure is not None:
            if old is None:
                path.unlink(missing_ok=True)
            elif old != data:
                atomic_write_bytes(path, old)
            raise APIError(400, f"file {name!r} could not be indexed: {failure.replace(str(path), name)}",
                           param="file")
    status = "indexed" if report.indexed else "unchanged"
    return {"filename": name, "status": status, "parents": report.parents, "embedded": report.embedded,
            "deleted": report.deleted}
