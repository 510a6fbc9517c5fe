"""The document routes: ``POST /v1/answers`` (a grounded answer from the index, with its evidence and
sources; ``stream: true`` sends the sources first, then the answer piece by piece) and ``POST /v1/documents``
(upload one document into the index). The work itself is in :mod:`fourbit.serve.documents`.

The generated answer is checked against its evidence as ``rag query`` checks it
(:func:`fourbit.rag.answer.judge_answer`): one the evidence does not support is not returned as the answer;
the best evidence sentence is, with a note, and ``supported`` / ``answer_kind`` say which case it was (a
stream sends the model's pieces as they come, then the checked answer in its "done" event)."""

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, File, Request, UploadFile
from starlette.concurrency import run_in_threadpool

from fourbit.rag.answer import judge_answer
from fourbit.rag.decoding import finish_answer
from fourbit.serve.bodies import AnswerRequest
from fourbit.serve.documents import ingest_upload, prepare_answer
from fourbit.serve.engine import Engine
from fourbit.serve.errors import APIError, error_body
from fourbit.serve.streaming import Stream, sse, sse_response, usage

__all__ = ["ANSWER_MAX_TOKENS", "router"]

# An answer's default length (a request's max_tokens overrides it). The evidence sentences carry the facts; the
# 135M model's answer past a few sentences mostly repeats them, and each token costs a decoding step on a
# 2-core CPU: the answer length is what decides whether a question answers within 5 s (see
# benchmarks/RESULTS.md, "Answers through the server").
ANSWER_MAX_TOKENS = 48

router = APIRouter()


@router.post("/v1/answers")
async def answers(body: AnswerRequest, request: Request):
    engine: Engine = request.app.state.engine
    engine.require_index()
    # No model named: the grounded-answer adapter when the server loaded one (issue 24), else the base model.
    adapter = engine.adapter_index(body.model if body.model is not None else engine.answer_model)
    max_tokens = body.max_tokens if body.max_tokens is not None else ANSWER_MAX_TOKENS
    prompt_ids, evidence, sources = await run_in_threadpool(prepare_answer, engine, body.question,
                                                            body.retriever, body.top_k, max_tokens)
    sampling = engine.sampling(len(prompt_ids), max_tokens=max_tokens, field_name="question", temperature=0.0)
    stream = Stream(engine, prompt_ids, [sampling], adapter)
    found = {"evidence": evidence, "sources": sources}
    if not body.stream:
        text = "".join([v async for _, k, v in stream.events(request) if k == "delta"])
        return {**_checked(body.question, text, evidence), **found, "model": engine.model_of(adapter),
                "finish_reason": stream.reqs[0].finish_reason, "usage": usage(stream.reqs)}
    return sse_response(_answer_events(body.question, stream, found), stream)


def _checked(question: str, text: str, evidence: list[dict[str, Any]]) -> dict[str, Any]:
    """``{"answer", "answer_kind", "supported", "support", "note", "generated"}``: the generated ``text``
    ended as ``rag query`` ends it, then checked against the evidence sentences."""
    generated = finish_answer(text)
    return {**judge_answer(question, generated, [e["text"] for e in evidence]).as_dict(), "generated": generated}


async def _answer_events(question: str, stream: Stream, found: dict[str, Any]) -> AsyncIterator[str]:
    """The sources and evidence, each piece of the generated answer, then the checked answer with its usage."""
    yield sse({"type": "sources", **found})
    pieces = []
    try:
        async for _, kind, value in stream.events():
            if kind == "delta":
                pieces.append(value)
                yield sse({"type": "delta", "text": value})
        yield sse({"type": "done", **_checked(question, "".join(pieces), found["evidence"]),
                   "finish_reason": stream.reqs[0].finish_reason, "usage": usage(stream.reqs)})
    except APIError as err:
        yield sse(error_body(err.message, err.type, None, None))
    yield sse("[DONE]")


@router.post("/v1/documents")
async def documents(request: Request, file: UploadFile = File(...)):  # noqa: B008 - FastAPI's declaration style
    engine: Engine = request.app.state.engine
    max_upload: int = request.app.state.max_upload
    engine.require_index()
    data = await file.read(max_upload + 1)
    return await run_in_threadpool(ingest_upload, engine, file.filename or "", data, max_upload)
