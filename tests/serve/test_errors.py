"""Bad input gets a 4xx with OpenAI's error body naming the field, and the server keeps serving; auth;
body limits; a full queue answers 429 with Retry-After; a client that goes away cancels its generation."""

from __future__ import annotations

import json
import logging
import socket
import time

import httpx
import pytest
from _server import Server, build_engine

from fourbit.serve import GenRequest, Sampling

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}


def assert_error(response: httpx.Response, status: int, param: str | None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    assert body["param"] == param
    assert "Traceback" not in response.text
    return body


def still_serving(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("length", "stop")


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b'{"model": "tiny", "messages": [', 400, "body"),  # malformed JSON
        (b'["not", "an", "object"]', 400, "body"),
        ({"model": "tiny"}, 400, "messages"),  # missing field
        ({"messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
        ({**CHAT, "model": "nope"}, 404, "model"),  # unknown model
        ({**CHAT, "max_tokens": -3}, 400, "max_tokens"),
        ({**CHAT, "max_tokens": 0}, 400, "max_tokens"),
        ({**CHAT, "temperature": 5}, 400, "temperature"),
        ({**CHAT, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
        ({**CHAT, "messages": []}, 400, "messages"),
        ({**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}, 400, "messages"),  # over the context
        ({**CHAT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({**CHAT, "n": 0}, 400, "n"),
        ({**CHAT, "n": 9}, 400, "n"),  # over the server's --max-batch (8)
    ],
)
def test_bad_chat_requests_are_named_4xx_and_the_server_keeps_serving(http, body, status, param):
    if isinstance(body, bytes):
        r = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    else:
        r = http.post("/v1/chat/completions", json=body)
    assert_error(r, status, param)
    still_serving(http)


def test_bad_completion_embedding_and_answer_requests(http):
    assert_error(http.post("/v1/completions", json={"model": "tiny", "prompt": "x" * 5000}), 400, "prompt")
    assert_error(http.post("/v1/completions", json={"model": "tiny"}), 400, "prompt")
    assert_error(http.post("/v1/completions", json={"model": "tiny", "prompt": ["a", "b"]}), 400, "prompt")
    assert_error(http.post("/v1/embeddings", json={"model": "m", "input": [""]}), 400, "input")
    assert_error(http.post("/v1/answers", json={"question": "why", "retriever": "magic"}), 400, "retriever")
    assert_error(http.post("/v1/answers", json={"question": ""}), 400, "question")
    assert_error(http.post("/v1/answers", json={"question": "why", "top_k": 0}), 400, "top_k")
    assert_error(http.post("/v1/answers", json={"question": "why", "max_tokens": -1}), 400, "max_tokens")
    assert_error(http.post("/v1/answers", json={"question": "why", "model": "nope"}), 404, "model")
    assert_error(http.get("/v1/nothing"), 404, None)
    assert_error(http.get("/v1/chat/completions"), 405, None)
    still_serving(http)


def test_openai_client_sees_typed_errors(client):
    import openai

    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="missing", messages=CHAT["messages"], max_tokens=1)
    assert info.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=CHAT["messages"], max_tokens=-1)
    assert info.value.body["param"] == "max_tokens"


def test_max_tokens_is_capped_by_the_context_window(model_dir):
    from fourbit.serve import create_app

    engine = build_engine(model_dir, context_window=48)
    try:
        with Server(create_app(engine)) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
            prompt_tokens = len(engine.chat_prompt(CHAT["messages"]))
            r = http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 10_000})
            assert r.status_code == 200, r.text
            usage = r.json()["usage"]
            assert usage["prompt_tokens"] == prompt_tokens
            assert usage["total_tokens"] <= 48
            assert r.json()["choices"][0]["finish_reason"] in ("length", "stop")
    finally:
        engine.close()


def test_api_key_guards_every_endpoint_but_health(model_dir, adapter_dirs):
    import openai

    from fourbit.serve import create_app

    engine = build_engine(model_dir)
    try:
        with Server(create_app(engine, api_key="s3cret")) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
            assert http.get("/health").status_code == 200
            for method, path in [("GET", "/v1/models"), ("POST", "/v1/chat/completions"),
                                 ("POST", "/v1/completions"), ("POST", "/v1/embeddings"),
                                 ("POST", "/v1/answers"), ("POST", "/v1/documents"),
                                 ("POST", "/v1/load_lora_adapter"), ("POST", "/v1/unload_lora_adapter")]:
                r = http.request(method, path, json=CHAT)
                assert_error(r, 401, "authorization")
                assert r.headers["www-authenticate"] == "Bearer"
                r = http.request(method, path, json=CHAT, headers={"Authorization": "Bearer wrong"})
                assert_error(r, 401, "authorization")
            good = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
            assert [m.id for m in good.models.list().data] == ["tiny"]
            bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="nope", max_retries=0)
            with pytest.raises(openai.AuthenticationError):
                bad.models.list()
            key = {"Authorization": "Bearer s3cret"}
            r = http.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": str(adapter_dirs["alpha"])},
                          headers=key)
            assert r.status_code == 200, r.text
            assert [m.id for m in good.models.list().data] == ["tiny", "a"]
            assert http.post("/v1/unload_lora_adapter", json={"lora_name": "a"}, headers=key).status_code == 200
            assert engine.models == ["tiny"]
    finally:
        engine.close()


