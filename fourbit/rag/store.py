"""The vector store: Chroma, embedded (PersistentClient at ``--db DIR``) or a server (HttpClient).

One index is two Chroma collections:

* ``<index>``: every embedded record. Parents (``kind="parent"``) hold the text the LLM reads; child
  chunks (``kind="chunk"``), generated questions (``kind="question"``) and summaries (``kind="summary"``)
  are references whose ``parent_id`` names their parent. Each record's ``src_key`` is a hash of its
  file's bytes and of the chunking/metadata settings, so stale records are recognised.
* ``<index>.files``: one bookkeeping row per indexed file (path, ``src_key``, record count), written
  only after all the file's records are in; a file whose row matches is skipped without being read.
  Chroma rows need a vector, so these hold a constant 1-d one. Its collection metadata says whether the
  last indexing run finished (``{"run": "complete"}``) or was interrupted (``"in progress"``), so a
  query on an index left half-built by a killed run says so instead of looking complete.

The collection's metadata records the embedding model and dimension; opening the index with another
model raises, so an index never mixes vector spaces.

Chroma's own failures become errors that say what to do: a damaged or truncated database file
(``chromadb.errors.InternalError``) is an :class:`~fourbit._errors.InputFileError` naming the ``db`` folder,
and a server that does not answer is a :class:`~fourbit._errors.FieldError` naming its host and port.
"""

from __future__ import annotations

import contextlib
import functools
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from fourbit._errors import FieldError, InputFileError

__all__ = ["KINDS", "StoreHit", "VectorStore", "index_info", "open_store", "server_heartbeat"]

KINDS = ("parent", "chunk", "question", "summary")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{1,60}[A-Za-z0-9]$")
_BATCH = 512


@dataclass
class StoreHit:
    """One record returned by a similarity query."""

    id: str
    score: float  # cosine similarity, 1 = same direction
    text: str
    metadata: dict[str, Any]


_F = TypeVar("_F", bound=Callable[..., Any])


@dataclass
class _Created:
    """What :func:`open_store` created, so that a run that wrote nothing can leave no trace
    (:meth:`VectorStore.discard_created`)."""

    folder: bool = False  # the ``db`` folder itself
    database: bool = False  # the database files inside it
    entries_before: frozenset[Path] = frozenset()  # what the folder held before
    collections: tuple[str, ...] = ()


@contextlib.contextmanager
def _chroma_errors(db: Path | None, host: str | None, port: int) -> Iterator[None]:
    """Turn Chroma's failures into errors that name the database folder or the server."""
    from chromadb.errors import InternalError

    try:
        yield
    except InternalError as err:
        if host:
            raise FieldError("chroma_host", f"the Chroma server at {host}:{port} failed ({err}); check its log") \
                from None
        text = str(err).lower()
        if "readonly" in text or "read-only" in text:
            raise FieldError("db_path", f"{db}: the index database cannot be written ({err}); choose a writable "
                                        "folder") from None
        if "locked" in text:
            raise FieldError("db_path", f"{db}: the index database is in use by another process ({err}); wait for "
                                        "it to finish") from None
        raise InputFileError(db, f"the index database is damaged or truncated ({err}); index your documents "
                                 "again into a new folder (`db_path`), or delete this one") from None
    except Exception as err:
        if host and _is_connection_error(err):
            raise _server_down(host, port) from None
        raise


def _is_connection_error(err: Exception) -> bool:
    import httpx

    return isinstance(err, httpx.TransportError | ConnectionError) or "Could not connect" in str(err)


def _server_down(host: str, port: int) -> FieldError:
    return FieldError("chroma_host", f"no Chroma server answers at {host}:{port}; start one (chroma run --path "
                                     f"DIR --host {host} --port {port}) or check `chroma_host` and `chroma_port`")


