"""The server's error: an HTTP status with OpenAI's error body, naming the request field at fault."""

from __future__ import annotations

from typing import Any

__all__ = ["APIError", "error_body"]


def error_body(message: str, type_: str, param: str | None, code: str | None) -> dict[str, Any]:
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class APIError(Exception):
    """An error answered as ``status`` with OpenAI's error body; ``param`` names the request field."""

    def __init__(self, status: int, message: str, *, param: str | None = None, type_: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")
