"""Mixed-adapter batches gathered once per batch (fourbit.serve.gathered) compute what the LoRA layer's own
per-adapter loop computes, rows of the base model get exactly the base layer, and the engine serves the same
tokens through them."""

from __future__ import annotations

import pytest
import torch
from _server import build_engine

from fourbit.serve import Sampling
from fourbit.serve.gathered import RowGather, gather_rows

ADAPTERS = [(0, 4, 2.0), (2, 8, 0.5), (5, 3, 1.0)]  # ranks differ; indices 1, 3, 4 target other layers


def _layer(base_kind: str):
    from fourbit.nn import Linear4bit
    from fourbit.nn.lora import LoRALinear

    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(64, 96)
    base = linear if base_kind == "linear" else Linear4bit.from_linear(linear, compute_dtype="fp32")
    layer = LoRALinear(base, r=0)
    for index, rank, scaling in ADAPTERS:
        layer.add_row_adapter(index, torch.randn(rank, 64, generator=g), torch.randn(96, rank, generator=g), scaling)
    return layer, torch.randn(7, 3, 64, generator=g)


@pytest.mark.parametrize("base_kind", ["linear", "4bit"])
@pytest.mark.parametrize("rows", [[5, -1, 0, 2, 3, 5, 9], [2] * 7, [-1, 3, 4, -1, 1, 3, 3]])
def test_gathered_rows_equal_the_per_adapter_loop(base_kind, rows):
    layer, x = _layer(base_kind)
    layer.rows = torch.tensor(rows)
    with torch.no_grad():
        loop = layer(x)  # the layer's own mixed-batch loop
        gathered = gather_rows(layer, rows)
        got = gathered.forward(x)
        torch.testing.assert_close(got, loop, rtol=1e-5, atol=1e-5)
        plain = layer.base(x)
        for i, index in enumerate(rows):  # the base model's rows, and rows whose adapter is not here: exact
            if index not in layer.row_scaling:
                assert torch.equal(got[i], plain[i])
        assert not torch.equal(got, plain) or not set(rows) & set(layer.row_scaling)
        if rows == [2] * 7:  # one adapter for every row: its own pair, no per-row copies
            assert gathered.a.shape == (64, 8)
        keep = [6, 0, 3]
        gathered.select(torch.tensor(keep))
        torch.testing.assert_close(gathered.forward(x[keep]), loop[keep], rtol=1e-5, atol=1e-5)


def test_the_row_gather_installs_and_removes_itself(model_dir, adapter_dirs):
    from fourbit.nn.lora import LoRALinear, lora_modules

    engine = build_engine(model_dir, adapters=adapter_dirs)
    engine.close()
    model, layers = engine.model, lora_modules(engine.model)
    gather = RowGather(model)
    gather.use([1, -1, 0])
    assert all(m.rows.tolist() == [1, -1, 0] and "_forward_rows" in vars(m) for m in layers.values())
    gather.select([2, 0])
    assert all(m.rows.tolist() == [0, 1] for m in layers.values()) and gather.rows == [0, 1]
    gather.clear()
    assert all(m.rows is None and "_forward_rows" not in vars(m) and type(m)._forward_rows is
               LoRALinear._forward_rows for m in layers.values())
    gather.use([-1, -1])  # base rows only: nothing to gather
    assert all(m.rows is None for m in layers.values())


def test_an_engine_serves_a_mixed_batch_as_the_per_adapter_loop_does(model_dir, adapter_dirs, monkeypatch):
    """The engine's gathered batches against the same engine with the gather switched off (every layer left to
    its own loop over the adapters the batch names)."""
    import threading

    from fourbit.serve import GenRequest

    def decode_all(engine) -> list[list[int]]:
        prompt = engine.chat_prompt([{"role": "user", "content": "Tell me about comets."}])
        done, reqs = threading.Semaphore(0), []
        with engine.hold():
            for name in ("alpha", "beta", "tiny", "beta"):
                sink = lambda kind, value: done.release() if kind in ("done", "error") else None  # noqa: E731
                reqs.append(engine.submit(GenRequest(prompt, engine.adapter_index(name), Sampling(12, 0.0), sink)))
        for _ in reqs:
            assert done.acquire(timeout=60)
        return [r.output_ids for r in reqs]

    engine = build_engine(model_dir, adapters=adapter_dirs)
    try:
        got = decode_all(engine)
    finally:
        engine.close()
    monkeypatch.setattr(RowGather, "use", lambda self, rows: _set_rows(self.model, rows))
    engine = build_engine(model_dir, adapters=adapter_dirs)
    try:
        want = decode_all(engine)
    finally:
        engine.close()
    assert got == want and got[0] != got[1] and got[1] == got[3]


def _set_rows(model, rows: list[int]) -> None:
    from fourbit.serve.adapters import set_row_adapters

    set_row_adapters(model, torch.tensor(rows))
