"""The OpenAI-compatible endpoints through the official ``openai`` client against a real uvicorn server."""

from __future__ import annotations

import numpy as np
import pytest

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a comet."}]


@pytest.fixture(scope="module")
def reference(model_dir):
    """The base model alone (no adapter layers), for greedy answers to compare with."""
    from fourbit.models import load_model

    return load_model(model_dir)


def greedy_ids(model, tokenizer, prompt_ids: list[int], n: int) -> list[int]:
    import torch

    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False, temperature=None,
                         top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id, eos_token_id=[])
    return out[0, len(prompt_ids):].tolist()


def test_health_and_models(client, http):
    assert http.get("/health").json()["status"] == "ok"
    assert [m.id for m in client.models.list().data] == ["tiny", "alpha", "beta"]


def test_chat_greedy_matches_the_model_and_counts_usage(client, engine, reference):
    model, tokenizer = reference
    prompt_ids = engine.chat_prompt(MESSAGES)
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0)
    want = tokenizer.decode(greedy_ids(model, tokenizer, prompt_ids, 12), skip_special_tokens=True)
    assert reply.choices[0].message.content == want
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.prompt_tokens == len(prompt_ids)
    assert reply.usage.completion_tokens == 12
    assert reply.usage.total_tokens == len(prompt_ids) + 12


def test_chat_stream_is_sse_chunks_ending_with_done(client, http):
    whole = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10
    with http.stream("POST", "/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES,
                                                            "max_tokens": 3, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


def test_completions_plain_and_streamed(client, engine, reference):
    model, tokenizer = reference
    prompt = "Once upon a time"
    want = tokenizer.decode(greedy_ids(model, tokenizer, engine.encode(prompt), 8), skip_special_tokens=True)
    reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0)
    assert reply.choices[0].text == want
    assert reply.usage.prompt_tokens == len(engine.encode(prompt))
    streamed = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == want


def test_seed_makes_sampling_repeatable_and_stop_cuts(client):
    kw = dict(model="tiny", prompt="abc", max_tokens=16, temperature=1.0, top_p=0.9)
    first = client.completions.create(seed=7, **kw).choices[0].text
    assert client.completions.create(seed=7, **kw).choices[0].text == first
    greedy = client.completions.create(model="tiny", prompt="abc", max_tokens=16, temperature=0).choices[0]
    text = greedy.text
    stop = next(text[i : i + 2] for i in range(2, len(text) - 1) if "\ufffd" not in text[i : i + 2])
    cut = client.completions.create(model="tiny", prompt="abc", max_tokens=16, temperature=0, stop=[stop]).choices[0]
    assert cut.text == text[: text.index(stop)]
    assert cut.finish_reason == "stop"


def test_embeddings_are_the_index_model(client, serve_embedder):
    texts = ["comets have tails", "bread needs yeast"]
    got = client.embeddings.create(model="ignored", input=texts)  # the client asks for base64
    want = serve_embedder.embed_documents(texts)
    np.testing.assert_allclose(np.array([d.embedding for d in got.data]), want, rtol=1e-5, atol=1e-6)
    floats = client.embeddings.create(model="x", input="comets have tails", encoding_format="float")
    np.testing.assert_allclose(floats.data[0].embedding, want[0], rtol=1e-5, atol=1e-6)
    assert got.usage.prompt_tokens > 0
