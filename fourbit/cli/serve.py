"""``fourbit serve``: the OpenAI-compatible server, document QA and the web page.

Imports only the standard library at import time; fastapi, uvicorn, torch and chromadb load inside
:func:`cmd_serve`.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path
from typing import Any

from fourbit._errors import FieldError

__all__ = ["add_parser", "build_engine", "cmd_serve"]

API_KEY_ENV = "FOURBIT_API_KEY"
# The name the grounded-answer adapter is served under (/v1/answers answers with it when no model is named).
ANSWER_ADAPTER_NAME = "answer"
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _adapter(value: str) -> tuple[str, Path]:
    name, sep, folder = value.partition("=")
    if not sep or not name.strip() or not folder.strip():
        raise argparse.ArgumentTypeError(f"{value!r}: give NAME=DIR, e.g. --adapter support=out/adapter")
    return name.strip(), Path(folder.strip()).expanduser()


def build_engine(args: argparse.Namespace) -> Any:
    """Load the 4-bit model, its adapters, and (with ``--db``) the embedder and index, into an Engine."""
    from fourbit.models import load_model
    from fourbit.serve import Engine

    adapters = [*args.adapters, *_answer_adapter(args)]
    names = [name for name, _ in adapters]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise FieldError("adapters", f"adapter name {duplicate!r} is given twice")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    if tokenizer is None:
        raise FieldError("model", f"{args.model}: holds no tokenizer; the server needs one")
    embedder = store = None
    if args.db is not None:
        from fourbit.rag.embeddings import Embedder
        from fourbit.rag.store import open_store

        embedder = Embedder(args.embedding_model)
        store = open_store(args.db, index=args.index, create=True, embedding=embedder.describe())
    name = args.name or (Path(args.model).name if args.model else "smollm2-135m-instruct")
    return Engine(model, tokenizer, adapters={n: str(f) for n, f in adapters}, embedder=embedder,
                  store=store, model_name=name, max_batch=args.max_batch, max_queue=args.max_queue,
                  decoder=args.decoder, answer_model=ANSWER_ADAPTER_NAME if len(adapters) > len(args.adapters)
                  else None)


def _answer_adapter(args: argparse.Namespace) -> list[tuple[str, Path]]:
    """``[(ANSWER_ADAPTER_NAME, folder)]`` of the adapter /v1/answers uses by default: ``--answer-adapter``, or
    the grounded-answer adapter shipped for the bundled model (not with ``--no-answer-adapter``, another
    ``model`` or no ``--db``); else ``[]``."""
    from fourbit.rag.llm import answer_adapter

    if args.db is None:
        return []
    folder = answer_adapter(args.model, args.answer_adapter, use_default=not args.no_answer_adapter)
    return [(ANSWER_ADAPTER_NAME, folder)] if folder is not None else []


# The serve extra's packages, by import name (python-multipart imports as python_multipart, before 0.0.13 only
# as multipart): checked before anything loads, so a missing one is one line, not a traceback after the model.
_SERVE_EXTRA = (("fastapi", ("fastapi",)), ("uvicorn", ("uvicorn",)),
                ("python-multipart", ("python_multipart", "multipart")), ("llguidance", ("llguidance",)),
                ("jsonschema", ("jsonschema",)), ("prometheus-client", ("prometheus_client",)))


def _check_serve_extra() -> None:
    """Raise NotImplementedError naming the extra to install when a package of the serve extra is missing."""
    from importlib.util import find_spec

    for package, modules in _SERVE_EXTRA:
        if not any(_importable(m, find_spec) for m in modules):
            raise NotImplementedError(f"the server needs the serve extra ({package} is not installed): "
                                      "pip install 'fourbit[serve]'")


def _importable(module: str, find_spec: Any) -> bool:
    try:
        return find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that fails to import, or a None entry in sys.modules
        return False


def _bind(host: str, port: int) -> socket.socket:
    """Bind the listening socket before loading anything, so a taken port fails fast and clearly."""
    if not 0 <= port <= 65535:
        raise FieldError("port", f"must be in [0, 65535], got {port}")
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        raise FieldError("host", f"{host!r} is not an address of this machine ({err.strerror})") from None
    sock = socket.socket(info[0], socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(info[4])
    except OSError as err:
        sock.close()
        raise FieldError("port", f"cannot listen on {host}:{port}: {err.strerror}") from None
    return sock


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the 4-bit model (and its adapters, and the documents of --db) over HTTP until Ctrl-C.

    OpenAI-compatible endpoints under /v1 (models, chat/completions, completions, embeddings), adapters
    loaded and unloaded while serving (/v1/load_lora_adapter, /v1/unload_lora_adapter), document QA
    (/v1/answers, /v1/documents), /health, and a web page at /. Binds 127.0.0.1 unless --host says
    otherwise; --api-key (or FOURBIT_API_KEY) requires `Authorization: Bearer KEY` on all but /health.
    """
    _check_serve_extra()
    import uvicorn

    from fourbit.serve import create_app

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if args.threads is not None and args.threads < 1:
        raise FieldError("threads", f"must be >= 1, got {args.threads}")
    for flag in ("max_batch", "max_queue"):  # before the model loads: a wrong flag fails fast
        if getattr(args, flag) < 1:
            raise FieldError(flag, f"must be >= 1, got {getattr(args, flag)}")
    if args.max_upload_mb <= 0:
        raise FieldError("max_upload_mb", f"must be > 0, got {args.max_upload_mb}")
    sock = _bind(args.host, args.port)
    try:
        if args.host not in _LOOPBACK and not api_key:
            print(f"warning: serving on {args.host} without an API key: anyone who can reach this machine "
                  f"can use the model (pass --api-key or set {API_KEY_ENV})", file=sys.stderr)
        engine = build_engine(args)
        try:
            app = create_app(engine, api_key=api_key, max_upload=int(args.max_upload_mb * (1 << 20)))
            host, port = sock.getsockname()[:2]
            print(f"serving {', '.join(engine.models)} on http://{host}:{port}/ "
                  f"({'API key required' if api_key else 'no API key'}); Ctrl-C stops", flush=True)
            server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
            server.run(sockets=[sock])
        finally:
            engine.close()
    finally:
        sock.close()
    return 0


