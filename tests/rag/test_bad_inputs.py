"""`fourbit rag` on bad input, through the CLI entry point: exit 1, one line naming the file, flag or server, no
traceback, nothing created or lost; and every mistake that can be seen cheaply is reported before the
embedding model loads (the `no_model` fixture makes loading it fail the test)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from _cli import assert_clean_error, run_cli

SMALL = ["--parent-tokens", "64", "--parent-overlap", "0", "--child-tokens", "16,32", "--child-overlap", "0"]


@pytest.fixture
def no_model(monkeypatch):
    """Loading the embedding model fails the test: the error must come before it."""
    import fourbit.rag.embeddings

    def refuse(*args, **kwargs):
        raise AssertionError("the embedding model was loaded before the error was found")

    monkeypatch.setattr(fourbit.rag.embeddings, "Embedder", refuse)


@pytest.fixture
def session_model(monkeypatch, embedder):
    """The CLI builds an Embedder per command; reuse the session's (loading it is the slow part)."""
    import fourbit.rag.embeddings

    monkeypatch.setattr(fourbit.rag.embeddings, "Embedder", lambda model=None, **kw: embedder)


def _index(*argv) -> object:
    return run_cli("rag", "index", *map(str, argv), *SMALL)


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- paths and files, before anything loads or is written ------------------------------------------------
def test_missing_path_and_empty_folder_create_nothing(tmp_path, no_model):
    db = tmp_path / "db"
    assert_clean_error(_index(tmp_path / "missing.txt", "--db", db), str(tmp_path / "missing.txt"),
                       "no such file")
    (tmp_path / "empty").mkdir()
    assert_clean_error(_index(tmp_path / "empty", "--db", db), str(tmp_path / "empty"), "no supported file")
    (tmp_path / "x.docx").write_bytes(b"PK")
    assert_clean_error(_index(tmp_path / "x.docx", "--db", db), str(tmp_path / "x.docx"), "unsupported")
    assert not db.exists()


def test_unusable_files_named_explicitly_are_errors(tmp_path, docs_dir, make_pdf, topic_text, no_model):
    good = make_pdf(tmp_path / "good.pdf", [topic_text("bread")])
    data = good.read_bytes()
    (tmp_path / "truncated.pdf").write_bytes(data[: len(data) // 2])
    (tmp_path / "fake.pdf").write_bytes(b"this is no PDF")
    make_pdf(tmp_path / "secret.pdf", ["classified"], encrypt=True)
    make_pdf(tmp_path / "scan.pdf", [""], blank=True)
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)) * 8)
    (tmp_path / "russian.txt").write_bytes("Привет, это документ на русском языке.".encode("cp1251"))
    (tmp_path / "empty.md").write_text("  \n", encoding="utf-8")
    cases = {
        "truncated.pdf": "not a readable PDF", "fake.pdf": "not a readable PDF", "secret.pdf": "encrypted",
        "scan.pdf": "no extractable text", "binary.txt": "binary data", "russian.txt": "not UTF-8",
        "empty.md": "empty file",
    }
    db = tmp_path / "db"
    for name, reason in cases.items():
        result = _index(docs_dir, tmp_path / name, "--db", db)
        message = assert_clean_error(result, str(tmp_path / name), reason)
        assert "EOF marker" not in result.err.replace(message, "")  # no stray pypdf log lines
    assert not db.exists()


def test_bad_flag_values_fail_before_the_model_loads(tmp_path, docs_dir, no_model):
    db = tmp_path / "db"
    assert_clean_error(run_cli("rag", "index", docs_dir, "--db", db, "--parent-tokens", "4"), "--parent-tokens")
    assert_clean_error(run_cli("rag", "index", docs_dir, "--db", db, "--metadata", "keywords"), "--metadata")
    assert_clean_error(run_cli("rag", "index", docs_dir, "--db", db, "--n-questions", "0"), "--n-questions")
    assert_clean_error(run_cli("rag", "index", docs_dir), "--db")
    missing_model = tmp_path / "no-such-model.gguf"
    assert_clean_error(run_cli("rag", "index", docs_dir, "--db", db, "--metadata", "questions", "--model",
                               missing_model), str(missing_model))
    assert not db.exists()


