"""Serving throughput: requests/s and tokens/s at 1, 4 and 8 concurrent clients, with waiting requests
decoded together in one batch (``--max-batch 8``) against handled one by one (``--max-batch 1``), for each
``--decoder``: ``auto`` (the server's default: base-model batches through the compiled decode step, one cache per
row) and ``hf`` (every step through the model's forward, the whole batch at once).

A real uvicorn server on 127.0.0.1 over the bundled SmolLM2-135M-Instruct in 4 bits (``--tiny``: the
2-layer random llama of the tests, a smoke run); each client sends ``--requests`` chat completions one
after the other (greedy, ``--tokens`` at most); tokens are the completion tokens the server reports.

    python benchmarks/bench_serve.py [--clients 1,4,8] [--requests 2] [--tokens 32] [--decoder auto,hf] [--tiny]

``--adapters N`` measures many adapters resident instead (issue 21 item 4): N small random adapters (rank 8 to
16, every other one all-linear, the rest q_proj/v_proj; written to a temp folder in peft's format and loaded
as ``--adapter`` would) over the same base, and batches of ``--batch`` requests, each naming a random adapter,
decoded together in one batch (the engine directly, no HTTP: the batch is the point). Reported against the
same batches all naming one adapter (the single-adapter case, one adapter resident); the engine gathers each
row's adapter once per batch (:mod:`fourbit.serve.gathered`), and the random mix is run again with the LoRA
layer's own loop over the adapters of the batch at every layer and step (the path before, for comparison):

    python benchmarks/bench_serve.py --adapters 100 [--batch 8] [--tokens 32] [--rounds 3] [--tiny] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
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
    parser.add_argument("--decoder", default="auto,hf", help="the engine's decoders to run, comma-separated")
    parser.add_argument("--tiny", action="store_true", help="the tests' 2-layer random llama (smoke run)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--adapters", type=int, default=0,
                        help="measure N random adapters resident against one (instead of the clients run)")
    parser.add_argument("--batch", type=int, default=8, help="rows decoded together in the --adapters run")
    parser.add_argument("--rounds", type=int, default=3, help="timed batches per case in the --adapters run")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.adapters:
        _adapters_main(args)
        return

    _clients_main(args)


def _clients_main(args) -> None:
    """Concurrent HTTP clients against a server, one by one and batched, for each decoder."""
    from fourbit.serve import Engine, create_app

    model, tokenizer = _load(args.tiny)
    clients = [int(c) for c in args.clients.split(",")]
    decoders = args.decoder.split(",")
    rows: dict[str, dict] = {}
    load_before = load_average()
    for decoder in decoders:
        for mode, max_batch in (("one by one", 1), ("batched", 8)):
            engine = Engine(model, tokenizer, model_name="base", max_batch=max_batch, decoder=decoder)
            try:
                with _Server(create_app(engine)) as srv:
                    _run_clients(srv.url, 1, 1, 4)  # warm-up
                    for c in clients:
                        result = _run_clients(srv.url, c, args.requests, args.tokens)
                        result["max_rows"] = engine.stats["max_rows"]
                        result["compiled_steps"] = engine.stats["compiled_steps"]
                        label = f"{decoder}, {mode}, {c} clients"
                        rows[label] = result
                        print(f"{label:>28}: {result['requests_per_s']:.2f} req/s, {result['tokens_per_s']:.1f} "
                              f"tok/s ({result['tokens']} tokens in {result['wall_s']:.1f} s)", flush=True)
            finally:
                engine.close()
    print("\ntokens/s ratios:")
    for c in clients:
        for decoder in decoders:
            one, batched = rows[f"{decoder}, one by one, {c} clients"], rows[f"{decoder}, batched, {c} clients"]
            print(f"  {c} clients, {decoder}: batched / one by one x{batched['tokens_per_s'] / one['tokens_per_s']:.2f}")
        if len(decoders) > 1:
            first, other = (rows[f"{d}, batched, {c} clients"]["tokens_per_s"] for d in decoders[:2])
            print(f"  {c} clients, batched: {decoders[0]} / {decoders[1]} x{first / other:.2f}")
    print(f"load average before/after: {load_before} / {load_average()} (a shared machine: numbers are noisy)")
    if args.json:
        print(json.dumps(rows, indent=2))


def _write_random_adapters(model, count: int, root: Path, seed: int) -> dict[str, Path]:
    """``count`` random adapters over ``model`` (rank 8 to 16; even ones all-linear, odd ones q_proj/v_proj),
    in peft's format; B is random (not zero) so that every adapter changes the output."""
    import random

    from fourbit.nn.adapters import save_adapter
    from fourbit.nn.lora import LoRASpec, inject_lora, lora_modules, unload_lora

    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    folders = {}
    for i in range(count):
        r = rng.randint(8, 16)
        targets = "all-linear" if i % 2 == 0 else ("q_proj", "v_proj")
        inject_lora(model, LoRASpec(r=r, alpha=2.0 * r, dropout=0.0, target_modules=targets))
        with torch.no_grad():
            for m in lora_modules(model).values():
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.01)
        folders[f"adapter-{i:03d}"] = save_adapter(model, root / f"adapter-{i:03d}")
        unload_lora(model)
    return folders


