"""Serving throughput: requests/s and tokens/s at 1, 4 and 8 concurrent clients, with waiting requests
decoded together in one batch (``--max-batch 8``) against handled one by one (``--max-batch 1``).

A real uvicorn server on 127.0.0.1 over the bundled SmolLM2-135M-Instruct in 4 bits (``--tiny``: the
2-layer random llama of the tests, a smoke run); each client sends ``--requests`` chat completions one
after the other (greedy, ``--tokens`` at most); tokens are the completion tokens the server reports.

    python benchmarks/bench_serve.py [--clients 1,4,8] [--requests 2] [--tokens 32] [--tiny] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _timing import load_average  # noqa: E402

QUESTIONS = [
    "What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis in one sentence.",
    "Name three prime numbers.", "What does a compiler do?", "Give me a tip for learning to cook.",
    "Why is the sky blue?", "Describe a cat to someone who has never seen one.",
]


class _Server:
    def __init__(self, app) -> None:
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve(sockets=[self.sock])),
                                       daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


def _load(tiny: bool):
    from fourbit.models import load_model

    if not tiny:
        return load_model()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from _tiny_models import make_llama, make_tokenizer

    folder = Path(tempfile.mkdtemp()) / "tiny"
    make_llama().save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return load_model(folder)


def _run_clients(url: str, clients: int, requests: int, tokens: int) -> dict:
    import httpx

    def client(number: int) -> int:
        done = 0
        with httpx.Client(base_url=url, timeout=600) as http:
            for i in range(requests):
                question = QUESTIONS[(number * requests + i) % len(QUESTIONS)]
                r = http.post("/v1/chat/completions", json={
                    "model": "base", "messages": [{"role": "user", "content": question}],
                    "max_tokens": tokens, "temperature": 0})
                r.raise_for_status()
                done += r.json()["usage"]["completion_tokens"]
        return done

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        generated = sum(pool.map(client, range(clients)))
    wall = time.perf_counter() - start
    return {"requests_per_s": clients * requests / wall, "tokens_per_s": generated / wall, "wall_s": wall,
            "tokens": generated}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1,4,8")
    parser.add_argument("--requests", type=int, default=2, help="requests per client")
    parser.add_argument("--tokens", type=int, default=32, help="max_tokens per request")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--tiny", action="store_true", help="the tests' 2-layer random llama (smoke run)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from fourbit.serve import Engine, create_app

    model, tokenizer = _load(args.tiny)
    clients = [int(c) for c in args.clients.split(",")]
    rows: dict[str, dict] = {}
    load_before = load_average()
    for mode, max_batch in (("one by one", 1), ("batched", 8)):
        engine = Engine(model, tokenizer, model_name="base", max_batch=max_batch)
        try:
            with _Server(create_app(engine)) as srv:
                _run_clients(srv.url, 1, 1, 4)  # warm-up
                for c in clients:
                    result = _run_clients(srv.url, c, args.requests, args.tokens)
                    result["max_rows"] = engine.stats["max_rows"]
                    rows[f"{mode}, {c} clients"] = result
                    print(f"{mode:>10}, {c} clients: {result['requests_per_s']:.2f} req/s, "
                          f"{result['tokens_per_s']:.1f} tok/s ({result['tokens']} tokens in {result['wall_s']:.1f} s)",
                          flush=True)
        finally:
            engine.close()
    print("\nbatched / one by one:")
    for c in clients:
        one, batched = rows[f"one by one, {c} clients"], rows[f"batched, {c} clients"]
        print(f"  {c} clients: requests/s x{batched['requests_per_s'] / one['requests_per_s']:.2f}, "
              f"tokens/s x{batched['tokens_per_s'] / one['tokens_per_s']:.2f}")
    print(f"load average before/after: {load_before} / {load_average()}")
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
