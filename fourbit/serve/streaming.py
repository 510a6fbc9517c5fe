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
                    kind, value = await asyncio.wait_for(self.queue.get(), POLL_S if request else None)
                except asyncio.TimeoutError:
                    kind = value = None
                if request is not None and time.monotonic() - checked >= POLL_S:
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


def usage(req: GenRequest) -> dict[str, int]:
    return {"prompt_tokens": req.prompt_tokens, "completion_tokens": req.completion_tokens,
            "total_tokens": req.prompt_tokens + req.completion_tokens}


def sse(data: Any) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def sse_response(gen: AsyncIterator[str], stream: Stream):
    from starlette.background import BackgroundTask
    from starlette.responses import StreamingResponse

    def cancel_unfinished() -> None:  # runs after the response, also when the client left before it began
        if stream.req.finish_reason is None:
            stream.req.cancel()

    return StreamingResponse(gen, media_type="text/event-stream", background=BackgroundTask(cancel_unfinished),
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
