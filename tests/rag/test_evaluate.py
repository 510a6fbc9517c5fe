"""Evaluation: hit rate and MRR on a constructed case; evidence matching; question files."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from fourbit.rag.evaluate import (
    EvalQuestion,
    contains_evidence,
    evaluate_retriever,
    load_questions,
    reciprocal_rank,
)


@dataclass
class _P:
    text: str


def test_contains_evidence_normalises_whitespace_and_hyphenation():
    assert contains_evidence("The  paged\noptimizers use unified memory.", "paged optimizers use")
    assert contains_evidence("an effi-\ncient approach", "an efficient approach")
    assert not contains_evidence("paged optimizers", "double quantization")


def test_metrics_on_a_constructed_case():
    # Three questions; the evidence is at rank 1, rank 3 and nowhere among the top-k.
    corpus = {"a": ["alpha", "x", "y"], "b": ["x", "y", "beta"], "c": ["x", "y", "z"]}
    questions = [EvalQuestion("a", "alpha"), EvalQuestion("b", "beta"), EvalQuestion("c", "gamma")]

    def retrieve(question):
        return [_P(t) for t in corpus[question]]

    at3 = evaluate_retriever(retrieve, questions, k=3)
    assert at3["hit_rate"] == pytest.approx(2 / 3)
    assert at3["mrr"] == pytest.approx((1 + 1 / 3 + 0) / 3)
    at2 = evaluate_retriever(retrieve, questions, k=2)  # "beta" at rank 3 no longer counts
    assert at2["hit_rate"] == pytest.approx(1 / 3) and at2["mrr"] == pytest.approx(1 / 3)
    assert at2["parents_per_query"] == 2 and at2["k"] == 2
    assert reciprocal_rank(["no", "no", "yes"], "yes") == pytest.approx(1 / 3)


def test_load_questions_and_errors(tmp_path):
    good = tmp_path / "q.jsonl"
    good.write_text(json.dumps({"question": "q?", "evidence": "e"}) + "\n\n", encoding="utf-8")
    assert load_questions(good) == [EvalQuestion("q?", "e")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q?", "evidence": "e"}) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        load_questions(bad)
    missing = tmp_path / "m.jsonl"
    missing.write_text(json.dumps({"question": "q?"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="m.jsonl:1"):
        load_questions(missing)
