"""The OpenAI-compatible routes: ``GET /v1/models``, ``POST /v1/chat/completions``, ``/v1/completions`` and
``/v1/embeddings``. The official ``openai`` client uses them unchanged; ``stream: true`` answers with
server-sent events in OpenAI's chunk format."""

import base64
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from fourbit.serve.bodies import ChatRequest, CompletionRequest, EmbeddingRequest, _Generation
from fourbit.serve.engine import Engine, Sampling
from fourbit.serve.errors import APIError, error_body
from fourbit.serve.streaming import Stream, sse, sse_response, usage

__all__ = ["router"]

router = APIRouter()


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


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    engine: Engine = request.app.state.engine
    created = int(time.time())
    data = [{"id": name, "object": "model", "created": created, "owned_by": "fourbit",
             "parent": None if name == engine.model_name else engine.model_name}
            for name in engine.models]
    return {"object": "list", "data": data}


@router.post("/v1/chat/completions")
async def chat(body: ChatRequest, request: Request):
    engine: Engine = request.app.state.engine
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    try:
        prompt_ids = engine.chat_prompt(messages)
    except Exception as err:  # jinja2's TemplateError and friends: the template refuses these messages
        raise APIError(400, f"messages: the model's chat template refuses them ({err})", param="messages") from None
    sampling, adapter = _prepare(engine, body, prompt_ids, "messages")
    stream = Stream(engine, prompt_ids, sampling, adapter)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": body.model}
    if not body.stream:
        text = "".join([v async for k, v in stream.events(request) if k == "delta"])
        return {**head, "object": "chat.completion", "choices": [{
            "index": 0, "message": {"role": "assistant", "content": text},
            "finish_reason": stream.req.finish_reason, "logprobs": None}], "usage": usage(stream.req)}
    include_usage = bool((body.stream_options or {}).get("include_usage"))
    return sse_response(_chat_chunks(stream, {**head, "object": "chat.completion.chunk"}, include_usage), stream)


async def _chat_chunks(stream: Stream, chunk: dict[str, Any], include_usage: bool) -> AsyncIterator[str]:
    """A chat completion's chunks: the role, each piece of text, the finish reason, the usage if asked."""
    yield sse({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                     "finish_reason": None}]})
    try:
        async for kind, value in stream.events():
            if kind == "delta":
                yield sse({**chunk, "choices": [{"index": 0, "delta": {"content": value}, "finish_reason": None}]})
        yield sse({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": stream.req.finish_reason}]})
        if include_usage:
            yield sse({**chunk, "choices": [], "usage": usage(stream.req)})
    except APIError as err:
        yield sse(error_body(err.message, err.type, None, None))
    yield sse("[DONE]")


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    engine: Engine = request.app.state.engine
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
        raise APIError(400, "prompt: give one prompt (a string) per request", param="prompt")
    prompt_ids = engine.encode(prompts[0])
    if not prompt_ids:
        raise APIError(400, "prompt is empty", param="prompt")
    sampling, adapter = _prepare(engine, body, prompt_ids, "prompt")
    stream = Stream(engine, prompt_ids, sampling, adapter)
    head = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": body.model,
            "object": "text_completion"}
    if not body.stream:
        text = "".join([v async for k, v in stream.events(request) if k == "delta"])
        return {**head, "choices": [{"index": 0, "text": text, "finish_reason": stream.req.finish_reason,
                                     "logprobs": None}], "usage": usage(stream.req)}
    include_usage = bool((body.stream_options or {}).get("include_usage"))
    return sse_response(_completion_chunks(stream, head, include_usage), stream)


async def _completion_chunks(stream: Stream, head: dict[str, Any], include_usage: bool) -> AsyncIterator[str]:
    """A text completion's chunks: each piece of text, the finish reason, the usage if asked."""
    try:
        async for kind, value in stream.events():
            if kind == "delta":
                yield sse({**head, "choices": [{"index": 0, "text": value, "finish_reason": None, "logprobs": None}]})
        yield sse({**head, "choices": [{"index": 0, "text": "", "logprobs": None,
                                        "finish_reason": stream.req.finish_reason}]})
        if include_usage:
            yield sse({**head, "choices": [], "usage": usage(stream.req)})
    except APIError as err:
        yield sse(error_body(err.message, err.type, None, None))
    yield sse("[DONE]")


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request):
    engine: Engine = request.app.state.engine
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
