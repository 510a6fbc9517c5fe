"""Prometheus metrics of the server, at ``GET /metrics`` (prometheus-client's text format).

* ``fourbit_http_requests_total{endpoint, status}``: HTTP requests answered (endpoint "other" for paths the
  server does not have, so that a scanner cannot grow the label set);
* ``fourbit_prompt_tokens_total{model}``, ``fourbit_generation_tokens_total{model}``: tokens read and written;
* ``fourbit_generations_total{model, finish_reason}``: generations ended (stop, length, cancelled, error, ...);
* ``fourbit_queue_depth``, ``fourbit_running_generations``: generations waiting and being decoded, read at
  scrape time;
* ``fourbit_time_to_first_token_seconds``: from queueing to the first generated token;
* ``fourbit_time_per_output_token_seconds``: between two tokens of one generation.

Each app has its own registry (nothing global): two servers in one process report apart.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["KNOWN_PATHS", "MetricsMiddleware", "ServeMetrics"]

KNOWN_PATHS = ("/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions",
               "/v1/embeddings", "/v1/answers", "/v1/documents", "/v1/load_lora_adapter", "/v1/unload_lora_adapter")
# Seconds; a 2-core CPU decodes a 135M model at ~20 ms a token and an 8B at seconds a token.
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5, 5, 10)


class ServeMetrics:
    """The server's metrics in their own registry; the engine reports tokens and ends to it."""

    def __init__(self, engine: Any) -> None:
        self.registry = CollectorRegistry()
        self.engine = engine
        r = self.registry
        self.http = Counter("fourbit_http_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("fourbit_prompt_tokens", "Prompt tokens of generations", ["model"], registry=r)
        self.generation_tokens = Counter("fourbit_generation_tokens", "Tokens generated", ["model"], registry=r)
        self.generations = Counter("fourbit_generations", "Generations ended", ["model", "finish_reason"], registry=r)
        Gauge("fourbit_queue_depth", "Generations waiting for a place in a batch",
              registry=r).set_function(lambda: engine.queue_depth)
        Gauge("fourbit_running_generations", "Generations being decoded",
              registry=r).set_function(lambda: engine.running)
        self.ttft = Histogram("fourbit_time_to_first_token_seconds", "From queueing to the first generated token",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("fourbit_time_per_output_token_seconds", "Between two tokens of one generation",
                              buckets=_TPOT_BUCKETS, registry=r)

    def _model(self, req: Any) -> str:
        return self.engine.model_of(req.adapter)

    def token(self, req: Any, now: float) -> None:
        """A token of ``req`` came at ``now`` (time.monotonic())."""
        if req.last_token_at is None:
            self.ttft.observe(now - req.submitted)
        else:
            self.tpot.observe(now - req.last_token_at)
        req.last_token_at = now

    def observe(self, req: Any, sink: Callable[[str, Any], None]) -> Callable[[str, Any], None]:
        """``sink`` that also counts ``req``'s tokens and how it ended."""

        def counted(kind: str, value: Any) -> None:
            if kind in ("done", "error"):
                model = self._model(req)
                self.prompt_tokens.labels(model).inc(req.prompt_tokens)
                self.generation_tokens.labels(model).inc(req.completion_tokens)
                self.generations.labels(model, value if kind == "done" else "error").inc()
            sink(kind, value)

        return counted

    def render(self) -> tuple[bytes, str]:
        """The metrics in Prometheus' text format, and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """ASGI middleware counting every HTTP answer by endpoint and status (the API key and body-limit
    refusals included: it sits outside them)."""

    def __init__(self, app: Any, metrics: ServeMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in KNOWN_PATHS else ("/static/" if path.startswith("/static/") else "other")
        status = [500]

        async def recording_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            self.metrics.http.labels(endpoint, str(status[0])).inc()
