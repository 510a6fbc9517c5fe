"""Constrained decoding for ``response_format`` and forced tool calls: a JSON Schema compiled to a grammar by
llguidance (the Rust library behind guidance, also used by llama.cpp and vLLM), which says at each step which
tokens may come next; the engine samples only among them, so the reply is valid by construction, never
retried.

A schema is first checked against its JSON Schema meta-schema (``jsonschema``), so a malformed one is a 400
naming the field; a valid schema that llguidance cannot compile (a feature it lacks) is a 400 saying so.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import torch

from fourbit.serve.errors import APIError

__all__ = ["Constraint", "GrammarTokenizer", "check_json_schema", "json_grammar"]


# json.dumps's separators and no other whitespace: with whitespace free, a small model can fill the whole
# reply with tabs and newlines that the grammar allows between any two tokens (seen with the tiny test model).
_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _require(module: str, field: str) -> None:
    """APIError 501 naming ``field`` when ``module`` (of the serve extra) is not installed on the server."""
    from importlib.util import find_spec

    if find_spec(module) is None:
        raise APIError(501, f"{field}: the server lacks {module}, which it needs for this; its operator can "
                            "pip install 'fourbit[serve]'", param=field, type_="server_error")


def check_json_schema(schema: Any, field: str) -> None:
    """Raise APIError 400 naming ``field`` unless ``schema`` is a JSON Schema (checked against its meta-schema)."""
    _require("jsonschema", field)
    from jsonschema.exceptions import SchemaError
    from jsonschema.validators import validator_for

    if not isinstance(schema, dict):
        raise APIError(400, f"{field}: a JSON Schema must be a JSON object, got {type(schema).__name__}",
                       param=field)
    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as err:
        where = "".join(f"[{p!r}]" if isinstance(p, str) else f"[{p}]" for p in err.absolute_path)
        raise APIError(400, f"{field}: not a valid JSON Schema: {err.message}" + (f" (at {where})" if where else ""),
                       param=field) from None


class GrammarTokenizer:
    """llguidance's view of a model's tokenizer (built once, on first use: it walks the whole vocabulary).

    Args:
        tokenizer: a transformers fast tokenizer.
        vocab_size: the number of logits the model gives (may exceed the tokenizer's vocabulary).
        stop_ids: the tokens that end a reply; a grammar allows them once it is complete.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: list[int]) -> None:
        self.tokenizer, self.vocab_size, self.stop_ids = tokenizer, vocab_size, stop_ids
        self._built: Any = None
        self._lock = threading.Lock()

    def get(self, field: str) -> Any:
        """The llguidance tokenizer; APIError 400 naming ``field`` when this tokenizer cannot be used."""
        with self._lock:
            if self._built is None:
                _require("llguidance", field)
                import llguidance.hf
                from transformers import PreTrainedTokenizerFast

                if not isinstance(self.tokenizer, PreTrainedTokenizerFast):
                    raise APIError(400, f"{field}: constrained decoding needs a fast (Rust) tokenizer; this model "
                                        f"has a {type(self.tokenizer).__name__}", param=field)
                self._built = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab_size,
                                                           eos_token=self.stop_ids or None)
            return self._built


def json_grammar(tokens: GrammarTokenizer, schema: dict[str, Any], field: str) -> str:
    """The llguidance grammar of JSON documents valid under ``schema`` (checked first), laid out as
    ``json.dumps`` lays them out.

    Raises:
        APIError: 400 naming ``field`` for an invalid schema or one llguidance cannot compile.
    """
    import llguidance

    check_json_schema(schema, field)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=_LAYOUT)
    error = llguidance.LLMatcher.validate_grammar(grammar, tokens.get(field))
    if error:
        raise APIError(400, f"{field}: fourbit cannot decode to this schema ({error.strip()})", param=field)
    return grammar


class Constraint:
    """One reply's grammar state: which tokens may come next (:meth:`mask`) and what came (:meth:`consume`)."""

    def __init__(self, tokens: GrammarTokenizer, grammar: str) -> None:
        import llguidance

        self.stop_ids = tokens.stop_ids
        self.matcher = llguidance.LLMatcher(tokens.get("response_format"), grammar)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits [vocab]`` with every token the grammar forbids at -inf (once the document is complete,
        only the stop tokens remain)."""
        allowed = torch.frombuffer(bytearray(self.matcher.compute_logit_bias()), dtype=torch.uint8) > 0
        if not bool(allowed.any()):  # the matcher failed (it cannot here, short of a bug): end the reply
            allowed[self.stop_ids] = True
        n = min(allowed.numel(), logits.numel())
        out = torch.full_like(logits, float("-inf"))
        out[:n] = torch.where(allowed[:n], logits[:n], out[:n])
        return out

    def consume(self, token: int) -> None:
        self.matcher.consume_token(token)
