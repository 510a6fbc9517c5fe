"""Grounded answers: give the model the retrieved parents' sentences that best match the question.

A retrieved parent is up to ~1,000 tokens; a small 4-bit model answers better from the few sentences that
bear on the question than from several whole parents (and every prompt token costs CPU time). So:

1. split each retrieved parent into sentences;
2. embed the question (query side) and every sentence (document side) with the index's embedder and score
   each sentence by cosine similarity plus :data:`LEXICAL_WEIGHT` times the share of the question's content
   words it holds (:func:`sentence_scores`);
3. keep the best sentences while they fit in ``token_budget`` tokens of the answering model, and only
   those scoring at least half the best one's score;
4. hand them to the model grouped by parent, best first: the parent of the best sentence first, each
   parent's sentences by score (:func:`grounded_contexts`: the answer adapter copies what it is given first),

and return the chosen sentences as extractive evidence beside the generated answer. Functions over the
retrieved parents only: ``rag query``, ``rag compare``, the demo (through
:func:`fourbit.rag.answer.answer_question`) and the server's ``/v1/answers`` all answer this way.

The budget: at most :data:`DEFAULT_EVIDENCE_TOKENS` tokens of the answering model, and never more than the
context window leaves after the prompt's own tokens and the answer's (:func:`evidence_budget`). SmolLM2-135M
stays on topic with a few hundred tokens of context and drifts on a thousand, and every prompt token costs
prefill time: 256 tokens of evidence (~330 with the prompt) prefill in about a second on 2 CPU cores.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fourbit.rag.prompts import answer_prompt
from fourbit.rag.support import content_words

__all__ = [
    "DEFAULT_EVIDENCE_TOKENS",
    "Evidence",
    "LEXICAL_WEIGHT",
    "evidence_budget",
    "grounded_contexts",
    "grounded_prompt",
    "select_evidence",
    "sentence_scores",
    "split_sentences",
]

DEFAULT_EVIDENCE_TOKENS = 256
# Weight of the question's words in a sentence's score, beside the embedding's cosine (0-1 each). The
# embedding finds sentences on the question's topic; the words the reader used pick, among those, the one
# that answers. On the 34 held-out QLoRA-paper questions (benchmarks/rag_questions.jsonl), the top sentence
# holds the reference for 21 by cosine alone and 25 with the words added at any weight from 0.25 to 1.0
# (10 and 12 of questions 21-34 alone); rank fusion instead of a sum: 19.
LEXICAL_WEIGHT = 0.5

# A sentence ends at . ! ? (optionally followed by a closing quote/bracket) before whitespace; a blank
# line or a Markdown heading/bullet line also ends one.
_HEADING = re.compile(r"#{1,6}\s")
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+|\n\s*\n|\n(?=\s*(?:#|[-*] |\d+\. ))")


@dataclass
class Evidence:
    """One extracted sentence: its text, where it comes from, its similarity to the question."""

    text: str
    source: str
    page: str
    parent_id: str
    position: int  # sentence number inside its parent
    score: float

    def as_dict(self) -> dict[str, Any]:
        return {"text": self.text, "source": self.source, "page": self.page, "parent_id": self.parent_id,
                "score": round(self.score, 4)}


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text`` (whitespace inside each collapsed); empty pieces dropped."""
    return [" ".join(s.split()) for s in _SENTENCE_END.split(text) if s and s.strip()]


