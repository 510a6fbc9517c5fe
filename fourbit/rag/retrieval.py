"""Recursive retrieval: match references (parents, child chunks, generated questions/summaries), return
the DISTINCT parents they point at.

Retrievers:

* ``baseline``: parents only (each embedded whole, by its pieces; see embeddings.py);
* ``chunks``: child chunks -> parents;
* ``metadata``: generated questions and summaries -> parents;
* ``all``: every kind of record -> parents;
* ``hybrid``: the ``all`` dense ranking and a BM25 ranking (bm25s, over the same records), each reduced
  to a ranking of parents, fused by reciprocal rank (Cormack et al. 2009): score = sum 1 / (60 + rank).

A parent's dense score is that of its best reference. ``top_k`` counts distinct parents: the store is
queried for more references until ``top_k`` distinct parents are found or the index is exhausted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fourbit._errors import FieldError

__all__ = ["RETRIEVERS", "Reference", "Retrieved", "Retriever"]

RETRIEVERS: dict[str, tuple[str, ...]] = {
    "baseline": ("parent",),
    "chunks": ("chunk",),
    "metadata": ("question", "summary"),
    "all": ("parent", "chunk", "question", "summary"),
    "hybrid": ("parent", "chunk", "question", "summary"),
}
_RRF_K = 60


@dataclass
class Reference:
    """A record that led to a parent."""

    id: str
    kind: str
    score: float
    text: str


@dataclass
class Retrieved:
    """A retrieved parent with the references that led to it (best first)."""

    id: str
    score: float
    text: str
    metadata: dict[str, Any]
    via: list[Reference] = field(default_factory=list)

    @property
    def page(self) -> str:
        return str(self.metadata.get("page", "?"))

    @property
    def source(self) -> str:
        return str(self.metadata.get("source", "?"))


def _rank_parents(hits: list[Any]) -> tuple[list[str], dict[str, list[Reference]], dict[str, float]]:
    order: list[str] = []
    via: dict[str, list[Reference]] = {}
    best: dict[str, float] = {}
    for hit in hits:
        parent = hit.metadata["parent_id"]
        if parent not in via:
            order.append(parent)
            via[parent] = []
            best[parent] = hit.score
        via[parent].append(Reference(hit.id, hit.metadata["kind"], hit.score, hit.text))
    return order, via, best


class Retriever:
    """Retrieve the top-k distinct parents for a question.

    Args:
        store: a :class:`fourbit.rag.store.VectorStore`.
        embedder: the :class:`fourbit.rag.embeddings.Embedder` the index was built with (checked).
        mode: one of :data:`RETRIEVERS`.
        top_k: distinct parents returned.

    Raises:
        FieldError: unknown mode, top_k < 1, the index holds no record of the kinds the mode needs, or was
            built with another embedding model.
    """

    def __init__(self, store: Any, embedder: Any, mode: str = "all", top_k: int = 2) -> None:
        if mode not in RETRIEVERS:
            raise FieldError("retriever", f"{mode!r}: choose from {', '.join(RETRIEVERS)}")
        if top_k < 1:
            raise FieldError("top_k", f"must be >= 1, got {top_k}")
        store.check_embedder(embedder.name, embedder.dim)
        self.store, self.embedder, self.mode, self.top_k = store, embedder, mode, top_k
        self.kinds = RETRIEVERS[mode]
        self._bm25: Any = None

    def _dense(self, question: str, want: int) -> list[Any]:
        vector = self.embedder.embed_queries([question])[0]
        total = self.store.count()
        n = max(4 * want, 16)
        while True:
            hits = self.store.query(vector, n, self.kinds)
            distinct = len({h.metadata["parent_id"] for h in hits})
            if distinct >= want or len(hits) < n or n >= total:
                return hits
            n *= 4

    def _bm25_hits(self, question: str) -> list[Any]:
        import bm25s
        import numpy as np

        from fourbit.rag.store import StoreHit

        if self._bm25 is None:
            ids, texts, metas = self.store.all_records(self.kinds)
            retriever = bm25s.BM25()
            retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
            self._bm25 = (retriever, ids, texts, metas)
        retriever, ids, texts, metas = self._bm25
        tokens = bm25s.tokenize([question], stopwords="en", show_progress=False)
        if not tokens.vocab:
            return []
        docs, scores = retriever.retrieve(tokens, k=len(ids), show_progress=False)
        return [
            StoreHit(ids[int(d)], float(s), texts[int(d)], metas[int(d)])
            for d, s in zip(np.asarray(docs[0]), np.asarray(scores[0]), strict=True)
            if s > 0
        ]

    def retrieve(self, question: str, top_k: int | None = None) -> list[Retrieved]:
        """The top-k distinct parents for ``question``, best first, each with its trace (``via``)."""
        k = top_k or self.top_k
        if self.store.count() == 0:
            raise FieldError("index", f"{self.store.name!r} is empty; index some documents first")
        order, via, best = _rank_parents(self._dense(question, k))
        if self.mode == "hybrid":
            sparse_order, sparse_via, _ = _rank_parents(self._bm25_hits(question))
            fused: dict[str, float] = {}
            for ranking in (order, sparse_order):
                for rank, parent in enumerate(ranking):
                    fused[parent] = fused.get(parent, 0.0) + 1.0 / (_RRF_K + rank + 1)
            for parent, refs in sparse_via.items():
                # Dense references first, then the best BM25 ones (a record may appear in both).
                via[parent] = via.get(parent, [])[:3] + [
                    Reference(r.id, f"bm25:{r.kind}", r.score, r.text) for r in refs[:2]
                ]
            order = sorted(fused, key=lambda p: -fused[p])
            best = fused
        elif not order:
            raise FieldError(
                "retriever", f"{self.mode}: the index has no {'/'.join(self.kinds)} records (index with "
                "`metadata` questions,summary for the metadata retriever)"
            )
        chosen = order[:k]
        parents = self.store.get(chosen)
        return [
            Retrieved(id=p, score=best[p], text=parents[p][0], metadata=parents[p][1], via=via.get(p, [])[:5])
            for p in chosen
            if p in parents
        ]
