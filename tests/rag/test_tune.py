"""``fourbit rag tune``: training examples built from an index (template questions, the evidence rag query
would give, answers made of evidence sentences), a LoRA adapter trained on them with fourbit's trainer on a
tiny model, and ``rag query --adapter`` / ``--no-answer-adapter``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _cli import assert_clean_error, run_cli

from fourbit.rag.grounding import Evidence, split_sentences
from fourbit.rag.index import build_index
from fourbit.rag.store import open_store
from fourbit.rag.tune import TuneConfig, build_examples, compose_answer, template_questions

SMALL = ["--parent-tokens", "64", "--parent-overlap", "0", "--child-tokens", "16,32", "--child-overlap", "0"]


def test_template_questions():
    text = ("## Paged optimizers\n\nPaged optimizers are a way to move optimizer states to CPU RAM. "
            "Double quantization is the quantization of the quantization constants.")
    assert template_questions(text, limit=5) == [
        "What does the document say about Paged optimizers?", "What are Paged optimizers?",
        "What is Double quantization?", "What does the document say about move optimizer states?"]
    plain = "it rains. Sourdough bread rises because wild yeast ferments the flour."
    assert template_questions(plain) == ["What does the document say about Sourdough bread rises?"]
    assert template_questions("no.", limit=2) == []


def test_compose_answer_takes_close_sentences_in_reading_order():
    def ev(text, parent, position, score):
        return Evidence(text, "f.txt", "1", parent, position, score)

    evidence = [ev("B best.", "p1", 5, 0.9), ev("A close.", "p1", 2, 0.85), ev("C far.", "p2", 0, 0.5)]
    assert compose_answer(evidence) == "A close. B best."
    assert compose_answer(evidence, sentences=1) == "B best."
    assert compose_answer(evidence, sentences=3, min_relative_score=0.5) == "A close. B best. C far."
    assert compose_answer([]) == ""


@pytest.fixture
def index(tmp_path, docs_dir, embedder, small_config):
    store = open_store(tmp_path / "db", create=True, embedding=embedder.describe())
    build_index([docs_dir], store, embedder, small_config, progress=False)
    return store


def test_examples_answer_in_the_evidence_words(index, embedder):
    records = build_examples(index, embedder, TuneConfig(per_parent=1, max_examples=50))
    parents = index.all_records(("parent",))
    assert len(records) == len(parents[0])  # one template question per parent
    for record in records:
        system, user, assistant = record["messages"]
        assert (system["role"], user["role"], assistant["role"]) == ("system", "user", "assistant")
        assert record["question"] in user["content"]
        # The answer is made of the evidence sentences given in the prompt, nothing else.
        for sentence in split_sentences(assistant["content"]):
            assert sentence in user["content"], (sentence, user["content"])
    assert len(build_examples(index, embedder, TuneConfig(max_examples=3))) == 3
    with pytest.raises(ValueError, match="`questions`"):
        build_examples(index, embedder, TuneConfig(questions="metadata"))
    with pytest.raises(ValueError, match="`per_parent`"):
        TuneConfig(per_parent=0)


# ---- through the command line, on a tiny llama ---------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    from _tiny_models import make_llama, make_tokenizer

    path = tmp_path_factory.mktemp("rag-tune") / "tiny"
    make_llama(intermediate_size=128, max_position_embeddings=2048).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def db(tmp_path, docs_dir, embedder, monkeypatch) -> Path:
    import fourbit.rag.embeddings

    monkeypatch.setattr(fourbit.rag.embeddings, "Embedder", lambda model=None, **kw: embedder)
    assert run_cli("rag", "index", docs_dir, "--db", tmp_path / "db", *SMALL).code == 0
    return tmp_path / "db"


def test_rag_tune_trains_an_adapter_that_rag_query_uses(tmp_path, db, tiny_model_dir, monkeypatch):
    out = tmp_path / "adapter"
    argv = ["rag", "tune", "--db", db, "--out", out, "--model", tiny_model_dir, "--max-steps", "2",
            "--max-examples", "6", "--batch-size", "2", "--lora-r", "4", "--json"]
    result = run_cli(*argv)
    assert result.code == 0, result.err
    summary = json.loads(result.out)
    assert summary["examples"] == 6 and summary["steps"] == 2 and summary["train"] + summary["eval"] == 6
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    saved = [json.loads(line) for line in (out / "rag_tune_examples.jsonl").read_text().splitlines()]
    assert len(saved) == 6 and all(r["messages"][-1]["role"] == "assistant" for r in saved)
    assert_clean_error(run_cli(*argv), "--out", str(out))  # an adapter is there: not replaced silently

    import fourbit.rag.llm

    loaded = []
    real = fourbit.rag.llm.load_llm
    monkeypatch.setattr(fourbit.rag.llm, "load_llm",
                        lambda *a, **kw: loaded.append(kw.get("adapter")) or real(*a, **kw))
    query = ["rag", "query", "Where do comets come from?", "--db", db, "--model", tiny_model_dir, "--json",
             "--max-new-tokens", "4", "--retriever", "chunks"]
    got = run_cli(*query, "--adapter", out)
    assert got.code == 0, got.err
    assert json.loads(got.out)["answer_kind"] in ("generated", "evidence")
    assert loaded == [out]
    assert run_cli(*query, "--adapter", out, "--no-answer-adapter").code == 2  # one or the other


def test_default_answer_adapter_only_for_the_bundled_model(tmp_path, monkeypatch):
    import fourbit.rag.llm
    from fourbit.rag.llm import answer_adapter

    shipped = tmp_path / "answer_adapter"
    monkeypatch.setattr(fourbit.rag.llm, "ANSWER_ADAPTER_DIR", shipped)
    assert answer_adapter(None) is None  # none ships yet
    shipped.mkdir()
    (shipped / "adapter_config.json").write_text("{}", encoding="utf-8")
    assert answer_adapter(None) == shipped
    assert answer_adapter(None, use_default=False) is None  # --no-answer-adapter
    assert answer_adapter("some/model") is None  # another base model: its own adapters only
    assert answer_adapter(None, tmp_path / "mine") == tmp_path / "mine"
