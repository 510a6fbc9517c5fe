"""Answering: retrieve parents, ground the 4-bit LLM in their best sentences, stream the answer, cite.

The model is given the sentences of the retrieved parents that best match the question
(:mod:`fourbit.rag.grounding`), not whole parents, and those sentences come back as extractive evidence
beside the generated text: a small model's answer may be weak, the evidence is the document's own words.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fourbit._errors import FieldError, InputFileError
from fourbit.rag.grounding import DEFAULT_EVIDENCE_TOKENS, Evidence, evidence_budget, grounded_prompt
from fourbit.rag.prompts import answer_prompt
from fourbit.rag.retrieval import Retrieved

__all__ = ["Answer", "answer_question", "answer_questions", "read_question_file", "source_rows"]


@dataclass
class Answer:
    """An answer with the evidence sentences it was written from and their parents."""

    question: str
    text: str
    retriever: str
    sources: list[Retrieved] = field(default_factory=list)
    evidence: list[Evidence] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self, lines: int = 2) -> dict[str, Any]:
        return {"question": self.question, "answer": self.text, "evidence": [e.as_dict() for e in self.evidence],
                "sources": source_rows(self.sources, lines), "retriever": self.retriever,
                "seconds": round(self.seconds, 3)}


def source_rows(parents: list[Retrieved], lines: int = 2) -> list[dict[str, Any]]:
    """id, score, file, page and the first ``lines`` lines of each parent."""
    rows = []
    for p in parents:
        head = [line for line in p.text.splitlines() if line.strip()][:lines]
        rows.append({"id": p.id, "score": round(p.score, 4), "source": p.source, "page": p.page,
                     "text": "\n".join(head), "via": [f"{r.kind}:{r.id}" for r in p.via]})
    return rows


def _budget(question: str, llm: Any, count: Callable[[str], int] | None, token_budget: int,
            max_new_tokens: int) -> int:
    """``token_budget``, lowered when the LLM's context window would not hold prompt + evidence + answer."""
    window = getattr(llm, "context_window", None)
    render = getattr(llm, "render", None)
    if window is None or render is None or count is None:
        return token_budget
    bare = count(render(answer_prompt(question, [""])))
    return evidence_budget(window, bare, max_new_tokens, cap=token_budget)


def answer_question(
    question: str,
    retriever: Any,
    llm: Any,
    *,
    max_new_tokens: int = 256,
    on_text: Callable[[str], None] | None = None,
    embedder: Any = None,
    token_budget: int = DEFAULT_EVIDENCE_TOKENS,
) -> Answer:
    """Answer ``question`` from the evidence sentences of the parents ``retriever`` finds.

    Args:
        question: the question.
        retriever: a :class:`fourbit.rag.retrieval.Retriever` (or anything with ``retrieve`` and ``mode``).
        llm: a :class:`fourbit.rag.llm.LLM`; its ``count_tokens`` and ``context_window``, when it has them,
            size the evidence in its own tokens.
        max_new_tokens: answer length cap.
        on_text: called with each streamed piece of the answer (e.g. print); None generates in one go.
        embedder: scores the sentences; default ``retriever.embedder`` (the index's).
        token_budget: tokens of the LLM the evidence may take at most.

    Returns:
        The :class:`Answer` (text, evidence best first, the retrieved parents, wall seconds).

    Raises:
        FieldError: an empty question; ``token_budget`` or ``max_new_tokens`` below 1.
    """
    if not question.strip():
        raise FieldError("question", "is empty")
    if token_budget < 1:
        raise FieldError("token_budget", f"must be >= 1, got {token_budget}")
    if max_new_tokens < 1:
        raise FieldError("max_new_tokens", f"must be >= 1, got {max_new_tokens}")
    start = time.perf_counter()
    parents = retriever.retrieve(question)
    count = getattr(llm, "count_tokens", None)
    budget = _budget(question, llm, count, token_budget, max_new_tokens)
    evidence, messages = grounded_prompt(question, parents, embedder or retriever.embedder, token_budget=budget,
                                         count_tokens=count)
    if on_text is None:
        text = llm.generate([messages], max_new_tokens=max_new_tokens)[0]
    else:
        pieces = []
        for piece in llm.stream(messages, max_new_tokens=max_new_tokens):
            pieces.append(piece)
            on_text(piece)
        text = "".join(pieces).strip()
    return Answer(question=question, text=text, retriever=getattr(retriever, "mode", "?"), sources=parents,
                  evidence=evidence, seconds=time.perf_counter() - start)


def read_question_file(path: str | Path) -> list[str]:
    """The questions of a JSONL file, one ``{"question": ...}`` object per line (other fields ignored, so a
    ``rag eval`` file works too).

    Raises:
        InputFileError: no such file, a line that is not a JSON object or lacks a non-empty string
            "question" (file and line named), or a file without questions.
    """
    from fourbit._io import read_jsonl_lines

    path = Path(path)
    questions = []
    for number, row in read_jsonl_lines(path):  # names the file and line of a line that is not JSON
        question = row.get("question")
        if not isinstance(question, str) or not question.strip():
            raise InputFileError(path, 'needs a non-empty string field "question"', line=number)
        questions.append(question)
    if not questions:
        raise InputFileError(path, "holds no questions")
    return questions


def answer_questions(questions: Iterable[str], retriever: Any, llm: Any, **kwargs: Any) -> Iterator[Answer]:
    """:func:`answer_question` for each question in turn, with the same retriever and LLM (loaded once)."""
    for question in questions:
        yield answer_question(question, retriever, llm, **kwargs)
