"""Every prompt the RAG pipeline sends to the LLM, in one place.

They are short on purpose: a 135M-parameter model follows a brief, concrete instruction placed AFTER
the text far better than a long preamble, and every prompt token costs CPU time (metadata generation
runs once per parent). Change ``PROMPT_VERSION`` when a metadata prompt changes: it is part of the
metadata cache key, so old generations are not reused for new prompts.
"""

from __future__ import annotations

__all__ = [
    "ANSWER_SYSTEM",
    "ANSWER_TEMPLATE",
    "PROMPT_VERSION",
    "QUESTIONS_TEMPLATE",
    "SUMMARY_TEMPLATE",
    "answer_prompt",
    "questions_prompt",
    "summary_prompt",
]

PROMPT_VERSION = "2"

ANSWER_SYSTEM = (
    "You are a helpful assistant. Answer the question using only the context. "
    "If the context does not contain the answer, say that you do not know."
)

ANSWER_TEMPLATE = "Context:\n{context}\n\nQuestion: {question}"

QUESTIONS_TEMPLATE = "Text:\n{text}\n\nWrite {n} short questions that this text answers, one per line."

SUMMARY_TEMPLATE = "Text:\n{text}\n\nSummarize this text in one sentence."


def answer_prompt(question: str, contexts: list[str]) -> list[dict[str, str]]:
    """Chat messages asking ``question`` over the retrieved parent texts (numbered, best first)."""
    context = "\n\n".join(f"[{i}] {text}" for i, text in enumerate(contexts, start=1))
    return [
        {"role": "system", "content": ANSWER_SYSTEM},
        {"role": "user", "content": ANSWER_TEMPLATE.format(context=context, question=question)},
    ]


def questions_prompt(text: str, n: int) -> list[dict[str, str]]:
    """Messages asking for ``n`` questions that ``text`` answers."""
    return [{"role": "user", "content": QUESTIONS_TEMPLATE.format(text=text, n=n)}]


def summary_prompt(text: str) -> list[dict[str, str]]:
    """Messages asking for a one-sentence summary of ``text``."""
    return [{"role": "user", "content": SUMMARY_TEMPLATE.format(text=text)}]
