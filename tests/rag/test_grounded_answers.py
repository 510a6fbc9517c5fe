"""Grounded answers in the rag layer: the evidence comes from the retrieved parents and fits the token budget;
``rag query`` prints it (and --json carries it); ``rag query --questions FILE.jsonl`` answers many questions in
one process, one JSON line each; bad lines name the file and line before anything loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _cli import assert_clean_error, run_cli

from fourbit.rag.answer import answer_question, read_question_file
from fourbit.rag.grounding import DEFAULT_EVIDENCE_TOKENS, evidence_budget, grounded_prompt, split_sentences
from fourbit.rag.index import build_index
from fourbit.rag.retrieval import Retriever
from fourbit.rag.store import open_store

SMALL = ["--parent-tokens", "64", "--parent-overlap", "0", "--child-tokens", "16,32", "--child-overlap", "0"]


class EchoLLM:
    """Stand-in LLM: answers with the number of contexts it was given; records its prompts."""

    name = "echo"

    def __init__(self, window: int | None = None):
        self.prompts: list = []
        if window is not None:
            self.context_window = window

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def render(self, prompt) -> str:
        return "\n".join(m["content"] for m in prompt)

    def generate(self, prompts, max_new_tokens=128):
        self.prompts.extend(prompts)
        return [f"{p[-1]['content'].count('[')} contexts" for p in prompts]

    def stream(self, prompt, max_new_tokens=256):
        yield from self.generate([prompt], max_new_tokens)


@pytest.fixture
def index(tmp_path, docs_dir, embedder, small_config):
    store = open_store(tmp_path / "db", create=True, embedding=embedder.describe())
    build_index([docs_dir], store, embedder, small_config, progress=False)
    return store


@pytest.mark.parametrize("budget", [1, 12, 40, 384])
def test_evidence_comes_from_the_retrieved_parents_and_fits_the_budget(index, embedder, budget):
    retriever = Retriever(index, embedder, "chunks", top_k=2)
    llm = EchoLLM()
    question = "Why does the tail of a comet point away from the Sun?"
    answer = answer_question(question, retriever, llm, token_budget=budget)
    parents = {p.id: p for p in retriever.retrieve(question)}
    assert [p.id for p in answer.sources] == list(parents)
    assert answer.evidence, "at least the best sentence is always given"
    for e in answer.evidence:
        assert e.parent_id in parents and e.text in split_sentences(parents[e.parent_id].text)
    used = sum(llm.count_tokens(e.text) for e in answer.evidence)
    assert used <= budget or len(answer.evidence) == 1  # the best sentence alone may exceed a tiny budget
    assert "tail" in answer.evidence[0].text.lower()
    # The prompt holds the evidence and nothing else of the parents.
    prompt = llm.prompts[0][-1]["content"]
    assert all(e.text in prompt for e in answer.evidence)
    other = [s for p in parents.values() for s in split_sentences(p.text)
             if s not in {e.text for e in answer.evidence}]
    assert not any(s in prompt for s in other if len(s) > 30)
    assert answer.generated == f"{len({e.parent_id for e in answer.evidence})} contexts"
    row = answer.as_dict()
    assert {"question", "answer", "evidence", "sources", "seconds"} <= set(row)
    assert row["evidence"][0]["text"] == answer.evidence[0].text and row["seconds"] >= 0


def test_budget_shrinks_to_what_the_context_window_leaves(index, embedder):
    assert evidence_budget(None, 100, 64) == DEFAULT_EVIDENCE_TOKENS
    assert evidence_budget(2048, 100, 256) == DEFAULT_EVIDENCE_TOKENS
    assert evidence_budget(2048, 100, 256, cap=1000) == 1000
    assert evidence_budget(512, 100, 256, cap=1000) == 512 - 100 - 128  # the answer's reserve is at most a quarter
    assert evidence_budget(256, 300, 64) == 1
    retriever = Retriever(index, embedder, "chunks", top_k=3)
    question = "How do bakers score sourdough?"
    wide = answer_question(question, retriever, EchoLLM(window=4096), token_budget=10_000, max_new_tokens=8)
    bare = EchoLLM().count_tokens(EchoLLM().render(grounded_prompt(question, [], embedder)[1]))
    narrow_llm = EchoLLM(window=bare + 8 + 20)
    narrow = answer_question(question, retriever, narrow_llm, token_budget=10_000, max_new_tokens=8)
    assert sum(narrow_llm.count_tokens(e.text) for e in narrow.evidence) <= 20 or len(narrow.evidence) == 1
    assert len(narrow.evidence) < len(wide.evidence)


def test_answer_rejects_bad_arguments(index, embedder):
    retriever = Retriever(index, embedder, "chunks", top_k=1)
    with pytest.raises(ValueError, match="`token_budget`"):
        answer_question("q?", retriever, EchoLLM(), token_budget=0)
    with pytest.raises(ValueError, match="`max_new_tokens`"):
        answer_question("q?", retriever, EchoLLM(), max_new_tokens=0)


def test_read_question_file(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question": "one?", "evidence": "x"}\n\n{"question": "two?"}\n', encoding="utf-8")
    assert read_question_file(path) == ["one?", "two?"]
    path.write_text('{"question": "one?"}\n\n{"question": ""}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=f"{path}:3"):
        read_question_file(path)
    path.write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no questions"):
        read_question_file(path)


# ---- through the command line, with the tiny 4-bit llama ------------------------------------------------
@pytest.fixture
def session_embedder(monkeypatch, embedder):
    """The CLI builds an Embedder per command; reuse the session's (loading it is the slow part)."""
    import fourbit.rag.embeddings

    monkeypatch.setattr(fourbit.rag.embeddings, "Embedder", lambda model=None, **kw: embedder)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    from _tiny_models import make_llama, make_tokenizer

    path = tmp_path_factory.mktemp("rag-llm") / "tiny"
    make_llama(max_position_embeddings=2048).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def db(tmp_path, docs_dir, session_embedder) -> Path:
    result = run_cli("rag", "index", docs_dir, "--db", tmp_path / "db", *SMALL)
    assert result.code == 0, result.err
    return tmp_path / "db"


