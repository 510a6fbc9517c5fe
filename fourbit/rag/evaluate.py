"""Retrieval evaluation: hit rate and mean reciprocal rank at k, from questions with evidence strings.

A question file is JSONL, one ``{"question": ..., "evidence": ...}`` per line. A retrieved parent is a
hit when it contains the evidence string after both are cleaned like indexed text (hyphenation repaired)
and whitespace-normalised. For each question, the reciprocal rank is 1/rank of the first hit among the
top-k distinct parents (0 without one); hit rate and MRR are their means over the questions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fourbit._errors import InputFileError
from fourbit._io import read_jsonl_lines
from fourbit.rag.loaders import clean_text, normalize_whitespace

__all__ = ["EvalQuestion", "contains_evidence", "evaluate_retriever", "load_questions", "reciprocal_rank"]


@dataclass
class EvalQuestion:
    question: str
    evidence: str


def load_questions(path: str | Path) -> list[EvalQuestion]:
    """Read a JSONL question file.

    Raises:
        InputFileError: no such file, a line that is not JSON or lacks a non-empty "question"/"evidence" (the
            line is named), or a file with no question.
    """
    path = Path(path)
    questions = []
    for number, row in read_jsonl_lines(path):  # raises InputFileError naming the file (and line) first
        if not all(isinstance(row.get(k), str) and row[k].strip() for k in ("question", "evidence")):
            raise InputFileError(path, "needs non-empty string fields 'question' and 'evidence'", line=number)
        questions.append(EvalQuestion(row["question"], row["evidence"]))
    if not questions:
        raise InputFileError(path, "no questions")
    return questions


def _norm(text: str) -> str:
    return normalize_whitespace(clean_text(text)).lower()


def contains_evidence(text: str, evidence: str) -> bool:
    """Whether ``text`` contains ``evidence``, both cleaned and whitespace-normalised (case-insensitive)."""
    return _norm(evidence) in _norm(text)


def reciprocal_rank(texts: Sequence[str], evidence: str) -> float:
    """1 / (1-based rank of the first text containing the evidence), 0.0 when none does."""
    for rank, text in enumerate(texts, start=1):
        if contains_evidence(text, evidence):
            return 1.0 / rank
    return 0.0


def evaluate_retriever(
    retrieve: Callable[[str], list[Any]], questions: list[EvalQuestion], k: int
) -> dict[str, Any]:
    """Hit rate and MRR at k of one retriever.

    Args:
        retrieve: question -> retrieved parents (objects with ``.text``, best first); at most k are used.
        questions: the question set.
        k: cut-off.

    Returns:
        ``{"hit_rate", "mrr", "k", "n", "parents_per_query", "chars_per_query"}``.
    """
    ranks, parents, chars = [], [], []
    for q in questions:
        got = retrieve(q.question)[:k]
        ranks.append(reciprocal_rank([p.text for p in got], q.evidence))
        parents.append(len(got))
        chars.append(sum(len(p.text) for p in got))
    n = len(questions)
    return {
        "hit_rate": sum(r > 0 for r in ranks) / n,
        "mrr": sum(ranks) / n,
        "k": k,
        "n": n,
        "parents_per_query": sum(parents) / n,
        "chars_per_query": sum(chars) / n,
    }
