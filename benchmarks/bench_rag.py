"""RAG benchmark: retrieval quality and speed of fourbit's retrievers next to llama-index-core's
parent-child (recursive) retriever, on the QLoRA paper, the same questions and the same embedding model.

    python benchmarks/bench_rag.py [--paper /work/shared/data/qlora_paper.txt] [--threads 1]
                                   [--metadata-parents 0] [--skip-llamaindex] [--json out.json]

Reports hit@2, hit@5 and MRR@5 per retriever, distinct parents and characters handed to the LLM per
query (at k=2), indexing wall and CPU time, and median query latency.

Both sides are measured the same way: the same embedding of every text (fourbit's ``Embedder``, which embeds
a text longer than MiniLM's 256 word pieces as the mean of its pieces instead of truncating it; llama-index
is handed those vectors), and the same number of distinct parents per query (k of them: a retriever whose
references point at the same parent is asked for more references until k distinct parents are found or the
index is exhausted, as fourbit's ``Retriever`` does; llama-index's ``RecursiveRetriever`` with
``similarity_top_k=k`` alone returned 1.29 distinct parents per query at k=2). Each side retrieves 5
distinct parents per question once, and hit@2/MRR@2 are read from the first 2, as a user with
``--top-k 2`` would get them. With ``--metadata-parents N`` it
also times metadata generation (questions + summary per parent, batched, bundled SmolLM2) on the first N
parents; when N covers every parent, the ``metadata`` retriever and ``all`` with metadata are evaluated.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _pin_threads(n: int) -> None:
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS"):
        os.environ[var] = str(n)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(n)


class _Clock:
    """Wall and process CPU time of a block."""

    def __enter__(self) -> _Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


class Hit:
    """A retrieved parent's text (what the metrics read)."""

    def __init__(self, text: str) -> None:
        self.text = text


def first_distinct_parents(search: Any, k: int, total: int) -> list[Hit]:
    """The first ``k`` distinct parents of a ranked search, as fourbit's ``Retriever`` returns them.

    Args:
        search: n -> the n best hits as (parent id, parent text), best first (several may share a parent).
        k: distinct parents wanted.
        total: references in the index (the most ``search`` can return).

    Returns:
        Up to ``k`` parents in rank order; fewer only when the whole index points at fewer.
    """
    n = k
    while True:
        seen: dict[str, Hit] = {}
        for parent, text in search(n):
            seen.setdefault(parent, Hit(text))
        if len(seen) >= k or n >= total:
            return list(seen.values())[:k]
        n = min(2 * n, total)


def _score(results: list[list[Any]], questions: list[Any], latencies: list[float]) -> dict[str, Any]:
    """Metrics from each question's ranked, distinct parents (objects with .text)."""
    from fourbit.rag.evaluate import evaluate_retriever

    lookup = {q.question: r for q, r in zip(questions, results, strict=True)}
    out: dict[str, Any] = {}
    for k in (2, 5):
        m = evaluate_retriever(lambda q: lookup[q], questions, k)
        out[f"hit@{k}"], out[f"mrr@{k}"] = m["hit_rate"], m["mrr"]
        if k == 2:
            out["parents@2"], out["chars@2"] = m["parents_per_query"], m["chars_per_query"]
    out["latency_ms"] = 1000 * statistics.median(latencies)
    return out


def run_fourbit(paper: Path, questions: list[Any], workdir: Path, metadata_parents: int) -> dict[str, Any]:
    from fourbit.rag.chunking import split_parents
    from fourbit.rag.embeddings import Embedder
    from fourbit.rag.index import IndexConfig, build_index
    from fourbit.rag.loaders import load_document
    from fourbit.rag.retrieval import Retriever
    from fourbit.rag.store import open_store

    embedder = Embedder()
    store = open_store(workdir / "fourbit_db", create=True, embedding=embedder.describe())
    with _Clock() as clock:
        report = build_index([paper], store, embedder, IndexConfig(), progress=False)
    rows: dict[str, Any] = {"_index": {"wall_s": clock.wall, "cpu_s": clock.cpu, "records": report.embedded,
                                       "parents": report.parents, "pieces": embedder.pieces_embedded}}
    modes = ["baseline", "chunks", "all", "hybrid"]
    if metadata_parents:
        parents = split_parents(load_document(paper), IndexConfig().chunk, embedder.tokenizer)
        rows["_metadata"] = run_metadata(parents[:metadata_parents])
        if metadata_parents >= len(parents):
            store = open_store(workdir / "fourbit_meta_db", create=True, embedding=embedder.describe())
            config = IndexConfig(metadata=("questions", "summary"))
            build_index([paper], store, embedder, config, extractor=rows["_metadata"].pop("extractor"),
                        progress=False)
            modes += ["metadata"]
            rows["_metadata"]["note"] = "metadata index: every parent; 'all'/'hybrid' include metadata"
        else:
            rows["_metadata"].pop("extractor")
    for mode in modes:
        retriever = Retriever(store, embedder, mode, top_k=5)
        retriever.retrieve(questions[0].question)  # warm-up (BM25 index, caches)
        results, latencies = [], []
        for q in questions:
            start = time.perf_counter()
            results.append(retriever.retrieve(q.question))
            latencies.append(time.perf_counter() - start)
        rows[f"fourbit {mode}"] = _score(results, questions, latencies)
    return rows