def test_query_many_questions_one_json_line_each(tmp_path, db, tiny_model_dir, monkeypatch):
    import fourbit.rag.llm

    loads = []
    real = fourbit.rag.llm.load_llm
    monkeypatch.setattr(fourbit.rag.llm, "load_llm", lambda *a, **kw: loads.append(a) or real(*a, **kw))
    questions = ["Where do long-period comets come from?", "What causes blossom end rot?",
                 "Why do bakers score the loaf?"]
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps({"question": q, "evidence": "unused"}) + "\n" for q in questions),
                    encoding="utf-8")
    result = run_cli("rag", "query", "--questions", path, "--db", db, "--json", "--model", tiny_model_dir,
                     "--max-new-tokens", "4", "--retriever", "chunks", "--evidence-tokens", "60")
    assert result.code == 0, result.err
    assert len(loads) == 1  # the model loads once for all the questions
    rows = [json.loads(line) for line in result.out.splitlines()]
    assert [r["question"] for r in rows] == questions
    expected_source = ["comets", "tomatoes", "bread"]
    for row, topic in zip(rows, expected_source, strict=True):
        assert set(row) >= {"question", "answer", "evidence", "sources", "seconds"}
        assert isinstance(row["answer"], str) and row["seconds"] > 0
        assert row["sources"] and row["evidence"]
        assert {e["parent_id"] for e in row["evidence"]} <= {s["id"] for s in row["sources"]}
        assert all(topic in e["source"] for e in row["evidence"][:1])


def test_query_prints_the_evidence(db, tiny_model_dir):
    result = run_cli("rag", "query", "Where do long-period comets come from?", "--db", db, "--model",
                     tiny_model_dir, "--max-new-tokens", "3", "--retriever", "chunks")
    assert result.code == 0, result.err
    assert "evidence" in result.out and "Oort cloud" in result.out
    single = run_cli("rag", "query", "Where do long-period comets come from?", "--db", db, "--model",
                     tiny_model_dir, "--max-new-tokens", "3", "--retriever", "chunks", "--json")
    assert single.code == 0, single.err
    body = json.loads(single.out)
    assert "Oort cloud" in body["evidence"][0]["text"] and body["sources"]


