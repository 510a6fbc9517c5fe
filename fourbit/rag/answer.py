"""Answering: retrieve parents, prompt the 4-bit LLM with them, stream the answer, cite the sources."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fourbit._errors import FieldError
from fourbit.rag.prompts import answer_prompt
from fourbit.rag.retrieval import Retrieved

__all__ = ["Answer", "answer_question", "source_rows"]


@dataclass
class Answer:
    """An answer with the parents it was written from."""

    question: str
    text: str
    retriever: str
    sources: list[Retrieved] = field(default_factory=list)

    def as_dict(self, lines: int = 2) -> dict[str, Any]:
        return {"question": self.question, "answer": self.text, "retriever": self.retriever,
                "sources": source_rows(self.sources, lines)}


def source_rows(parents: list[Retrieved], lines: int = 2) -> list[dict[str, Any]]:
    """id, score, file, page and the first ``lines`` lines of each parent."""
    rows = []
    for p in parents:
        head = [line for line in p.text.splitlines() if line.strip()][:lines]
        rows.append({"id": p.id, "score": round(p.score, 4), "source": p.source, "page": p.page,
                     "text": "\n".join(head), "via": [f"{r.kind}:{r.id}" for r in p.via]})
    return rows


def answer_question(
    question: str,
    retriever: Any,
    llm: Any,
    *,
    max_new_tokens: int = 256,
    on_text: Callable[[str], None] | None = None,
) -> Answer:
    """Answer ``question`` from the parents ``retriever`` finds.

    Args:
        question: the question.
        retriever: a :class:`fourbit.rag.retrieval.Retriever` (or anything with ``retrieve`` and ``mode``).
        llm: a :class:`fourbit.rag.llm.LLM`.
        max_new_tokens: answer length cap.
        on_text: called with each streamed piece of the answer (e.g. print); None generates in one go.

    Returns:
        The :class:`Answer`.
    """
    if not question.strip():
        raise FieldError("question", "is empty")
    parents = retriever.retrieve(question)
    messages = answer_prompt(question, [p.text for p in parents])
    if on_text is None:
        text = llm.generate([messages], max_new_tokens=max_new_tokens)[0]
    else:
        pieces = []
        for piece in llm.stream(messages, max_new_tokens=max_new_tokens):
            pieces.append(piece)
            on_text(piece)
        text = "".join(pieces).strip()
    return Answer(question=question, text=text, retriever=getattr(retriever, "mode", "?"), sources=parents)
