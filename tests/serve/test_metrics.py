"""``GET /metrics``: Prometheus' text format, with the requests, tokens, queue depth and latency histograms of
what the server did, counted against what the API answered."""

from __future__ import annotations

import json

import httpx
import pytest
from _server import Server, build_engine
from prometheus_client.parser import text_string_to_metric_families

from fourbit.serve import GenRequest, Sampling

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}


def scrape(http: httpx.Client) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} from /metrics, parsed by prometheus-client's own parser."""
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


@pytest.fixture
def served(model_dir):
    from fourbit.serve import create_app

    engine = build_engine(model_dir, max_batch=2)
    try:
        with Server(create_app(engine)) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
            yield engine, http
    finally:
        engine.close()


def test_metrics_count_requests_tokens_and_latencies(served):
    engine, http = served
    before = scrape(http)
    assert before[("fourbit_queue_depth", ())] == 0
    assert before[("fourbit_time_to_first_token_seconds_count", ())] == 0
    usages = [http.post("/v1/chat/completions", json={**CHAT, "max_tokens": n}).json()["usage"] for n in (3, 5)]
    with http.stream("POST", "/v1/completions", json={"model": "tiny", "prompt": "abc", "max_tokens": 4,
                                                      "temperature": 0, "stream": True,
                                                      "stream_options": {"include_usage": True}}) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: {")]
    usages.append(json.loads(lines[-1][6:])["usage"])
    assert http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 0}).status_code == 400
    assert http.get("/no/such/path").status_code == 404

    after = scrape(http)
    assert after[("fourbit_http_requests_total", (("endpoint", "/v1/chat/completions"), ("status", "200")))] == 2
    assert after[("fourbit_http_requests_total", (("endpoint", "/v1/chat/completions"), ("status", "400")))] == 1
    assert after[("fourbit_http_requests_total", (("endpoint", "/v1/completions"), ("status", "200")))] == 1
    assert after[("fourbit_http_requests_total", (("endpoint", "other"), ("status", "404")))] == 1
    generated = sum(u["completion_tokens"] for u in usages)
    assert after[("fourbit_generation_tokens_total", (("model", "tiny"),))] == generated
    assert after[("fourbit_prompt_tokens_total", (("model", "tiny"),))] == sum(u["prompt_tokens"] for u in usages)
    finished = sum(v for (name, _), v in after.items() if name == "fourbit_generations_total")
    assert finished == 3
    # one first token per generation that produced one; one interval between each two tokens after it
    producing = sum(1 for u in usages if u["completion_tokens"] > 0)
    assert after[("fourbit_time_to_first_token_seconds_count", ())] == producing
    assert after[("fourbit_time_per_output_token_seconds_count", ())] == generated - producing
    assert after[("fourbit_time_to_first_token_seconds_sum", ())] > 0
    assert after[("fourbit_queue_depth", ())] == 0


def test_queue_depth_is_read_at_scrape_time(served):
    engine, http = served
    waiting = [GenRequest(engine.encode("hello"), -1, Sampling(max_tokens=2, temperature=0), lambda k, v: None)
               for _ in range(3)]
    with engine.hold():  # the worker cannot take them while the block runs
        for req in waiting:
            engine.submit(req)
        assert scrape(http)[("fourbit_queue_depth", ())] == 3
    for req in waiting:
        req.cancel()


def test_metrics_need_the_api_key_when_there_is_one(model_dir):
    from fourbit.serve import create_app

    engine = build_engine(model_dir)
    try:
        with Server(create_app(engine, api_key="k")) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
            assert http.get("/metrics").status_code == 401
            assert http.get("/metrics", headers={"Authorization": "Bearer k"}).status_code == 200
    finally:
        engine.close()
