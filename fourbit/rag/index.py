"""Incremental indexing: files -> parents, children and metadata -> embeddings -> Chroma.

:func:`build_index` runs these steps, each a function below, in order:

1. **find files** (:func:`find_sources`): expand folders; read every file named explicitly, so a file that
   cannot be used stops the run before the model loads or the index changes;
2. **skip unchanged files**: a file whose bytes, path and settings match its bookkeeping row is not read;
3. **load** each other file (inside a folder, a file that cannot be used is skipped and reported);
4. **chunk** it into parents and children, and **generate metadata** (questions, summaries) when asked;
5. **replace stale records**: records whose text or settings changed are deleted, the others kept;
6. **embed and store** the missing records batch by batch, then **mark the file complete**;
7. **remove** the records of files that were under an indexed folder and are gone.

Nothing is written before the first file that can be used (indexed or found unchanged): when every file
found is skipped, :class:`NothingIndexedError` is raised and the index is left as it was.

Re-indexing is cheap and safe: unchanged files cost a hash; a killed run (even by SIGKILL) leaves files
whose bookkeeping row is missing or stale, because a row is written only after the file's last batch, so
the next run re-embeds only what is missing, under the same stable ids, never duplicating a record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fourbit._errors import FieldError, InputFileError
from fourbit.rag.chunking import ChunkConfig, Parent, split_children, split_parents
from fourbit.rag.loaders import Document, discover_files, doc_id_for, file_sha256, load_document

__all__ = ["IndexConfig", "IndexReport", "NothingIndexedError", "Sources", "build_index", "find_sources"]

log = logging.getLogger(__name__)

METADATA_KINDS = ("questions", "summary")


@dataclass
class IndexConfig:
    """What goes into an index.

    Attributes:
        chunk: parent and child sizes.
        metadata: generated metadata per parent (``questions``, ``summary``); needs an LLM.
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
                raise FieldError("metadata", f"unknown kind {kind!r}; choose from {', '.join(METADATA_KINDS)}")
        if not 1 <= self.n_questions <= 10:
            raise FieldError("n_questions", f"must be in [1, 10], got {self.n_questions}")
        if self.embed_batch < 1:
            raise FieldError("embed_batch", f"must be >= 1, got {self.embed_batch}")


@dataclass
class IndexReport:
    """What an indexing run did.

    Attributes:
        indexed / unchanged / removed: file paths.
        skipped: (path, reason) of files inside a folder that could not be used (damaged, encrypted, binary,
            no text); files named explicitly raise instead.
        notes: (path, note) worth telling, e.g. a text file read as Windows-1252 because it is not UTF-8.
        parents / embedded / deleted: counts of parents of the indexed files, records embedded and deleted.
        resumed: the previous run on this index was interrupted (this one completed what it left).
    """

    indexed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)
    parents: int = 0
    embedded: int = 0
    deleted: int = 0
    resumed: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class NothingIndexedError(InputFileError):
    """Every file found was skipped (damaged, encrypted, binary, no text) and none was indexed before: the
    run has nothing to index. Raised before anything is written, so an existing index is left as it was.

    Attributes:
        report: the run's :class:`IndexReport`; ``report.skipped`` names each file and why.
    """

    def __init__(self, paths: list[Path], report: IndexReport):
        where = ", ".join(str(p) for p in paths)
        n = len(report.skipped)
        super().__init__(where, f"nothing could be indexed: the {n} file{'s' if n != 1 else ''} found "
                                f"{'were' if n != 1 else 'was'} skipped (damaged, encrypted, binary or without text)")
        self.report = report


@dataclass
class Sources:
    """The files an indexing run reads (step 1), from :func:`find_sources`.

    Attributes:
        paths: the files and folders as given.
        files: every supported file, resolved and sorted.
        loaded: the files named explicitly, already read (each a :class:`Document`).
    """

    paths: list[Path]
    files: list[Path]
    loaded: dict[Path, Document]