def test_query_eval_compare_flags_fail_before_anything_loads(tmp_path, no_model):
    db = tmp_path / "db"
    assert_clean_error(run_cli("rag", "query", "q", "--db", db, "--top-k", "0", "--no-answer"), "--top-k")
    assert_clean_error(run_cli("rag", "query", "  ", "--db", db, "--no-answer"), "QUESTION")
    assert_clean_error(run_cli("rag", "query", "q", "--db", db, "--model", tmp_path / "m.gguf"),
                       str(tmp_path / "m.gguf"))
    assert_clean_error(run_cli("rag", "query", "q", "--db", db, "--adapter", tmp_path / "none"),
                       str(tmp_path / "none"))
    assert_clean_error(run_cli("rag", "compare", "q", "--db", db, "--retrievers", "chunks,nope"), "--retrievers",
                       "nope")
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question": "q", "evidence": "e"}\n', encoding="utf-8")
    assert_clean_error(run_cli("rag", "eval", "--questions", questions, "--db", db, "--retrievers", ""),
                       "--retrievers")
    assert_clean_error(run_cli("rag", "eval", "--questions", tmp_path / "none.jsonl", "--db", db),
                       str(tmp_path / "none.jsonl"))
    assert not db.exists()


def test_written_files_respect_the_umask(tmp_path, docs_dir, session_model):
    import os

    from fourbit.rag.metadata import MetadataCache

    old = os.umask(0o022)
    try:
        assert _index(docs_dir, "--db", tmp_path / "db").code == 0
        cache = MetadataCache(tmp_path / "db" / "metadata_cache.json")
        cache.put("k", ["v"])
        cache.save()
    finally:
        os.umask(old)
    modes = {str(p): p.stat().st_mode & 0o777 for p in [tmp_path / "db", *(tmp_path / "db").rglob("*")]}
    assert all(mode in (0o644, 0o755) for mode in modes.values()), modes
    assert MetadataCache(tmp_path / "db" / "metadata_cache.json").get("k") == ["v"]


# ---- the database folder ---------------------------------------------------------------------------------
def test_db_that_is_a_file_or_read_only(tmp_path, docs_dir, monkeypatch, no_model):
    a_file = tmp_path / "db.txt"
    a_file.write_text("keep me", encoding="utf-8")
    assert_clean_error(_index(docs_dir, "--db", a_file), "--db", str(a_file))
    assert a_file.read_text(encoding="utf-8") == "keep me"

    # A read-only file system, as the OS reports it (root writes anywhere, so the check is simulated).
    import fourbit._io

    read_only = tmp_path / "ro"
    read_only.mkdir()
    real_access = fourbit._io.os.access
    monkeypatch.setattr(fourbit._io.os, "access", lambda p, mode: Path(p) != read_only and real_access(p, mode))
    monkeypatch.setattr(fourbit._io, "_read_only_fs", lambda p: Path(p) == read_only)
    message = assert_clean_error(_index(docs_dir, "--db", read_only / "db"), "--db", str(read_only))
    assert "read-only file system" in message
    assert not (read_only / "db").exists()


