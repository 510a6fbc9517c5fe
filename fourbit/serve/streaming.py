"""From the engine's worker thread to an HTTP response: a request's events in an asyncio queue, and
server-sent events in OpenAI's format (``data: {...}`` lines ending with ``data: [DONE]``)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fourbit.serve.engine import Engine, GenRequest, Sampling
from fourbit.serve.errors import APIError

__all__ = ["POLL_S", "Stream", "sse", "sse_response", "usage"]

POLL_S = 0.25  # how often a waiting non-streamed request checks that its client is still there


class Stream:
    """Bridge from the engine's worker thread to the event loop: the events of one request's choices (one
    generation per :class:`Sampling`, ``n`` of them for OpenAI's ``n``) in one asyncio queue.

    Raises:
        QueueFull: the engine's queue has no room for every choice (those already queued are cancelled).
    """

    def __init__(self, engine: Engine, prompt_ids: list[int], samplings: list[Sampling], adapter: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.reqs: list[GenRequest] = []
        try:
            for i, sampling in enumerate(samplings):
                self.reqs.append(engine.submit(GenRequest(prompt_ids, adapter, sampling, self._sink_for(i))))
        except BaseException:
            self.cancel()
            raise

    def _sink_for(self, index: int) -> Any:
        def sink(kind: str, value: Any) -> None:
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, kind, value))
            except RuntimeError:  # the loop is gone (server shutting down)
                self.cancel()

        return sink

    @property
    def finished(self) -> bool:
        return all(req.finish_reason is not None for req in self.reqs)

    def cancel(self) -> None:
        """Cancel every choice that has not finished."""
        for req in self.reqs:
            if req.finish_reason is None:
                req.cancel()

    async def events(self, request: Any | None = None) -> AsyncIterator[tuple[int, str, Any]]:
        """(choice, "delta", text), (choice, "logprob", entry) ... and one (choice, "done", reason) per choice;
        raises APIError on a failed generation. When ``request`` is given, a client that disconnected cancels
        the generation."""
        checked, open_ = time.monotonic(), len(self.reqs)
        try:
            while open_:
                try:
                    index, kind, value = await asyncio.wait_for(self.queue.get(), POLL_S if request else None)
                except asyncio.TimeoutError:
                    kind = None
                if request is not None and time.monotonic() - checked >= POLL_S:
                    # Checked on a clock, not only when no token came for a while: tokens may keep coming.
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        self.cancel()
                        return
                if kind is None:
                    continue
                if kind == "error":
                    raise APIError(500, value, type_="server_error")
                yield index, kind, value
                open_ -= kind == "done"
        finally:
            self.cancel()


def usage(reqs: list[GenRequest]) -> dict[str, int]:
    """OpenAI's usage: the prompt counted once, the completions of every choice summed."""
    prompt, completion = reqs[0].prompt_tokens, sum(req.completion_tokens for req in reqs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(data: Any) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def sse_response(gen: AsyncIterator[str], stream: Stream):
    from starlette.background import BackgroundTask
    from starlette.responses import StreamingResponse

    # runs after the response, also when the client left before it began
    return StreamingResponse(gen, media_type="text/event-stream", background=BackgroundTask(stream.cancel),
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
