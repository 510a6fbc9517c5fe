"""ASGI middleware in front of every route: the API key check and the request body limits.

Both are answered before any handler runs (a 401 or 413 with OpenAI's error body), so a handler never reads
an unauthenticated or oversized body. A body without Content-Length is counted while it is read.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from fourbit.serve.errors import error_body

__all__ = ["PUBLIC_PATHS", "Guard"]

PUBLIC_PATHS = ("/health", "/", "/static/")  # never need the key


class Guard:
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
        public = path == "/" or any(path.startswith(p) for p in PUBLIC_PATHS if p != "/")
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
