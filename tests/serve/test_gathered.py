"""The gathered formulation of mixed-adapter batches (fourbit.serve.gathered, a prototype) computes what the
LoRA layer's per-adapter loop computes, and serves the same tokens."""

from __future__ import annotations

import pytest
import torch
from _server import build_engine

from fourbit.serve import Sampling
from fourbit.serve.gathered import gathered_rows, gathered_rows_forward, stack_row_adapters


@pytest.mark.parametrize("base_kind", ["linear", "4bit"])
def test_gathered_rows_equal_the_per_adapter_loop(base_kind):
    from fourbit.nn import Linear4bit
    from fourbit.nn.lora import LoRALinear

    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(64, 96)
    base = linear if base_kind == "linear" else Linear4bit.from_linear(linear, compute_dtype="fp32")
    layer = LoRALinear(base, r=0)
    for index, rank, scaling in [(0, 4, 2.0), (2, 8, 0.5), (5, 3, 1.0)]:  # ranks differ; 1, 3, 4 target elsewhere
        layer.add_row_adapter(index, torch.randn(rank, 64, generator=g), torch.randn(96, rank, generator=g), scaling)
    stacks = stack_row_adapters(layer)
    assert stacks.a.shape == (3, 8, 64) and stacks.b.shape == (3, 96, 8)
    x = torch.randn(7, 3, 64, generator=g)
    rows = torch.tensor([5, -1, 0, 2, 3, 5, 9])  # 3 does not target this layer, 9 is past every index here
    layer.rows = rows
    with torch.no_grad():
        loop = layer(x)
        gathered = gathered_rows_forward(layer, x, stacks, rows)
        torch.testing.assert_close(gathered, loop, rtol=1e-5, atol=1e-5)
        plain = base(x)
        for i in (1, 4, 6):  # the base model's rows, and rows whose adapter is not here: exactly the base layer
            assert torch.equal(gathered[i], plain[i])
        assert torch.equal(gathered_rows_forward(layer, x, stacks, torch.full((7,), -1)), plain)
    with pytest.raises(RuntimeError, match="rows"):
        gathered_rows_forward(layer, x, stacks, rows[:3])
    layer.rows = None
    assert stack_row_adapters(LoRALinear(base, r=0)) is None


def test_an_engine_under_gathered_rows_serves_the_same_tokens(model_dir, adapter_dirs):
    from fourbit.nn.lora import LoRALinear, lora_modules

    engine = build_engine(model_dir, adapters=adapter_dirs)
    try:
        prompt = engine.chat_prompt([{"role": "user", "content": "Tell me about comets."}])
        want = {name: engine.generate(prompt, Sampling(12, 0.0), engine.adapter_index(name), timeout=60)[1].output_ids
                for name in ("alpha", "beta")}
        with gathered_rows(engine.model):
            assert all("forward" in vars(m) for m in lora_modules(engine.model).values())
            got = {name: engine.generate(prompt, Sampling(12, 0.0), engine.adapter_index(name),
                                         timeout=60)[1].output_ids for name in ("alpha", "beta")}
        assert got == want and want["alpha"] != want["beta"]
        assert all(type(m).forward is LoRALinear.forward and "forward" not in vars(m)
                   for m in lora_modules(engine.model).values())  # the layers are as they were
    finally:
        engine.close()