def test_body_over_the_limit_is_413(model_dir):
    from fourbit.serve import create_app

    engine = build_engine(model_dir)
    try:
        with Server(create_app(engine, max_body=512)) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
            big = {**CHAT, "messages": [{"role": "user", "content": "y" * 600}]}
            assert_error(http.post("/v1/chat/completions", json=big), 413, "body")

            def chunks():  # no Content-Length: the limit is enforced while reading
                yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
                yield b"z" * 1000
                yield b'"}]}'

            r = http.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
            assert_error(r, 413, "body")
            still_serving(http)
    finally:
        engine.close()


def test_full_queue_answers_429_with_retry_after(model_dir):
    from fourbit.serve import create_app

    engine = build_engine(model_dir, max_batch=1, max_queue=1)
    busy = [GenRequest(engine.encode("hello"), -1, Sampling(max_tokens=900, temperature=0), lambda k, v: None)
            for _ in range(2)]
    try:
        with Server(create_app(engine)) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
            engine.submit(busy[0])
            deadline = time.monotonic() + 10
            while engine.stats["batches"] == 0 and time.monotonic() < deadline:  # the worker took it
                time.sleep(0.01)
            engine.submit(busy[1])  # waits: the queue is now full
            r = http.post("/v1/chat/completions", json=CHAT)
            assert_error(r, 429, None)
            assert int(r.headers["retry-after"]) >= 1
            for req in busy:
                req.cancel()
            deadline = time.monotonic() + 20
            while r.status_code == 429 and time.monotonic() < deadline:
                time.sleep(0.05)
                r = http.post("/v1/chat/completions", json=CHAT)
            assert r.status_code == 200, r.text
    finally:
        engine.close()


def test_client_disconnect_cancels_its_generation(model_dir):
    from fourbit.serve import create_app

    # The model's forward, not the compiled step: the compiled step can finish 900 tiny-model tokens between two
    # of the server's disconnect checks (every 0.25 s), and a finished generation has nothing to cancel.
    engine = build_engine(model_dir, decoder="hf")
    try:
        with Server(create_app(engine)) as srv:
            body = {**CHAT, "max_tokens": 900, "stream": True}
            with httpx.Client(base_url=srv.url, timeout=60) as http:
                with http.stream("POST", "/v1/chat/completions", json=body) as r:
                    next(r.iter_lines())  # the first chunk arrived: the generation is running
            deadline = time.monotonic() + 20
            while engine.stats["cancelled"] == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert engine.stats["cancelled"] == 1
            assert engine.stats["steps"] < 900

            # a non-streamed request whose client gives up (once its generation runs) is cancelled too
            batches = engine.stats["batches"]
            payload = json.dumps({**CHAT, "max_tokens": 900}).encode()
            with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
                sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
                deadline = time.monotonic() + 20
                while engine.stats["batches"] == batches and time.monotonic() < deadline:
                    time.sleep(0.01)
            deadline = time.monotonic() + 20
            while engine.stats["cancelled"] < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert engine.stats["cancelled"] == 2
    finally:
        engine.close()


class _Records(logging.Handler):
    """Every record logged while installed, on the root logger and uvicorn's (which do not propagate)."""

    NAMES = ("", "uvicorn", "uvicorn.error", "uvicorn.access", "fastapi", "fourbit")

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> _Records:
        for name in self.NAMES:
            logging.getLogger(name).addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        for name in self.NAMES:
            logging.getLogger(name).removeHandler(self)

    def tracebacks(self) -> list[str]:
        formatter = logging.Formatter()
        return [formatter.format(r) for r in self.records if r.exc_info or "Traceback" in r.getMessage()]


SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}
NAMELESS_TOOL = [{"type": "function", "function": {"parameters": {"type": "object"}}}]


def test_bad_inputs_of_the_new_options_and_endpoints_log_no_traceback(http, tmp_path):
    """Issue 23's server cases and wrongly typed fields: each a 4xx with one line naming the field, nothing but
    that in the server's log (no traceback), and the server serves the next request."""
    (tmp_path / "file.txt").write_text("not an adapter")
    (tmp_path / "empty").mkdir()
    cases = [
        ("/v1/chat/completions", {**CHAT, "response_format": SCHEMA_FORMAT}, 400, "response_format.json_schema.schema"),
        ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "object", "properties": {"a": {"minimum": "zero"}}}}}}, 400,
         "response_format.json_schema.schema"),
        ("/v1/chat/completions", {**CHAT, "tools": NAMELESS_TOOL}, 400, "tools[0].function.name"),
        ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function"}]}, 400, "tools[0].function"),
        ("/v1/chat/completions", {**CHAT, "temperature": "hot"}, 400, "temperature"),
        ("/v1/chat/completions", {**CHAT, "messages": "hi"}, 400, "messages"),
        ("/v1/chat/completions", {**CHAT, "model": 5}, 400, "model"),
        ("/v1/chat/completions", {**CHAT, "seed": "lucky"}, 400, "seed"),
        ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(tmp_path / "nope")}, 400, "lora_path"),
        ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(tmp_path / "file.txt")}, 400, "lora_path"),
        ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(tmp_path / "empty")}, 400, "lora_path"),
        ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": 7}, 400, "lora_path"),
        ("/v1/unload_lora_adapter", {"lora_name": "never-loaded"}, 404, "lora_name"),
    ]
    with _Records() as log:
        for path, body, status, param in cases:
            r = http.post(path, json=body)
            error = assert_error(r, status, param)
            assert "\n" not in error["message"] and param.split("[")[0].split(".")[0] in error["message"], error
        still_serving(http)
    assert log.tracebacks() == []
    assert not [r for r in log.records if r.levelno >= logging.ERROR]
