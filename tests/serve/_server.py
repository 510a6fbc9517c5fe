"""Test helpers for the server tests: a uvicorn server in a thread, engines and adapters over the tiny llama."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path

import torch

DOCS = {
    "comets.txt": (
        "A comet is a frozen body of ice and dust. The tail of a comet always points away from the Sun. "
        "Halley's comet returns roughly every seventy-six years. Short-period comets come from the Kuiper belt."
    ),
    "bread.md": (
        "# Bread\n\nSourdough bread rises because wild yeast ferments the flour. A starter is fed with flour "
        "and water every day. Bakers score the loaf so that steam escapes in a controlled way."
    ),
}


class Server:
    """uvicorn serving ``app`` in a thread on a socket bound to a free port of 127.0.0.1."""

    def __init__(self, app) -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve(sockets=[self.sock])),
                                       daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start within 20 s")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()
        assert not self.thread.is_alive(), "the test server did not stop within 15 s"


def make_adapter(base_dir: Path, folder: Path, seed: int) -> Path:
    """A LoRA adapter over the tiny llama whose B is random (not zero), so it changes the output."""
    from fourbit.models import load_model
    from fourbit.nn.adapters import save_adapter
    from fourbit.nn.lora import LoRASpec, inject_lora, lora_modules

    model, _ = load_model(base_dir)
    with torch.random.fork_rng():  # A's init from the seed too: the same adapter whatever ran before
        torch.manual_seed(seed)
        inject_lora(model, LoRASpec(r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj", "down_proj")))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.5)
    return save_adapter(model, folder)


def build_engine(model_dir: Path, *, adapters=None, embedder=None, db: Path | None = None, **kw):
    from fourbit.models import load_model
    from fourbit.serve import Engine

    model, tokenizer = load_model(model_dir)
    store = None
    if db is not None:
        from fourbit.rag.store import open_store

        store = open_store(db, create=True, embedding=embedder.describe())
    kw.setdefault("context_window", 1024)  # the tiny llama's rotary positions work past its nominal 256
    return Engine(model, tokenizer, adapters={k: str(v) for k, v in (adapters or {}).items()},
                  embedder=embedder, store=store, model_name="tiny", **kw)


def reference_ids(model_dir, adapter_dir, prompt_ids: list[int], n: int, end_ids: set[int]) -> list[int]:
    """Greedy ids from a fresh 4-bit model holding only this adapter (or none), one prompt at a time."""
    from fourbit.models import load_model
    from fourbit.nn.adapters import load_adapter

    model, tokenizer = load_model(model_dir)
    if adapter_dir is not None:
        load_adapter(model, adapter_dir)
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False, temperature=None,
                         top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(end_ids))
    ids = out[0, len(prompt_ids):].tolist()
    return ids[: next((i for i, t in enumerate(ids) if t in end_ids), len(ids))]
