"""Adapters per request over one 4-bit base: rows of one batch never mix adapters."""

from __future__ import annotations

import threading

import pytest
import torch
from _server import build_engine, reference_ids

from fourbit.serve import GenRequest, Sampling

PROMPTS = ["Tell me about comets.", "Bread?"]


@pytest.mark.parametrize("base_kind", ["linear", "conv1d", "4bit"])
def test_the_lora_layer_in_mixed_batch_mode_picks_the_adapter_per_row(base_kind):
    from transformers.pytorch_utils import Conv1D

    from fourbit.nn import Linear4bit
    from fourbit.nn.lora import LoRALinear

    torch.manual_seed(0)
    base = {"linear": lambda: torch.nn.Linear(64, 96), "conv1d": lambda: Conv1D(96, 64),
            "4bit": lambda: Linear4bit.from_linear(torch.nn.Linear(64, 96), compute_dtype="fp32")}[base_kind]()
    one, two = LoRALinear(base, 4, 8.0), LoRALinear(base, 2, 4.0)
    for lora in (one, two):
        torch.nn.init.normal_(lora.lora_B.weight)
    multi = LoRALinear(base, r=0)  # the same layer type, serving only: no trainable adapter of its own
    assert multi.adapter_params() == {}
    multi.add_row_adapter(0, one.lora_A.weight.detach(), one.lora_B.weight.detach(), one.scaling)
    multi.add_row_adapter(1, two.lora_A.weight.detach(), two.lora_B.weight.detach(), two.scaling)
    x = torch.randn(5, 3, 64)
    multi.rows = torch.tensor([1, -1, 0, 1, -1])
    with torch.no_grad():
        y = multi(x)
        torch.testing.assert_close(y[[0, 3]], two(x[[0, 3]]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y[2], one(x[2:3])[0], rtol=1e-5, atol=1e-5)
        assert torch.equal(y[[1, 4]], base(x)[[1, 4]])  # the base rows get exactly the base layer
        multi.rows = None
        assert torch.equal(multi(x), base(x))
    assert set(multi.state_dict()) == {f"base.{k}" for k in base.state_dict()}  # row adapters are not saved
    with pytest.raises(ValueError, match="do not fit"):
        multi.add_row_adapter(2, torch.zeros(4, 63), torch.zeros(96, 4), 1.0)
    multi.remove_row_adapter(1)
    assert sorted(multi.row_scaling) == [0] and not hasattr(multi, "row_A_1")


def test_one_batch_of_mixed_adapters_matches_one_adapter_runs(engine, model_dir, adapter_dirs):
    n = 12
    cases = [(name, prompt) for name in ("tiny", "alpha", "beta") for prompt in PROMPTS]
    done = threading.Semaphore(0)
    reqs = []
    rows_before = engine.stats["max_rows"]
    with engine.hold():  # all six start together: one batch, three adapters, two prompt lengths
        for name, prompt in cases:
            ids = engine.chat_prompt([{"role": "user", "content": prompt}])
            sink = lambda kind, value: done.release() if kind in ("done", "error") else None  # noqa: E731
            reqs.append(engine.submit(GenRequest(ids, engine.adapter_index(name), Sampling(n, 0.0), sink)))
    for _ in reqs:
        assert done.acquire(timeout=60)
    assert engine.stats["max_rows"] >= max(rows_before, len(cases))
    outputs = {}
    for (name, prompt), req in zip(cases, reqs, strict=True):
        want = reference_ids(model_dir, adapter_dirs.get(name), req.prompt_ids, n, engine.end_ids)
        assert req.output_ids == want, (name, prompt)
        outputs[name, prompt] = req.output_ids
    for prompt in PROMPTS:  # the adapters matter, so the comparison above can tell them apart
        assert len({tuple(outputs[name, prompt]) for name in ("tiny", "alpha", "beta")}) == 3


def test_concurrent_http_requests_for_different_adapters_never_mix(client, engine):
    import concurrent.futures

    def ask(name: str, prompt: str) -> str:
        reply = client.chat.completions.create(model=name, messages=[{"role": "user", "content": prompt}],
                                               max_tokens=10, temperature=0)
        return reply.choices[0].message.content

    cases = [(name, prompt) for _ in range(2) for name in ("alpha", "beta", "tiny") for prompt in PROMPTS]
    with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
        got = list(pool.map(lambda case: ask(*case), cases))
    for (name, prompt), text in zip(cases, got, strict=True):
        alone, _ = engine.generate(engine.chat_prompt([{"role": "user", "content": prompt}]), Sampling(10, 0.0),
                                   engine.adapter_index(name), timeout=60)
        assert text == alone, (name, prompt)


def test_a_bad_adapter_folder_names_the_field(model_dir, tmp_path):
    from fourbit._errors import FieldError

    with pytest.raises(FieldError, match="missing") as info:
        build_engine(model_dir, adapters={"x": tmp_path / "missing"})
    assert info.value.field == "adapters"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FieldError, match="adapter_config.json") as info:
        build_engine(model_dir, adapters={"x": tmp_path / "empty"})


def test_requests_arriving_mid_batch_join_it_and_still_match(model_dir, adapter_dirs):
    import time

    engine = build_engine(model_dir, adapters=adapter_dirs)
    try:
        done = threading.Semaphore(0)

        def sink(kind, value):
            if kind in ("done", "error"):
                done.release()

        def request(name: str, prompt: str, n: int) -> GenRequest:
            ids = engine.chat_prompt([{"role": "user", "content": prompt}])
            return GenRequest(ids, engine.adapter_index(name), Sampling(n, 0.0), sink)

        first = engine.submit(request("alpha", "A long story, please.", 200))
        deadline = time.monotonic() + 30
        while first.completion_tokens < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        with engine.hold():  # both join the running batch at its next step, with other lengths and adapters
            later = [engine.submit(request("beta", "Hi", 20)), engine.submit(request("tiny", "What is 2+2?", 30))]
        for _ in range(3):
            assert done.acquire(timeout=60)
        assert first.finish_reason == "length" and first.completion_tokens == 200
        assert engine.stats["batches"] == 1 and engine.stats["max_rows"] == 3
        for name, req in [("alpha", first), ("beta", later[0]), ("tiny", later[1])]:
            want = reference_ids(model_dir, adapter_dirs.get(name), req.prompt_ids, req.sampling.max_tokens,
                                 engine.end_ids)
            assert req.output_ids == want, name
    finally:
        engine.close()