def _guarded(method: _F) -> _F:
    """Run a :class:`VectorStore` method under :func:`_chroma_errors`."""

    @functools.wraps(method)
    def wrapper(self: VectorStore, *args: Any, **kwargs: Any) -> Any:
        with _chroma_errors(self.db, self.host, self.port):
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _settings() -> Any:
    from chromadb.config import Settings

    # No internet here and no phoning home anywhere: telemetry off.
    return Settings(anonymized_telemetry=False, allow_reset=False)


class VectorStore:
    """An index in Chroma (see the module docstring for its layout). Build it with :func:`open_store`."""

    def __init__(self, client: Any, collection: Any, files: Any, location: str, *, db: Path | None = None,
                 host: str | None = None, port: int = 8000, created: _Created | None = None) -> None:
        self.client = client
        self.collection = collection
        self.files_collection = files
        self.location = location
        self.db, self.host, self.port = db, host, port
        self.created = created or _Created()

    @_guarded
    def discard_created(self) -> None:
        """Undo what :func:`open_store` created, for a run that wrote nothing: the collections it made and,
        when the database did not exist before, its files (and the ``db`` folder when it made that too).
        An index that existed is left exactly as it was; the store cannot be used afterwards."""
        for name in self.created.collections:
            self.client.delete_collection(name)
        if self.db is None or not self.created.database:
            return
        self.client.close()  # releases the SQLite file before it is removed
        if self.created.folder:
            shutil.rmtree(self.db, ignore_errors=True)
            return
        for entry in set(self.db.iterdir()) - self.created.entries_before:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)

    # ---- description -------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.collection.name

    @property
    @_guarded
    def info(self) -> dict[str, Any]:
        """The collection's metadata (embedding model and dimension, settings)."""
        return dict(self.collection.metadata or {})

    def check_embedder(self, name: str, dim: int) -> None:
        """Raise FieldError when the index was built with another embedding model."""
        info = self.info
        if info.get("embedding_model") != name or int(info.get("embedding_dim", -1)) != dim:
            raise FieldError(
                "embedding_model",
                f"index {self.name!r} at {self.location} was built with embedding model "
                f"{info.get('embedding_model')!r} (dim {info.get('embedding_dim')}), not {name!r} (dim {dim}); "
                "pass the same `embedding_model` or index into another `db_path` or `index`",
            )

    @_guarded
    def count(self) -> int:
        """Records in the index (parents and references)."""
        return self.collection.count()

    # ---- records ---------------------------------------------------------------------------------
    @_guarded
    def upsert(self, ids: list[str], vectors: np.ndarray, texts: list[str], metadatas: list[dict]) -> None:
        """Write records (ids are stable, so writing one twice replaces it: no duplicates)."""
        assert len(ids) == len(vectors) == len(texts) == len(metadatas)
        for start in range(0, len(ids), _BATCH):
            end = start + _BATCH
            self.collection.upsert(
                ids=ids[start:end],
                embeddings=np.asarray(vectors[start:end], dtype=np.float32),
                documents=texts[start:end],
                metadatas=metadatas[start:end],
            )

    @_guarded
    def records_of(self, doc_id: str) -> dict[str, dict[str, Any]]:
        """id -> metadata of every record of a document."""
        got = self.collection.get(where={"doc_id": doc_id}, include=["metadatas"])
        return dict(zip(got["ids"], got["metadatas"], strict=True))

    @_guarded
    def delete_ids(self, ids: list[str]) -> None:
        for start in range(0, len(ids), _BATCH):
            self.collection.delete(ids=ids[start : start + _BATCH])

    @_guarded
    def get(self, ids: list[str]) -> dict[str, tuple[str, dict[str, Any]]]:
        """id -> (text, metadata) for the ids that exist."""
        if not ids:
            return {}
        got = self.collection.get(ids=list(dict.fromkeys(ids)), include=["documents", "metadatas"])
        return {i: (d, m) for i, d, m in zip(got["ids"], got["documents"], got["metadatas"], strict=True)}

    @_guarded
    def all_records(self, kinds: tuple[str, ...] = KINDS) -> tuple[list[str], list[str], list[dict]]:
        """(ids, texts, metadatas) of every record of the given kinds (for BM25)."""
        got = self.collection.get(where={"kind": {"$in": list(kinds)}}, include=["documents", "metadatas"])
        return got["ids"], got["documents"], got["metadatas"]

    @_guarded
    def query(self, vector: np.ndarray, n: int, kinds: tuple[str, ...] = KINDS) -> list[StoreHit]:
        """The ``n`` records of the given kinds nearest to ``vector`` (cosine), best first."""
        n = min(n, self.count())
        if n <= 0:
            return []
        res = self.collection.query(
            query_embeddings=[np.asarray(vector, dtype=np.float32)],
            n_results=n,
            where={"kind": {"$in": list(kinds)}},
            include=["documents", "metadatas", "distances"],
        )
        return [
            StoreHit(id=i, score=1.0 - float(dist), text=doc, metadata=meta)
            for i, doc, meta, dist in zip(
                res["ids"][0], res["documents"][0], res["metadatas"][0], res["distances"][0], strict=True
            )
        ]

    # ---- runs and file bookkeeping ---------------------------------------------------------------------
    @property
    @_guarded
    def interrupted(self) -> bool:
        """True when an indexing run started on this index and did not finish (killed, or failed)."""
        return (self.files_collection.metadata or {}).get("run") == "in progress"

    @_guarded
    def begin_run(self) -> bool:
        """Record that an indexing run starts; returns whether the previous one was interrupted."""
        interrupted = self.interrupted
        self.files_collection.modify(metadata={"run": "in progress"})
        return interrupted

    @_guarded
    def end_run(self) -> None:
        """Record that the indexing run finished: every file it found is indexed or reported."""
        self.files_collection.modify(metadata={"run": "complete"})

    @_guarded
    def files(self) -> dict[str, dict[str, Any]]:
        """doc_id -> bookkeeping row of every completely indexed file."""
        got = self.files_collection.get(include=["metadatas"])
        return dict(zip(got["ids"], got["metadatas"], strict=True))

    @_guarded
    def mark_file(self, doc_id: str, row: dict[str, Any]) -> None:
        """Record that every record of ``doc_id`` is written (call last)."""
        self.files_collection.upsert(ids=[doc_id], embeddings=[[1.0]], documents=[row["path"]], metadatas=[row])

    @_guarded
    def unmark_file(self, doc_id: str) -> None:
        self.files_collection.delete(ids=[doc_id])

    @_guarded
    def remove_document(self, doc_id: str) -> int:
        """Delete a document's records and its bookkeeping row; returns the records deleted."""
        self.unmark_file(doc_id)  # first: a crash in between leaves a file to re-index, never a lie
        ids = list(self.records_of(doc_id))
        self.delete_ids(ids)
        return len(ids)