def run_metadata(parents: list[Any]) -> dict[str, Any]:
    """Time questions+summary generation for ``parents`` with the bundled 4-bit SmolLM2."""
    from fourbit.rag.index import IndexConfig
    from fourbit.rag.llm import load_llm
    from fourbit.rag.metadata import MetadataCache, MetadataExtractor

    with _Clock() as load:
        llm = load_llm()
    extractor = MetadataExtractor(llm, MetadataCache(None), batch_size=8)
    config = IndexConfig(metadata=("questions", "summary"))
    with _Clock() as clock:
        out = extractor.extract(parents, config, progress=True)
    n_prompts = extractor.generated
    questions = [q for v in out.values() for q in v.get("questions", [])]
    return {
        "parents": len(parents), "prompts": n_prompts, "load_s": load.wall,
        "wall_s": clock.wall, "cpu_s": clock.cpu,
        "s_per_parent_per_prompt": clock.wall / max(1, n_prompts),
        "valid_questions_per_parent": len(questions) / max(1, len(parents)),
        "summaries": sum(bool(v.get("summary")) for v in out.values()),
        "examples": questions[:4], "extractor": extractor,
    }


def run_llamaindex(paper: Path, questions: list[Any]) -> dict[str, Any]:
    """llama-index-core's parent-child recipe: 1024-token parents, 128/256/512 sub-chunks as IndexNodes
    pointing at their parent, VectorStoreIndex + RecursiveRetriever; baseline = parents only."""
    from importlib.metadata import version

    import numpy as np
    from llama_index.core import Document, Settings, VectorStoreIndex
    from llama_index.core.embeddings import BaseEmbedding
    from llama_index.core.node_parser import SentenceSplitter
    from llama_index.core.retrievers import RecursiveRetriever
    from llama_index.core.schema import IndexNode

    from fourbit.rag.embeddings import Embedder
    from fourbit.rag.loaders import load_document

    st = Embedder()  # the same model and the same embedding of long texts as fourbit's side

    class _STEmbedding(BaseEmbedding):
        """fourbit's Embedder as a llama-index embedding: a text longer than the model reads is embedded
        by its pieces (HuggingFaceEmbedding would truncate it at max_seq_length, an unfair handicap for
        1024-token parents)."""

        def _vec(self, texts: list[str]) -> list[list[float]]:
            return np.asarray(st.embed_documents(texts)).tolist()

        def _get_query_embedding(self, query: str) -> list[float]:
            return np.asarray(st.embed_queries([query])[0]).tolist()

        async def _aget_query_embedding(self, query: str) -> list[float]:
            return self._get_query_embedding(query)

        def _get_text_embedding(self, text: str) -> list[float]:
            return self._vec([text])[0]

        def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
            return self._vec(texts)

    embed = _STEmbedding(model_name="all-MiniLM-L6-v2", embed_batch_size=32)
    Settings.embed_model, Settings.llm = embed, None

    def count(text: str) -> list[int]:
        return st.tokenizer.encode(text, add_special_tokens=False).ids

    rows: dict[str, Any] = {}
    with _Clock() as clock:
        # The same cleaned text that fourbit's loader gives its own side (hyphenation repaired, whitespace).
        docs = [Document(text=load_document(paper).text, metadata={"file_name": paper.name})]
        base_nodes = SentenceSplitter(chunk_size=1024, tokenizer=count).get_nodes_from_documents(docs)
        for i, node in enumerate(base_nodes):
            node.id_ = f"node-{i}"
        all_nodes: list[Any] = []
        for base in base_nodes:
            for size in (128, 256, 512):
                parser = SentenceSplitter(chunk_size=size, chunk_overlap=20, tokenizer=count)
                for sub in parser.get_nodes_from_documents([base]):
                    all_nodes.append(IndexNode.from_text_node(sub, base.node_id))
            all_nodes.append(IndexNode.from_text_node(base, base.node_id))
        chunk_index = VectorStoreIndex(all_nodes, embed_model=embed)
    rows["_index"] = {"wall_s": clock.wall, "cpu_s": clock.cpu, "records": len(all_nodes),
                      "parents": len(base_nodes), "version": version("llama-index-core")}
    with _Clock() as clock:
        base_index = VectorStoreIndex(base_nodes, embed_model=embed)
    rows["_index"]["baseline_wall_s"] = clock.wall
    nodes_by_id = {n.node_id: n for n in all_nodes}

    def retriever(name: str, n: int) -> Any:
        if name == "llama-index baseline":
            return base_index.as_retriever(similarity_top_k=n)
        vector = chunk_index.as_retriever(similarity_top_k=n)
        return RecursiveRetriever("vector", retriever_dict={"vector": vector}, node_dict=nodes_by_id,
                                  verbose=False)

    def distinct_parents(name: str, question: str, k: int, total: int) -> list[Hit]:
        def search(n: int) -> list[tuple[str, str]]:  # the recursive retriever resolves references to parents
            return [(hit.node.node_id, hit.node.get_content()) for hit in retriever(name, n).retrieve(question)]

        return first_distinct_parents(search, k, total)

    sizes = {"llama-index baseline": len(base_nodes), "llama-index chunks": len(all_nodes)}
    for name, total in sizes.items():
        distinct_parents(name, questions[0].question, 5, total)  # warm-up
        results, latencies = [], []
        for q in questions:
            start = time.perf_counter()
            results.append(distinct_parents(name, q.question, 5, total))
            latencies.append(time.perf_counter() - start)
        rows[name] = _score(results, questions, latencies)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paper", type=Path, default=Path("/work/shared/data/qlora_paper.txt"))
    parser.add_argument("--questions", type=Path, default=HERE / "rag_questions.jsonl")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--metadata-parents", type=int, default=0,
                        help="generate metadata for the first N parents (CPU heavy); >= all parents also "
                             "evaluates the metadata retriever")
    parser.add_argument("--skip-llamaindex", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    _pin_threads(args.threads)
    sys.path.insert(0, str(HERE.parent))
    from rich.console import Console
    from rich.table import Table

    from fourbit.rag.evaluate import load_questions

    questions = load_questions(args.questions)
    with tempfile.TemporaryDirectory() as tmp:
        rows = run_fourbit(args.paper, questions, Path(tmp), args.metadata_parents)
        if not args.skip_llamaindex:
            rows.update({f"{k}:li" if k.startswith("_") else k: v
                         for k, v in run_llamaindex(args.paper, questions).items()})
    con = Console(width=160)
    table = Table(title=f"retrieval on {args.paper.name}: {len(questions)} questions, {args.threads} thread(s)")
    for col in ("retriever", "hit@2", "hit@5", "MRR@5", "parents/q @2", "chars/q @2", "latency ms"):
        table.add_column(col, justify="right")
    for name, r in rows.items():
        if not name.startswith("_"):
            table.add_row(name, f"{r['hit@2']:.3f}", f"{r['hit@5']:.3f}", f"{r['mrr@5']:.3f}",
                          f"{r['parents@2']:.2f}", f"{r['chars@2']:.0f}", f"{r['latency_ms']:.1f}")
    con.print(table)
    for key in ("_index", "_index:li", "_metadata"):
        if key in rows:
            con.print(key, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in rows[key].items()})
    best = {side: max((r["mrr@5"], n) for n, r in rows.items() if n.startswith(side))
            for side in ("fourbit", "llama-index") if any(n.startswith(side) for n in rows)}
    if len(best) == 2:
        con.print(f"best MRR@5: {best['fourbit'][1]} {best['fourbit'][0]:.3f} vs {best['llama-index'][1]} "
                  f"{best['llama-index'][0]:.3f} (ratio {best['fourbit'][0] / max(best['llama-index'][0], 1e-9):.2f})")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
