"""Parent/child chunking with stable ids (the "parent-child retriever" layout).

Parents (default 1024 tokens) are what the LLM reads; children (default 128, 256 and 512 tokens, cut
from each parent) and generated metadata are what gets matched against the question, each pointing back
at its parent. Lengths are counted with a Hugging Face ``tokenizers.Tokenizer`` (the embedding model's by
default, or the LLM's).

Splitting uses ``semantic-text-splitter`` (a maintained Rust library): it fills each chunk up to the
token capacity while cutting at the highest semantic level that fits (paragraphs, then Unicode sentence
boundaries, then words), supports token overlap, and returns character offsets, which we need for page
labels. Ids: parent ``<doc>-<n>``; child ``<doc>-<n>/c<size>-<m>``; they depend only on the text and
the sizes, so re-indexing the same file yields the same ids.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from fourbit._errors import FieldError
from fourbit.rag.loaders import Document

__all__ = ["Child", "ChunkConfig", "Parent", "child_id", "parent_id", "split_children", "split_parents"]


@dataclass
class ChunkConfig:
    """Chunk sizes in tokens.

    Attributes:
        parent_tokens: size of the chunks the LLM reads.
        parent_overlap: tokens shared by neighbouring parents.
        child_tokens: sizes of the child chunks cut from each parent.
        child_overlap: tokens shared by neighbouring children.
    """

    parent_tokens: int = 1024
    parent_overlap: int = 32
    child_tokens: tuple[int, ...] = (128, 256, 512)
    child_overlap: int = 20

    def __post_init__(self) -> None:
        self.child_tokens = tuple(int(s) for s in self.child_tokens)
        if self.parent_tokens < 16:
            raise FieldError("parent_tokens", f"must be >= 16, got {self.parent_tokens}")
        if not 0 <= self.parent_overlap < self.parent_tokens // 2:
            raise FieldError("parent_overlap", f"must be in [0, `parent_tokens`/2), got {self.parent_overlap}")
        for size in self.child_tokens:
            if not 8 <= size <= self.parent_tokens:
                raise FieldError("child_tokens", f"each size must be in [8, {self.parent_tokens}], got {size}")
        if len(set(self.child_tokens)) != len(self.child_tokens):
            raise FieldError("child_tokens", f"sizes must be distinct, got {self.child_tokens}")
        if self.child_tokens and not 0 <= self.child_overlap < min(self.child_tokens) // 2:
            raise FieldError("child_overlap", f"must be in [0, min(`child_tokens`)/2), got {self.child_overlap}")

    def key(self) -> str:
        """Short hash of the sizes: records made with other sizes are stale."""
        raw = f"{self.parent_tokens}/{self.parent_overlap}/{self.child_tokens}/{self.child_overlap}"
        return hashlib.sha256(raw.encode()).hexdigest()[:12]


@dataclass
class Parent:
    """A parent chunk: the unit the retrievers return and the LLM reads."""

    id: str
    doc_id: str
    index: int
    text: str
    page: str
    source: str
    n_tokens: int
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class Child:
    """A child chunk: a smaller piece of a parent, embedded as a reference to it."""

    id: str
    parent_id: str
    size: int
    text: str


def parent_id(doc_id: str, index: int) -> str:
    """``<doc>-<n>``."""
    return f"{doc_id}-{index}"


def child_id(parent: str, size: int, index: int) -> str:
    """``<parent>/c<size>-<m>``."""
    return f"{parent}/c{size}-{index}"


def _splitter(tokenizer: Any, capacity: int, overlap: int) -> Any:
    try:
        from semantic_text_splitter import TextSplitter
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError("chunking needs semantic-text-splitter: pip install 'fourbit[rag]'") from err

    return TextSplitter.from_huggingface_tokenizer(tokenizer, capacity=capacity, overlap=overlap)


def _count(tokenizer: Any, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False).ids)


def split_parents(doc: Document, config: ChunkConfig, tokenizer: Any) -> list[Parent]:
    """Cut a document into parent chunks of at most ``config.parent_tokens`` tokens.

    Args:
        doc: the loaded document.
        config: chunk sizes.
        tokenizer: a ``tokenizers.Tokenizer`` with truncation and padding disabled.

    Returns:
        Parents in document order, ids ``<doc>-0``, ``<doc>-1``, ...
    """
    splitter = _splitter(tokenizer, config.parent_tokens, config.parent_overlap)
    parents = []
    for index, (offset, text) in enumerate(splitter.chunk_indices(doc.text)):
        parents.append(
            Parent(
                id=parent_id(doc.doc_id, index),
                doc_id=doc.doc_id,
                index=index,
                text=text,
                page=doc.page_at(offset),
                source=doc.path.name,
                n_tokens=_count(tokenizer, text),
            )
        )
    return parents


def split_children(parent: Parent, config: ChunkConfig, tokenizer: Any) -> list[Child]:
    """Cut one parent into child chunks of every size in ``config.child_tokens``.

    A size at least as large as the parent would only repeat it, so it yields no child.
    """
    children = []
    for size in config.child_tokens:
        if size >= parent.n_tokens:
            continue
        splitter = _splitter(tokenizer, size, config.child_overlap)
        for index, text in enumerate(splitter.chunks(parent.text)):
            children.append(Child(id=child_id(parent.id, size, index), parent_id=parent.id, size=size, text=text))
    return children
