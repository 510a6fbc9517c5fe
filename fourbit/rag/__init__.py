"""Document question answering with the 4-bit model: parent-child retrieval with generated metadata.

Pipeline: :mod:`~fourbit.rag.loaders` (PDF, text, Markdown) -> :mod:`~fourbit.rag.chunking` (parents
and children) -> :mod:`~fourbit.rag.metadata` (LLM questions/summaries) -> :mod:`~fourbit.rag.embeddings`
-> :mod:`~fourbit.rag.store` (Chroma) via :mod:`~fourbit.rag.index`; then :mod:`~fourbit.rag.retrieval`,
:mod:`~fourbit.rag.answer` and :mod:`~fourbit.rag.evaluate`. Heavy dependencies (chromadb,
sentence-transformers, pypdf, bm25s) are imported only when used.
"""

from fourbit.rag.chunking import ChunkConfig, Parent, split_children, split_parents
from fourbit.rag.evaluate import contains_evidence, evaluate_retriever, load_questions, reciprocal_rank
from fourbit.rag.index import IndexConfig, IndexReport, Sources, build_index, find_sources
from fourbit.rag.loaders import Document, NoTextError, discover_files, load_document
from fourbit.rag.retrieval import RETRIEVERS, Retrieved, Retriever
from fourbit.rag.store import VectorStore, index_info, open_store, server_heartbeat

__all__ = [
    "RETRIEVERS",
    "ChunkConfig",
    "Document",
    "IndexConfig",
    "IndexReport",
    "NoTextError",
    "Parent",
    "Retrieved",
    "Retriever",
    "Sources",
    "VectorStore",
    "build_index",
    "contains_evidence",
    "discover_files",
    "evaluate_retriever",
    "find_sources",
    "index_info",
    "load_document",
    "load_questions",
    "open_store",
    "reciprocal_rank",
    "server_heartbeat",
    "split_children",
    "split_parents",
]
