"""Decoding that cannot ramble: what stops a small model's answer, and how long it may grow.

A 135M model decoding greedily says its answer in a sentence or two and then goes on ("In the context of the
context, it is a helpful tool ..."), or loops. Three rules, each measured on the questions of
``benchmarks/bench_answers.py`` (numbers in its docstring; the length rule made no difference there and is
kept as a bound that costs nothing):

1. **No repeated n-gram inside the answer** (:class:`AnswerNoRepeatNGram`). transformers'
   ``no_repeat_ngram_size`` bans every n-gram of the whole sequence, the prompt included, so the model may not
   copy four tokens of the evidence in a row: it paraphrases, and a small model paraphrases into invention.
   This processor bans only n-grams the answer itself already holds.
2. **Stop at the end of the answer** (:class:`ParagraphEnd`, :func:`finish_answer`): a blank line after a
   complete sentence ends the answer; a last sentence that the length cap cut short is dropped, and so is
   everything from the first sentence that repeats a word 4-gram (token n-grams differ where words repeat
   with other tokens: "NVIDIA unified memory" and " NVIDIA Unified Memory").
3. **A length that fits the evidence** (:func:`answer_token_limit`): an answer composed from the evidence
   needs no more tokens than the evidence has.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

__all__ = ["AnswerNoRepeatNGram", "ParagraphEnd", "answer_token_limit", "finish_answer", "generation_helpers"]

# A sentence end (. ! ? and any closing quote or bracket), then a line break, optional blanks, a line break.
_PARAGRAPH_END = re.compile(r"([.!?][\"')\]]*)[ \t]*\n[ \t]*\n")
# ... not after a number of one or two digits standing alone: "2." in "spikes. 2. Pager ..." numbers a list item.
_SENTENCE_END = re.compile(r"(?<!\b[0-9])(?<!\b[0-9]{2})[.!?][\"')\]]*(?=\s|$)")
_ENDS_SENTENCE = re.compile(r"[.!?][\"')\]]*$")
_WORD = re.compile(r"[a-z0-9]+")


class AnswerNoRepeatNGram(LogitsProcessor):
    """Logits processor: forbid the token that would repeat an ``n``-gram of the generated tokens.

    Only tokens after ``prompt_length`` count, so the answer may quote the evidence in the prompt word for
    word but can never say the same ``n`` tokens twice (what a loop is).

    Args:
        n: n-gram size in tokens (>= 2).
        prompt_length: tokens of the (left-padded) prompt in every row.
    """

    def __init__(self, n: int, prompt_length: int) -> None:
        if n < 2:
            raise ValueError(f"`n` must be >= 2, got {n}")
        self.n, self.prompt_length = n, prompt_length

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        """``input_ids`` (batch, length) and ``scores`` (batch, vocab); returns the scores with banned tokens
        set to -inf."""
        generated = input_ids[:, self.prompt_length :]
        length = generated.shape[1]
        if length < self.n:  # no complete n-gram yet
            return scores
        prefix = generated[:, length + 1 - self.n :]  # the last n-1 tokens
        windows = generated.unfold(1, self.n, 1)  # (batch, windows, n)
        matches = (windows[..., :-1] == prefix.unsqueeze(1)).all(dim=-1)
        banned = torch.zeros(scores.shape, dtype=torch.int32, device=scores.device)
        banned.scatter_add_(1, windows[..., -1], matches.to(torch.int32))
        return scores.masked_fill(banned > 0, float("-inf"))


class ParagraphEnd(StoppingCriteria):
    """Stopping criterion: a row is done once its answer text holds a blank line after a complete sentence.

    Args:
        tokenizer: decodes the generated tokens.
        prompt_length: tokens of the (left-padded) prompt in every row.
    """

    def __init__(self, tokenizer: Any, prompt_length: int) -> None:
        self.tokenizer, self.prompt_length = tokenizer, prompt_length

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :], skip_special_tokens=True)
        return torch.tensor([bool(_PARAGRAPH_END.search(t.lstrip())) for t in texts], device=input_ids.device)


def generation_helpers(tokenizer: Any, prompt_length: int, *, no_repeat_ngram_size: int,
                       stop_at_paragraph: bool) -> dict[str, Any]:
    """``model.generate`` keyword arguments for the rules above (empty lists where a rule is off)."""
    processors = [AnswerNoRepeatNGram(no_repeat_ngram_size, prompt_length)] if no_repeat_ngram_size else []
    stops = [ParagraphEnd(tokenizer, prompt_length)] if stop_at_paragraph else []
    return {"logits_processor": LogitsProcessorList(processors), "stopping_criteria": StoppingCriteriaList(stops)}


def finish_answer(text: str, *, cut_paragraph: bool = True, drop_partial: bool = True,
                  drop_repeats: bool = True) -> str:
    """The answer as shown: up to the first paragraph end (``cut_paragraph``), without a last sentence the
    length cap cut short (``drop_partial``; kept when it is the only one), ending before the first sentence
    that repeats a word 4-gram (``drop_repeats``: the answer is over once it says itself again; the first
    sentence is always kept), stripped."""
    text = text.strip()
    end = _PARAGRAPH_END.search(text) if cut_paragraph else None
    if end:
        text = text[: end.end(1)]
    if drop_partial and not _ENDS_SENTENCE.search(text):
        ends = list(_SENTENCE_END.finditer(text))
        if ends:
            text = text[: ends[-1].end()]
    if drop_repeats:
        text = _before_repeat(text)
    return text.strip()


def _before_repeat(text: str, n: int = 4) -> str:
    """``text`` up to the first sentence (after the first) holding a word ``n``-gram said before or twice."""
    seen: set[tuple[str, ...]] = set()
    start = 0
    for end in [m.end() for m in _SENTENCE_END.finditer(text)] + [len(text)]:
        words = _WORD.findall(text[start:end].lower())
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        if start > 0 and (seen.intersection(grams) or len(set(grams)) < len(grams)):
            return text[:start]
        seen.update(grams)
        start = end
    return text


def answer_token_limit(evidence_tokens: int, cap: int, *, ratio: float = 1.0, floor: int = 32) -> int:
    """Tokens an answer may take: ``ratio`` times the evidence's tokens, at least ``floor``, at most ``cap``."""
    if ratio <= 0:
        return cap
    return max(1, min(cap, max(floor, math.ceil(ratio * evidence_tokens))))