def _decode_batches(engine, names: list[str], tokens: int, rounds: int) -> dict:
    """``rounds`` batches (after one warm-up), each of ``len(names)`` greedy requests (row i naming adapter
    ``names[i]``) started together, so that they are decoded in one batch; tokens/s over the timed ones."""
    from fourbit.serve import GenRequest, Sampling

    def one_batch() -> tuple[int, float]:
        done = threading.Semaphore(0)
        reqs = []
        start = time.perf_counter()
        with engine.hold():
            for i, name in enumerate(names):
                ids = engine.chat_prompt([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}])
                sink = lambda kind, value: done.release() if kind in ("done", "error") else None  # noqa: E731
                reqs.append(engine.submit(GenRequest(ids, engine.adapter_index(name), Sampling(tokens, 0.0), sink)))
        for _ in reqs:
            done.acquire()
        if any(r.finish_reason not in ("stop", "length") for r in reqs):
            raise RuntimeError(f"a request failed: {[r.finish_reason for r in reqs]}")
        return sum(r.completion_tokens for r in reqs), time.perf_counter() - start

    one_batch()  # warm-up
    generated = wall = 0.0
    for _ in range(rounds):
        n, seconds = one_batch()
        generated, wall = generated + n, wall + seconds
    return {"tokens_per_s": generated / wall, "tokens": int(generated), "wall_s": wall, "rows": len(names),
            "one_batch": engine.stats["batches"] == rounds + 1 and engine.stats["max_rows"] == len(names),
            "adapters_in_batch": len(set(names))}


@contextlib.contextmanager
def _per_adapter_loop():
    """The engine's batches computed by the LoRA layer's own mixed-batch loop instead of the gathered rows."""
    from fourbit.serve.adapters import set_row_adapters
    from fourbit.serve.gathered import RowGather

    use, select = RowGather.use, RowGather.select
    RowGather.use = lambda self, rows: set_row_adapters(self.model, torch.tensor(rows))
    RowGather.select = lambda self, keep: None
    try:
        yield
    finally:
        RowGather.use, RowGather.select = use, select


def _adapters_main(args) -> None:
    """Many adapters resident against one: the same batches, one adapter for every row against a random mix."""
    import random

    from fourbit.nn.lora import unload_lora
    from fourbit.serve import Engine

    model, tokenizer = _load(args.tiny)
    rng = random.Random(args.seed)
    rows: dict[str, dict] = {}
    load_before = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        folders = _write_random_adapters(model, args.adapters, Path(tmp), args.seed)
        print(f"wrote {len(folders)} adapters in {time.perf_counter() - started:.1f} s", flush=True)
        names = list(folders)
        mix = [rng.choice(names) for _ in range(args.batch)]
        cases = [("single adapter", {names[0]: folders[names[0]]}, [names[0]] * args.batch, False),
                 (f"{len(names)} adapters, random mix", folders, mix, False),
                 (f"{len(names)} adapters, random mix, per-adapter loop", folders, mix, True)]
        for label, served, row_names, loop in cases:
            started = time.perf_counter()
            engine = Engine(model, tokenizer, adapters={n: str(f) for n, f in served.items()}, model_name="base",
                            max_batch=args.batch)
            loaded = time.perf_counter() - started
            try:
                if loop:
                    with _per_adapter_loop():
                        result = _decode_batches(engine, row_names, args.tokens, args.rounds)
                else:
                    result = _decode_batches(engine, row_names, args.tokens, args.rounds)
            finally:
                engine.close()
                unload_lora(model)  # the base model back, for the next case's engine
            rows[label] = {**result, "resident": len(served), "load_s": loaded}
            print(f"{label:>40}: {result['tokens_per_s']:.1f} tok/s ({result['tokens']} tokens in "
                  f"{result['wall_s']:.1f} s; {len(served)} resident, loaded in {loaded:.1f} s; "
                  f"{result['adapters_in_batch']} in the batch of {result['rows']}, one batch: "
                  f"{result['one_batch']})", flush=True)
    single = rows["single adapter"]["tokens_per_s"]
    print("\nagainst the single-adapter case (target >= 85 %):")
    for label, row in rows.items():
        row["vs_single"] = row["tokens_per_s"] / single
        print(f"  {label}: {100 * row['vs_single']:.0f} %")
    print(f"load average before/after: {load_before} / {load_average()} (a shared machine: numbers are noisy)")
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
