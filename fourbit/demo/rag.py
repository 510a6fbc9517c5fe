"""The RAG part of ``fourbit``'s demo: index the shipped QLoRA guide, ask about paged optimizers, and show the
base model's answer above the grounded-answer adapter's (issue 24) to the same question.

Kept fast: the guide is about 1,000 tokens, cut into parents of 256 tokens with 128-token children, and no
metadata is generated. The answer is grounded like ``rag query``'s: the model gets the sentences of the two
best parents that match the question (:mod:`fourbit.rag.grounding`), its answer is checked against them
(:mod:`fourbit.rag.support`: an unsupported one is replaced by the best sentence, with a note), and those
sentences are shown as evidence beside the answer.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["DEMO_QUESTION", "guide_path", "run_rag_demo"]

DEMO_QUESTION = "Can you tell me about the paged optimizers?"


def guide_path() -> Path:
    """The guide to QLoRA that ships inside the package (``fourbit/data/qlora_guide.md``)."""
    path = Path(__file__).resolve().parents[1] / "data" / "qlora_guide.md"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: reinstall fourbit")
    return path


def run_rag_demo(
    model: Any,
    tokenizer: Any,
    workdir: Path,
    *,
    question: str = DEMO_QUESTION,
    max_new_tokens: int = 160,
    on_text: Callable[[str], None] | None = None,
    verbose: bool = True,
    adapter: str | os.PathLike | None = None,
    use_answer_adapter: bool = True,
) -> dict[str, Any]:
    """Index the QLoRA guide into ``workdir/rag_db`` and answer ``question`` with the given 4-bit model: the
    base model's answer, then (when there is an answer adapter) the answer adapter's, to the same question.

    Args:
        model / tokenizer: the (4-bit) causal LM and its tokenizer (the bundled model); an adapter is loaded
            onto it for the second answer and removed afterwards.
        workdir: folder for the Chroma database (re-running reuses the index: nothing is re-embedded).
        question: the question.
        max_new_tokens: answer length cap.
        on_text: called with each answer as shown (after the support check; with the note, when the answer is
            the best evidence sentence): the base model's, then the adapter's; by default (``verbose``) printed.
        verbose: print the question, the answers and tables of the evidence and the sources.
        adapter: the answer adapter; default the grounded-answer adapter shipped with the bundled model
            (:func:`fourbit.rag.llm.answer_adapter`).
        use_answer_adapter: False: the base model's answer only.

    Returns:
        The adapter's answer (the base model's when there is no adapter): ``{"question", "answer",
        "answer_kind", "supported", "grounded", "support", "note", "generated", "evidence": [{"text", "source", "page",
        "parent_id", "score"}], "sources": [{"id", "score", "source", "page", "text", "via"}], "retriever",
        "seconds", "parents", "embedded", "index_s", "answer_s", "adapter" (its folder or None), "base" (the
        base model's answer: the same fields without "evidence" and "sources")}``.
    """
    from fourbit.rag.llm import answer_adapter

    workdir = Path(workdir)
    store, retriever, report, index_s = _index_guide(workdir)
    folder = answer_adapter(None, adapter, use_default=use_answer_adapter)
    start = time.perf_counter()
    console = None
    if verbose:
        from rich.console import Console

        console = Console()
        console.print(f"indexed {guide_path().name}: {report.parents or 'unchanged'} parents, "
                      f"{report.embedded} records embedded in {index_s:.1f} s")
        console.print(f"[bold]Q:[/] {question}")
        if on_text is None:
            def on_text(text: str) -> None:
                print(text, flush=True)
    runs = [("base model", None), *([(f"answer adapter ({folder.name})", folder)] if folder else [])]
    answers = {}
    for label, use in runs:  # one above the other: the same question, the same evidence
        answers[label] = answer = _answer(model, tokenizer, retriever, question, max_new_tokens, use)
        if console is not None:
            console.print(f"[bold]A, {label}:[/]", end=" ")
        if on_text is not None:
            on_text(f"{answer.note}\n{answer.text}" if answer.note else answer.text)
    base, shown = answers["base model"], list(answers.values())[-1]
    result = shown.as_dict()
    if console is not None:
        _print_tables(console, result)
    result.update(parents=len(store.collection.get(where={"kind": "parent"})["ids"]), embedded=report.embedded,
                  index_s=round(index_s, 2), answer_s=round(time.perf_counter() - start, 2),
                  adapter=str(folder) if folder else None,
                  base={k: v for k, v in base.as_dict().items() if k not in ("evidence", "sources")})
    return result


def _index_guide(workdir: Path) -> tuple[Any, Any, Any, float]:
    """(store, retriever, index report, seconds) of the guide indexed into ``workdir/rag_db``."""
    from fourbit.rag.chunking import ChunkConfig
    from fourbit.rag.embeddings import Embedder
    from fourbit.rag.index import IndexConfig, build_index
    from fourbit.rag.retrieval import Retriever
    from fourbit.rag.store import open_store

    start = time.perf_counter()
    embedder = Embedder()
    store = open_store(workdir / "rag_db", index="qlora-guide", create=True, embedding=embedder.describe())
    config = IndexConfig(chunk=ChunkConfig(parent_tokens=256, parent_overlap=16, child_tokens=(128,)))
    report = build_index([guide_path()], store, embedder, config, progress=False)
    # Grounded in the best-matching sentences of two parents: with whole 256-token parents the 135M model
    # looped ("of the context of the context ...") on two and needed the best one alone.
    return store, Retriever(store, embedder, "chunks", top_k=2), report, time.perf_counter() - start


def _answer(model: Any, tokenizer: Any, retriever: Any, question: str, max_new_tokens: int,
            adapter: Path | None) -> Any:
    """The :class:`fourbit.rag.answer.Answer` of ``model`` (with ``adapter`` loaded onto it for this answer
    and removed afterwards, so the model is left as it was)."""
    from fourbit.nn.adapters import load_adapter
    from fourbit.nn.lora import unload_lora
    from fourbit.rag.answer import answer_question
    from fourbit.rag.llm import HFChatLLM

    if adapter is not None:
        model = load_adapter(model, adapter).eval()
    try:
        llm = HFChatLLM(model, tokenizer, name="demo", stop_at_paragraph=True)
        return answer_question(question, retriever, llm, max_new_tokens=max_new_tokens)
    finally:
        if adapter is not None:
            unload_lora(model)


def _print_tables(console: Any, result: dict[str, Any]) -> None:
    """The evidence sentences and the retrieved parents, as tables."""
    from rich.table import Table

    table = Table(title="evidence (the guide's own sentences)")
    for col in ("score", "page", "sentence"):
        table.add_column(col, overflow="fold")
    for row in result["evidence"]:
        table.add_row(f"{row['score']:.3f}", row["page"], row["text"])
    console.print(table)
    table = Table(title="sources")
    for col in ("id", "score", "page", "first lines"):
        table.add_column(col, overflow="fold")
    for row in result["sources"]:
        table.add_row(row["id"], f"{row['score']:.3f}", row["page"], row["text"][:160])
    console.print(table)
