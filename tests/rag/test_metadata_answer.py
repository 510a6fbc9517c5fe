"""Metadata extraction (parsing, batching, caching, indexing) and answering, with a scripted LLM."""

from __future__ import annotations

import re

import pytest

from fourbit.rag.answer import answer_question
from fourbit.rag.index import IndexConfig, build_index
from fourbit.rag.metadata import MetadataCache, MetadataExtractor, parse_questions, parse_summary
from fourbit.rag.retrieval import Retriever
from fourbit.rag.store import open_store


class ScriptedLLM:
    """Deterministic stand-in: questions and summaries built from the prompt's first sentence."""

    name = "scripted"

    def __init__(self):
        self.calls: list[int] = []  # batch sizes

    @staticmethod
    def _content(prompt) -> str:
        return prompt if isinstance(prompt, str) else prompt[-1]["content"]

    def generate(self, prompts, max_new_tokens=128):
        self.calls.append(len(prompts))
        out = []
        for prompt in prompts:
            content = self._content(prompt)
            first = re.split(r"(?<=\.)\s", content.removeprefix("Text:\n"))[0].rstrip(".")
            if "questions" in content.rsplit("\n", 1)[-1]:
                out.append(f"1. Is it true that {first}?\n2. ok\nHere are questions that you asked?")
            elif "Summarize" in content:
                out.append(f"Summary: {first}. More words.")
            else:
                out.append(f"ANSWER from {content.count('[')} parents")
        return out

    def stream(self, prompt, max_new_tokens=256):
        text = self.generate([prompt], max_new_tokens)[0]
        yield from text.split(" ")[:1] + [" " + w for w in text.split(" ")[1:]]


def test_parse_questions_keeps_real_questions():
    raw = "1. What is NF4?\n2) Paged optimizers.\n- How does double quantization save memory? Why use it here?\n" \
          "Q3: What is NF4?\nWrite 3 questions that the text answers?"
    # Numbering and bullets stripped; statements, duplicates and echoes of the instruction dropped.
    assert parse_questions(raw, 5) == ["What is NF4?", "How does double quantization save memory?", "Why use it here?"]
    assert parse_questions(raw, 1) == ["What is NF4?"]
    assert parse_questions("Is it?\nA comet.", 3) == []  # too short to be a useful question


def test_parse_summary():
    assert parse_summary("Summary: Comets are icy bodies. They glow.") == "Comets are icy bodies."
    assert parse_summary("ok") == ""


def test_extraction_is_batched_and_cached(tmp_path, docs_dir, embedder, small_config):
    from fourbit.rag.chunking import split_parents
    from fourbit.rag.loaders import load_document

    parents = split_parents(load_document(docs_dir / "comets.txt"), small_config.chunk, embedder.tokenizer)
    config = IndexConfig(chunk=small_config.chunk, metadata=("questions", "summary"), n_questions=2)
    llm = ScriptedLLM()
    extractor = MetadataExtractor(llm, MetadataCache(tmp_path / "cache.json"), batch_size=2)
    first = extractor.extract(parents, config, progress=False)
    assert extractor.generated == 2 * len(parents)
    assert max(llm.calls) == 2  # batches of at most batch_size prompts
    for p in parents:
        assert first[p.id]["questions"] and all(q.endswith("?") for q in first[p.id]["questions"])
        assert first[p.id]["summary"]
    # A new extractor on the same cache file generates nothing and returns the same metadata.
    again = MetadataExtractor(ScriptedLLM(), MetadataCache(tmp_path / "cache.json"))
    assert again.extract(parents, config, progress=False) == first and again.generated == 0


def test_metadata_index_and_retrieval(tmp_path, docs_dir, embedder, small_config):
    config = IndexConfig(chunk=small_config.chunk, metadata=("questions", "summary"), n_questions=2)
    store = open_store(tmp_path / "db", create=True, embedding=embedder.describe())
    extractor = MetadataExtractor(ScriptedLLM(), MetadataCache(tmp_path / "cache.json"))
    build_index([docs_dir], store, embedder, config, extractor=extractor, progress=False)
    kinds = {m["kind"] for m in store.collection.get(include=["metadatas"])["metadatas"]}
    assert kinds == {"parent", "chunk", "question", "summary"}
    got = Retriever(store, embedder, "metadata", top_k=2).retrieve("Is it true that a comet has a tail?")
    assert len({p.id for p in got}) == 2
    assert all(ref.kind in ("question", "summary") and ref.id.startswith(p.id + "/") for p in got for ref in p.via)
    # Unchanged re-index: no generation, no embedding.
    generated = extractor.generated
    report = build_index([docs_dir], store, embedder, config, extractor=extractor, progress=False)
    assert report.embedded == 0 and extractor.generated == generated


def test_answer_streams_and_cites(tmp_path, docs_dir, embedder, small_config):
    store = open_store(tmp_path / "db", create=True, embedding=embedder.describe())
    build_index([docs_dir], store, embedder, small_config, progress=False)
    retriever = Retriever(store, embedder, "chunks", top_k=2)
    pieces: list[str] = []
    answer = answer_question("What causes blossom end rot?", retriever, ScriptedLLM(), on_text=pieces.append)
    # The LLM is given one context per parent that yields evidence sentences (grounded answers).
    grounded = len({e.parent_id for e in answer.evidence})
    assert answer.generated == "".join(pieces).strip() == f"ANSWER from {grounded} parents"
    # Not what the evidence says: the best evidence sentence is shown instead (tests/rag/test_support.py).
    assert answer.answer_kind == "evidence" and answer.text == answer.evidence[0].text
    assert [s.id for s in answer.sources] == [p.id for p in retriever.retrieve("What causes blossom end rot?")]
    assert {e.parent_id for e in answer.evidence} <= {s.id for s in answer.sources}
    assert "blossom end rot" in answer.evidence[0].text.lower()
    row = answer.as_dict()["sources"][0]
    assert set(row) >= {"id", "score", "page", "text", "source"}
    with pytest.raises(ValueError, match="empty"):
        answer_question("  ", retriever, ScriptedLLM())
