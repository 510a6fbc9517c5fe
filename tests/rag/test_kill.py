"""SIGKILL during `fourbit rag index`: what is left does not look complete, and a rerun finishes with the same
index (ids, texts, metadata, vectors, bookkeeping) as an uninterrupted run.

The killed run is a real process: `fourbit rag index` with one hook, installed by the script below and not by
fourbit, that pauses for good after the Nth batch written to the store and drops a marker file; the test
waits for the marker (bounded) and sends SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _cli import run_cli

import fourbit

SMALL = ["--parent-tokens", "64", "--parent-overlap", "0", "--child-tokens", "16,32", "--child-overlap", "0"]
_WAIT_S = 180

_PAUSING_CLI = """
import os, sys, time
from pathlib import Path

import fourbit.rag.store as store

marker, pause_after = Path(os.environ["MARKER"]), int(os.environ["PAUSE_AFTER"])
real_upsert, calls = store.VectorStore.upsert, [0]

def upsert(self, *args, **kwargs):
    real_upsert(self, *args, **kwargs)
    calls[0] += 1
    if calls[0] == pause_after:  # this batch is written; its file is not marked complete yet
        marker.write_text(str(os.getpid()))
        time.sleep(3600)

store.VectorStore.upsert = upsert
from fourbit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _contents(db: Path) -> tuple[dict, dict, dict]:
    """(id -> (text, metadata), id -> vector, doc_id -> bookkeeping row) of the index in ``db``."""
    from fourbit.rag.store import open_store

    store = open_store(db)
    got = store.collection.get(include=["documents", "metadatas", "embeddings"])
    records = {i: (d, m) for i, d, m in zip(got["ids"], got["documents"], got["metadatas"], strict=True)}
    vectors = {i: np.asarray(v) for i, v in zip(got["ids"], got["embeddings"], strict=True)}
    return records, vectors, store.files()


def _kill_mid_run(docs: Path, db: Path, tmp: Path, pause_after: int) -> None:
    marker = tmp / "paused"
    root = Path(fourbit.__file__).resolve().parents[1]
    env = {**os.environ, "MARKER": str(marker), "PAUSE_AFTER": str(pause_after), "PYTHONPATH": str(root),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _PAUSING_CLI, "rag", "index", str(docs), "--db", str(db),
                             "--json", *SMALL], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + _WAIT_S
        while not marker.exists():
            if proc.poll() is not None:
                raise AssertionError(f"the run ended (exit {proc.returncode}) before pausing: "
                                     f"{proc.stderr.read().decode(errors='replace')[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the run did not reach batch {pause_after} in {_WAIT_S} s")
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.multiprocess
def test_sigkill_then_rerun_equals_an_uninterrupted_run(tmp_path, docs_dir, monkeypatch, embedder):
    import fourbit.rag.embeddings

    monkeypatch.setattr(fourbit.rag.embeddings, "Embedder", lambda model=None, **kw: embedder)
    reference = tmp_path / "reference"
    assert run_cli("rag", "index", docs_dir, "--db", reference, *SMALL).code == 0
    want_records, want_vectors, want_files = _contents(reference)

    db = tmp_path / "db"
    _kill_mid_run(docs_dir, db, tmp_path, pause_after=2)  # one batch per file: killed before file 2 is marked
    records, _, files = _contents(db)
    assert 0 < len(records) < len(want_records)
    assert any(m["doc_id"] == "comets" for _, m in records.values())  # file 2's records are in, unmarked
    # Only the first file is marked complete, and its records are all there; the half-done one is not marked.
    assert list(files) == ["bread"] and files["bread"] == want_files["bread"]
    assert {i for i, (_, m) in records.items() if m["doc_id"] == "bread"} == {
        i for i, (_, m) in want_records.items() if m["doc_id"] == "bread"}
    # A query on what is left says that the index is incomplete.
    partial = run_cli("rag", "query", "comets", "--db", db, "--no-answer", "--json")
    assert partial.code == 0 and "did not finish" in partial.err and "rag index" in partial.err

    rerun = run_cli("rag", "index", docs_dir, "--db", db, "--json", *SMALL)
    assert rerun.code == 0, rerun.err
    report = json.loads(rerun.out)
    assert report["resumed"] and report["embedded"] == len(want_records) - len(records)  # only what was missing
    got_records, got_vectors, got_files = _contents(db)
    assert got_records == want_records and got_files == want_files
    for rid, vector in want_vectors.items():  # another process, the same model: float32 rounding at most
        np.testing.assert_allclose(got_vectors[rid], vector, atol=1e-5)
    after = run_cli("rag", "query", "comets", "--db", db, "--no-answer", "--json")
    assert after.code == 0 and "did not finish" not in after.err
