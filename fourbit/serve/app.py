"""The HTTP API (FastAPI): OpenAI-compatible endpoints, document QA, uploads, and the static web page.

Endpoints (the official ``openai`` client uses the /v1 ones unchanged), by route group:

* :mod:`.routes_openai`: ``GET /v1/models`` (the base model and each adapter), ``POST /v1/chat/completions``
  and ``POST /v1/completions`` (``stream: true`` answers with server-sent events in OpenAI's chunk format,
  ending with ``data: [DONE]``; the options ``stop``, ``n``, ``seed``, ``logprobs``/``top_logprobs``,
  ``stream_options``, ``response_format`` (:mod:`.options`, :mod:`.constrain`) and ``tools``/``tool_choice``
  (:mod:`.tools`); any other option is a 400 naming it), ``POST /v1/embeddings`` (the index's
  sentence-transformers model);
* :mod:`.routes_documents`: ``POST /v1/answers`` (grounded document QA) and ``POST /v1/documents`` (upload
  into the index);
* :mod:`.routes_adapters`: ``POST /v1/load_lora_adapter`` and ``POST /v1/unload_lora_adapter`` (vLLM's names:
  adapters loaded and unloaded while serving);
* here: ``GET /health`` (never needs the key), ``GET /metrics`` (Prometheus, :mod:`.metrics`) and ``GET /``
  the web page (files under ``static/``, nothing fetched from elsewhere).

Every error is a 4xx with OpenAI's body ``{"error": {"message", "type", "param", "code"}}`` whose
``param`` names the request field at fault; an unexpected failure is a 500 with the same body and no
traceback, and the server keeps serving. The API key and body limits are checked first, by :mod:`.guard`.
"""

import logging
import re
from pathlib import Path
from typing import Any

from fourbit._errors import FieldError
from fourbit.serve.engine import Engine, QueueFull, UnknownModel
from fourbit.serve.errors import APIError, error_body
from fourbit.serve.routes_documents import ANSWER_MAX_TOKENS

__all__ = ["ANSWER_MAX_TOKENS", "DEFAULT_MAX_BODY", "DEFAULT_MAX_UPLOAD", "create_app"]

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY = 1 << 20  # 1 MiB of JSON per request
DEFAULT_MAX_UPLOAD = 20 << 20  # 20 MiB per uploaded document
STATIC = Path(__file__).resolve().parent / "static"


def create_app(
    engine: Engine,
    *,
    api_key: str | None = None,
    max_body: int = DEFAULT_MAX_BODY,
    max_upload: int = DEFAULT_MAX_UPLOAD,
) -> Any:
    """The FastAPI application serving ``engine``.

    Args:
        engine: the :class:`fourbit.serve.engine.Engine` (model, adapters, embedder, index).
        api_key: when set, every endpoint but /health and the static page needs ``Authorization: Bearer``.
        max_body: bytes allowed in a JSON request body (413 beyond).
        max_upload: bytes allowed in an uploaded document (413 beyond).

    Returns:
        The ASGI app (run it with uvicorn).
    """
    from fastapi import FastAPI

    from fourbit.serve import routes_adapters, routes_documents, routes_openai
    from fourbit.serve.guard import Guard
    from fourbit.serve.metrics import MetricsMiddleware, ServeMetrics

    app = FastAPI(title="fourbit", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = ServeMetrics(engine)
    engine.metrics = metrics
    app.state.engine, app.state.max_upload, app.state.metrics = engine, max_upload, metrics
    _add_error_handlers(app)
    _add_page_routes(app, engine, metrics)
    app.include_router(routes_openai.router)
    app.include_router(routes_documents.router)
    app.include_router(routes_adapters.router)
    app.add_middleware(Guard, api_key=api_key, max_body=max_body, max_upload=max_upload)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # the outermost: it counts the Guard's refusals too
    return app


def _json_response(status: int, body: Any, headers: dict[str, str] | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse(body, status_code=status, headers=headers)


def _add_error_handlers(app: Any) -> None:
    """Map every failure to OpenAI's error body: APIError as it says, a request that fails validation or a
    FieldError to a 400 naming the field, an unknown model to 404, a full queue to 429 with Retry-After, an
    unexpected exception to a 500 without a traceback."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    from fourbit.serve.bodies import validation_error

    async def api_error(request: Request, err: APIError):
        return _json_response(err.status, error_body(err.message, err.type, err.param, err.code), err.headers)

    async def invalid(request: Request, err: RequestValidationError):
        return await api_error(request, validation_error(list(err.errors())))

    async def field(request: Request, err: FieldError):
        message = re.sub(r"`([^`]+)`", r"\1", f"{err.field}: {err.message}")
        return await api_error(request, APIError(400, message, param=err.field))

    async def unknown(request: Request, err: UnknownModel):
        return await api_error(request, APIError(404, str(err), param="model", code="model_not_found"))

    async def busy(request: Request, err: QueueFull):
        return await api_error(request, APIError(429, str(err), type_="rate_limit_error", code="queue_full",
                                                 headers={"Retry-After": str(err.retry_after)}))

    async def http(request: Request, err: HTTPException):
        message = err.detail if isinstance(err.detail, str) else "request failed"
        if err.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        return await api_error(request, APIError(err.status_code, message))

    async def crash(request: Request, err: Exception):
        log.exception("request failed: %s %s", request.method, request.url.path)
        return await api_error(request, APIError(500, f"internal error ({type(err).__name__}); the server "
                                                      "is still serving", type_="server_error"))

    for kind, handler in [(APIError, api_error), (RequestValidationError, invalid), (FieldError, field),
                          (UnknownModel, unknown), (QueueFull, busy), (HTTPException, http), (Exception, crash)]:
        app.add_exception_handler(kind, handler)


def _add_page_routes(app: Any, engine: Engine, metrics: Any) -> None:
    """``GET /health``, ``GET /metrics`` (Prometheus; behind the API key when there is one), the web page at
    ``/`` and its files under ``/static/``."""
    from starlette.responses import FileResponse, Response
    from starlette.staticfiles import StaticFiles

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": engine.models, "documents": engine.store is not None}

    @app.get("/metrics")
    async def prometheus_metrics():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