def find_sources(paths: list[str | Path] | Sources) -> Sources:
    """Step 1: expand ``paths`` into files and read the files named explicitly.

    Cheap next to loading an embedding model: call it first, so that a missing path, an empty folder or a
    damaged file named on the command line fails at once, before anything is loaded or written.

    Raises:
        FileNotFoundError: a path does not exist.
        InputFileError: naming the file or folder: an empty folder, an unsupported type, or a file named
            explicitly that cannot be used (damaged, encrypted, binary, no text).
    """
    if isinstance(paths, Sources):
        return paths
    if not paths:
        raise FieldError("paths", "give at least one file or folder to index")
    given = [Path(p).expanduser() for p in paths]
    files = discover_files(given)
    loaded = {}
    for path in given:
        if not path.is_dir():
            loaded[path.resolve()] = load_document(path.resolve())
    return Sources(paths=given, files=files, loaded=loaded)


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


def _file_keys(sha: str, path: Path, chunk_key: str, meta_key_cfg: str) -> tuple[str, str]:
    """(base key, metadata key) of a file's records; the path is part of both, because records carry it
    (a moved file gets fresh records)."""
    return _hash(sha, chunk_key, str(path)), _hash(sha, chunk_key, str(path), meta_key_cfg)


def _is_unchanged(row: dict[str, Any] | None, path: Path, base_key: str, meta_key: str) -> bool:
    """Step 2: the file was completely indexed from the same bytes, at the same path, with the same settings."""
    return bool(row) and row.get("base_key") == base_key and row.get("meta_key") == meta_key \
        and row["path"] == str(path)


def _load(path: Path, doc_id: str, sources: Sources) -> Document:
    """Step 3: the document (read in step 1 when named explicitly)."""
    doc = sources.loaded.get(path)
    if doc is None:
        return load_document(path, doc_id)
    return dataclasses.replace(doc, doc_id=doc_id)


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


def _chunk(doc: Document, config: IndexConfig, embedder: Any, extractor: Any, keys: tuple[str, str],
           progress: bool) -> tuple[list[Parent], list[tuple[str, str, dict[str, Any]]]]:
    """Step 4: the document's parents and every record wanted for it (parents, children, metadata)."""
    parents = split_parents(doc, config.chunk, embedder.tokenizer)
    generated = extractor.extract(parents, config, progress=progress) if config.metadata else {}
    return parents, _records(parents, config, embedder.tokenizer, generated, *keys, doc.path)


def _replace_stale(store: Any, doc_id: str, wanted: list[tuple[str, str, dict[str, Any]]]) -> tuple[list, int]:
    """Step 5: delete the document's records that are no longer wanted as they are; returns the records
    still to write and the number deleted."""
    existing = store.records_of(doc_id)
    wanted_keys = {rid: meta["key"] for rid, _, meta in wanted}
    stale = [rid for rid, meta in existing.items() if wanted_keys.get(rid) != meta.get("key")]
    if stale:
        store.unmark_file(doc_id)  # first: a crash in between leaves a file to re-index, never a lie
        store.delete_ids(stale)
    kept = set(existing) - set(stale)
    return [rec for rec in wanted if rec[0] not in kept], len(stale)


def _embed_and_store(store: Any, embedder: Any, todo: list, batch_size: int, label: str, progress: bool) -> int:
    """Step 6: embed and write ``todo`` batch by batch (each batch is durable on its own)."""
    from tqdm.auto import tqdm

    batches = range(0, len(todo), batch_size)
    for start in tqdm(batches, desc=f"embed {label}", unit="batch", disable=not progress or not todo):
        batch = todo[start : start + batch_size]
        vectors = embedder.embed_documents([text for _, text, _ in batch])
        store.upsert([r[0] for r in batch], vectors, [r[1] for r in batch], [r[2] for r in batch])
    return len(todo)


def _index_file(doc: Document, store: Any, embedder: Any, config: IndexConfig, extractor: Any, sha: str,
                keys: tuple[str, str], report: IndexReport, progress: bool) -> None:
    """Steps 4 to 6 for one loaded file, then its bookkeeping row (written last)."""
    path = doc.path
    if doc.encoding != "utf-8":
        report.notes.append((str(path), f"not UTF-8; read as {doc.encoding}"))
    parents, wanted = _chunk(doc, config, embedder, extractor, keys, progress)
    todo, deleted = _replace_stale(store, doc.doc_id, wanted)
    report.deleted += deleted
    report.embedded += _embed_and_store(store, embedder, todo, config.embed_batch, path.name, progress)
    store.mark_file(doc.doc_id, {"path": str(path), "sha256": sha, "base_key": keys[0], "meta_key": keys[1],
                                 "records": len(wanted), "parents": len(parents)})
    report.indexed.append(str(path))
    report.parents += len(parents)


