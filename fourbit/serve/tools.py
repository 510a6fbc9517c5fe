"""Tool calling (OpenAI's ``tools`` / ``tool_choice``) through the model's own chat template.

The tool definitions go to the template (``apply_chat_template(tools=...)``), which shows them to the model
the way it was trained to see them; a template that does not use them is a 400, not a silent ignore. The
reply is parsed for calls in the formats chat models write (Hermes/Qwen ``<tool_call>{...}</tool_call>``,
Mistral ``[TOOL_CALLS][...]``, Llama 3.1 ``<|python_tag|>{...}`` or a bare ``{"name", "arguments"}``
object) into OpenAI's ``tool_calls``. ``tool_choice: "required"`` or a named function forces a call by
constrained decoding (:mod:`.constrain`) of ``{"name": ..., "arguments": {...}}`` under the tool's schema.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from fourbit.serve.constrain import check_json_schema, json_grammar
from fourbit.serve.engine import Engine
from fourbit.serve.errors import APIError

__all__ = ["ToolPlan", "chat_messages", "parse_tool_calls", "plan_tools"]

_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.S)
_PREFIXES = ("[TOOL_CALLS]", "<|python_tag|>")


@dataclass
class ToolPlan:
    """What a request's tools ask for: the definitions for the template, the grammar of a forced call (None
    when the model may answer in text), and the tool names a parsed call may use."""

    tools: list[dict[str, Any]]
    grammar: str | None
    names: set[str]


def chat_messages(body: Any) -> list[dict[str, Any]]:
    """The request's messages as the chat template takes them: ``developer`` as ``system``; an assistant's
    tool calls with their arguments as objects (templates write them with ``tojson``); a tool reply with its
    ``tool_call_id``."""
    out = []
    for i, m in enumerate(body.messages):
        message: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.name is not None:
            message["name"] = m.name
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            message["tool_calls"] = [_call_for_template(c, f"messages[{i}].tool_calls[{j}].function.arguments")
                                     for j, c in enumerate(m.tool_calls)]
        out.append(message)
    return out


def _call_for_template(call: Any, field: str) -> dict[str, Any]:
    try:
        arguments = json.loads(call.function.arguments or "{}")
    except json.JSONDecodeError as err:
        raise APIError(400, f"{field}: not JSON ({err.msg})", param=field) from None
    return {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": arguments}}


def plan_tools(engine: Engine, body: Any) -> ToolPlan | None:
    """Check ``tools`` and ``tool_choice``; None when no tool is offered (or ``tool_choice`` is "none").

    Raises:
        APIError: 400 naming the field: a tool without a name, a duplicate name, parameters that are not a JSON
        Schema, a tool_choice naming no given tool, tool_choice without tools, tools with response_format.
    """
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none"):
            raise APIError(400, "tool_choice: given without tools", param="tool_choice")
        return None
    names: dict[str, int] = {}
    for i, tool in enumerate(body.tools):
        if tool.function.name in names:
            raise APIError(400, f"tools[{i}].function.name: {tool.function.name!r} is given twice",
                           param=f"tools[{i}].function.name")
        names[tool.function.name] = i
        if tool.function.parameters is not None:
            check_json_schema(tool.function.parameters, f"tools[{i}].function.parameters")
    if choice == "none":
        return None
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools]
    if choice in (None, "auto"):
        return ToolPlan(tools, None, set(names))
    if body.response_format is not None and body.response_format.type != "text":
        raise APIError(400, "response_format: cannot be combined with a tool_choice that forces a call",
                       param="response_format")
    if choice == "required":
        forced, field = list(body.tools), "tools"
    elif choice.function.name in names:
        i = names[choice.function.name]
        forced, field = [body.tools[i]], f"tools[{i}].function.parameters"
    else:
        raise APIError(400, f"tool_choice.function.name: no tool named {choice.function.name!r} is given",
                       param="tool_choice.function.name")
    calls = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
              "properties": {"name": {"const": t.function.name},
                             "arguments": t.function.parameters or {"type": "object"}}} for t in forced]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    return ToolPlan(tools, json_grammar(engine.grammar_tokens, schema, field), set(names))


def parse_tool_calls(text: str, names: set[str]) -> tuple[str | None, list[dict[str, Any]]]:
    """Split a reply into its text and its tool calls (OpenAI's ``tool_calls`` entries, arguments as JSON
    text). Only calls to a tool in ``names`` count; anything else stays text."""
    calls: list[dict[str, Any]] = []
    rest = text
    if "<tool_call>" in text:
        for block in _BLOCK.findall(text):
            calls += _calls_in(block, names)
        rest = _BLOCK.sub("", text) if calls else text
    else:
        body = text.strip()
        for prefix in _PREFIXES:
            if body.startswith(prefix):
                body = body[len(prefix):]
        calls = _calls_in(body, names)
        rest = "" if calls else text
    content = rest.strip() or None
    return (content if calls else text), calls


def _calls_in(text: str, names: set[str]) -> list[dict[str, Any]]:
    """The calls in one JSON object or list of objects ``{"name", "arguments" | "parameters"}``; [] if none."""
    try:
        value = json.loads(text.strip())
    except json.JSONDecodeError:
        return []
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or item.get("name") not in names:
            return []
        arguments = item.get("arguments", item.get("parameters", {}))
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": item["name"],
                                   "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)}})
    return calls