def add_parser(subparsers: Any) -> None:
    """Register ``fourbit serve``."""
    p = subparsers.add_parser("serve", help="serve the 4-bit model over an OpenAI-compatible HTTP API",
                              description=cmd_serve.__doc__)
    p.add_argument("model", nargs="?", help="model folder, 4-bit checkpoint or GGUF (default: bundled SmolLM2)")
    p.add_argument("--adapter", dest="adapters", type=_adapter, action="append", default=[], metavar="NAME=DIR",
                   help="a LoRA adapter served as model NAME over the same 4-bit base (repeatable)")
    p.add_argument("--name", help="the name the base model is served under (default: its folder name)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--answer-adapter", type=Path, metavar="DIR",
                       help=f"the LoRA adapter /v1/answers answers with (served as model {ANSWER_ADAPTER_NAME!r}; "
                            "default: the bundled model's grounded-answer adapter)")
    which.add_argument("--no-answer-adapter", action="store_true",
                       help="answer /v1/answers with the base model, without the default answer adapter")
    p.add_argument("--db", type=Path, help="folder of the document index (created when missing)")
    p.add_argument("--index", default="fourbit", help="index (collection) name (default: fourbit)")
    p.add_argument("--embedding-model", help="sentence-transformers folder or cached name "
                                             "(default: the bundled all-MiniLM-L6-v2)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help=f"require `Authorization: Bearer KEY` (default: ${API_KEY_ENV})")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together (default: 8)")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a place in a batch; more "
                   "are answered 429 with Retry-After at once (default: 64)")
    p.add_argument("--threads", type=int, help="CPU threads for the model (default: torch's, one per core); on a "
                   "machine busy with other work, 1 can be several times faster")
    p.add_argument("--decoder", choices=("auto", "hf"), default="auto",
                   help="auto: batches of base-model requests run the compiled decode step where the model allows it "
                        "(Llama-family models on the CPU); hf: every step through the model's forward "
                        "(default: auto)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest uploaded document (default: 20)")
    p.set_defaults(func=cmd_serve)
