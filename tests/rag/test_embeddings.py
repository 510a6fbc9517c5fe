"""Embeddings: unit vectors, long texts embedded by all their pieces (no silent truncation)."""

from __future__ import annotations

import numpy as np

from fourbit.rag.embeddings import instruction_prefixes


def test_unit_vectors_and_query_document_agreement(embedder):
    docs = embedder.embed_documents(["Comets have tails.", "Bread needs yeast."])
    assert docs.shape == (2, embedder.dim) and docs.dtype == np.float32
    # float32 norms: within 1e-5 of 1.
    np.testing.assert_allclose(np.linalg.norm(docs, axis=1), 1.0, atol=1e-5)
    query = embedder.embed_queries(["Why does a comet have a tail?"])[0]
    assert query @ docs[0] > query @ docs[1]


def test_long_text_is_the_mean_of_all_its_pieces(embedder, topic_text):
    text = " ".join(topic_text(name, repeat=3) for name in ("bread", "comets", "tomatoes"))
    assert embedder.count_tokens(text) > 2 * embedder.max_tokens
    pieces = embedder._pieces(text, embedder.document_prefix)
    assert len(pieces) >= 3
    # The pieces tile the text: nothing dropped.
    assert "".join(pieces).replace(" ", "") == text.replace(" ", "")
    # Independent reference: sentence-transformers on each piece, token-weighted mean, renormalised.
    raw = embedder.model.encode(pieces, normalize_embeddings=True)
    weights = np.array([embedder.count_tokens(p) for p in pieces], dtype=np.float64)
    expected = (raw * weights[:, None]).sum(0)
    expected /= np.linalg.norm(expected)
    got = embedder.embed_documents([text])[0]
    # Same model, same inputs, batch composition may differ: float32 noise only.
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # Truncation would embed only the first piece, which is about bread, not comets or tomatoes.
    truncated = embedder.model.encode([text], normalize_embeddings=True)[0]
    assert float(got @ truncated) < 0.99
    q = embedder.embed_queries(["Where do long-period comets come from?"])[0]
    assert q @ got > q @ truncated


def test_instruction_prefixes():
    assert instruction_prefixes("intfloat/e5-small-v2") == ("query: ", "passage: ")
    assert instruction_prefixes("BAAI/bge-small-en-v1.5")[0].startswith("Represent this sentence")
    assert instruction_prefixes("hkunlp/instructor-base")[1].startswith("Represent the document")
    assert instruction_prefixes("all-MiniLM-L6-v2") == ("", "")
