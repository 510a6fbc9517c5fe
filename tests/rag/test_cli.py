"""`fourbit rag` commands through argparse: index, query (retrieval only), eval --json, errors."""

from __future__ import annotations

import argparse
import json

import pytest

from fourbit._errors import FieldError
from fourbit.cli.rag import add_parser


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fourbit")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(autouse=True)
def _one_embedder(monkeypatch, embedder):
    """The CLI builds an Embedder per command; reuse the session's (loading it is the slow part)."""
    import fourbit.rag.embeddings

    monkeypatch.setattr(fourbit.rag.embeddings, "Embedder", lambda model=None, **kw: embedder)


def test_index_query_eval(tmp_path, docs_dir, capsys):
    db = str(tmp_path / "db")
    small = ["--parent-tokens", "64", "--parent-overlap", "0", "--child-tokens", "16,32", "--child-overlap", "0"]
    assert _run(["rag", "index", str(docs_dir), "--db", db, "--json", *small]) == 0
    first = json.loads(capsys.readouterr().out)
    assert len(first["indexed"]) == 3 and first["records"] == first["embedded"] > 0
    assert _run(["rag", "index", str(docs_dir), "--db", db, "--json", *small]) == 0
    assert json.loads(capsys.readouterr().out)["embedded"] == 0

    assert _run(["rag", "query", "Where do long-period comets come from?", "--db", db, "--no-answer", "--json",
                 "--retriever", "chunks", "--top-k", "2"]) == 0
    sources = json.loads(capsys.readouterr().out)["sources"]
    assert len(sources) == 2 and sources[0]["id"].startswith("comets-")

    questions = tmp_path / "q.jsonl"
    questions.write_text(
        json.dumps({"question": "Where do long-period comets come from?", "evidence": "distant Oort cloud"}) + "\n"
        + json.dumps({"question": "What deters whiteflies?", "evidence": "Companion planting with basil"}) + "\n",
        encoding="utf-8",
    )
    assert _run(["rag", "eval", "--questions", str(questions), "--db", db, "--json", "--top-k", "3"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"baseline", "chunks", "metadata", "all", "hybrid"}
    assert "error" in result["metadata"]  # no metadata was generated for this index
    for mode in ("baseline", "chunks", "all", "hybrid"):
        assert result[mode]["k"] == 3 and 0.0 <= result[mode]["mrr"] <= result[mode]["hit_rate"] <= 1.0
    assert result["chunks"]["hit_rate"] == 1.0


def test_cli_errors(tmp_path, docs_dir):
    with pytest.raises(FieldError, match="no index database"):
        _run(["rag", "query", "q", "--db", str(tmp_path / "none"), "--no-answer"])
    with pytest.raises(FieldError, match="`metadata`"):
        _run(["rag", "index", str(docs_dir), "--db", str(tmp_path / "db"), "--metadata", "keywords"])
    with pytest.raises(SystemExit):
        _run(["rag", "query", "q", "--db", "x", "--retriever", "nope"])
