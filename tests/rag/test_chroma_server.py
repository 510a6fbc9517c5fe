"""The Chroma server path (`--chroma-host/--chroma-port`) against a real server: `chroma run` on 127.0.0.1 and a
free port, started for this module and always stopped. Indexing and retrieval through it give the same
records and the same answers' sources as the embedded store."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _cli import run_cli

SMALL = ["--parent-tokens", "64", "--parent-overlap", "0", "--child-tokens", "16,32", "--child-overlap", "0"]
QUESTIONS = ["Where do long-period comets come from?", "What deters whiteflies?", "Why do bakers score the loaf?"]
_WAIT_S = 60


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def chroma_server(tmp_path_factory):
    """(host, port) of a fresh Chroma server, stopped (killed if need be) when the module ends."""
    from fourbit.rag.store import server_heartbeat

    chroma = Path(sys.executable).with_name("chroma")
    if not chroma.exists():
        pytest.skip(f"the `chroma` executable is not installed next to {sys.executable} (chromadb's server)")
    folder = tmp_path_factory.mktemp("chroma_server")
    port = _free_port()
    log = open(folder / "server.log", "wb")  # noqa: SIM115 (closed in the finalizer)
    proc = subprocess.Popen([str(chroma), "run", "--path", str(folder / "data"), "--host", "127.0.0.1",
                             "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + _WAIT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"chroma run exited with {proc.returncode}: "
                                   f"{(folder / 'server.log').read_text(errors='replace')[-2000:]}")
            try:
                assert server_heartbeat("127.0.0.1", port, timeout=2.0) > 0
                break
            except ValueError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no heartbeat from chroma run on 127.0.0.1:{port} in {_WAIT_S} s") \
                        from None
                time.sleep(0.25)
        yield "127.0.0.1", port
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        log.close()


@pytest.fixture
def session_model(monkeypatch, embedder):
    import fourbit.rag.embeddings

    monkeypatch.setattr(fourbit.rag.embeddings, "Embedder", lambda model=None, **kw: embedder)


def _json(*argv) -> dict:
    result = run_cli(*map(str, argv))
    assert result.code == 0, result.err
    return json.loads(result.out)


@pytest.mark.multiprocess
def test_server_index_and_query_equal_the_embedded_store(tmp_path, docs_dir, chroma_server, session_model):
    from fourbit.rag.store import server_heartbeat

    host, port = chroma_server
    assert server_heartbeat(host, port) > 0
    server = ["--chroma-host", host, "--chroma-port", port, "--index", "server-test"]
    embedded = ["--db", tmp_path / "db", "--index", "server-test"]

    first = _json("rag", "index", docs_dir, *server, *SMALL, "--json")
    local = _json("rag", "index", docs_dir, *embedded, *SMALL, "--json")
    assert first["location"] == f"http://{host}:{port}"
    assert len(first["indexed"]) == 3 and first["records"] == local["records"] == first["embedded"] > 0
    again = _json("rag", "index", docs_dir, *server, *SMALL, "--json")  # incremental through the server too
    assert again["embedded"] == 0 and len(again["unchanged"]) == 3

    from fourbit.rag.store import open_store

    def records(store):
        got = store.collection.get(include=["documents", "metadatas"])
        return {i: (d, m) for i, d, m in zip(got["ids"], got["documents"], got["metadatas"], strict=True)}

    assert records(open_store(host=host, port=port, index="server-test")) == records(
        open_store(tmp_path / "db", index="server-test"))

    for retriever in ("baseline", "chunks", "all", "hybrid"):
        for question in QUESTIONS:
            argv = ["rag", "query", question, "--no-answer", "--json", "--retriever", retriever, "--top-k", "2"]
            remote, here = _json(*argv, *server)["sources"], _json(*argv, *embedded)["sources"]
            assert [s["id"] for s in remote] == [s["id"] for s in here]
            assert [s["text"] for s in remote] == [s["text"] for s in here]
            # Both run Chroma's HNSW over the same float32 vectors.
            assert [s["score"] for s in remote] == pytest.approx([s["score"] for s in here], abs=1e-5)


@pytest.mark.multiprocess
def test_answers_through_the_server_equal_the_embedded_store(tmp_path, docs_dir, chroma_server, embedder):
    """The answering step sees the same context (a deterministic stand-in LLM echoes its prompt)."""
    from fourbit.rag.answer import answer_question
    from fourbit.rag.chunking import ChunkConfig
    from fourbit.rag.index import IndexConfig, build_index
    from fourbit.rag.retrieval import Retriever
    from fourbit.rag.store import open_store

    class Echo:
        name = "echo"

        def generate(self, prompts, max_new_tokens=128):
            return [json.dumps(p) for p in prompts]

        def stream(self, prompt, max_new_tokens=256):
            yield json.dumps(prompt)

    host, port = chroma_server
    config = IndexConfig(chunk=ChunkConfig(parent_tokens=64, parent_overlap=0, child_tokens=(16,), child_overlap=0))
    stores = [open_store(host=host, port=port, index="answers", create=True, embedding=embedder.describe()),
              open_store(tmp_path / "db", index="answers", create=True, embedding=embedder.describe())]
    for store in stores:
        build_index([docs_dir], store, embedder, config, progress=False)
    for question in QUESTIONS:
        remote, here = (answer_question(question, Retriever(s, embedder, "chunks", 2), Echo()) for s in stores)
        assert remote.text == here.text and [p.id for p in remote.sources] == [p.id for p in here.sources]
