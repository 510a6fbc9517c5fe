"""The OpenAI-compatible routes: ``GET /v1/models``, ``POST /v1/chat/completions``, ``/v1/completions`` and
``/v1/embeddings``. The official ``openai`` client uses them unchanged; ``stream: true`` answers with
server-sent events in OpenAI's chunk format. The request options (``n``, ``logprobs``, ``response_format``,
...) are read by :mod:`.options`, tools by :mod:`.tools`."""

import base64
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from fourbit._errors import FieldError
from fourbit.serve.bodies import ChatRequest, CompletionRequest, EmbeddingRequest
from fourbit.serve.engine import Engine
from fourbit.serve.errors import APIError, error_body
from fourbit.serve.options import (
    chat_logprobs,
    completion_logprobs,
    include_usage,
    reject_unsupported,
    response_grammar,
    samplings,
)
from fourbit.serve.streaming import Stream, sse, sse_response, usage
from fourbit.serve.tools import ToolPlan, chat_messages, parse_tool_calls, plan_tools

__all__ = ["router"]

router = APIRouter()


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    engine: Engine = request.app.state.engine
    created = int(time.time())
    data = [{"id": name, "object": "model", "created": created, "owned_by": "fourbit",
             "parent": None if name == engine.model_name else engine.model_name}
            for name in engine.models]
    return {"object": "list", "data": data}


async def _collect(stream: Stream, request: Request) -> list[tuple[str, list[dict[str, Any]]]]:
    """Each choice's whole text and its logprob entries (a client that leaves cancels the generation)."""
    texts: list[list[str]] = [[] for _ in stream.reqs]
    entries: list[list[dict[str, Any]]] = [[] for _ in stream.reqs]
    async for i, kind, value in stream.events(request):
        if kind == "delta":
            texts[i].append(value)
        elif kind == "logprob":
            entries[i].append(value)
    return [("".join(t), e) for t, e in zip(texts, entries, strict=True)]


def _chat_prompt(engine: Engine, messages: list[dict[str, Any]], plan: ToolPlan | None) -> list[int]:
    """The prompt's token ids; a template that refuses the messages, or shows no tools, is a 400."""
    try:
        ids = engine.chat_prompt(messages, tools=plan.tools if plan else None)
        if plan is not None and ids == engine.chat_prompt(messages):
            raise APIError(400, "tools: the model's chat template does not show tools to the model, so it cannot "
                                "call them", param="tools")
    except (APIError, FieldError):
        raise
    except Exception as err:  # jinja2's TemplateError and friends: the template refuses these messages
        raise APIError(400, f"messages: the model's chat template refuses them ({err})", param="messages") from None
    return ids


@router.post("/v1/chat/completions")
async def chat(body: ChatRequest, request: Request):
    engine: Engine = request.app.state.engine
    reject_unsupported(body)
    usage_too = include_usage(body)
    adapter = engine.adapter_index(body.model)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs: needs logprobs set to true", param="top_logprobs")
    plan = plan_tools(engine, body)
    prompt_ids = _chat_prompt(engine, chat_messages(body), plan)
    grammar = plan.grammar if plan is not None and plan.grammar else response_grammar(engine, body.response_format)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    stream = Stream(engine, prompt_ids, samplings(engine, body, prompt_ids, "messages", logprobs=logprobs,
                                                  grammar=grammar), adapter)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": body.model}
    reply = _ChatReply(engine, body, plan)
    if not body.stream:
        results = await _collect(stream, request)
        choices = [reply.choice(i, text, entries, req.finish_reason)
                   for i, ((text, entries), req) in enumerate(zip(results, stream.reqs, strict=True))]
        return {**head, "object": "chat.completion", "choices": choices, "usage": usage(stream.reqs)}
    return sse_response(reply.chunks(stream, {**head, "object": "chat.completion.chunk"}, usage_too), stream)


