"""The HTTP API (FastAPI): OpenAI-compatible endpoints, document QA, uploads, and the static web page.

Endpoints (the official ``openai`` client uses the /v1 ones unchanged):

* ``GET /health`` (never needs the key), ``GET /v1/models`` (the base model and each adapter);
* ``POST /v1/chat/completions`` and ``POST /v1/completions`` (``stream: true`` answers with server-sent
  events in OpenAI's chunk format, ending with ``data: [DONE]``);
* ``POST /v1/embeddings`` (the index's sentence-transformers model);
* ``POST /v1/answers`` (grounded document QA) and ``POST /v1/documents`` (upload into the index);
* ``GET /`` the web page (files under ``static/``, nothing fetched from elsewhere).

Every error is a 4xx with OpenAI's body ``{"error": {"message", "type", "param", "code"}}`` whose
``param`` names the request field at fault; an unexpected failure is a 500 with the same body and no
traceback, and the server keeps serving.
"""


import asyncio
import base64
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from fourbit._errors import FieldError
from fourbit.rag.retrieval import RETRIEVERS
from fourbit.serve.engine import Engine, GenRequest, QueueFull, Sampling, UnknownModel
from fourbit.serve.errors import APIError, error_body

__all__ = ["ANSWER_MAX_TOKENS", "DEFAULT_MAX_BODY", "DEFAULT_MAX_UPLOAD", "create_app"]

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY = 1 << 20  # 1 MiB of JSON per request
DEFAULT_MAX_UPLOAD = 20 << 20  # 20 MiB per uploaded document
# An answer's default length (a request's max_tokens overrides it). The evidence sentences carry the facts; the
# 135M model's answer past a few sentences mostly repeats them, and each token costs a decoding step on a
# 2-core CPU: the answer length is what decides whether a question answers within 5 s (see
# benchmarks/RESULTS.md, "Answers through the server").
ANSWER_MAX_TOKENS = 48
STATIC = Path(__file__).resolve().parent / "static"
_PUBLIC = ("/health", "/", "/static/")
_POLL_S = 0.25  # how often a waiting non-streamed request checks that its client is still there


# ---- request bodies ----------------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Generation(_Body):
    model: str
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(1, ge=1, le=1)


class _Part(_Body):
    type: str = "text"
    text: str = ""


class _Message(_Body):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[_Part] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content if p.type == "text")


class ChatRequest(_Generation):
    messages: list[_Message] = Field(min_length=1)


class CompletionRequest(_Generation):
    prompt: str | list[str]


class EmbeddingRequest(_Body):
    input: str | list[str]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"


class AnswerRequest(_Body):
    question: str = Field(min_length=1, max_length=4000)
    retriever: Literal[tuple(RETRIEVERS)] = "all"  # type: ignore[valid-type]
    top_k: int = Field(2, ge=1, le=20)
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    stream: bool = False


# ---- errors --------------------------------------------------------------------------------------------
def _json_response(status: int, body: Any, headers: dict[str, str] | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse(body, status_code=status, headers=headers)


def _loc_name(loc: tuple) -> str | None:
    """pydantic's error location -> the request field, e.g. ('body', 'messages', 0, 'content') ->
    'messages[0].content'."""
    parts = [p for p in loc if p != "body"]
    name = ""
    for p in parts:
        if isinstance(p, int):
            name += f"[{p}]"
        elif p in ("str", "list[str]", "list[_Part]", "int", "float", "function-after", "literal"):
            continue  # union member names pydantic adds to the location
        else:
            name += f".{p}" if name else str(p)
    return name or None


def _validation_error(errors: list[dict[str, Any]]) -> APIError:
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "not valid JSON")
        return APIError(400, f"the request body is not valid JSON ({detail})", param="body", code="invalid_json")
    field = _loc_name(tuple(first.get("loc", ())))
    if field is None and first.get("type") in ("model_attributes_type", "dict_type"):
        return APIError(400, "the request body must be a JSON object", param="body")
    if first.get("type") == "missing":
        return APIError(400, f"missing required field {field!r}", param=field, code="missing_field")
    return APIError(400, f"{field}: {first.get('msg', 'invalid value')}", param=field)