def _under(path: Path, roots: list[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def _remove_missing(store: Any, rows: dict[str, dict[str, Any]], sources: Sources, touched: set[str],
                    report: IndexReport, notify: Callable[[str, str], None]) -> None:
    """Step 7: forget the files that were indexed from under one of ``sources.paths`` and are gone."""
    roots = [p.resolve() for p in sources.paths]
    present = {str(p) for p in sources.files}
    for doc_id, row in rows.items():
        if doc_id not in touched and row["path"] not in present and _under(Path(row["path"]), roots):
            report.deleted += store.remove_document(doc_id)
            report.removed.append(row["path"])
            notify(row["path"], "removed")


def build_index(
    paths: list[str | Path] | Sources,
    store: Any,
    embedder: Any,
    config: IndexConfig | None = None,
    *,
    extractor: Any = None,
    progress: bool = True,
    on_file: Callable[[str, str], None] | None = None,
) -> IndexReport:
    """Index files and folders into ``store``, incrementally (the steps are in the module docstring).

    Args:
        paths: files and folders (PDF, text, Markdown), or the :class:`Sources` that
            :func:`find_sources` returned for them.
        store: a :class:`fourbit.rag.store.VectorStore` opened with ``create=True``.
        embedder: a :class:`fourbit.rag.embeddings.Embedder` (its tokenizer counts chunk lengths).
        config: sizes and metadata settings.
        extractor: a :class:`fourbit.rag.metadata.MetadataExtractor`; required when ``config.metadata``.
        progress: show progress bars.
        on_file: called with (path, status) for each file: "indexed", "unchanged", "skipped", "removed".

    Returns:
        An :class:`IndexReport`; files inside a folder that could not be used are in ``report.skipped``.

    Raises:
        FileNotFoundError / InputFileError / FieldError: a path is missing, a folder empty, a file named
            explicitly cannot be used, a setting is wrong; all raised before the index is touched.
        NothingIndexedError: every file found was skipped (``err.report`` says why each); the index is
            untouched.
    """
    config = config or IndexConfig()
    if config.metadata and extractor is None:
        raise FieldError("metadata", "generating metadata needs an LLM (an `extractor`)")
    sources = find_sources(paths)
    store.check_embedder(embedder.name, embedder.dim)
    rows = store.files()
    doc_ids = _assign_doc_ids(sources.files, rows)
    chunk_key = config.chunk.key()
    meta_key_cfg = extractor.key(config) if config.metadata else "none"
    report = IndexReport()
    notify = on_file or (lambda path, status: None)
    started = False

    for path in sources.files:
        doc_id = doc_ids[path]
        try:
            sha = sources.loaded[path].sha256 if path in sources.loaded else file_sha256(path)
            base_key, meta_key = _file_keys(sha, path, chunk_key, meta_key_cfg)
            unchanged = _is_unchanged(rows.get(doc_id), path, base_key, meta_key)
            doc = None if unchanged else _load(path, doc_id, sources)
        except (InputFileError, OSError) as err:  # only files found in a folder get here: skip, say why
            reason = err.message if isinstance(err, InputFileError) else f"cannot be read ({err.strerror or err})"
            log.debug("skipped %s: %s", path, reason)
            report.skipped.append((str(path), reason))
            notify(str(path), "skipped")
            continue
        if not started:  # the first usable file: only now does the run touch the index
            report.resumed, started = store.begin_run(), True
        if doc is None:
            report.unchanged.append(str(path))
            notify(str(path), "unchanged")
            continue
        _index_file(doc, store, embedder, config, extractor, sha, (base_key, meta_key), report, progress)
        notify(str(path), "indexed")

    if not started:
        raise NothingIndexedError(sources.paths, report)
    _remove_missing(store, rows, sources, set(doc_ids.values()), report, notify)
    store.end_run()
    return report