def test_damaged_database_is_named_and_kept(tmp_path, docs_dir, session_model):
    db = tmp_path / "db"
    assert _index(docs_dir, "--db", db).code == 0
    assert run_cli("rag", "query", "comets", "--db", db, "--no-answer", "--json").code == 0
    sqlite = db / "chroma.sqlite3"
    sqlite.write_bytes(sqlite.read_bytes()[: sqlite.stat().st_size // 3])  # truncated
    before = _tree(db)
    for argv in (["rag", "query", "comets", "--db", db, "--no-answer"], ["rag", "index", docs_dir, "--db", db]):
        message = assert_clean_error(run_cli(*argv), str(db), "damaged")
        assert "--db" in message  # says what to do: index into a new --db folder
    assert _tree(db) == before  # nothing lost, nothing written

    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "chroma.sqlite3").write_bytes(bytes(range(256)) * 64)
    assert_clean_error(run_cli("rag", "query", "comets", "--db", garbage, "--no-answer"), str(garbage), "damaged")


def test_damaged_database_fails_before_the_model_loads(tmp_path, docs_dir, no_model):
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "chroma.sqlite3").write_bytes(b"SQLite format 3\x00" + bytes(range(256)) * 64)
    assert_clean_error(_index(docs_dir, "--db", garbage), str(garbage), "damaged")
    assert_clean_error(run_cli("rag", "query", "q", "--db", tmp_path / "none", "--no-answer"), "--db",
                       "no index database")
    assert not (tmp_path / "none").exists()


def test_index_built_with_another_model_is_named_before_loading(tmp_path, docs_dir, no_model):
    from fourbit.rag.store import open_store

    open_store(tmp_path / "db", create=True, embedding={"embedding_model": "other-model", "embedding_dim": 8})
    assert_clean_error(_index(docs_dir, "--db", tmp_path / "db"), "--embedding-model", "other-model")


# ---- a Chroma server that is down --------------------------------------------------------------------------
def test_server_down_names_host_and_port(tmp_path, docs_dir, no_model):
    port = _free_port()
    where = f"127.0.0.1:{port}"
    for argv in (["rag", "index", docs_dir], ["rag", "query", "q", "--no-answer"]):
        message = assert_clean_error(run_cli(*argv, "--chroma-host", "127.0.0.1", "--chroma-port", port), where)
        assert "--chroma-host" in message


# ---- folders: unusable files are skipped with a warning that names them -------------------------------------
def test_folder_skips_unusable_files_with_one_warning_each(tmp_path, docs_dir, make_pdf, session_model):
    (docs_dir / "broken.pdf").write_bytes(b"%PDF-1.4\n garbage")
    make_pdf(docs_dir / "secret.pdf", ["classified"], encrypt=True)
    (docs_dir / "binary.txt").write_bytes(bytes(range(256)) * 8)
    (docs_dir / "latin1.txt").write_bytes("Le café de Sévérine est très chaud, à Orléans.".encode("latin-1"))
    result = _index(docs_dir, "--db", tmp_path / "db", "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert sorted(Path(p).name for p, _ in report["skipped"]) == ["binary.txt", "broken.pdf", "secret.pdf"]
    assert sorted(Path(p).name for p in report["indexed"]) == ["bread.txt", "comets.txt", "latin1.txt",
                                                              "tomatoes.txt"]
    warnings = [line for line in result.err.splitlines() if ": warning: " in line]
    assert len(warnings) == 3 and "Traceback" not in result.err and "EOF marker" not in result.err
    for name, reason in (("broken.pdf", "not a readable PDF"), ("secret.pdf", "encrypted"),
                         ("binary.txt", "binary")):
        assert any(str(docs_dir / name) in w and reason in w for w in warnings), (name, warnings)
    assert any(str(docs_dir / "latin1.txt") in line and "cp1252" in line for line in result.err.splitlines())
    from fourbit.rag.store import open_store

    texts = open_store(tmp_path / "db").collection.get(where={"doc_id": "latin1"}, include=["documents"])
    assert any("Le café de Sévérine" in t for t in texts["documents"])  # decoded, not mojibake


def test_eval_questions_file_errors_name_file_and_line(tmp_path, docs_dir, session_model):
    assert _index(docs_dir, "--db", tmp_path / "db").code == 0
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"question": "q", "evidence": "e"}\n{"question": "no evidence"}\n', encoding="utf-8")
    assert_clean_error(run_cli("rag", "eval", "--questions", bad, "--db", tmp_path / "db"), f"{bad}:2")
    bad.write_text('{"question": "q", "evidence": "e"}\n{not json\n', encoding="utf-8")
    assert_clean_error(run_cli("rag", "eval", "--questions", bad, "--db", tmp_path / "db"), f"{bad}:2")


