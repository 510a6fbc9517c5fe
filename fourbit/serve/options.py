"""OpenAI's request options, read into the engine's settings: ``stop``, ``n``, ``seed``, ``logprobs`` /
``top_logprobs``, ``stream_options``, ``response_format``; and the refusal, by name, of what fourbit does not
support: a request field fourbit would otherwise ignore is a 400 naming it, never a silent ignore.
"""

from __future__ import annotations

from typing import Any

from fourbit.serve.constrain import Constraint, json_grammar
from fourbit.serve.engine import Engine, Sampling
from fourbit.serve.errors import APIError

__all__ = ["chat_logprobs", "completion_logprobs", "include_usage", "reject_unsupported", "response_grammar",
           "samplings"]

# OpenAI fields fourbit does not implement, with the values that ask for nothing (what clients send by
# default): those are accepted; any other value is refused by name.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logit_bias": ({},), "echo": (False,),
    "best_of": (1,), "suffix": ("",), "modalities": (["text"],), "store": (False,), "reasoning_effort": (),
    "service_tier": ("auto", "default"), "audio": (), "prediction": (), "functions": (), "function_call": (),
    "web_search_options": (), "verbosity": (),
}
_METADATA = ("user", "metadata", "prompt_cache_key", "safety_identifier")  # labels for the caller's records


def reject_unsupported(body: Any) -> None:
    """Raise APIError 400 naming the first field of ``body`` that fourbit would have to ignore."""
    for name, value in (body.model_extra or {}).items():
        if value is None or name in _METADATA or value in _NEUTRAL.get(name, ()):
            continue
        known = "an OpenAI option fourbit does not support" if name in _NEUTRAL else "not a field fourbit knows"
        raise APIError(400, f"{name}: {known}; remove it", param=name, code="unsupported_parameter")


def include_usage(body: Any) -> bool:
    """``stream_options.include_usage``; stream_options without ``stream`` or with other keys is a 400."""
    if body.stream_options is None:
        return False
    if not body.stream:
        raise APIError(400, "stream_options: only allowed when stream is true", param="stream_options")
    unknown = sorted(set(body.stream_options) - {"include_usage"})
    if unknown:
        raise APIError(400, f"stream_options.{unknown[0]}: not supported (only include_usage)",
                       param=f"stream_options.{unknown[0]}")
    return bool(body.stream_options.get("include_usage"))


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    if len(stops) > 4 or any(not s for s in stops):
        raise APIError(400, "stop: give up to 4 non-empty strings", param="stop")
    return stops


def samplings(engine: Engine, body: Any, prompt_ids: list[int], field_name: str, *, logprobs: int | None = None,
              grammar: str | None = None) -> list[Sampling]:
    """One :class:`Sampling` per choice (``n``): the same settings, each its own grammar state and, with a
    ``seed``, seeds ``seed, seed + 1, ...`` so that the choices differ and each is repeatable."""
    if body.n > engine.max_batch:
        raise APIError(400, f"n: at most {engine.max_batch} choices per request (the server's --max-batch), "
                            f"got {body.n}", param="n")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    base = engine.sampling(len(prompt_ids), max_tokens=max_tokens, field_name=field_name,
                           temperature=body.temperature, top_p=body.top_p, stop=_stops(body.stop), seed=body.seed,
                           logprobs=logprobs)
    out = []
    for i in range(body.n):
        seed = None if body.seed is None else body.seed + i
        constraint = None if grammar is None else Constraint(engine.grammar_tokens, grammar)
        out.append(Sampling(base.max_tokens, base.temperature, base.top_p, base.stop, seed, logprobs, constraint))
    return out


def response_grammar(engine: Engine, response_format: Any) -> str | None:
    """The grammar ``response_format`` asks for: None for text, any JSON object for ``json_object``, the
    schema's documents for ``json_schema``.

    Raises:
        APIError: 400 naming the field for a missing or invalid schema.
    """
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return json_grammar(engine.grammar_tokens, {"type": "object"}, "response_format")
    spec = response_format.json_schema
    if spec is None:
        raise APIError(400, "response_format.json_schema: missing (give {name, schema})",
                       param="response_format.json_schema")
    schema = spec.schema_ if spec.schema_ is not None else {}
    return json_grammar(engine.grammar_tokens, schema, "response_format.json_schema.schema")


def _token_text(tokenizer: Any, token: int) -> str:
    return tokenizer.decode([token], skip_special_tokens=False)


def chat_logprobs(tokenizer: Any, entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Chat completions' ``logprobs``: ``{"content": [{token, logprob, bytes, top_logprobs}], "refusal": None}``."""

    def item(token: int, logprob: float) -> dict[str, Any]:
        text = _token_text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**item(e["token"], e["logprob"]), "top_logprobs": [item(t, lp) for t, lp in e["top"]]}
                        for e in entries], "refusal": None}


def completion_logprobs(tokenizer: Any, entries: list[dict[str, Any]], offset: int = 0) -> dict[str, Any]:
    """Completions' (legacy) ``logprobs``: parallel lists of tokens, their logprobs, the top alternatives as
    ``{token: logprob}``, and each token's character offset in the text (from ``offset``)."""
    tokens = [_token_text(tokenizer, e["token"]) for e in entries]
    offsets, at = [], offset
    for text in tokens:
        offsets.append(at)
        at += len(text)
    return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{_token_text(tokenizer, t): lp for t, lp in e["top"]} for e in entries],
            "text_offset": offsets}