@pytest.fixture
def no_model(monkeypatch):
    """Loading the embedding model or the LLM fails the test: the error must come before it."""
    import fourbit.rag.embeddings
    import fourbit.rag.llm

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the error was found")

    monkeypatch.setattr(fourbit.rag.embeddings, "Embedder", refuse)
    monkeypatch.setattr(fourbit.rag.llm, "load_llm", refuse)


def test_bad_question_files_name_file_and_line_before_anything_loads(tmp_path, no_model):
    db = tmp_path / "db"
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"question": "ok?"}\n{"question": "torn\n', encoding="utf-8")
    assert_clean_error(run_cli("rag", "query", "--questions", bad, "--db", db, "--json"), f"{bad}:2")
    bad.write_text('{"question": "ok?"}\n\n{"evidence": "no question"}\n', encoding="utf-8")
    assert_clean_error(run_cli("rag", "query", "--questions", bad, "--db", db), f"{bad}:3")
    bad.write_text('["not an object"]\n', encoding="utf-8")
    assert_clean_error(run_cli("rag", "query", "--questions", bad, "--db", db), f"{bad}:1")
    assert_clean_error(run_cli("rag", "query", "--questions", tmp_path / "none.jsonl", "--db", db),
                       str(tmp_path / "none.jsonl"))
    assert_clean_error(run_cli("rag", "query", "--db", db), "QUESTION", "--questions")
    assert_clean_error(run_cli("rag", "query", "q?", "--questions", bad, "--db", db), "QUESTION", "--questions")
    assert_clean_error(run_cli("rag", "query", "q?", "--db", db, "--evidence-tokens", "0"), "--evidence-tokens")
    assert not db.exists()


def test_markdown_headings_are_not_evidence(embedder):
    from fourbit.rag.grounding import select_evidence
    from fourbit.rag.retrieval import Retrieved

    parent = Retrieved("p1", 0.9, "## Paged optimizers\n\nPaged optimizers move optimizer states to CPU RAM when the "
                                  "GPU runs out of memory. Bread needs yeast.", {"source": "guide.md", "page": "1"})
    found = select_evidence("What are paged optimizers?", [parent], embedder, min_relative_score=0.0)
    assert [e.text for e in found][:1] == ["Paged optimizers move optimizer states to CPU RAM when the GPU runs out "
                                           "of memory."]
    assert not any(e.text.startswith("#") for e in found)


class _SameVectorEmbedder:
    """Every text embeds to the same unit vector: cosine similarity cannot tell sentences apart."""

    def embed_queries(self, texts):
        return [[1.0, 0.0]] * len(texts)

    embed_documents = embed_queries


def test_sentence_scores_add_the_share_of_the_question_words_to_the_cosine(embedder):
    import numpy as np

    from fourbit.rag.grounding import sentence_scores

    sentences = ["Bread needs yeast and flour.", "QLoRA with FP4 lags behind the 16-bit LoRA baseline.",
                 "QLoRA recovers 16-bit performance."]
    question = "How far behind 16-bit LoRA is QLoRA with FP4?"
    # the question's content words: far, behind, 16-bit (as "16" and "bit"), lora, qlora, fp4
    got = sentence_scores(question, sentences, _SameVectorEmbedder(), lexical_weight=0.5)
    asked = {"far", "behind", "16", "bit", "lora", "qlora", "fp4"}
    expected = [1.0 + 0.5 * len(asked & held) / len(asked)
                for held in (set(), {"behind", "16", "bit", "lora", "qlora", "fp4"}, {"qlora", "16", "bit"})]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    # with no weight it is the embedder's cosine (the real embedder here)
    cosine = np.asarray(embedder.embed_documents(sentences)) @ np.asarray(embedder.embed_queries([question]))[0]
    np.testing.assert_allclose(sentence_scores(question, sentences, embedder, lexical_weight=0.0), cosine,
                               rtol=1e-6)