# ---- a folder where nothing can be indexed: exit 1, each file named, no new database left behind ----------
@pytest.fixture
def unusable_dir(tmp_path, make_pdf) -> Path:
    folder = tmp_path / "unusable"
    folder.mkdir()
    (folder / "broken.pdf").write_bytes(b"%PDF-1.4\n garbage")
    make_pdf(folder / "secret.pdf", ["classified"], encrypt=True)
    (folder / "binary.txt").write_bytes(bytes(range(256)) * 8)
    return folder


def _nothing_indexed(result, folder: Path) -> None:
    message = assert_clean_error(result, str(folder), "nothing could be indexed")
    assert "3 files" in message
    warnings = [line for line in result.err.splitlines() if ": warning: skipped " in line]
    assert sorted(Path(w.split("skipped ", 1)[1].split(":", 1)[0]).name for w in warnings) == \
        ["binary.txt", "broken.pdf", "secret.pdf"]


def test_nothing_indexable_fails_and_leaves_no_new_database(tmp_path, unusable_dir, session_model):
    db = tmp_path / "db"
    _nothing_indexed(_index(unusable_dir, "--db", db), unusable_dir)
    assert not db.exists()
    given = tmp_path / "empty-db"  # a folder the user made for it: kept, and left empty
    given.mkdir()
    _nothing_indexed(_index(unusable_dir, "--db", given, "--json"), unusable_dir)
    assert given.is_dir() and list(given.iterdir()) == []
    # The same folder, once it holds a usable file, indexes into the same place.
    (unusable_dir / "fine.txt").write_text("Comets have tails that point away from the Sun.", encoding="utf-8")
    assert _index(unusable_dir, "--db", db).code == 0
    assert json.loads(run_cli("rag", "query", "comet tails", "--db", db, "--no-answer", "--json").out)["sources"]


def test_nothing_indexable_leaves_an_existing_database_as_it_was(tmp_path, docs_dir, unusable_dir,
                                                                  session_model):
    from fourbit.rag.store import open_store

    db = tmp_path / "db"
    assert _index(docs_dir, "--db", db).code == 0
    before = _tree(db)
    _nothing_indexed(_index(unusable_dir, "--db", db), unusable_dir)
    assert _tree(db) == before  # not a byte written
    _nothing_indexed(_index(unusable_dir, "--db", db, "--index", "other"), unusable_dir)
    store = open_store(db)
    assert sorted(c.name for c in store.client.list_collections()) == ["fourbit", "fourbit.files"]
    assert not store.interrupted and len(store.files()) == 3
    assert sorted(_tree(db)) == sorted(before)  # the same files (no new collection folder)
    hits = json.loads(run_cli("rag", "query", "comet tails", "--db", db, "--no-answer", "--json").out)["sources"]
    assert hits and hits[0]["source"].startswith("comets")


def test_build_index_raises_before_touching_the_store(tmp_path, unusable_dir, embedder, small_config):
    from fourbit.rag.index import NothingIndexedError, build_index
    from fourbit.rag.store import open_store

    store = open_store(tmp_path / "db", create=True, embedding=embedder.describe())
    seen = []
    with pytest.raises(NothingIndexedError, match="nothing could be indexed") as caught:
        build_index([unusable_dir], store, embedder, small_config, progress=False,
                    on_file=lambda path, status: seen.append(status))
    assert sorted(Path(p).name for p, _ in caught.value.report.skipped) == ["binary.txt", "broken.pdf",
                                                                            "secret.pdf"]
    assert seen == ["skipped"] * 3 and not caught.value.report.indexed
    assert store.files() == {} and store.count() == 0 and not store.interrupted
    store.discard_created()
    assert not (tmp_path / "db").exists()
