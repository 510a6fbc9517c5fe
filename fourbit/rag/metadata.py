"""LLM-generated metadata per parent: questions the excerpt answers, and a one-sentence summary.

Both are embedded as references to their parent (the ``metadata`` retriever). Generation is batched
(:meth:`HFChatLLM.generate` pads a batch of prompts on the left), shows a progress bar, and is cached by
content: the key is a hash of the prompt version, the LLM's name, the kind, the number of questions and
the parent's text, so re-indexing unchanged text generates nothing, even into a fresh database.

Small models (SmolLM2-135M) often answer "write 3 questions" with statements, numbered fragments or the
instruction itself; :func:`parse_questions` keeps only lines that are real questions.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from fourbit._errors import InputFileError
from fourbit._io import atomic_write_text, read_json
from fourbit.rag.prompts import PROMPT_VERSION, questions_prompt, summary_prompt

__all__ = ["MetadataCache", "MetadataExtractor", "parse_questions", "parse_summary"]

_BULLET = re.compile(r"^\s*(?:[-*\u2022]+|\(?\d+[.):]|q(?:uestion)?\s*\d*\s*[:.)-])\s*", re.IGNORECASE)
_LABEL = re.compile(r"^\s*(?:summary|in summary|the text|this text)\s*[:,-]\s*", re.IGNORECASE)


def parse_questions(raw: str, n: int) -> list[str]:
    """Up to ``n`` distinct well-formed questions from a model's reply.

    A kept line, stripped of bullets and numbering, ends with "?", has 3 to 40 words and does not echo the
    prompt.
    """
    kept: list[str] = []
    seen: set[str] = set()
    for line in raw.splitlines():
        line = _BULLET.sub("", line).strip().strip('"').strip()
        # A reply may put several questions on one line.
        for part in re.findall(r"[^?]*\?", line):
            question = part.strip()
            words = question.split()
            lowered = question.lower()
            if not 3 <= len(words) <= 40 or "questions that" in lowered or lowered in seen:
                continue
            seen.add(lowered)
            kept.append(question)
    return kept[:n]


def parse_summary(raw: str, max_words: int = 60) -> str:
    """The first sentence of a model's reply, label removed; "" when it is empty or too short."""
    text = _LABEL.sub("", raw.strip().split("\n\n")[0]).strip().strip('"')
    sentence = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0].strip()
    words = sentence.split()
    if len(words) < 4 or sentence.lower().startswith(("text:", "write ")):
        return ""
    return " ".join(words[:max_words])


class MetadataCache:
    """A JSON file mapping content keys to generated metadata, written atomically.

    Args:
        path: the file; None keeps the cache in memory only.
    """

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path is not None else None
        self.entries: dict[str, Any] = {}
        if self.path is not None and self.path.exists():
            try:
                self.entries = read_json(self.path)
            except InputFileError as err:
                raise InputFileError(self.path, f"damaged metadata cache ({err.message}); delete it to "
                                                "regenerate", line=err.line) from None
            if not isinstance(self.entries, dict):
                raise InputFileError(self.path, "damaged metadata cache (not a JSON object); delete it to "
                                                "regenerate")

    def get(self, key: str) -> Any:
        return self.entries.get(key)

    def put(self, key: str, value: Any) -> None:
        self.entries[key] = value

    def save(self) -> None:
        if self.path is None:
            return
        atomic_write_text(self.path, json.dumps(self.entries, ensure_ascii=False))


