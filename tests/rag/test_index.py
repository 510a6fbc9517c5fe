"""Incremental indexing into Chroma: unchanged, changed, removed, resumed after a crash; bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from fourbit._errors import FieldError, InputFileError
from fourbit.rag.index import build_index
from fourbit.rag.store import open_store


def _store(db: Path, embedder, create: bool = True):
    return open_store(db, create=create, embedding=embedder.describe())


def _snapshot(store) -> dict[str, str]:
    got = store.collection.get(include=["documents"])
    return dict(zip(got["ids"], got["documents"], strict=True))


def test_unchanged_files_embed_nothing(tmp_path, docs_dir, embedder, small_config):
    store = _store(tmp_path / "db", embedder)
    first = build_index([docs_dir], store, embedder, small_config, progress=False)
    assert len(first.indexed) == 3 and first.embedded == store.count() > 0
    before, pieces = _snapshot(store), embedder.pieces_embedded
    # Re-open from disk, as a new process would.
    again = build_index([docs_dir], _store(tmp_path / "db", embedder), embedder, small_config, progress=False)
    assert again.embedded == 0 and len(again.unchanged) == 3 and not again.indexed
    assert embedder.pieces_embedded == pieces
    assert _snapshot(store) == before


def test_changed_file_replaces_its_records(tmp_path, docs_dir, embedder, small_config, topic_text):
    store = _store(tmp_path / "db", embedder)
    build_index([docs_dir], store, embedder, small_config, progress=False)
    before = _snapshot(store)
    (docs_dir / "comets.txt").write_text(topic_text("comets", repeat=1), encoding="utf-8")
    report = build_index([docs_dir], store, embedder, small_config, progress=False)
    assert report.indexed == [str((docs_dir / "comets.txt").resolve())] and len(report.unchanged) == 2
    after = _snapshot(store)
    # Other documents untouched, byte for byte.
    assert {k: v for k, v in after.items() if not k.startswith("comets")} == {
        k: v for k, v in before.items() if not k.startswith("comets")
    }
    # The changed document equals a fresh index of its new content: nothing stale remains.
    fresh = _store(tmp_path / "fresh", embedder)
    build_index([docs_dir / "comets.txt"], fresh, embedder, small_config, progress=False)
    assert {k: v for k, v in after.items() if k.startswith("comets")} == _snapshot(fresh)
    assert report.deleted > 0


def test_removed_file_is_removed(tmp_path, docs_dir, embedder, small_config):
    store = _store(tmp_path / "db", embedder)
    build_index([docs_dir], store, embedder, small_config, progress=False)
    (docs_dir / "bread.txt").unlink()
    report = build_index([docs_dir], store, embedder, small_config, progress=False)
    assert report.removed == [str((docs_dir / "bread.txt").resolve())]
    assert not any(k.startswith("bread") for k in _snapshot(store))
    assert "bread" not in store.files()


def test_killed_run_resumes_without_duplicates(tmp_path, docs_dir, embedder, small_config, monkeypatch):
    reference = _store(tmp_path / "ref", embedder)
    build_index([docs_dir], reference, embedder, small_config, progress=False)
    total = reference.count()

    store = _store(tmp_path / "db", embedder)
    real = embedder.embed_documents
    calls = {"n": 0}

    def dies_on_third_batch(texts, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real(texts, **kwargs)

    monkeypatch.setattr(embedder, "embed_documents", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        build_index([docs_dir], store, embedder, small_config, progress=False)
    monkeypatch.setattr(embedder, "embed_documents", real)
    done = store.count()
    assert 0 < done < total
    assert _store(tmp_path / "db", embedder).interrupted  # what is left does not pass for complete
    resumed = build_index([docs_dir], _store(tmp_path / "db", embedder), embedder, small_config, progress=False)
    assert resumed.resumed and not _store(tmp_path / "db", embedder).interrupted
    assert resumed.embedded == total - done  # only what was missing
    assert _snapshot(store) == _snapshot(reference)  # same ids, same texts, no duplicates


def test_unusable_files_in_a_folder_are_skipped_with_the_reason(tmp_path, docs_dir, embedder, small_config,
                                                                make_pdf):
    make_pdf(docs_dir / "scan.pdf", [""], blank=True)
    make_pdf(docs_dir / "secret.pdf", ["hidden"], encrypt=True)
    store = _store(tmp_path / "db", embedder)
    report = build_index([docs_dir], store, embedder, small_config, progress=False)
    assert len(report.indexed) == 3
    reasons = {Path(p).name: reason for p, reason in report.skipped}
    assert set(reasons) == {"scan.pdf", "secret.pdf"}
    assert "no extractable text" in reasons["scan.pdf"] and "encrypted" in reasons["secret.pdf"]
    # Named explicitly, the same files are errors that name them, raised before the index changes.
    count = store.count()
    for name, reason in (("scan.pdf", "no extractable text"), ("secret.pdf", "encrypted")):
        with pytest.raises(InputFileError, match=reason) as caught:
            build_index([docs_dir / "bread.txt", docs_dir / name], store, embedder, small_config, progress=False)
        assert caught.value.path == str((docs_dir / name).resolve())
    assert store.count() == count


def test_pdf_records_carry_page_labels(tmp_path, embedder, small_config, make_pdf, topic_text):
    path = make_pdf(tmp_path / "book.pdf", [topic_text("bread", 1), topic_text("comets", 1)])
    store = _store(tmp_path / "db", embedder)
    build_index([path], store, embedder, small_config, progress=False)
    got = store.collection.get(where={"kind": "parent"}, include=["documents", "metadatas"])
    pages = {m["page"] for m in got["metadatas"]}
    assert pages == {"1", "2"}
    for text, meta in zip(got["documents"], got["metadatas"], strict=True):
        if "Halley" in text:
            assert meta["page"] == "2"


def test_bad_databases(tmp_path, docs_dir, embedder, small_config):
    with pytest.raises(FieldError, match="no index database") as caught:
        open_store(tmp_path / "nothing")
    assert caught.value.field == "db_path" and not (tmp_path / "nothing").exists()
    store = _store(tmp_path / "db", embedder)
    build_index([docs_dir], store, embedder, small_config, progress=False)
    count = store.count()
    with pytest.raises(FieldError, match="built with embedding model"):
        open_store(tmp_path / "db", embedding={"embedding_model": "other-model", "embedding_dim": 768})
    with pytest.raises(FieldError, match="no such index"):
        open_store(tmp_path / "db", index="other")
    with pytest.raises(InputFileError, match="unsupported file type"):
        (tmp_path / "x.docx").write_bytes(b"PK")
        build_index([tmp_path / "x.docx"], store, embedder, small_config, progress=False)
    assert open_store(tmp_path / "db").count() == count  # nothing lost


def test_moved_file_keeps_one_copy(tmp_path, docs_dir, embedder, small_config):
    store = _store(tmp_path / "db", embedder)
    build_index([docs_dir], store, embedder, small_config, progress=False)
    count = store.count()
    (docs_dir / "sub").mkdir()
    (docs_dir / "bread.txt").rename(docs_dir / "sub" / "bread.txt")
    report = build_index([docs_dir], store, embedder, small_config, progress=False)
    assert report.indexed == [str((docs_dir / "sub" / "bread.txt").resolve())]
    assert store.count() == count
    paths = {m["path"] for m in store.collection.get(where={"doc_id": "bread"}, include=["metadatas"])["metadatas"]}
    assert paths == {str((docs_dir / "sub" / "bread.txt").resolve())}
    assert store.files()["bread"]["path"] == str((docs_dir / "sub" / "bread.txt").resolve())
