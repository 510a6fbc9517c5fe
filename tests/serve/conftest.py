"""A real uvicorn server on 127.0.0.1 (free port) over the tiny 4-bit llama, two adapters, MiniLM and a
small index; bounded waits, always stopped."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # so that test files can import _server
    sys.path.insert(0, _HERE)

from _server import Server, build_engine, make_adapter  # noqa: E402

SEEDS = {"alpha": 1, "beta": 2}


@pytest.fixture(scope="session")
def serve_embedder():
    from fourbit.rag.embeddings import Embedder

    return Embedder()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    from _tiny_models import make_llama, make_tokenizer

    path = tmp_path_factory.mktemp("serve") / "tiny-llama"
    make_llama().save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def adapter_dirs(model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_adapter(model_dir, root / name, seed) for name, seed in SEEDS.items()}


@pytest.fixture(scope="session")
def engine(model_dir, adapter_dirs, serve_embedder, tmp_path_factory):
    db = tmp_path_factory.mktemp("db")
    eng = build_engine(model_dir, adapters=adapter_dirs, embedder=serve_embedder, db=db)
    yield eng
    eng.close()


@pytest.fixture(scope="session")
def server(engine):
    from fourbit.serve import create_app

    with Server(create_app(engine, max_upload=64 << 10)) as srv:
        yield srv


@pytest.fixture
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def http(server):
    import httpx

    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c
