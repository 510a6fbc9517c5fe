"""Parent/child chunking: sizes respected, text covered, ids stable and derived."""

from __future__ import annotations

from pathlib import Path

import pytest

from fourbit._errors import FieldError
from fourbit.rag.chunking import ChunkConfig, split_children, split_parents
from fourbit.rag.loaders import load_document, normalize_whitespace


@pytest.fixture
def doc(tmp_path: Path, topic_text):
    path = tmp_path / "comets.txt"
    path.write_text(topic_text("comets", repeat=3), encoding="utf-8")
    return load_document(path)


def test_parents_fit_and_cover_the_text(doc, embedder):
    config = ChunkConfig(parent_tokens=64, parent_overlap=0, child_tokens=(16, 32), child_overlap=0)
    parents = split_parents(doc, config, embedder.tokenizer)
    assert len(parents) >= 3
    assert all(p.n_tokens <= 64 for p in parents)
    assert [p.id for p in parents] == [f"comets-{i}" for i in range(len(parents))]
    # Without overlap, the parents joined are the document (up to whitespace): nothing is lost.
    assert normalize_whitespace(" ".join(p.text for p in parents)) == normalize_whitespace(doc.text)


def test_children_are_inside_their_parent_with_derived_ids(doc, embedder):
    config = ChunkConfig(parent_tokens=64, parent_overlap=0, child_tokens=(16, 32), child_overlap=0)
    parent = split_parents(doc, config, embedder.tokenizer)[0]
    children = split_children(parent, config, embedder.tokenizer)
    assert {c.size for c in children} == {16, 32}
    for child in children:
        assert child.parent_id == parent.id and child.id.startswith(f"{parent.id}/c{child.size}-")
        assert child.text in parent.text
        assert embedder.count_tokens(child.text) <= child.size
    assert len({c.id for c in children}) == len(children)


def test_ids_are_stable_across_runs(doc, embedder):
    config = ChunkConfig(parent_tokens=48, parent_overlap=8, child_tokens=(16,), child_overlap=4)
    first = [(p.id, p.text) for p in split_parents(doc, config, embedder.tokenizer)]
    second = [(p.id, p.text) for p in split_parents(doc, config, embedder.tokenizer)]
    assert first == second


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"parent_tokens": 4}, "parent_tokens"),
        ({"child_tokens": (2048,)}, "child_tokens"),
        ({"child_tokens": (64, 64)}, "child_tokens"),
        ({"parent_overlap": 600}, "parent_overlap"),
        ({"child_overlap": 100}, "child_overlap"),
    ],
)
def test_config_rejects_bad_values(kwargs, field):
    with pytest.raises(FieldError, match=f"`{field}`") as caught:
        ChunkConfig(**kwargs)
    assert caught.value.field == field
