"""The request bodies the API accepts (pydantic models, OpenAI's field names) and how a body that fails
validation becomes a 400 naming the field (``messages[0].role``), as OpenAI's ``param`` does."""

# No ``from __future__ import annotations``: pydantic and FastAPI read these annotations at run time.

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from fourbit.rag.retrieval import RETRIEVERS
from fourbit.serve.errors import APIError

__all__ = ["AnswerRequest", "ChatRequest", "CompletionRequest", "EmbeddingRequest", "LoadLoRARequest", "NamedToolChoice",
           "ResponseFormat", "Tool", "UnloadLoRARequest", "validation_error"]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Generation(_Body):
    # Fields fourbit does not know are kept (not ignored) so that the route can refuse them by name:
    # fourbit.serve.options.reject_unsupported.
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(1, ge=1, le=128)


class _Part(_Body):
    type: str = "text"
    text: str = ""


class _CalledFunction(_Body):
    name: str
    arguments: str = "{}"  # JSON text, as OpenAI sends it


class _ToolCall(_Body):
    id: str
    type: Literal["function"] = "function"
    function: _CalledFunction


class _Message(_Body):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[_Part] | None = None
    name: str | None = None
    tool_calls: list[_ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content if p.type == "text")


class _Function(_Body):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: _Function


class _FunctionName(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: _FunctionName


class _JSONSchemaFormat(_Body):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: Any = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: _JSONSchemaFormat | None = None


class ChatRequest(_Generation):
    messages: list[_Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True


class CompletionRequest(_Generation):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=5)


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


class LoadLoRARequest(_Body):
    """vLLM's ``POST /v1/load_lora_adapter`` body (its other fields, e.g. ``load_inplace``, are ignored)."""

    lora_name: str = Field(min_length=1, max_length=256)
    lora_path: str = Field(min_length=1)


class UnloadLoRARequest(_Body):
    """vLLM's ``POST /v1/unload_lora_adapter`` body."""

    lora_name: str = Field(min_length=1, max_length=256)


def _loc_name(loc: tuple) -> str | None:
    """pydantic's error location -> the request field, e.g. ('body', 'messages', 0, 'content') ->
    'messages[0].content'."""
    parts = [p for p in loc if p != "body"]
    name = ""
    for p in parts:
        if isinstance(p, int):
            name += f"[{p}]"
        elif p in ("str", "list[str]", "list[_Part]", "int", "float", "function-after", "literal") or \
                p.startswith(("literal[", "NamedToolChoice", "_")):
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
