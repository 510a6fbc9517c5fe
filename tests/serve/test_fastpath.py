"""Base-model rows through the compiled decode step (fourbit.serve.fastpath) give the tokens the model's forward
gives (the engine with ``decoder="hf"``), at batch 1 and batched, with rows joining mid-batch; adapter rows (in
the same batch) and unsupported models keep the forward.

The compiled step runs its float 4-bit rows here (``float_rows``): its int8 rows (CPUs with AVX512_VNNI, by
default for layers of 2,048 columns or more, ``FOURBIT_DECODE_ROWS=int8`` for all) round the activations to int8, which flips greedy near-ties of the tiny random model within 100 tokens (seen: one
token at position 32), so they could not be compared token for token with the forward; they are checked against
transformers with a tolerance in tests/models/test_decode.py and row by row in tests/kernels/test_decode_int8.py.
"""

from __future__ import annotations

import threading
import time

import pytest
from _server import reference_ids

from fourbit.serve import Engine, GenRequest, Sampling

pytestmark = pytest.mark.usefixtures("float_rows")

PROMPTS = ["Tell me about comets.", "Bread?", "What is two plus two, and why?", "Hi"]


def fp32_engine(model_dir, decoder: str, **kw) -> Engine:
    """The tiny 4-bit llama computing in float32, as the compiled step does (a bf16 forward would round
    otherwise, and greedy tokens could differ at near ties)."""
    from fourbit.models import QuantConfig, load_model

    model, tokenizer = load_model(model_dir, quant=QuantConfig(compute_dtype="fp32"))
    return Engine(model, tokenizer, model_name="tiny", decoder=decoder, context_window=1024, **kw)


def run_together(engine: Engine, specs: list[tuple[str, Sampling]], adapter: str | None = None) -> list[GenRequest]:
    done, reqs = threading.Semaphore(0), []
    with engine.hold():  # they start together: one batch
        for prompt, sampling in specs:
            ids = engine.chat_prompt([{"role": "user", "content": prompt}])
            sink = lambda kind, value: done.release() if kind in ("done", "error") else None  # noqa: E731
            reqs.append(engine.submit(GenRequest(ids, engine.adapter_index(adapter), sampling, sink)))
    for _ in reqs:
        assert done.acquire(timeout=120)
    assert all(r.finish_reason in ("stop", "length") for r in reqs), [r.finish_reason for r in reqs]
    return reqs


def logprob_sink(req: GenRequest, entries: list) -> None:
    inner = req.sink

    def sink(kind, value):
        if kind == "logprob":
            entries.append(value)
        inner(kind, value)

    req.sink = sink


@pytest.fixture(scope="module")
def engines(model_dir):
    fast, hf = fp32_engine(model_dir, "auto"), fp32_engine(model_dir, "hf")
    yield fast, hf
    fast.close()
    hf.close()


@pytest.mark.parametrize("batch", [1, 4])
def test_compiled_batches_give_the_forward_paths_greedy_tokens(engines, batch):
    fast, hf = engines
    compiled = fast.stats["compiled_steps"]
    specs = [(PROMPTS[i], Sampling(24, 0.0)) for i in range(batch)]
    got = [r.output_ids for r in run_together(fast, specs)]
    want = [r.output_ids for r in run_together(hf, specs)]
    assert got == want and all(len(ids) >= 1 for ids in got)
    # the first token of each row from the batched prefill, each further one from a compiled step of its row
    # (one more for a row that ends with its end token, which is not in output_ids)
    steps = fast.stats["compiled_steps"] - compiled
    tokens = sum(len(ids) for ids in got)
    assert tokens - batch <= steps <= tokens and hf.stats["compiled_steps"] == 0


def test_logprobs_stop_strings_and_seeded_sampling_on_the_compiled_step(engines):
    fast, hf = engines
    specs = [(PROMPTS[0], Sampling(16, 0.0, logprobs=3)), (PROMPTS[1], Sampling(16, 0.0, stop=("e",))),
             (PROMPTS[2], Sampling(16, 0.8, top_p=0.9, seed=7))]
    results = []
    for engine in (fast, hf):
        reqs = run_together(engine, specs)
        results.append(reqs)
    (f_lp, f_stop, f_seed), (h_lp, h_stop, h_seed) = results
    assert f_lp.output_ids == h_lp.output_ids and f_stop.output_ids == h_stop.output_ids
    assert f_seed.output_ids == h_seed.output_ids  # same seed, same distribution to float32 rounding


def test_rows_joining_a_compiled_batch_match_their_single_runs(model_dir):
    engine = fp32_engine(model_dir, "auto")
    try:
        done = threading.Semaphore(0)

        def request(prompt: str, n: int) -> GenRequest:
            sink = lambda kind, value: done.release() if kind in ("done", "error") else None  # noqa: E731
            return GenRequest(engine.chat_prompt([{"role": "user", "content": prompt}]), -1, Sampling(n, 0.0), sink)

        first = engine.submit(request("A long story, please.", 150))
        deadline = time.monotonic() + 30
        while first.completion_tokens < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        with engine.hold():
            later = [engine.submit(request("Hi", 20)), engine.submit(request("What is 2+2?", 30))]
        for _ in range(3):
            assert done.acquire(timeout=120)
        assert first.finish_reason == "length" and first.completion_tokens == 150
        assert engine.stats["batches"] == 1 and engine.stats["max_rows"] == 3
        for req in (first, *later):
            want = reference_ids(model_dir, None, req.prompt_ids, req.sampling.max_tokens, engine.end_ids)
            assert req.output_ids == want
    finally:
        engine.close()