# ---- ASGI middleware: auth and body limits ------------------------------------------------------------
class _Guard:
    """API key check (all but the public paths) and request body limits (413), before any handler runs."""

    def __init__(self, app: Any, api_key: str | None, max_body: int, max_upload: int) -> None:
        self.app, self.api_key, self.max_body, self.max_upload = app, api_key, max_body, max_upload

    async def _send_error(self, send: Any, status: int, message: str, type_: str, param: str | None = None,
                          headers: list[tuple[bytes, bytes]] = ()) -> None:
        body = json.dumps(error_body(message, type_, param, None)).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()), *headers]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        headers = dict(scope.get("headers") or [])
        public = path == "/" or any(path.startswith(p) for p in _PUBLIC if p != "/")
        if self.api_key and not public:
            given = headers.get(b"authorization", b"").decode("latin-1")
            token = given[7:].strip() if given[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                await self._send_error(send, 401, "missing or wrong API key: send `Authorization: Bearer KEY`",
                                       "invalid_request_error", "authorization",
                                       [(b"www-authenticate", b"Bearer")])
                return
        limit = self.max_upload if path == "/v1/documents" else self.max_body
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await self._send_error(send, 413, f"the request body is {int(length)} bytes; the limit is {limit}",
                                   "invalid_request_error", "body")
            return
        received = 0
        started = rejected = False

        async def limited_receive() -> Any:
            # Over the limit: answer 413 now and tell the app the client left (an exception raised here
            # would be turned into a 400 by the body parser).
            nonlocal received, rejected
            message = await receive()
            if message["type"] == "http.request" and not rejected:
                received += len(message.get("body", b""))
                if received > limit:
                    rejected = True
                    if not started:
                        await self._send_error(send, 413, f"the request body is over the limit of {limit} bytes",
                                               "invalid_request_error", "body")
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Any) -> None:
            nonlocal started
            if rejected:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, limited_receive, guarded_send)


# ---- generation plumbing -------------------------------------------------------------------------------
class _Stream:
    """Bridge from the engine's worker thread to the event loop: the request's events in an asyncio queue."""

    def __init__(self, engine: Engine, prompt_ids: list[int], sampling: Sampling, adapter: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.req = engine.submit(GenRequest(prompt_ids, adapter, sampling, self._sink))

    def _sink(self, kind: str, value: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))
        except RuntimeError:  # the loop is gone (server shutting down)
            self.req.cancel()

    async def events(self, request: Any | None = None) -> AsyncIterator[tuple[str, Any]]:
        """("delta", text) ... then ("done", reason); raises APIError on a failed generation. When
        ``request`` is given, a client that disconnected cancels the generation."""
        checked = time.monotonic()
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(self.queue.get(), _POLL_S if request else None)
                except asyncio.TimeoutError:
                    kind = value = None
                if request is not None and time.monotonic() - checked >= _POLL_S:
                    # Checked on a clock, not only when no token came for a while: tokens may keep coming.
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        self.req.cancel()
                        return
                if kind is None:
                    continue
                if kind == "error":
                    raise APIError(500, value, type_="server_error")
                yield kind, value
                if kind == "done":
                    return
        finally:
            if self.req.finish_reason is None:
                self.req.cancel()


def _usage(req: GenRequest) -> dict[str, int]:
    return {"prompt_tokens": req.prompt_tokens, "completion_tokens": req.completion_tokens,
            "total_tokens": req.prompt_tokens + req.completion_tokens}


def _sse(data: Any) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    if len(stops) > 4 or any(not s for s in stops):
        raise APIError(400, "stop: give up to 4 non-empty strings", param="stop")
    return stops


def _prepare(engine: Engine, body: _Generation, prompt_ids: list[int], field_name: str) -> tuple[Sampling, int]:
    adapter = engine.adapter_index(body.model)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    sampling = engine.sampling(len(prompt_ids), max_tokens=max_tokens, field_name=field_name,
                               temperature=body.temperature, top_p=body.top_p, stop=_stops(body.stop),
                               seed=body.seed)
    return sampling, adapter


