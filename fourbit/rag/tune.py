"""Teach the answering model to answer from its evidence: examples built from an index, a LoRA adapter
trained on them with fourbit's own trainer (``fourbit rag tune``).

A small model given evidence sentences and a question tends to write around them; QLoRA is how a narrow
task is taught to a small model. The examples come from the indexed documents themselves, built the way
``rag query`` answers (:func:`fourbit.rag.answer.answer_question`), so training and use see the same prompt:

1. **a question per parent**: the questions the metadata step generated for it (``rag index --metadata
   questions``), or questions written from templates over its text (:func:`template_questions`: its Markdown
   headings, "X is/are ..." definitions, a key phrase of its first substantial sentence);
2. **the retrieved evidence as context**: the question is put to the index's retriever and the best
   sentences of what it finds are chosen within the token budget (:func:`fourbit.rag.grounding.grounded_prompt`);
3. **an answer composed of evidence sentences** (:func:`compose_answer`): the best one and, when they score
   close to it, the next ones, in reading order: the answer a reader would accept, in the documents' words.

The records are chat conversations (system, user, assistant), trained on the assistant turn only.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fourbit._errors import FieldError
from fourbit.rag.grounding import DEFAULT_EVIDENCE_TOKENS, Evidence, grounded_prompt, split_sentences
from fourbit.rag.support import content_words

__all__ = ["TuneConfig", "build_examples", "compose_answer", "template_questions", "tune_answer_adapter"]

QUESTION_SOURCES = ("auto", "metadata", "templates")
EXAMPLES_FILE = "rag_tune_examples.jsonl"

_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
_DEFINITION = re.compile(r"^((?:[A-Z][\w\-]*|[A-Z0-9]{2,})(?:[ \-][\w\-]+){0,4}) (is|are) (?:a|an|the|used|how|what)\b")
_WORDS = re.compile(r"[A-Za-z][A-Za-z0-9\-]*")
_LEADING_ARTICLE = re.compile(r"^(A|An|The) (?=\S)")
# How a key phrase of a sentence is asked about, in turn (readers ask the same thing in several ways).
KEY_PHRASE_QUESTIONS = ("What does the document say about {}?", "Can you tell me about {}?",
                        "What do the documents say about {}?")


@dataclass
class TuneConfig:
    """How the training examples are built.

    Attributes:
        questions: "metadata" (the index's generated questions), "templates" (:func:`template_questions`), or
            "auto": a parent's generated questions when it has any, else templates.
        per_parent: questions (examples) per parent at most.
        max_examples: examples at most, over all parents.
        retriever: the retriever that finds each question's parents (as ``rag query --retriever``).
        top_k: parents retrieved per question.
        token_budget: tokens of the model the evidence may take (as ``rag query --evidence-tokens``).
        answer_sentences: evidence sentences per answer at most.
        min_relative_score: further sentences join the answer only when they score at least this fraction
            of the best one.
        same_parent: keep a question only when its best evidence sentence comes from the parent it was
            written about (a question whose retrieval went to another passage would teach an answer to
            another question).
    """

    questions: str = "auto"
    per_parent: int = 2
    max_examples: int = 400
    retriever: str = "chunks"
    top_k: int = 2
    token_budget: int = DEFAULT_EVIDENCE_TOKENS
    answer_sentences: int = 2
    min_relative_score: float = 0.85
    same_parent: bool = True

    def __post_init__(self) -> None:
        if self.questions not in QUESTION_SOURCES:
            raise FieldError("questions", f"{self.questions!r}: choose from {', '.join(QUESTION_SOURCES)}")
        for name in ("per_parent", "max_examples", "top_k", "token_budget", "answer_sentences"):
            if getattr(self, name) < 1:
                raise FieldError(name, f"must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.min_relative_score <= 1.0:
            raise FieldError("min_relative_score", f"must be in [0, 1], got {self.min_relative_score}")


def template_questions(text: str, limit: int = 2) -> list[str]:
    """Questions that ``text`` answers, from templates: its headings ("What does the document say about
    Paged optimizers?"), its definitions ("Double quantization is ..." -> "What is Double quantization?"),
    then, for each substantial sentence in turn, the longest run of its content words, asked in one of
    :data:`KEY_PHRASE_QUESTIONS` (so a parent gives as many questions as it has sentences, not all alike)."""
    questions = [f"What does the document say about {h.strip()}?" for h in _HEADING.findall(text)]
    sentences = [s for s in split_sentences(text) if not s.startswith("#")]
    for sentence in sentences:
        match = _DEFINITION.match(sentence)
        if match:
            subject = _LEADING_ARTICLE.sub(lambda m: m.group(1).lower() + " ", match.group(1))
            questions.append(f"What {match.group(2)} {subject}?")
    substantial = [s for s in sentences if len(content_words(s)) >= 4]
    for number, sentence in enumerate(substantial):
        template = KEY_PHRASE_QUESTIONS[number % len(KEY_PHRASE_QUESTIONS)]
        questions.append(template.format(_key_phrase(sentence)))
    return list(dict.fromkeys(questions))[:limit]


def _key_phrase(sentence: str, longest: int = 4) -> str:
    """The first longest run of consecutive content words of ``sentence`` (at most ``longest`` words)."""
    runs: list[list[str]] = [[]]
    for word in _WORDS.findall(sentence):
        if content_words(word):
            runs[-1].append(word)
        elif runs[-1]:
            runs.append([])
    return " ".join(max(runs, key=len)[:longest])


def compose_answer(evidence: list[Evidence], sentences: int = 2, min_relative_score: float = 0.85) -> str:
    """An answer made of evidence sentences: the best, and up to ``sentences`` - 1 more scoring at least
    ``min_relative_score`` of it, in reading order (by parent, then position)."""
    if not evidence:
        return ""
    best = evidence[0].score
    chosen = [e for e in evidence[:sentences] if e is evidence[0] or e.score >= min_relative_score * best]
    parents = list(dict.fromkeys(e.parent_id for e in chosen))
    chosen.sort(key=lambda e: (parents.index(e.parent_id), e.position))
    return " ".join(e.text for e in chosen)


def _questions_by_parent(store: Any, config: TuneConfig) -> list[tuple[str, list[str]]]:
    """(parent id, questions) for every parent of the index, in index order."""
    ids, texts, metas = store.all_records(("parent", "question"))
    generated: dict[str, list[str]] = {}
    for text, meta in zip(texts, metas, strict=True):
        if meta.get("kind") == "question":
            generated.setdefault(str(meta["parent_id"]), []).append(text)
    out = []
    for rid, text, meta in zip(ids, texts, metas, strict=True):
        if meta.get("kind") != "parent":
            continue
        asked = generated.get(rid, []) if config.questions != "templates" else []
        if not asked and config.questions != "metadata":
            asked = template_questions(text, config.per_parent)
        out.append((rid, asked[: config.per_parent]))
    if config.questions == "metadata" and not any(q for _, q in out):
        raise FieldError("questions", "the index holds no generated questions; index with `metadata` questions "
                                      "or build questions from `templates`")
    return out


def build_examples(store: Any, embedder: Any, config: TuneConfig | None = None, *,
                   count_tokens: Callable[[str], int] | None = None) -> list[dict[str, Any]]:
    """Chat records ``{"messages": [system, user, assistant], "parent_id", "question"}`` from the index.

    Args:
        store: the index (:class:`fourbit.rag.store.VectorStore`).
        embedder: its embedder (retrieval and evidence scoring).
        config: how questions, evidence and answers are chosen.
        count_tokens: the model's token counter (sizes the evidence as ``rag query`` does); default the
            embedder's.

    Returns:
        The records, at most ``config.max_examples``; questions whose evidence gives no answer (or, with
        ``config.same_parent``, whose best sentence is from another parent) are left out.

    Raises:
        FieldError: ``questions`` "metadata" on an index without generated questions; an empty index.
    """
    from fourbit.rag.retrieval import Retriever

    config = config or TuneConfig()
    retriever = Retriever(store, embedder, config.retriever, config.top_k)
    records: list[dict[str, Any]] = []
    for parent_id, questions in _questions_by_parent(store, config):
        for question in questions:
            evidence, messages = grounded_prompt(question, retriever.retrieve(question), embedder,
                                                 token_budget=config.token_budget, count_tokens=count_tokens)
            if config.same_parent and (not evidence or evidence[0].parent_id != parent_id):
                continue
            answer = compose_answer(evidence, config.answer_sentences, config.min_relative_score)
            if answer:
                records.append({"messages": [*messages, {"role": "assistant", "content": answer}],
                                "parent_id": parent_id, "question": question})
            if len(records) >= config.max_examples:
                return records
    if not records:
        raise FieldError("db_path", f"the index at {store.location} gave no training example (no parents?)")
    return records


def tune_answer_adapter(store: Any, embedder: Any, train_config: Any, config: TuneConfig | None = None, *,
                        log: Callable[..., Any] | None = None) -> tuple[Any, int]:
    """Build the examples of ``store`` and fine-tune a LoRA adapter on them into ``train_config.out``.

    Args:
        store / embedder: the index and its embedder.
        train_config: a :class:`fourbit.train.TrainConfig` (``out`` required; ``data`` and ``format`` are set
            here); ``model`` None is the bundled SmolLM2.
        config: how the examples are built.
        log: status lines (default: print).

    Returns:
        (the trainer's :class:`fourbit.train.TrainResult`, the number of examples). The examples are saved
        beside the adapter as ``rag_tune_examples.jsonl``.

    Raises:
        FieldError: see :func:`build_examples` and :func:`fourbit.train.plan_run`.
        fourbit.train.TrainingInterrupted: Ctrl-C (a checkpoint was written).
    """
    import dataclasses
    import json

    from fourbit._io import atomic_write_text
    from fourbit.train import plan_run, train
    from fourbit.train.loading import load_for_training

    plan = plan_run(train_config, log=log)  # a bad `out` fails before the model loads
    model, tokenizer = load_for_training(train_config)
    examples = build_examples(store, embedder, config,
                              count_tokens=lambda t: len(tokenizer(t, add_special_tokens=False).input_ids))
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in examples)
    with tempfile.TemporaryDirectory(prefix="fourbit-rag-tune-") as tmp:
        data = Path(tmp) / EXAMPLES_FILE
        data.write_text(text, encoding="utf-8")
        resolved = dataclasses.replace(train_config, data=str(data), format="chat")
        result = train(resolved, model, tokenizer, plan=plan, log=log)
    atomic_write_text(Path(result.out) / EXAMPLES_FILE, text)
    return result, len(examples)
