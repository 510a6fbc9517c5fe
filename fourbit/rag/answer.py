"""Answering: retrieve parents, ground the 4-bit LLM in their best sentences, check the answer, cite.

The model is given the sentences of the retrieved parents that best match the question
(:mod:`fourbit.rag.grounding`), not whole parents, and those sentences come back as extractive evidence
beside the generated text. The answer may take as many tokens as the evidence has, ends at its first
paragraph (:mod:`fourbit.rag.decoding`), and is checked against the evidence (:mod:`fourbit.rag.support`):
an answer the evidence does not support is never shown as the answer; the best evidence sentence is shown
instead, with a note saying so; ``supported`` (True/False) and ``answer_kind`` ("generated", "evidence",
"none") say which case it was.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fourbit._errors import FieldError, InputFileError
from fourbit.rag.decoding import answer_token_limit, finish_answer
from fourbit.rag.grounding import DEFAULT_EVIDENCE_TOKENS, Evidence, evidence_budget, grounded_prompt
from fourbit.rag.prompts import answer_prompt
from fourbit.rag.retrieval import Retrieved
from fourbit.rag.support import DEFAULT_SUPPORT_THRESHOLD, check_support

__all__ = ["ANSWER_KINDS", "UNSUPPORTED_NOTE", "Answer", "Verdict", "answer_question", "answer_questions",
           "judge_answer", "read_question_file", "source_rows"]

# "generated": the model's answer, supported by the evidence; "evidence": the model's answer was not
# supported, the best evidence sentence is shown instead; "none": no evidence at all.
ANSWER_KINDS = ("generated", "evidence", "none")
UNSUPPORTED_NOTE = "The documents do not support a generated answer; the passage closest to the question says:"
NO_EVIDENCE_NOTE = "The documents hold nothing on this question."
DEFAULT_ANSWER_RATIO = 1.0


@dataclass
class Answer:
    """An answer with the evidence sentences it was written from and their parents.

    Attributes:
        text: what is shown as the answer: the model's (``answer_kind`` "generated") or the best evidence
            sentence ("evidence"), or empty ("none").
        generated: the model's answer as generated (after :func:`fourbit.rag.decoding.finish_answer`).
        grounded: the generated answer is supported by the evidence (:mod:`fourbit.rag.support`).
        support: the share of its content words in the evidence or the question.
        supported: the check's verdict on the generated answer (True: shown as the answer; False: replaced
            by the best evidence sentence or nothing); None when the check was turned off.
        note: shown above ``text`` when it is not the model's answer; empty otherwise.
    """

    question: str
    text: str
    retriever: str
    sources: list[Retrieved] = field(default_factory=list)
    evidence: list[Evidence] = field(default_factory=list)
    seconds: float = 0.0
    generated: str = ""
    grounded: bool = True
    support: float = 1.0
    answer_kind: str = "generated"
    note: str = ""
    supported: bool | None = None

    def as_dict(self, lines: int = 2) -> dict[str, Any]:
        return {"question": self.question, "answer": self.text, "answer_kind": self.answer_kind,
                "supported": self.supported, "grounded": self.grounded, "support": round(self.support, 3),
                "note": self.note,
                "generated": self.generated, "evidence": [e.as_dict() for e in self.evidence],
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


def _generate(llm: Any, messages: list[dict[str, str]], max_new_tokens: int,
              on_text: Callable[[str], None] | None) -> str:
    if on_text is None:
        return llm.generate([messages], max_new_tokens=max_new_tokens)[0]
    pieces = []
    for piece in llm.stream(messages, max_new_tokens=max_new_tokens):
        pieces.append(piece)
        on_text(piece)
    return "".join(pieces).strip()


@dataclass
class Verdict:
    """What is shown for a generated answer once it is checked against its evidence.

    Attributes:
        text: the generated answer when supported, else the best evidence sentence (or empty: no evidence).
        answer_kind: "generated", "evidence" or "none" (:data:`ANSWER_KINDS`).
        supported: the generated answer is supported by the evidence (:func:`fourbit.rag.support.check_support`).
        support: the share of the content words it adds to the question that the evidence holds.
        note: shown above ``text`` when it is not the model's answer; empty otherwise.
    """

    text: str
    answer_kind: str
    supported: bool
    support: float
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"answer": self.text, "answer_kind": self.answer_kind, "supported": self.supported,
                "support": round(self.support, 3), "note": self.note}


def judge_answer(question: str, generated: str, evidence: list[str],
                 threshold: float = DEFAULT_SUPPORT_THRESHOLD) -> Verdict:
    """Check ``generated`` against the ``evidence`` sentences (best first) it was written from: shown when
    supported, else replaced by the best evidence sentence (``answer_kind`` "evidence") or nothing ("none"),
    with a note. ``rag query`` and ``fourbit serve``'s ``/v1/answers`` both decide this way.

    Raises:
        ValueError: ``threshold`` outside [0, 1].
    """
    support = check_support(generated, evidence, question, threshold)
    if support.grounded:
        return Verdict(generated, "generated", True, support.score)
    if evidence:
        return Verdict(evidence[0], "evidence", False, support.score, UNSUPPORTED_NOTE)
    return Verdict("", "none", False, support.score, NO_EVIDENCE_NOTE)


def _judged(answer: Answer, generated: str, threshold: float | None) -> Answer:
    """``answer`` with the generated text checked against its evidence (:func:`judge_answer`); with no
    ``threshold`` the generated text is shown unchecked (``supported`` None)."""
    answer.generated = answer.text = generated
    if threshold is None:
        return answer
    verdict = judge_answer(answer.question, generated, [e.text for e in answer.evidence], threshold)
    answer.text, answer.answer_kind, answer.note = verdict.text, verdict.answer_kind, verdict.note
    answer.supported = answer.grounded = verdict.supported
    answer.support = verdict.support
    return answer


def answer_question(
    question: str,
    retriever: Any,
    llm: Any,
    *,
    max_new_tokens: int = 256,
    on_text: Callable[[str], None] | None = None,
    embedder: Any = None,
    token_budget: int = DEFAULT_EVIDENCE_TOKENS,
    answer_ratio: float = DEFAULT_ANSWER_RATIO,
    support_threshold: float | None = DEFAULT_SUPPORT_THRESHOLD,
    finish: bool = True,
) -> Answer:
    """Answer ``question`` from the evidence sentences of the parents ``retriever`` finds.

    Args:
        question: the question.
        retriever: a :class:`fourbit.rag.retrieval.Retriever` (or anything with ``retrieve`` and ``mode``).
        llm: a :class:`fourbit.rag.llm.LLM`; its ``count_tokens`` and ``context_window``, when it has them,
            size the evidence in its own tokens.
        max_new_tokens: answer length cap.
        on_text: called with each streamed piece of the generated answer (e.g. print); None generates in one
            go. What it receives is the model's text before the support check: print ``Answer.text``
            instead where an unsupported answer must not be seen.
        embedder: scores the sentences; default ``retriever.embedder`` (the index's).
        token_budget: tokens of the LLM the evidence may take at most.
        answer_ratio: the answer may take at most this many tokens per token of evidence (at least 32, at
            most ``max_new_tokens``); 0: ``max_new_tokens`` alone.
        support_threshold: the share of the answer's content words the evidence (or question) must hold for
            the answer to be shown (:func:`fourbit.rag.support.check_support`); None: no check.
        finish: end the answer at its first paragraph and drop a last sentence the length cap cut short.

    Returns:
        The :class:`Answer` (text, evidence best first, the retrieved parents, wall seconds, the check).

    Raises:
        FieldError: an empty question; ``token_budget`` or ``max_new_tokens`` below 1; ``answer_ratio``
            below 0; ``support_threshold`` outside [0, 1].
    """
    if not question.strip():
        raise FieldError("question", "is empty")
    for name, value, low in (("token_budget", token_budget, 1), ("max_new_tokens", max_new_tokens, 1),
                             ("answer_ratio", answer_ratio, 0)):
        if value < low:
            raise FieldError(name, f"must be >= {low}, got {value}")
    if support_threshold is not None and not 0.0 <= support_threshold <= 1.0:
        raise FieldError("support_threshold", f"must be in [0, 1], got {support_threshold}")
    start = time.perf_counter()
    parents = retriever.retrieve(question)
    count = getattr(llm, "count_tokens", None)
    budget = _budget(question, llm, count, token_budget, max_new_tokens)
    evidence, messages = grounded_prompt(question, parents, embedder or retriever.embedder, token_budget=budget,
                                         count_tokens=count)
    if count is not None:
        max_new_tokens = answer_token_limit(sum(count(e.text) for e in evidence), max_new_tokens,
                                            ratio=answer_ratio)
    text = _generate(llm, messages, max_new_tokens, on_text)
    answer = Answer(question=question, text=text, retriever=getattr(retriever, "mode", "?"), sources=parents,
                    evidence=evidence)
    answer = _judged(answer, finish_answer(text) if finish else text.strip(), support_threshold)
    answer.seconds = time.perf_counter() - start
    return answer


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