def _check_name(index: str) -> None:
    if not _NAME.match(index):
        raise FieldError("index", f"{index!r}: use 3-62 characters of [A-Za-z0-9_-], alphanumeric at both ends")


def _db_folder(db: str | Path | None, create: bool) -> Path:
    if db is None:
        raise FieldError("db_path", "give the folder of the index database (or `chroma_host` for a Chroma server)")
    folder = Path(db).expanduser()
    if folder.exists() and not folder.is_dir():
        raise FieldError("db_path", f"{db} exists and is not a folder")
    if not create and not (folder / "chroma.sqlite3").exists():
        raise FieldError("db_path", f"{db}: no index database there; index documents into this `db_path` first "
                                    "(fourbit rag index PATH)")
    return folder


def server_heartbeat(host: str, port: int = 8000, timeout: float = 5.0) -> int:
    """Ask the Chroma server at ``host:port`` for its heartbeat (nanoseconds since the epoch).

    Raises:
        FieldError: naming ``chroma_host``, ``host:port``: no server answers.
    """
    import httpx

    try:
        reply = httpx.get(f"http://{host}:{port}/api/v2/heartbeat", timeout=timeout)
        reply.raise_for_status()
        return int(next(iter(reply.json().values())))
    except (httpx.HTTPError, ValueError, StopIteration, TypeError):
        raise _server_down(host, port) from None


