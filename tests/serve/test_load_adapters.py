"""Adapters loaded and unloaded while the server runs (vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter):
they serve the same tokens as a fresh model holding only that adapter, a running batch goes on while they load,
and every bad input is a one-line 4xx naming the field while the server keeps serving."""

from __future__ import annotations

import json
import shutil
import threading
import time

import httpx
import pytest
from _server import Server, build_engine, reference_ids

from fourbit.nn.lora import lora_modules
from fourbit.serve import GenRequest, Sampling

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me about comets."}], "max_tokens": 10,
        "temperature": 0}


@pytest.fixture
def live(model_dir):
    """A server over the tiny llama with no adapter at start (its own engine: these tests change it)."""
    from fourbit.serve import create_app

    engine = build_engine(model_dir, max_batch=4)
    try:
        with Server(create_app(engine)) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
            yield engine, srv, http
    finally:
        engine.close()


def load(http: httpx.Client, name: str, path) -> httpx.Response:
    return http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})


def unload(http: httpx.Client, name: str) -> httpx.Response:
    return http.post("/v1/unload_lora_adapter", json={"lora_name": name})


def assert_one_line_error(r: httpx.Response, status: int, param: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert body["param"] == param, body
    assert "\n" not in body["message"] and "Traceback" not in r.text
    return body["message"]


def chat_ids(http: httpx.Client, engine, model: str, n: int = 10) -> list[int]:
    r = http.post("/v1/chat/completions", json={**CHAT, "model": model, "max_tokens": n})
    assert r.status_code == 200, r.text
    return engine.encode(r.json()["choices"][0]["message"]["content"])


def expected_ids(engine, model_dir, adapter_dir, n: int = 10) -> list[int]:
    """What a fresh model holding only ``adapter_dir`` (None: none) answers, as the text round-trips."""
    prompt = engine.chat_prompt(CHAT["messages"])
    ids = reference_ids(model_dir, adapter_dir, prompt, n, engine.end_ids)
    return engine.encode(engine.tokenizer.decode(ids, skip_special_tokens=True))


def test_load_serve_and_unload_while_serving(live, model_dir, adapter_dirs):
    from openai import OpenAI

    engine, srv, http = live
    client = OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    base = expected_ids(engine, model_dir, None)
    assert chat_ids(http, engine, "tiny") == base

    r = load(http, "gamma", adapter_dirs["alpha"])
    assert r.status_code == 200, r.text
    assert r.json()["models"] == ["tiny", "gamma"]
    assert load(http, "delta", adapter_dirs["beta"]).status_code == 200
    assert [m.id for m in client.models.list().data] == ["tiny", "gamma", "delta"]
    want = {"gamma": expected_ids(engine, model_dir, adapter_dirs["alpha"]),
            "delta": expected_ids(engine, model_dir, adapter_dirs["beta"]), "tiny": base}
    assert len({tuple(v) for v in want.values()}) == 3  # the adapters change the answer: the check can fail
    for name, ids in want.items():
        assert chat_ids(http, engine, name) == ids, name

    r = unload(http, "gamma")
    assert r.status_code == 200, r.text
    assert [m.id for m in client.models.list().data] == ["tiny", "delta"]
    assert_one_line_error(http.post("/v1/chat/completions", json={**CHAT, "model": "gamma"}), 404, "model")
    assert chat_ids(http, engine, "delta") == want["delta"]
    assert unload(http, "delta").status_code == 200
    assert not lora_modules(engine.model)  # every wrapped layer has its base back
    assert chat_ids(http, engine, "tiny") == base
    assert load(http, "gamma", adapter_dirs["beta"]).status_code == 200  # a name can be used again
    assert chat_ids(http, engine, "gamma") == want["delta"]


def test_loading_does_not_stop_the_running_batch(live, model_dir, adapter_dirs, float_rows):
    # float_rows: the base row's 600 greedy tokens from the compiled step are compared one for one with the
    # forward's (tests/conftest.py)
    engine, _, http = live
    done = threading.Semaphore(0)

    def sink(kind, value):
        if kind in ("done", "error"):
            done.release()

    prompt = engine.chat_prompt(CHAT["messages"])
    first = engine.submit(GenRequest(prompt, -1, Sampling(600, 0.0), sink))
    deadline = time.monotonic() + 30
    while first.completion_tokens < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert load(http, "gamma", adapter_dirs["alpha"]).status_code == 200
    assert first.finish_reason is None  # loaded between two steps of a batch that is still decoding
    second = engine.submit(GenRequest(prompt, engine.adapter_index("gamma"), Sampling(20, 0.0), sink))
    for _ in range(2):
        assert done.acquire(timeout=120)
    assert engine.stats["batches"] == 1 and engine.stats["max_rows"] == 2  # it joined the running batch
    assert first.output_ids == reference_ids(model_dir, None, prompt, 600, engine.end_ids)
    assert second.output_ids == reference_ids(model_dir, adapter_dirs["alpha"], prompt, 20, engine.end_ids)


def _broken_adapters(root, good):
    """Folders that are not usable adapters of the tiny llama, by what is wrong with them."""
    (root / "empty").mkdir()
    (root / "file.txt").write_text("not a folder")
    shutil.copytree(good, root / "other-rank")
    cfg = json.loads((root / "other-rank" / "adapter_config.json").read_text())
    (root / "other-rank" / "adapter_config.json").write_text(json.dumps({**cfg, "r": cfg["r"] * 2}))
    shutil.copytree(good, root / "truncated")
    weights = root / "truncated" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    shutil.copytree(good, root / "dora")
    (root / "dora" / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    shutil.copytree(good, root / "saves-modules")  # would write lm_head into the base every request shares
    (root / "saves-modules" / "adapter_config.json").write_text(json.dumps({**cfg, "modules_to_save": ["lm_head"]}))
    return {"missing": root / "nope", "empty": root / "empty", "file": root / "file.txt",
            "other-rank": root / "other-rank", "truncated": root / "truncated", "dora": root / "dora",
            "saves-modules": root / "saves-modules"}


def test_bad_loads_and_unloads_are_named_4xx_and_the_server_keeps_serving(live, model_dir, adapter_dirs, tmp_path):
    engine, _, http = live
    assert load(http, "gamma", adapter_dirs["alpha"]).status_code == 200
    layers = set(lora_modules(engine.model))
    for why, path in _broken_adapters(tmp_path, adapter_dirs["alpha"]).items():
        message = assert_one_line_error(load(http, f"bad-{why}", path), 400, "lora_path")
        assert f"bad-{why}" in message, message
        assert engine.models == ["tiny", "gamma"] and set(lora_modules(engine.model)) == layers, why
    assert "DoRA" in assert_one_line_error(load(http, "x", tmp_path / "dora"), 400, "lora_path")
    assert "modules_to_save" in assert_one_line_error(load(http, "x", tmp_path / "saves-modules"), 400, "lora_path")
    assert "does not exist" in assert_one_line_error(load(http, "x", tmp_path / "nope"), 400, "lora_path")
    assert "already loaded" in assert_one_line_error(load(http, "gamma", adapter_dirs["beta"]), 400, "lora_name")
    assert_one_line_error(load(http, "tiny", adapter_dirs["beta"]), 400, "lora_name")
    assert_one_line_error(http.post("/v1/load_lora_adapter", json={"lora_name": "x"}), 400, "lora_path")
    assert_one_line_error(http.post("/v1/load_lora_adapter", json={"lora_name": "", "lora_path": "x"}), 400,
                          "lora_name")
    assert "nothing" in assert_one_line_error(unload(http, "nothing"), 404, "lora_name")
    assert engine.models == ["tiny", "gamma"]
    assert chat_ids(http, engine, "gamma") == expected_ids(engine, model_dir, adapter_dirs["alpha"])


def test_unloading_an_adapter_in_use_is_409_until_its_requests_end(model_dir, adapter_dirs):
    from fourbit.serve import create_app

    engine = build_engine(model_dir, max_batch=1)
    try:
        with Server(create_app(engine)) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
            assert load(http, "gamma", adapter_dirs["alpha"]).status_code == 200
            prompt = engine.encode("hello")
            running = engine.submit(GenRequest(prompt, -1, Sampling(900, 0.0), lambda k, v: None))
            deadline = time.monotonic() + 20
            while running.completion_tokens < 1 and time.monotonic() < deadline:
                time.sleep(0.005)
            queued = engine.submit(GenRequest(prompt, engine.adapter_index("gamma"), Sampling(900, 0.0),
                                              lambda k, v: None))  # waits: --max-batch 1 is taken
            assert "in use by 1 running or queued request" in assert_one_line_error(unload(http, "gamma"), 409,
                                                                                     "lora_name")
            running.cancel()
            deadline = time.monotonic() + 20
            while queued.completion_tokens < 1 and time.monotonic() < deadline:  # now it runs
                time.sleep(0.005)
            assert queued.completion_tokens >= 1 and queued.finish_reason is None
            assert_one_line_error(unload(http, "gamma"), 409, "lora_name")
            assert engine.models == ["tiny", "gamma"]
            queued.cancel()
            r = unload(http, "gamma")
            deadline = time.monotonic() + 20
            while r.status_code == 409 and time.monotonic() < deadline:  # until the row has left the batch
                time.sleep(0.05)
                r = unload(http, "gamma")
            assert r.status_code == 200, r.text
            assert engine.models == ["tiny"] and not lora_modules(engine.model)
            assert http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 2}).status_code == 200
    finally:
        engine.close()


def test_a_request_for_an_adapter_unloaded_after_its_lookup_is_refused(model_dir, adapter_dirs):
    from fourbit.serve import UnknownModel

    engine = build_engine(model_dir, adapters={"alpha": adapter_dirs["alpha"]})
    try:
        index = engine.adapter_index("alpha")
        engine.unload_adapter("alpha").result(timeout=60)
        engine.load_adapter("other", str(adapter_dirs["beta"])).result(timeout=60)
        assert engine.adapter_index("other") != index  # indices are never reused ...
        with pytest.raises(UnknownModel, match="unloaded"):  # ... so the stale one cannot pick another adapter
            engine.submit(GenRequest(engine.encode("hi"), index, Sampling(2, 0.0), lambda k, v: None))
    finally:
        engine.close()
