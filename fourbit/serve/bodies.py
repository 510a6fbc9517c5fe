"""The request bodies the API accepts (pydantic models, OpenAI's field names) and how a body that fails
validation becomes a 400 naming the field (``messages[0].role``), as OpenAI's ``param`` does."""

# No ``from __future__ import annotations``: pydantic and FastAPI read these annotations at run time.

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from fourbit.rag.retrieval import RETRIEVERS
from fourbit.serve.errors import APIError

__all__ = ["AnswerRequest", "ChatRequest", "CompletionRequest", "EmbeddingRequest", "validation_error"]


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


def validation_error(errors: list[dict[str, Any]]) -> APIError:
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
