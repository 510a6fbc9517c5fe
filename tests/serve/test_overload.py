"""Many concurrent connections: beyond the bounded queue (--max-queue) the server answers 429 with Retry-After and
a one-line JSON error, serves everything it accepted, and keeps serving (issue 23)."""

from __future__ import annotations

import httpx
from _server import Server, build_engine

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}


def test_a_thousand_concurrent_connections_get_429_beyond_the_queue_and_the_server_keeps_serving(model_dir):
    import asyncio

    from fourbit.serve import create_app

    engine = build_engine(model_dir, max_batch=2, max_queue=4)

    async def storm(url: str, n: int) -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)  # n connections at once
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
            return await asyncio.gather(*(c.post("/v1/chat/completions", json=CHAT) for _ in range(n)))

    try:
        with Server(create_app(engine)) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
            responses = asyncio.run(storm(srv.url, 1000))
            statuses = [r.status_code for r in responses]
            assert set(statuses) == {200, 429}, sorted(set(statuses))
            assert statuses.count(200) >= 2 + 4  # at least a batch and a full queue were served
            for r in responses:
                if r.status_code == 200:
                    assert r.json()["choices"][0]["finish_reason"] in ("length", "stop")
                    continue
                assert int(r.headers["retry-after"]) >= 1
                error = r.json()["error"]
                assert (error["type"], error["code"], error["param"]) == ("rate_limit_error", "queue_full", None)
                assert "busy" in error["message"] and "\n" not in r.text
            assert http.get("/health").json()["status"] == "ok"
            r = http.post("/v1/chat/completions", json=CHAT)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text
            assert engine.queue_depth == 0
    finally:
        engine.close()