class _ChatReply:
    """A chat completion's choices, whole or as chunks: text, or tool calls parsed from it; logprobs if asked."""

    def __init__(self, engine: Engine, body: ChatRequest, plan: ToolPlan | None) -> None:
        self.tokenizer, self.plan, self.logprobs = engine.tokenizer, plan, body.logprobs
        self.parallel = body.parallel_tool_calls

    def message(self, text: str) -> tuple[dict[str, Any], bool]:
        """The assistant message for ``text``, and whether it calls tools."""
        if self.plan is not None:
            content, calls = parse_tool_calls(text, self.plan.names)
            if calls:
                return {"role": "assistant", "content": content,
                        "tool_calls": calls if self.parallel else calls[:1]}, True
        return {"role": "assistant", "content": text}, False

    def logprobs_of(self, entries: list[dict[str, Any]]) -> dict[str, Any] | None:
        return chat_logprobs(self.tokenizer, entries) if self.logprobs else None

    def choice(self, i: int, text: str, entries: list[dict[str, Any]], finish: str | None) -> dict[str, Any]:
        message, called = self.message(text)
        return {"index": i, "message": message, "finish_reason": "tool_calls" if called else finish,
                "logprobs": self.logprobs_of(entries)}

    def last_delta(self, held: list[str]) -> tuple[dict[str, Any], bool]:
        """The held text of a reply that may call tools, as one delta: its content and/or its tool calls."""
        message, called = self.message("".join(held))
        delta = {"content": message["content"]} if message["content"] else {}
        if called:
            delta["tool_calls"] = [{"index": k, **c} for k, c in enumerate(message["tool_calls"])]
        return delta, called

    async def chunks(self, stream: Stream, chunk: dict[str, Any], usage_too: bool) -> AsyncIterator[str]:
        """The role, each piece of text (held to the end where tools may be called: a call is known only
        then), each choice's finish reason, the usage if asked."""
        n = len(stream.reqs)
        held: list[list[str]] = [[] for _ in range(n)]
        entries: list[list[dict[str, Any]]] = [[] for _ in range(n)]

        def out(i: int, delta: dict[str, Any], finish: str | None = None) -> str:
            lp, entries[i] = (self.logprobs_of(entries[i]) if entries[i] else None), []
            return sse({**chunk, "choices": [{"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}]})

        for i in range(n):
            yield out(i, {"role": "assistant", "content": ""})
        try:
            async for i, kind, value in stream.events():
                if kind == "logprob":
                    entries[i].append(value)
                elif kind == "delta" and self.plan is not None:
                    held[i].append(value)
                elif kind == "delta":
                    yield out(i, {"content": value})
                elif kind == "done":
                    delta, called = self.last_delta(held[i]) if self.plan is not None else ({}, False)
                    if delta:
                        yield out(i, delta)
                    yield out(i, {}, "tool_calls" if called else stream.reqs[i].finish_reason)
            if usage_too:
                yield sse({**chunk, "choices": [], "usage": usage(stream.reqs)})
        except APIError as err:
            yield sse(error_body(err.message, err.type, None, None))
        yield sse("[DONE]")


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    engine: Engine = request.app.state.engine
    reject_unsupported(body)
    usage_too = include_usage(body)
    adapter = engine.adapter_index(body.model)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
        raise APIError(400, "prompt: give one prompt (a string) per request", param="prompt")
    prompt_ids = engine.encode(prompts[0])
    if not prompt_ids:
        raise APIError(400, "prompt is empty", param="prompt")
    stream = Stream(engine, prompt_ids, samplings(engine, body, prompt_ids, "prompt", logprobs=body.logprobs),
                    adapter)
    head = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": body.model,
            "object": "text_completion"}

    def logprobs(entries: list[dict[str, Any]]) -> dict[str, Any] | None:
        return None if body.logprobs is None else completion_logprobs(engine.tokenizer, entries)

    if not body.stream:
        results = await _collect(stream, request)
        choices = [{"index": i, "text": text, "finish_reason": req.finish_reason, "logprobs": logprobs(entries)}
                   for i, ((text, entries), req) in enumerate(zip(results, stream.reqs, strict=True))]
        return {**head, "choices": choices, "usage": usage(stream.reqs)}
    return sse_response(_completion_chunks(stream, head, usage_too, logprobs), stream)


async def _completion_chunks(stream: Stream, head: dict[str, Any], usage_too: bool,
                             logprobs: Any) -> AsyncIterator[str]:
    """A text completion's chunks: each piece of text (with its tokens' logprobs when asked), each choice's
    finish reason, the usage if asked."""
    entries: list[list[dict[str, Any]]] = [[] for _ in stream.reqs]

    def out(i: int, text: str, finish: str | None = None) -> str:
        lp, entries[i] = (logprobs(entries[i]) if entries[i] else None), []
        return sse({**head, "choices": [{"index": i, "text": text, "finish_reason": finish, "logprobs": lp}]})

    try:
        async for i, kind, value in stream.events():
            if kind == "logprob":
                entries[i].append(value)
            elif kind == "delta":
                yield out(i, value)
            elif kind == "done":
                yield out(i, "", stream.reqs[i].finish_reason)
        if usage_too:
            yield sse({**head, "choices": [], "usage": usage(stream.reqs)})
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