def _sse_response(gen: AsyncIterator[str], stream: _Stream):
    from starlette.background import BackgroundTask
    from starlette.responses import StreamingResponse

    def cancel_unfinished() -> None:  # runs after the response, also when the client left before it began
        if stream.req.finish_reason is None:
            stream.req.cancel()

    return StreamingResponse(gen, media_type="text/event-stream", background=BackgroundTask(cancel_unfinished),
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ---- the app -------------------------------------------------------------------------------------------
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
    from fastapi import FastAPI, File, Request, UploadFile
    from fastapi.exceptions import RequestValidationError
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.responses import FileResponse
    from starlette.staticfiles import StaticFiles

    app = FastAPI(title="fourbit", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        return _json_response(err.status, error_body(err.message, err.type, err.param, err.code), err.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        return await _api_error(request, _validation_error(list(err.errors())))

    @app.exception_handler(FieldError)
    async def _field(request: Request, err: FieldError):
        message = re.sub(r"`([^`]+)`", r"\1", f"{err.field}: {err.message}")
        return await _api_error(request, APIError(400, message, param=err.field))

    @app.exception_handler(UnknownModel)
    async def _unknown(request: Request, err: UnknownModel):
        return await _api_error(request, APIError(404, str(err), param="model", code="model_not_found"))

    @app.exception_handler(QueueFull)
    async def _busy(request: Request, err: QueueFull):
        return await _api_error(request, APIError(429, str(err), type_="rate_limit_error", code="queue_full",
                                                  headers={"Retry-After": str(err.retry_after)}))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, err: HTTPException):
        message = err.detail if isinstance(err.detail, str) else "request failed"
        if err.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        return await _api_error(request, APIError(err.status_code, message))

    @app.exception_handler(Exception)
    async def _crash(request: Request, err: Exception):
        log.exception("request failed: %s %s", request.method, request.url.path)
        return await _api_error(request, APIError(500, f"internal error ({type(err).__name__}); the server "
                                                       "is still serving", type_="server_error"))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": engine.models, "documents": engine.store is not None}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        created = int(time.time())
        data = [{"id": name, "object": "model", "created": created, "owned_by": "fourbit",
                 "parent": None if name == engine.model_name else engine.model_name}
                for name in engine.models]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        try:
            prompt_ids = engine.chat_prompt(messages)
        except Exception as err:  # jinja2's TemplateError and friends: the template refuses these messages
            raise APIError(400, f"messages: the model's chat template refuses them ({err})", param="messages") from None
        sampling, adapter = _prepare(engine, body, prompt_ids, "messages")
        stream = _Stream(engine, prompt_ids, sampling, adapter)
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": cid, "created": created, "model": body.model}
        if not body.stream:
            text = "".join([v async for k, v in stream.events(request) if k == "delta"])
            return {**head, "object": "chat.completion", "choices": [{
                "index": 0, "message": {"role": "assistant", "content": text},
                "finish_reason": stream.req.finish_reason, "logprobs": None}], "usage": _usage(stream.req)}
        include_usage = bool((body.stream_options or {}).get("include_usage"))

        async def chunks() -> AsyncIterator[str]:
            chunk = {**head, "object": "chat.completion.chunk"}
            yield _sse({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                              "finish_reason": None}]})
            try:
                async for kind, value in stream.events():
                    if kind == "delta":
                        yield _sse({**chunk, "choices": [{"index": 0, "delta": {"content": value},
                                                          "finish_reason": None}]})
                yield _sse({**chunk, "choices": [{"index": 0, "delta": {},
                                                  "finish_reason": stream.req.finish_reason}]})
                if include_usage:
                    yield _sse({**chunk, "choices": [], "usage": _usage(stream.req)})
            except APIError as err:
                yield _sse(error_body(err.message, err.type, None, None))
            yield _sse("[DONE]")

        return _sse_response(chunks(), stream)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise APIError(400, "prompt: give one prompt (a string) per request", param="prompt")
        prompt_ids = engine.encode(prompts[0])
        if not prompt_ids:
            raise APIError(400, "prompt is empty", param="prompt")
        sampling, adapter = _prepare(engine, body, prompt_ids, "prompt")
        stream = _Stream(engine, prompt_ids, sampling, adapter)
        head = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": body.model,
                "object": "text_completion"}
        if not body.stream:
            text = "".join([v async for k, v in stream.events(request) if k == "delta"])
            return {**head, "choices": [{"index": 0, "text": text, "finish_reason": stream.req.finish_reason,
                                         "logprobs": None}], "usage": _usage(stream.req)}
        include_usage = bool((body.stream_options or {}).get("include_usage"))

        async def chunks() -> AsyncIterator[str]:
            try:
                async for kind, value in stream.events():
                    if kind == "delta":
                        yield _sse({**head, "choices": [{"index": 0, "text": value, "finish_reason": None,
                                                         "logprobs": None}]})
                yield _sse({**head, "choices": [{"index": 0, "text": "", "logprobs": None,
                                                 "finish_reason": stream.req.finish_reason}]})
                if include_usage:
                    yield _sse({**head, "choices": [], "usage": _usage(stream.req)})
            except APIError as err:
                yield _sse(error_body(err.message, err.type, None, None))
            yield _sse("[DONE]")

        return _sse_response(chunks(), stream)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest):
        if engine.embedder is None:
            raise APIError(404, "no embedding model is loaded: start the server with --db", param="model",
                           code="model_not_found")
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        if not texts or len(texts) > 2048:
            raise APIError(400, "input: give 1 to 2048 strings", param="input")
        if any(not t for t in texts):
            raise APIError(400, "input: empty strings cannot be embedded", param="input")
        vectors = await run_in_threadpool(engine.embedder.embed_documents, texts)
        tokens = sum(engine.embedder.count_tokens(t) for t in texts)

        def encode(v: Any) -> Any:
            if body.encoding_format == "base64":
                return base64.b64encode(v.astype("<f4").tobytes()).decode()
            return [float(x) for x in v]

        return {"object": "list", "model": engine.embedder.name,
                "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @app.post("/v1/answers")
    async def answers(body: AnswerRequest, request: Request):
        from fourbit.serve.documents import prepare_answer

        engine.require_index()
        adapter = engine.adapter_index(body.model)
        max_tokens = body.max_tokens if body.max_tokens is not None else ANSWER_MAX_TOKENS
        prompt_ids, evidence, sources = await run_in_threadpool(prepare_answer, engine, body.question,
                                                                body.retriever, body.top_k, max_tokens)
        sampling = engine.sampling(len(prompt_ids), max_tokens=max_tokens, field_name="question",
                                   temperature=0.0)
        stream = _Stream(engine, prompt_ids, sampling, adapter)
        found = {"evidence": evidence, "sources": sources}
        if not body.stream:
            text = "".join([v async for k, v in stream.events(request) if k == "delta"])
            return {"answer": text.strip(), **found, "model": body.model or engine.model_name,
                    "finish_reason": stream.req.finish_reason, "usage": _usage(stream.req)}

        async def events() -> AsyncIterator[str]:
            yield _sse({"type": "sources", **found})
            pieces = []
            try:
                async for kind, value in stream.events():
                    if kind == "delta":
                        pieces.append(value)
                        yield _sse({"type": "delta", "text": value})
                yield _sse({"type": "done", "answer": "".join(pieces).strip(),
                            "finish_reason": stream.req.finish_reason, "usage": _usage(stream.req)})
            except APIError as err:
                yield _sse(error_body(err.message, err.type, None, None))
            yield _sse("[DONE]")

        return _sse_response(events(), stream)

    @app.post("/v1/documents")
    async def documents(file: UploadFile = File(...)):  # noqa: B008 - FastAPI's declaration style
        from fourbit.serve.documents import ingest_upload

        engine.require_index()
        data = await file.read(max_upload + 1)
        return await run_in_threadpool(ingest_upload, engine, file.filename or "", data, max_upload)

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(_Guard, api_key=api_key, max_body=max_body, max_upload=max_upload)
    return app