def test_adapter_rows_run_the_forward_beside_compiled_rows_of_the_same_batch(model_dir, adapter_dirs):
    engine = fp32_engine(model_dir, "auto", adapters={"alpha": str(adapter_dirs["alpha"])})
    try:
        adapted = run_together(engine, [(PROMPTS[0], Sampling(12, 0.0))], adapter="alpha")[0]
        assert engine.stats["compiled_steps"] == 0  # the adapter's row ran the forward
        assert adapted.output_ids == reference_ids(model_dir, adapter_dirs["alpha"], adapted.prompt_ids, 12,
                                                   engine.end_ids)
        # a long base-model row on the compiled step; an adapter's row and another base row join it
        done = threading.Semaphore(0)
        sink = lambda kind, value: done.release() if kind in ("done", "error") else None  # noqa: E731
        ids = engine.chat_prompt([{"role": "user", "content": "A long story, please."}])
        long = engine.submit(GenRequest(ids, -1, Sampling(100, 0.0), sink))
        deadline = time.monotonic() + 30
        while long.completion_tokens < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        batches = engine.stats["batches"]
        with engine.hold():
            joining = [engine.submit(GenRequest(ids, engine.adapter_index("alpha"), Sampling(30, 0.0), sink)),
                       engine.submit(GenRequest(engine.encode("Hi"), -1, Sampling(30, 0.0), sink))]
        for _ in range(3):
            assert done.acquire(timeout=120)
        assert engine.stats["batches"] == batches and engine.stats["max_rows"] == 3  # they joined it
        assert engine.stats["compiled_steps"] > 100
        for req, adapter in zip((long, *joining), (None, adapter_dirs["alpha"], None), strict=True):
            want = reference_ids(model_dir, adapter, req.prompt_ids, req.sampling.max_tokens, engine.end_ids)
            assert req.output_ids == want
        assert joining[0].output_ids != reference_ids(model_dir, None, ids, 30, engine.end_ids)
    finally:
        engine.close()


def test_a_model_the_compiled_step_cannot_run_falls_back(model_dir, monkeypatch, caplog):
    import fourbit.serve.fastpath as fastpath

    monkeypatch.setattr(fastpath, "unsupported_reason", lambda model: "hooks everywhere")
    engine = fp32_engine(model_dir, "auto")
    try:
        with caplog.at_level("INFO", logger="fourbit.serve.engine"):
            req = run_together(engine, [(PROMPTS[0], Sampling(8, 0.0))])[0]
        assert req.output_ids == reference_ids(model_dir, None, req.prompt_ids, 8, engine.end_ids)
        assert engine.stats["compiled_steps"] == 0 and "hooks everywhere" in caplog.text
    finally:
        engine.close()


def test_decoder_must_be_known(model_dir):
    from fourbit._errors import FieldError

    with pytest.raises(FieldError, match="decoder"):
        fp32_engine(model_dir, "fast-please")


def test_decoder_sequences_interleave_and_grow_like_one_sequence_each(model_dir):
    """Decoder.new_state / using (the API the engine adds rows with): two sequences stepped in turn give what each
    gives decoded alone, a state's cache grows past its first length, the decoder's own sequence is untouched."""
    import torch

    from fourbit.models import QuantConfig, load_model
    from fourbit.models.decode import Decoder

    model, _ = load_model(model_dir, quant=QuantConfig(compute_dtype="fp32"))
    prompts = [[5, 9, 11, 30, 2], [7, 7, 100]]

    def alone(ids: list[int], n: int) -> list[int]:
        dec = Decoder(model, 4)
        token = int(torch.argmax(dec.prefill(ids)))
        out = [token]
        for _ in range(n - 1):
            token = dec.step(token)[0]
            out.append(token)
        return out

    want = [alone(ids, 12) for ids in prompts]
    dec = Decoder(model, 64)
    own = int(torch.argmax(dec.prefill(prompts[0])))
    states, tokens, got = [], [], [[], []]
    for i, ids in enumerate(prompts):
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1)
        cache = out["cache"] if "cache" in out else out["past_key_values"]
        kv = [(layer.keys[0].float(), layer.values[0].float()) for layer in cache.layers]
        states.append(dec.new_state(len(ids) + 2, kv))  # room for 2 more: the cache must grow
        tokens.append(int(torch.argmax(out.logits[0, -1])))
        got[i].append(tokens[i])
    for _ in range(11):
        for i, state in enumerate(states):
            with dec.using(state):
                tokens[i] = dec.step(tokens[i])[0]
            got[i].append(tokens[i])
    assert got == want
    assert all(s.pos == len(p) + 11 for s, p in zip(states, prompts, strict=True))
    assert states[0].caches[0][0].shape[1] >= len(prompts[0]) + 11  # grown
    assert dec.pos == len(prompts[0]) and dec.step(own)[0] == want[0][1]  # its own sequence went on untouched
