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
    assert template_questions(text, limit=6) == [
        "What does the document say about Paged optimizers?", "What are Paged optimizers?",
        "What is Double quantization?", "What does the document say about move optimizer states?",
        "Can you tell me about Double quantization?"]  # a key phrase per sentence, asked in turn
    assert template_questions(text, limit=2) == template_questions(text, limit=6)[:2]
    plain = "it rains. Sourdough bread rises because wild yeast ferments the flour."
    assert template_questions(plain) == ["What does the document say about Sourdough bread rises?"]
    assert template_questions("no.", limit=2) == []
    assert template_questions("A B-tree is a balanced tree of pages.") == [
        "What is a B-tree?", "What does the document say about balanced tree?"]  # the leading article lower-cased


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
    records = build_examples(index, embedder, TuneConfig(per_parent=1, max_examples=50, same_parent=False))
    parents = index.all_records(("parent",))
    assert len(records) == len(parents[0])  # one template question per parent
    for record in records:
        system, user, assistant = record["messages"]
        assert (system["role"], user["role"], assistant["role"]) == ("system", "user", "assistant")
        assert record["question"] in user["content"]
        # The answer is made of the evidence sentences given in the prompt, nothing else.
        for sentence in split_sentences(assistant["content"]):
            assert sentence in user["content"], (sentence, user["content"])
    assert len(build_examples(index, embedder, TuneConfig(max_examples=3, same_parent=False))) == 3
    # same_parent (the default): only questions whose best evidence sentence is from their own parent
    own = build_examples(index, embedder, TuneConfig(per_parent=3, max_examples=500))
    every = build_examples(index, embedder, TuneConfig(per_parent=3, max_examples=500, same_parent=False))
    assert own and all(r in every for r in own)
    ids, texts = index.all_records(("parent",))[:2]
    parent_text = dict(zip(ids, texts, strict=True))
    for record in own:  # the answer quotes the parent the question was written about
        assert any(s in parent_text[record["parent_id"]] for s in split_sentences(record["messages"][-1]["content"]))
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


# ---- the default answer adapter: rag query, the demo -----------------------------------------------------------
def _tiny_adapter(model_dir: Path, out: Path, intermediate_size: int | None = None) -> Path:
    """A LoRA adapter whose B is not zero, over the tiny llama of ``model_dir`` (or, with ``intermediate_size``,
    over another tiny llama: an adapter for another base)."""
    import torch
    from _tiny_models import make_llama

    from fourbit.models import load_model
    from fourbit.nn.adapters import save_adapter
    from fourbit.nn.lora import LoRASpec, inject_lora, lora_modules

    model = make_llama(intermediate_size=intermediate_size) if intermediate_size else load_model(model_dir)[0]
    inject_lora(model, LoRASpec(r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "down_proj")))
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.5)
    return save_adapter(model, out)


def test_rag_query_answers_with_the_shipped_adapter_unless_told_otherwise(tmp_path, db, tiny_model_dir,
                                                                          monkeypatch):
    import fourbit.rag.llm

    shipped = _tiny_adapter(tiny_model_dir, tmp_path / "shipped")
    monkeypatch.setattr(fourbit.rag.llm, "ANSWER_ADAPTER_DIR", shipped)
    loaded = []
    real = fourbit.rag.llm.load_llm

    def record(model=None, **kw):  # the bundled model is stood in for by the tiny one
        loaded.append((model, kw.get("adapter")))
        return real(tiny_model_dir, adapter=kw.get("adapter"))

    monkeypatch.setattr(fourbit.rag.llm, "load_llm", record)
    query = ["rag", "query", "Where do comets come from?", "--db", db, "--json", "--max-new-tokens", "4",
             "--retriever", "chunks"]
    for flags, adapter in (((), shipped), (("--no-answer-adapter",), None), (("--adapter", shipped), shipped)):
        got = run_cli(*query, *flags)
        assert got.code == 0, got.err
        assert json.loads(got.out)["answer_kind"] in ("generated", "evidence")
        assert loaded.pop() == (None, adapter), flags


def test_rag_query_refuses_an_adapter_for_another_base_in_one_line(tmp_path, db, tiny_model_dir):
    other = _tiny_adapter(tiny_model_dir, tmp_path / "other", intermediate_size=96)
    got = run_cli("rag", "query", "Where do comets come from?", "--db", db, "--model", tiny_model_dir,
                  "--adapter", other, "--max-new-tokens", "4")
    assert_clean_error(got, str(other / "adapter_model.safetensors"))


def test_demo_prints_the_base_answer_above_the_adapters(tmp_path, tiny_model_dir, embedder, monkeypatch):
    import torch

    import fourbit.rag.embeddings
    import fourbit.rag.llm
    from fourbit.demo.rag import run_rag_demo
    from fourbit.models import load_model
    from fourbit.nn.lora import lora_modules

    monkeypatch.setattr(fourbit.rag.embeddings, "Embedder", lambda model=None, **kw: embedder)
    shipped = _tiny_adapter(tiny_model_dir, tmp_path / "shipped")
    monkeypatch.setattr(fourbit.rag.llm, "ANSWER_ADAPTER_DIR", shipped)
    model, tokenizer = load_model(tiny_model_dir)
    shown: list[str] = []
    with torch.inference_mode():  # as fourbit.demo runs it
        result = run_rag_demo(model, tokenizer, tmp_path / "demo", max_new_tokens=6, on_text=shown.append,
                              verbose=False)
    assert len(shown) == 2 and result["adapter"] == str(shipped)  # the base model's answer, then the adapter's
    assert shown[0].endswith(result["base"]["answer"]) and shown[1].endswith(result["answer"])
    assert result["base"]["question"] == result["question"]
    assert not lora_modules(model)  # the adapter was taken off again
    alone = run_rag_demo(model, tokenizer, tmp_path / "demo", max_new_tokens=6, on_text=shown.append,
                         verbose=False, use_answer_adapter=False)
    assert len(shown) == 3 and alone["adapter"] is None and alone["generated"] == result["base"]["generated"]