def _client(db: str | Path | None, host: str | None, port: int, create: bool,
            created: _Created | None = None) -> tuple[Any, str, Path | None]:
    """(client, location, folder); ``created`` (when given) is filled in with the folder and database made."""
    import chromadb

    if host:
        server_heartbeat(host, port)
        with _chroma_errors(None, host, port):
            return chromadb.HttpClient(host=host, port=port, settings=_settings()), f"http://{host}:{port}", None
    folder = _db_folder(db, create)
    if created is not None:
        created.folder = not folder.exists()
        created.database = not (folder / "chroma.sqlite3").exists()
        created.entries_before = frozenset(folder.iterdir()) if folder.is_dir() else frozenset()
    folder.mkdir(parents=True, exist_ok=True)
    with _chroma_errors(folder, None, port):
        return chromadb.PersistentClient(path=str(folder), settings=_settings()), str(folder), folder


def _collection_names(client: Any) -> set[str]:
    return {c if isinstance(c, str) else c.name for c in client.list_collections()}


def index_info(
    db: str | Path | None = None, *, index: str = "fourbit", host: str | None = None, port: int = 8000
) -> dict[str, Any] | None:
    """What an existing index records (embedding model and dimension), or None when there is none yet.

    Creates nothing: a ``db`` folder without a database is not opened. Cheap next to loading an embedding
    model, so the command line asks it first, to fail early on a damaged database or a server that is down.

    Raises:
        FieldError / InputFileError: as :func:`open_store`.
    """
    _check_name(index)
    if not host and not (_db_folder(db, create=True) / "chroma.sqlite3").exists():
        return None
    client, _, folder = _client(db, host, port, create=False)
    with _chroma_errors(folder, host, port):
        if index not in _collection_names(client):
            return None
        return dict(client.get_collection(index, embedding_function=None).metadata or {})


def open_store(
    db: str | Path | None = None,
    *,
    index: str = "fourbit",
    host: str | None = None,
    port: int = 8000,
    create: bool = False,
    embedding: dict[str, Any] | None = None,
) -> VectorStore:
    """Open (or create) an index.

    Args:
        db: folder of an embedded Chroma database; ignored when ``host`` is given.
        index: collection name, 3-62 characters of ``[A-Za-z0-9_-]``.
        host / port: a Chroma server (it must answer a heartbeat).
        create: create the database and collection when missing (indexing); otherwise they must exist.
        embedding: ``{"embedding_model": name, "embedding_dim": dim}`` to record in a new collection and
            to check against an existing one.

    Returns:
        The :class:`VectorStore`.

    Raises:
        FieldError: bad ``index`` name, no ``db``, no database or no such index there (without ``create``),
            embedding model mismatch, no server answering at ``host:port``.
        InputFileError: the database in ``db`` is damaged or truncated.
    """
    _check_name(index)
    created = _Created()
    client, location, folder = _client(db, host, port, create, created)
    with _chroma_errors(folder, host, port):
        existing = _collection_names(client)
        created.collections = tuple(name for name in (index, f"{index}.files") if name not in existing)
        if index not in existing:
            if not create:
                known = ", ".join(sorted(n for n in existing if not n.endswith(".files"))) or "none"
                raise FieldError("index", f"{index!r}: no such index at {location} (indexes there: {known})")
            if embedding is None:
                raise FieldError("embedding", "creating an index needs the embedding model's name and dimension")
            collection = client.create_collection(
                index, metadata=dict(embedding), configuration={"hnsw": {"space": "cosine"}},
                embedding_function=None,
            )
        else:
            collection = client.get_collection(index, embedding_function=None)
        files = client.get_or_create_collection(f"{index}.files", embedding_function=None)
    store = VectorStore(client, collection, files, location, db=folder, host=host, port=port, created=created)
    if embedding is not None:
        store.check_embedder(embedding["embedding_model"], int(embedding["embedding_dim"]))
    return store
