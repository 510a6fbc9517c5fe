"""The RAG part of ``fourbit``'s demo: index the shipped QLoRA guide, ask about paged optimizers.

Kept fast: the guide is about 1,000 tokens, cut into parents of 256 tokens with 128-token children, and no
metadata is generated. The answer is grounded like ``rag query``'s: the model gets the sentences of the two
best parents that match the question (:mod:`fourbit.rag.grounding`), its answer is checked against them
(:mod:`fourbit.rag.support`: an unsupported one is replaced by the best sentence, with a note), and those
sentences are shown as evidence beside the answer.
"""

from __future__ import annotations

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
) -> dict[str, Any]:
    """Index the QLoRA guide into ``workdir/rag_db`` and answer ``question`` with the given 4-bit model.

    Args:
        model / tokenizer: the (4-bit) causal LM and its tokenizer.
        workdir: folder for the Chroma database (re-running reuses the index: nothing is re-embedded).
        question: the question.
        max_new_tokens: answer length cap.
        on_text: called once with the answer as shown (after the support check; with the note, when the
            answer is the best evidence sentence); by default (``verbose``) it is printed.
        verbose: print the question, the answer and tables of the evidence and the sources.

    Returns:
        ``{"question", "answer", "answer_kind", "grounded", "support", "note", "generated",
        "evidence": [{"text", "source", "page", "parent_id", "score"}],
        "sources": [{"id", "score", "source", "page", "text", "via"}], "retriever", "seconds", "parents",
        "embedded", "index_s", "answer_s"}``.
    """
    from fourbit.rag.answer import answer_question
    from fourbit.rag.chunking import ChunkConfig
    from fourbit.rag.embeddings import Embedder
    from fourbit.rag.index import IndexConfig, build_index
    from fourbit.rag.llm import HFChatLLM
    from fourbit.rag.retrieval import Retriever
    from fourbit.rag.store import open_store

    workdir = Path(workdir)
    start = time.perf_counter()
    embedder = Embedder()
    store = open_store(workdir / "rag_db", index="qlora-guide", create=True, embedding=embedder.describe())
    config = IndexConfig(chunk=ChunkConfig(parent_tokens=256, parent_overlap=16, child_tokens=(128,)))
    report = build_index([guide_path()], store, embedder, config, progress=False)
    index_s = time.perf_counter() - start
    start = time.perf_counter()
    llm = HFChatLLM(model, tokenizer, name="demo", stop_at_paragraph=True)
    if verbose:
        from rich.console import Console

        console = Console()
        console.print(f"indexed {guide_path().name}: {report.parents or 'unchanged'} parents, "
                      f"{report.embedded} records embedded in {index_s:.1f} s")
        console.print(f"[bold]Q:[/] {question}\n[bold]A:[/] ", end="")
        if on_text is None:
            def on_text(piece: str) -> None:
                print(piece, end="", flush=True)
    # Grounded in the best-matching sentences of two parents: with whole 256-token parents the 135M model
    # looped ("of the context of the context ...") on two and needed the best one alone.
    answer = answer_question(question, Retriever(store, embedder, "chunks", top_k=2), llm,
                             max_new_tokens=max_new_tokens)
    if on_text is not None:
        on_text(f"{answer.note}\n{answer.text}" if answer.note else answer.text)
    result = answer.as_dict()
    if verbose:
        from rich.table import Table

        print()
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
    result.update(parents=len(store.collection.get(where={"kind": "parent"})["ids"]), embedded=report.embedded,
                  index_s=round(index_s, 2), answer_s=round(time.perf_counter() - start, 2))
    return result
