"""Grounded answers: give the model the retrieved parents' sentences that best match the question.

A retrieved parent is up to ~1,000 tokens; a small 4-bit model answers better from the few sentences that
bear on the question than from several whole parents (and every prompt token costs CPU time). So:

1. split each retrieved parent into sentences;
2. embed the question (query side) and every sentence (document side) with the index's embedder and score
   each sentence by cosine similarity;
3. keep the best sentences while they fit in ``token_budget`` tokens of the answering model, and only
   those scoring at least half the best one's score;
4. hand them to the model grouped by parent, in retrieval order, each parent's sentences in reading
   order (so the context reads like text, not like a shuffled list),

and return the chosen sentences as extractive evidence beside the generated answer. A function over the
retrieved parents only, so that ``rag query`` can use it too.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Evidence", "grounded_contexts", "select_evidence", "split_sentences"]

# A sentence ends at . ! ? (optionally followed by a closing quote/bracket) before whitespace; a blank
# line or a Markdown heading/bullet line also ends one.
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
    token_budget: int = 384,
    count_tokens: Callable[[str], int] | None = None,
    max_sentences: int = 12,
    min_sentences: int = 1,
    min_relative_score: float = 0.5,
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
            seen.add(sentence.lower())
            candidates.append((parent, position, sentence))
    if not candidates:
        return []
    count = count_tokens or embedder.count_tokens
    query = np.asarray(embedder.embed_queries([question]))[0]
    vectors = np.asarray(embedder.embed_documents([s for _, _, s in candidates]))
    scores = vectors @ query
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


def grounded_contexts(evidence: list[Evidence], parent_order: list[str]) -> list[str]:
    """One context per parent (in ``parent_order``): its chosen sentences in reading order."""
    by_parent: dict[str, list[Evidence]] = {}
    for e in evidence:
        by_parent.setdefault(e.parent_id, []).append(e)
    contexts = []
    for pid in parent_order:
        if pid in by_parent:
            contexts.append(" ".join(e.text for e in sorted(by_parent[pid], key=lambda e: e.position)))
    return contexts
