"""Never a confident fabrication: an answer the evidence does not support is replaced by the best evidence
sentence, with a note, and ``supported`` / ``answer_kind`` say which case it was (library and ``rag query --json``),
with stand-in LLMs whose answers are written here."""

from __future__ import annotations

import json

import pytest
from _cli import run_cli

from fourbit.rag.answer import UNSUPPORTED_NOTE, answer_question
from fourbit.rag.index import build_index
from fourbit.rag.retrieval import Retriever
from fourbit.rag.store import open_store
from fourbit.rag.support import check_support, content_words

SMALL = ["--parent-tokens", "64", "--parent-overlap", "0", "--child-tokens", "16,32", "--child-overlap", "0"]
QUESTION = "Where do long-period comets come from?"
SUPPORTED = "Long-period comets are thought to originate in the distant Oort cloud."
INVENTED = "Comets are made in factories on Mars by robots that paint them green every spring."


class FixedLLM:
    """Stand-in LLM that answers every prompt with ``text`` (and counts tokens as words)."""

    name = "fixed"

    def __init__(self, text: str):
        self.text = text

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def generate(self, prompts, max_new_tokens=128):
        return [self.text for _ in prompts]

    def stream(self, prompt, max_new_tokens=256):
        yield self.text


def test_content_words_and_support_scores():
    assert content_words("The optimizers were paged to CPU memory") == ["optimizer", "paged", "cpu", "memory"]
    evidence = ["QLoRA finetunes a 65B parameter model on a single 48GB GPU."]
    assert check_support("It finetunes a 65B model on a single 48GB GPU.", evidence).grounded
    paraphrase = check_support("A 65B model fits on one 48GB GPU with QLoRA.", evidence)
    assert paraphrase.missing == ["fits"] and paraphrase.score == pytest.approx(5 / 6)  # 65b model 48gb gpu qlora
    invented = check_support("It needs a single 24GB GPU.", evidence)
    assert not invented.grounded and invented.missing == ["need", "24gb"]  # a number not in the evidence
    assert not check_support("It finetunes a 65B parameter model on 3 GPUs.", evidence).grounded  # one number off
    # The question's own words restated are not invented.
    assert check_support("Paged optimizers avoid spikes.", ["They avoid spikes."],
                         question="What do paged optimizers avoid?").grounded
    assert not check_support("  ", evidence).grounded  # nothing said is no answer
    # Restating the question adds nothing: not an answer, whatever words it shares with the evidence.
    question = "How much GPU memory does QLoRA need to finetune a 65B parameter model?"
    restated = check_support("The answer to the question is how much GPU memory QLoRA needs to finetune a 65B "
                             "parameter model.", evidence, question)
    assert restated.score == 0.0 and restated.missing == [] and not restated.grounded
    assert check_support("The answer: a single 48GB GPU.", evidence, question).grounded
    # List markers are not numbers; a number inside a line is.
    assert check_support("1. It finetunes a 65B model.\n2) On a single 48GB GPU.", evidence).grounded
    assert not check_support("It finetunes 1. a 65B model.", evidence).grounded
    # An echo of the question is not an answer, whatever its words.
    echo = check_support("1. Single GPU\n\nQuestion: How much GPU memory does QLoRA need?", evidence, question)
    assert echo.score == 1.0 and not echo.grounded
    loop = check_support("It finetunes a 65B model on a single GPU, a single GPU, a single GPU.", evidence)
    assert loop.score == 1.0 and not loop.grounded
    with pytest.raises(ValueError, match="support_threshold"):
        check_support("x", evidence, threshold=1.5)


@pytest.fixture
def index(tmp_path, docs_dir, embedder, small_config):
    store = open_store(tmp_path / "db", create=True, embedding=embedder.describe())
    build_index([docs_dir], store, embedder, small_config, progress=False)
    return store


def test_supported_answer_is_shown_invented_one_is_replaced(index, embedder):
    retriever = Retriever(index, embedder, "chunks", top_k=2)
    good = answer_question(QUESTION, retriever, FixedLLM(SUPPORTED + "\n\nAnd then it rambles on and"))
    assert good.answer_kind == "generated" and good.supported is good.grounded is True and good.note == ""
    assert good.text == good.generated == SUPPORTED  # ended at its first paragraph
    bad = answer_question(QUESTION, retriever, FixedLLM(INVENTED))
    assert bad.answer_kind == "evidence" and bad.supported is bad.grounded is False and bad.support < 0.6
    assert bad.text == bad.evidence[0].text and "Oort cloud" in bad.text  # the best sentence instead
    assert bad.note == UNSUPPORTED_NOTE and bad.generated == INVENTED
    row = bad.as_dict()
    assert (row["answer_kind"], row["supported"], row["answer"]) == ("evidence", False, bad.evidence[0].text)
    assert row["generated"] == INVENTED and row["note"] == UNSUPPORTED_NOTE
    unchecked = answer_question(QUESTION, retriever, FixedLLM(INVENTED), support_threshold=None)
    assert unchecked.answer_kind == "generated" and unchecked.text == INVENTED
    assert unchecked.supported is None  # not checked: neither supported nor unsupported
    with pytest.raises(ValueError, match="support_threshold"):
        answer_question(QUESTION, retriever, FixedLLM(INVENTED), support_threshold=2.0)
    with pytest.raises(ValueError, match="answer_ratio"):
        answer_question(QUESTION, retriever, FixedLLM(INVENTED), answer_ratio=-1)


def test_answer_length_fits_the_evidence(index, embedder):
    seen = []

    class Recording(FixedLLM):
        def generate(self, prompts, max_new_tokens=128):
            seen.append(max_new_tokens)
            return super().generate(prompts, max_new_tokens)

    retriever = Retriever(index, embedder, "chunks", top_k=2)
    got = answer_question(QUESTION, retriever, Recording(SUPPORTED), max_new_tokens=500, token_budget=60)
    evidence_tokens = sum(len(e.text.split()) for e in got.evidence)
    assert seen[-1] == max(32, evidence_tokens) < 500
    answer_question(QUESTION, retriever, Recording(SUPPORTED), max_new_tokens=500, token_budget=60, answer_ratio=0)
    assert seen[-1] == 500


@pytest.fixture
def db(tmp_path, docs_dir, embedder, monkeypatch):
    import fourbit.rag.embeddings

    monkeypatch.setattr(fourbit.rag.embeddings, "Embedder", lambda model=None, **kw: embedder)
    assert run_cli("rag", "index", docs_dir, "--db", tmp_path / "db", *SMALL).code == 0
    return tmp_path / "db"


@pytest.mark.parametrize(("text", "kind"), [(SUPPORTED, "generated"), (INVENTED, "evidence")])
def test_rag_query_json_marks_the_case(db, monkeypatch, text, kind):
    import fourbit.rag.llm

    monkeypatch.setattr(fourbit.rag.llm, "load_llm", lambda *a, **kw: FixedLLM(text))
    result = run_cli("rag", "query", QUESTION, "--db", db, "--json", "--retriever", "chunks")
    assert result.code == 0, result.err
    body = json.loads(result.out)
    assert body["answer_kind"] == kind and body["supported"] is body["grounded"] is (kind == "generated")
    assert body["generated"] == text
    assert body["answer"] == (text if kind == "generated" else body["evidence"][0]["text"])
    plain = run_cli("rag", "query", QUESTION, "--db", db, "--retriever", "chunks")
    assert plain.code == 0, plain.err
    assert (UNSUPPORTED_NOTE in plain.out) == (kind == "evidence") and (INVENTED in plain.out) is False