class MetadataExtractor:
    """Generate questions and summaries for parents with an LLM, batched and cached.

    Args:
        llm: a :class:`fourbit.rag.llm.LLM`.
        cache: a :class:`MetadataCache` (default: in memory).
        batch_size: prompts per ``llm.generate`` call (one cache save per batch).
        question_tokens / summary_tokens: generation caps (per question; per summary).
        max_input_tokens: the parent text is cut to this many LLM tokens in the prompt (None: whole).
            Prompt length dominates the cost on CPU, and a 135M model draws its questions from the
            first paragraphs anyway; the child chunks still cover the rest of the parent.
    """

    def __init__(
        self,
        llm: Any,
        cache: MetadataCache | None = None,
        *,
        batch_size: int = 8,
        question_tokens: int = 20,
        summary_tokens: int = 48,
        max_input_tokens: int | None = 512,
    ) -> None:
        self.llm = llm
        self.cache = cache or MetadataCache(None)
        self.batch_size = batch_size
        self.question_tokens = question_tokens
        self.summary_tokens = summary_tokens
        self.max_input_tokens = max_input_tokens
        self.generated = 0  # prompts actually sent to the LLM (tests and benchmarks read it)

    def key(self, config: Any) -> str:
        """Settings key of generated records: prompt version, LLM, kinds, number of questions."""
        raw = (f"{PROMPT_VERSION}|{self.llm.name}|{','.join(config.metadata)}|{config.n_questions}|"
               f"{self.max_input_tokens}")
        return hashlib.sha256(raw.encode()).hexdigest()[:12]

    def _content_key(self, kind: str, n: int, text: str) -> str:
        raw = f"{PROMPT_VERSION}\x1f{self.llm.name}\x1f{kind}\x1f{n}\x1f{self.max_input_tokens}\x1f{text}"
        return hashlib.sha256(raw.encode()).hexdigest()

    def _clip(self, text: str) -> str:
        """The first ``max_input_tokens`` tokens of ``text`` (by the LLM's tokenizer when it has one)."""
        if self.max_input_tokens is None:
            return text
        tokenizer = getattr(self.llm, "tokenizer", None)
        if tokenizer is None:
            return text[: 4 * self.max_input_tokens]  # ~4 characters per token for English
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        return text if len(offsets) <= self.max_input_tokens else text[: offsets[self.max_input_tokens - 1][1]]

    def extract(self, parents: list[Any], config: Any, *, progress: bool = True) -> dict[str, dict[str, Any]]:
        """Metadata for each parent.

        Args:
            parents: :class:`fourbit.rag.chunking.Parent` objects.
            config: an :class:`fourbit.rag.index.IndexConfig` (its ``metadata`` kinds and ``n_questions``).
            progress: show a progress bar.

        Returns:
            parent id -> ``{"questions": [...], "summary": "..."}`` (only the kinds asked for).
        """
        from tqdm.auto import tqdm

        n = config.n_questions
        jobs: list[tuple[str, str, str]] = []  # (parent id, kind, cache key) not in the cache
        out: dict[str, dict[str, Any]] = {p.id: {} for p in parents}
        for parent in parents:
            for kind in config.metadata:
                key = self._content_key(kind, n if kind == "questions" else 0, parent.text)
                hit = self.cache.get(key)
                if hit is not None:
                    out[parent.id][kind] = hit
                else:
                    jobs.append((parent.id, kind, key))
        texts = {p.id: self._clip(p.text) for p in parents}
        with tqdm(total=len(jobs), desc="metadata", unit="prompt", disable=not progress or not jobs) as bar:
            for kind in config.metadata:
                todo = [j for j in jobs if j[1] == kind]
                for start in range(0, len(todo), self.batch_size):
                    batch = todo[start : start + self.batch_size]
                    if kind == "questions":
                        prompts = [questions_prompt(texts[pid], n) for pid, _, _ in batch]
                        replies = self.llm.generate(prompts, max_new_tokens=self.question_tokens * n)
                        values: list[Any] = [parse_questions(r, n) for r in replies]
                    else:
                        prompts = [summary_prompt(texts[pid]) for pid, _, _ in batch]
                        replies = self.llm.generate(prompts, max_new_tokens=self.summary_tokens)
                        values = [parse_summary(r) for r in replies]
                    self.generated += len(batch)
                    for (pid, _, key), value in zip(batch, values, strict=True):
                        self.cache.put(key, value)
                        out[pid][kind] = value
                    self.cache.save()
                    bar.update(len(batch))
        return out
