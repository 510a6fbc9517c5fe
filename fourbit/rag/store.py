"""The vector store: Chroma, embedded (PersistentClient at ``--db DIR``) or a server (HttpClient).

One index is two Chroma collections:

* ``<index>``: every embedded record. Parents (``kind="parent"``) hold the text the LLM reads; child
  chunks (``kind="chunk"``), generated questions (``kind="question"``) and summaries (``kind="summary"``)
  are references whose ``parent_id`` names their parent. Each record's ``src_key`` is a hash of its
  file's bytes and of the chunking/metadata settings, so stale records are recognised.
* ``<index>.files``: one bookkeeping row per indexed file (path, ``src_key``, record count), written
  only after all the file's records are in; a file whose row matches is skipped without being read.
  Chroma rows need a vector, so these hold a constant 1-d one.

The collection's metadata records the embedding model and dimension; opening the index with another
model raises, so an index never mixes vector spaces.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["KINDS", "StoreHit", "VectorStore", "open_store"]

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


def _settings() -> Any:
    from chromadb.config import Settings

    # No internet here and no phoning home anywhere: telemetry off.
    return Settings(anonymized_telemetry=False, allow_reset=False)


class VectorStore:
    """An index in Chroma (see the module docstring for its layout). Build it with :func:`open_store`."""

    def __init__(self, client: Any, collection: Any, files: Any, location: str) -> None:
        self.client = client
        self.collection = collection
        self.files_collection = files
        self.location = location

    # ---- description -------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.collection.name

    @property
    def info(self) -> dict[str, Any]:
        """The collection's metadata (embedding model and dimension, settings)."""
        return dict(self.collection.metadata or {})

    def check_embedder(self, name: str, dim: int) -> None:
        """Raise ValueError when the index was built with another embedding model."""
        info = self.info
        if info.get("embedding_model") != name or int(info.get("embedding_dim", -1)) != dim:
            raise ValueError(
                f"index {self.name!r} at {self.location} was built with embedding model "
                f"{info.get('embedding_model')!r} (dim {info.get('embedding_dim')}), not {name!r} (dim {dim}); "
                "pass the same --embedding-model or index into another --db/--index"
            )

    def count(self) -> int:
        """Records in the index (parents and references)."""
        return self.collection.count()

    # ---- records ---------------------------------------------------------------------------------
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

    def records_of(self, doc_id: str) -> dict[str, dict[str, Any]]:
        """id -> metadata of every record of a document."""
        got = self.collection.get(where={"doc_id": doc_id}, include=["metadatas"])
        return dict(zip(got["ids"], got["metadatas"], strict=True))

    def delete_ids(self, ids: list[str]) -> None:
        for start in range(0, len(ids), _BATCH):
            self.collection.delete(ids=ids[start : start + _BATCH])

    def get(self, ids: list[str]) -> dict[str, tuple[str, dict[str, Any]]]:
        """id -> (text, metadata) for the ids that exist."""
        if not ids:
            return {}
        got = self.collection.get(ids=list(dict.fromkeys(ids)), include=["documents", "metadatas"])
        return {i: (d, m) for i, d, m in zip(got["ids"], got["documents"], got["metadatas"], strict=True)}

    def all_records(self, kinds: tuple[str, ...] = KINDS) -> tuple[list[str], list[str], list[dict]]:
        """(ids, texts, metadatas) of every record of the given kinds (for BM25)."""
        got = self.collection.get(where={"kind": {"$in": list(kinds)}}, include=["documents", "metadatas"])
        return got["ids"], got["documents"], got["metadatas"]

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

    # ---- file bookkeeping ----------------------------------------------------------------------------
    def files(self) -> dict[str, dict[str, Any]]:
        """doc_id -> bookkeeping row of every completely indexed file."""
        got = self.files_collection.get(include=["metadatas"])
        return dict(zip(got["ids"], got["metadatas"], strict=True))

    def mark_file(self, doc_id: str, row: dict[str, Any]) -> None:
        """Record that every record of ``doc_id`` is written (call last)."""
        self.files_collection.upsert(ids=[doc_id], embeddings=[[1.0]], documents=[row["path"]], metadatas=[row])

    def unmark_file(self, doc_id: str) -> None:
        self.files_collection.delete(ids=[doc_id])

    def remove_document(self, doc_id: str) -> int:
        """Delete a document's records and its bookkeeping row; returns the records deleted."""
        self.unmark_file(doc_id)  # first: a crash in between leaves a file to re-index, never a lie
        ids = list(self.records_of(doc_id))
        self.delete_ids(ids)
        return len(ids)


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
        db: folder of an embedded Chroma database (``--db``); ignored when ``host`` is given.
        index: collection name (``--index``), 3-62 characters of ``[A-Za-z0-9_-]``.
        host / port: a Chroma server (``--chroma-host``/``--chroma-port``).
        create: create the database and collection when missing (indexing); otherwise they must exist.
        embedding: ``{"embedding_model": name, "embedding_dim": dim}`` to record in a new collection and
            to check against an existing one.

    Returns:
        The :class:`VectorStore`.

    Raises:
        ValueError: bad index name, no --db, missing index, embedding model mismatch.
        FileNotFoundError: ``--db`` holds no database and ``create`` is False.
    """
    import chromadb

    if not _NAME.match(index):
        raise ValueError(f"--index {index!r}: use 3-62 characters of [A-Za-z0-9_-], alphanumeric at both ends")
    if host:
        client = chromadb.HttpClient(host=host, port=port, settings=_settings())
        location = f"http://{host}:{port}"
    else:
        if db is None:
            raise ValueError("--db DIR is required (or --chroma-host for a Chroma server)")
        folder = Path(db).expanduser()
        if not create and not (folder / "chroma.sqlite3").exists():
            raise FileNotFoundError(f"--db {db}: no index database there; build one with `fourbit rag index PATH --db {db}`")
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"--db {db}: exists and is not a folder")
        folder.mkdir(parents=True, exist_ok=True)
        client = chromadb.PersistentClient(path=str(folder), settings=_settings())
        location = str(folder)
    existing = {c if isinstance(c, str) else c.name for c in client.list_collections()}
    if index not in existing:
        if not create:
            known = ", ".join(sorted(n for n in existing if not n.endswith(".files"))) or "none"
            raise ValueError(f"--index {index!r}: no such index at {location} (indexes there: {known})")
        if embedding is None:
            raise ValueError("creating an index needs the embedding model's name and dimension")
        collection = client.create_collection(
            index, metadata=dict(embedding), configuration={"hnsw": {"space": "cosine"}}, embedding_function=None
        )
    else:
        collection = client.get_collection(index, embedding_function=None)
    files = client.get_or_create_collection(f"{index}.files", embedding_function=None)
    store = VectorStore(client, collection, files, location)
    if embedding is not None:
        store.check_embedder(embedding["embedding_model"], int(embedding["embedding_dim"]))
    return store
