"""Recursive retrieval: top-k distinct parents, checked against brute force over the stored vectors."""

from __future__ import annotations

import numpy as np
import pytest

from fourbit._errors import FieldError
from fourbit.rag.index import build_index
from fourbit.rag.retrieval import RETRIEVERS, Retriever
from fourbit.rag.store import open_store


@pytest.fixture(scope="module")
def store(tmp_path_factory, embedder, topic_text):
    from fourbit.rag.chunking import ChunkConfig
    from fourbit.rag.index import IndexConfig

    root = tmp_path_factory.mktemp("retrieval")
    (root / "docs").mkdir()
    for name in ("bread", "comets", "tomatoes"):
        (root / "docs" / f"{name}.txt").write_text(topic_text(name), encoding="utf-8")
    config = IndexConfig(chunk=ChunkConfig(parent_tokens=64, parent_overlap=0, child_tokens=(16, 32), child_overlap=0))
    store = open_store(root / "db", create=True, embedding=embedder.describe())
    build_index([root / "docs"], store, embedder, config, progress=False)
    return store


def _brute_force(store, embedder, question, kinds, k):
    got = store.collection.get(include=["embeddings", "metadatas"])
    q = embedder.embed_queries([question])[0]
    best: dict[str, float] = {}
    for vec, meta in zip(got["embeddings"], got["metadatas"], strict=True):
        if meta["kind"] in kinds:
            best[meta["parent_id"]] = max(best.get(meta["parent_id"], -2.0), float(np.dot(vec, q)))
    return sorted(best, key=lambda p: -best[p])[:k], best


@pytest.mark.parametrize("mode", ["baseline", "chunks", "all"])
def test_dense_retrievers_return_distinct_parents_like_brute_force(store, embedder, mode):
    question = "Which way does the tail of a comet point?"
    retriever = Retriever(store, embedder, mode, top_k=3)
    got = retriever.retrieve(question)
    expected, best = _brute_force(store, embedder, question, RETRIEVERS[mode], 3)
    assert [p.id for p in got] == expected
    assert len({p.id for p in got}) == 3
    for parent in got:
        # HNSW over a tiny set is exact; cosine in float32: 1e-4.
        assert parent.score == pytest.approx(best[parent.id], abs=1e-4)
        assert parent.via and all(ref.id.split("/")[0] == parent.id for ref in parent.via)
        assert parent.metadata["kind"] == "parent"
    assert "comet" in got[0].text.lower()


def test_top_k_larger_than_parents_returns_all(store, embedder):
    n_parents = len(store.collection.get(where={"kind": "parent"})["ids"])
    got = Retriever(store, embedder, "chunks", top_k=n_parents + 5).retrieve("bread")
    assert len(got) == n_parents == len({p.id for p in got})


def test_hybrid_fuses_dense_and_bm25(store, embedder):
    question = "blossom end rot calcium"
    hybrid = Retriever(store, embedder, "hybrid", top_k=2)
    got = hybrid.retrieve(question)
    assert len({p.id for p in got}) == 2
    # Reciprocal rank fusion recomputed from the two rankings of parents.
    n = len(store.collection.get(where={"kind": "parent"})["ids"])
    dense = [p.id for p in Retriever(store, embedder, "all", top_k=n).retrieve(question)]
    sparse = list(dict.fromkeys(h.metadata["parent_id"] for h in hybrid._bm25_hits(question)))
    fused = {p: 1 / (61 + dense.index(p)) + (1 / (61 + sparse.index(p)) if p in sparse else 0) for p in dense}
    assert [p.id for p in got] == sorted(fused, key=lambda p: -fused[p])[:2]
    assert [p.score for p in got] == pytest.approx(sorted(fused.values(), reverse=True)[:2])
    assert "Blossom end rot" in got[0].text
    assert any(ref.kind.startswith("bm25:") for ref in got[0].via)


def test_metadata_retriever_needs_metadata(store, embedder):
    with pytest.raises(FieldError, match="`metadata` questions,summary") as caught:
        Retriever(store, embedder, "metadata").retrieve("comets")
    assert caught.value.field == "retriever"
    with pytest.raises(FieldError, match="`retriever`"):
        Retriever(store, embedder, "nope")
    with pytest.raises(FieldError, match="`top_k`"):
        Retriever(store, embedder, "all", top_k=0)