def select_evidence(
    question: str,
    parents: list[Any],
    embedder: Any,
    *,
    token_budget: int = DEFAULT_EVIDENCE_TOKENS,
    count_tokens: Callable[[str], int] | None = None,
    max_sentences: int = 12,
    min_sentences: int = 1,
    min_relative_score: float = 0.5,
    lexical_weight: float = LEXICAL_WEIGHT,
) -> list[Evidence]:
    """The sentences of ``parents`` most similar to ``question`` that fit in ``token_budget`` tokens.

    Args:
        question: the question.
        parents: retrieved parents (:class:`fourbit.rag.retrieval.Retrieved`: ``id``, ``text``, ``source``,
            ``page``), best first.
        embedder: the index's :class:`fourbit.rag.embeddings.Embedder` (``embed_queries``,
            ``embed_documents``, ``count_tokens``).
        token_budget: tokens of the answering model the chosen sentences may take together.
        count_tokens: the answering model's token counter; default the embedder's.
        max_sentences: at most this many sentences.
        min_sentences: at least this many (the best ones), even over the budget.
        min_relative_score: drop sentences scoring below this fraction of the best sentence's score (a
            sentence on another topic is not evidence just because the budget has room for it).
        lexical_weight: weight of the question's words in the score (:func:`sentence_scores`).

    Returns:
        The chosen sentences, best first.
    """
    import numpy as np

    candidates: list[tuple[Any, int, str]] = []
    seen: set[str] = set()
    for parent in parents:
        for position, sentence in enumerate(split_sentences(parent.text)):
            if sentence.lower() in seen:  # overlapping parents repeat sentences
                continue
            if _HEADING.match(sentence):  # "## Paged optimizers" names a topic; it is not evidence
                continue
            seen.add(sentence.lower())
            candidates.append((parent, position, sentence))
    if not candidates:
        return []
    count = count_tokens or embedder.count_tokens
    scores = sentence_scores(question, [s for _, _, s in candidates], embedder, lexical_weight)
    chosen: list[Evidence] = []
    used = 0
    order = np.argsort(-scores, kind="stable")
    floor = float(scores[order[0]]) * min_relative_score if scores[order[0]] > 0 else -np.inf
    for i in order:
        parent, position, sentence = candidates[int(i)]
        if len(chosen) >= min_sentences and scores[int(i)] < floor:
            break
        cost = count(sentence)
        if len(chosen) >= min_sentences and used + cost > token_budget:
            continue
        chosen.append(Evidence(sentence, str(parent.source), str(parent.page), str(parent.id), position,
                               float(scores[int(i)])))
        used += cost
        if len(chosen) >= max_sentences:
            break
    return chosen


def sentence_scores(question: str, sentences: list[str], embedder: Any,
                    lexical_weight: float = LEXICAL_WEIGHT) -> Any:
    """How well each sentence answers ``question``: the cosine similarity of their embeddings (query side
    for the question, document side for the sentences) plus ``lexical_weight`` times the share of the
    question's distinct content words (:func:`fourbit.rag.support.content_words`) the sentence holds.

    Returns:
        A float numpy array, one score per sentence.
    """
    import numpy as np

    query = np.asarray(embedder.embed_queries([question]))[0]
    scores = np.asarray(embedder.embed_documents(sentences)) @ query
    asked = set(content_words(question))
    if lexical_weight and asked:
        shares = [len(asked & set(content_words(s))) / len(asked) for s in sentences]
        scores = scores + lexical_weight * np.asarray(shares, dtype=scores.dtype)
    return scores


def grounded_contexts(evidence: list[Evidence]) -> list[str]:
    """One context per parent that gave ``evidence`` (best first): the parent of the best sentence first, each
    parent's sentences best first.

    Best first, not reading order: the answer adapter copies the sentences it is given, and in reading order
    it copied the best-scoring one for 10 of 34 held-out questions; given best first and trained that way, it
    answers with the sentence that holds the reference more often (``benchmarks/RESULTS.md``, "Seconds per
    answer, and what was tried for coverage")."""
    by_parent: dict[str, list[Evidence]] = {}
    for e in evidence:
        by_parent.setdefault(e.parent_id, []).append(e)
    return [" ".join(e.text for e in sentences) for sentences in by_parent.values()]


def evidence_budget(
    context_window: int | None,
    prompt_tokens: int,
    max_new_tokens: int,
    cap: int = DEFAULT_EVIDENCE_TOKENS,
) -> int:
    """Tokens the evidence may take: ``cap``, less when the context window would not hold the prompt's own
    ``prompt_tokens``, the evidence and the answer (whose reserve is at most a quarter of the window).

    Returns:
        At least 1 (the best sentence is always given: :func:`select_evidence`'s ``min_sentences``).
    """
    if context_window is None:
        return max(1, cap)
    reserve = min(max_new_tokens, context_window // 4)
    return max(1, min(cap, context_window - prompt_tokens - reserve))


def grounded_prompt(
    question: str,
    parents: list[Any],
    embedder: Any,
    *,
    token_budget: int = DEFAULT_EVIDENCE_TOKENS,
    count_tokens: Callable[[str], int] | None = None,
) -> tuple[list[Evidence], list[dict[str, str]]]:
    """The evidence of ``parents`` for ``question`` and the answer prompt built from it.

    Args:
        question: the question.
        parents: the retrieved parents, best first.
        embedder: the index's embedder (scores the sentences).
        token_budget: tokens the evidence may take (:func:`evidence_budget`).
        count_tokens: the answering model's token counter; default the embedder's.

    Returns:
        (evidence, best first; chat messages for the answering model: one context per parent that gave
        evidence, best first, each its chosen sentences best first: :func:`grounded_contexts`).
    """
    evidence = select_evidence(question, parents, embedder, token_budget=token_budget, count_tokens=count_tokens)
    return evidence, answer_prompt(question, grounded_contexts(evidence))
