"""Incremental indexing: files -> parents, children and metadata -> embeddings -> Chroma.

Re-indexing is cheap and safe:

* unchanged file (same bytes, same settings): skipped before it is even read; nothing is embedded;
* changed file: records whose text or settings changed are replaced, the others are kept;
* removed file (it was under a folder being indexed, and is gone): its records are deleted;
* killed run: records are written batch by batch with stable ids, and a file is marked complete only
  after its last batch, so the next run re-embeds only what is missing, never duplicating a record.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fourbit.rag.chunking import ChunkConfig, Parent, split_children, split_parents
from fourbit.rag.loaders import NoTextError, discover_files, doc_id_for, file_sha256, load_document

__all__ = ["IndexConfig", "IndexReport", "build_index"]

log = logging.getLogger(__name__)

METADATA_KINDS = ("questions", "summary")


@dataclass
class IndexConfig:
    """What goes into an index.

    Attributes:
        chunk: parent and child sizes.
        metadata: generated metadata per parent (``--metadata questions,summary``); needs an LLM.
        n_questions: questions asked per parent.
        embed_batch: records embedded and written per batch (the unit a killed run loses at most).
    """

    chunk: ChunkConfig = field(default_factory=ChunkConfig)
    metadata: tuple[str, ...] = ()
    n_questions: int = 3
    embed_batch: int = 64

    def __post_init__(self) -> None:
        self.metadata = tuple(self.metadata)
        for kind in self.metadata:
            if kind not in METADATA_KINDS:
                raise ValueError(f"--metadata: unknown kind {kind!r}; choose from {', '.join(METADATA_KINDS)}")
        if not 1 <= self.n_questions <= 10:
            raise ValueError(f"--n-questions must be in [1, 10], got {self.n_questions}")
        if self.embed_batch < 1:
            raise ValueError(f"embed_batch must be >= 1, got {self.embed_batch}")


@dataclass
class IndexReport:
    """What an indexing run did."""

    indexed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): no text
    errors: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): unreadable
    parents: int = 0
    embedded: int = 0
    deleted: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _hash(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:16]


def _assign_doc_ids(files: list[Path], rows: dict[str, dict[str, Any]]) -> dict[Path, str]:
    """Stable ids from file names; a name shared with another file gets a hash of its path appended."""
    by_path = {Path(row["path"]): doc_id for doc_id, row in rows.items()}
    taken = {doc_id: Path(row["path"]) for doc_id, row in rows.items()}
    stems: dict[str, int] = {}
    for path in files:
        stems[doc_id_for(path)] = stems.get(doc_id_for(path), 0) + 1
    ids: dict[Path, str] = {}
    for path in files:
        if path in by_path:
            ids[path] = by_path[path]
            continue
        doc_id = doc_id_for(path)
        if stems[doc_id] > 1 or (doc_id in taken and taken[doc_id] != path and taken[doc_id].exists()):
            doc_id = f"{doc_id}-{hashlib.sha1(str(path).encode()).hexdigest()[:6]}"
        ids[path] = doc_id
    return ids


def _records(
    parents: list[Parent], config: IndexConfig, tokenizer: Any, generated: dict[str, dict[str, Any]],
    base_key: str, meta_key: str, path: Path,
) -> list[tuple[str, str, dict[str, Any]]]:
    """(id, text, metadata) of every record of one document."""
    out = []
    for parent in parents:
        common = {
            "doc_id": parent.doc_id, "parent_id": parent.id, "source": parent.source, "path": str(path),
            "page": parent.page,
        }
        out.append((parent.id, parent.text, {**common, "kind": "parent", "key": base_key,
                                             "n_tokens": parent.n_tokens, "position": parent.index}))
        for child in split_children(parent, config.chunk, tokenizer):
            out.append((child.id, child.text, {**common, "kind": "chunk", "key": base_key, "size": child.size}))
        extra = generated.get(parent.id, {})
        for number, question in enumerate(extra.get("questions", [])):
            out.append((f"{parent.id}/q-{number}", question, {**common, "kind": "question", "key": meta_key}))
        if extra.get("summary"):
            out.append((f"{parent.id}/s", extra["summary"], {**common, "kind": "summary", "key": meta_key}))
    return out


def _under(path: Path, roots: list[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def build_index(
    paths: list[str | Path],
    store: Any,
    embedder: Any,
    config: IndexConfig | None = None,
    *,
    extractor: Any = None,
    progress: bool = True,
    on_file: Callable[[str, str], None] | None = None,
) -> IndexReport:
    """Index files and folders into ``store``, incrementally.

    Args:
        paths: files and folders (PDF, text, Markdown).
        store: a :class:`fourbit.rag.store.VectorStore` opened with ``create=True``.
        embedder: a :class:`fourbit.rag.embeddings.Embedder` (its tokenizer counts chunk lengths).
        config: sizes and metadata settings.
        extractor: a :class:`fourbit.rag.metadata.MetadataExtractor`; required when ``config.metadata``.
        progress: show progress bars.
        on_file: called with (path, status) for each file: "indexed", "unchanged", "skipped", "error".

    Returns:
        An :class:`IndexReport`.

    Raises:
        FileNotFoundError / ValueError: a path is missing, a file type unsupported, a folder empty (raised
            before anything in the index is touched).
    """
    from tqdm.auto import tqdm

    config = config or IndexConfig()
    if config.metadata and extractor is None:
        raise ValueError("--metadata needs an LLM to generate it (an extractor)")
    files = discover_files(paths)
    store.check_embedder(embedder.name, embedder.dim)
    rows = store.files()
    doc_ids = _assign_doc_ids(files, rows)
    base_key_cfg = config.chunk.key()
    meta_cfg = extractor.key(config) if config.metadata else "none"
    report = IndexReport()
    notify = on_file or (lambda path, status: None)

    for path in files:
        doc_id = doc_ids[path]
        sha = file_sha256(path)
        # The path is part of the key: records carry it, so a moved file gets fresh records.
        base_key = _hash(sha, base_key_cfg, str(path))
        meta_key = _hash(sha, base_key_cfg, str(path), meta_cfg)
        row = rows.get(doc_id)
        if row and row.get("base_key") == base_key and row.get("meta_key") == meta_key and row["path"] == str(path):
            report.unchanged.append(str(path))
            notify(str(path), "unchanged")
            continue
        try:
            doc = load_document(path, doc_id)
        except NoTextError as err:
            log.warning("skipped: %s", err)
            report.skipped.append((str(path), str(err)))
            notify(str(path), "skipped")
            continue
        except ValueError as err:
            report.errors.append((str(path), str(err)))
            notify(str(path), "error")
            continue
        parents = split_parents(doc, config.chunk, embedder.tokenizer)
        generated = extractor.extract(parents, config, progress=progress) if config.metadata else {}
        wanted = _records(parents, config, embedder.tokenizer, generated, base_key, meta_key, path)
        existing = store.records_of(doc_id)
        wanted_keys = {rid: meta["key"] for rid, _, meta in wanted}
        stale = [rid for rid, meta in existing.items() if wanted_keys.get(rid) != meta.get("key")]
        if stale:
            store.unmark_file(doc_id)
            store.delete_ids(stale)
            report.deleted += len(stale)
        kept = set(existing) - set(stale)
        todo = [rec for rec in wanted if rec[0] not in kept]
        batches = range(0, len(todo), config.embed_batch)
        for start in tqdm(batches, desc=f"embed {path.name}", unit="batch", disable=not progress or not todo):
            batch = todo[start : start + config.embed_batch]
            vectors = embedder.embed_documents([text for _, text, _ in batch])
            store.upsert([r[0] for r in batch], vectors, [r[1] for r in batch], [r[2] for r in batch])
            report.embedded += len(batch)
        store.mark_file(doc_id, {"path": str(path), "sha256": sha, "base_key": base_key, "meta_key": meta_key,
                                 "records": len(wanted), "parents": len(parents)})
        report.indexed.append(str(path))
        report.parents += len(parents)
        notify(str(path), "indexed")

    roots = [Path(p).expanduser().resolve() for p in paths]
    present = {str(p) for p in files}
    touched = set(doc_ids.values())
    for doc_id, row in rows.items():
        if doc_id not in touched and row["path"] not in present and _under(Path(row["path"]), roots):
            report.deleted += store.remove_document(doc_id)
            report.removed.append(row["path"])
            notify(row["path"], "removed")
    return report
