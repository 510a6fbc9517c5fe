"""Chat prompts and stop tokens: the one place that turns messages into a prompt and decides where a reply ends.

``fourbit generate``, ``rag query`` (:class:`fourbit.rag.llm.HFChatLLM`) and ``fourbit serve``
(:class:`fourbit.serve.engine.Engine`) all render through :func:`render_chat` and stop on
:func:`stop_token_ids`, so a model behaves the same in each: before this module each had its own renderer and
its own list of end tokens, and a Phi-style model (whose turns end with ``<|end|>``) stopped in ``serve`` but
ran on in ``rag query``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["END_OF_TURN_TOKENS", "Prompt", "chat_messages", "render_chat", "stop_token_ids"]

Prompt = str | list[dict[str, Any]]  # a user message, or chat messages [{"role": ..., "content": ...}]

# Tokens that end an assistant turn in the chat formats fourbit meets: ChatML (Qwen, SmolLM), Llama 3
# (eot_id; eom_id after a tool call), GPT-2 / Phi / Qwen base (endoftext), Phi-3 (end), Gemma (end_of_turn),
# Mistral/Llama 2 (</s> is their eos already). A token counts only when the tokenizer has it as one token.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|endoftext|>", "<|end|>", "<end_of_turn>")


def chat_messages(prompt: Prompt, system: str | None = None) -> list[dict[str, Any]]:
    """``prompt`` as chat messages: a string is one user message; ``system`` goes first unless the messages
    already start with a system message."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system is not None and (not messages or messages[0].get("role") != "system"):
        messages = [{"role": "system", "content": system}, *messages]
    return messages


def render_chat(tokenizer: Any, prompt: Prompt, system: str | None = None, *,
                tools: list[dict[str, Any]] | None = None) -> str:
    """The text a model is given for ``prompt``, ending where its reply starts.

    With a chat template, the template renders the messages (and ``tools``, the OpenAI-style function
    definitions, which the template places where the model was trained to see them) with the generation
    prompt. Without one, a plain string stays a plain text prompt (a base model continues it), and messages
    are their contents separated by blank lines, with a blank line after the last.

    Args:
        tokenizer: a transformers tokenizer.
        prompt: a user message (string) or chat messages ``{"role", "content"}``.
        system: a system message put first (unless the messages start with one).
        tools: function definitions for a template that supports tool calling.

    Returns:
        The prompt text (special tokens written out; encode it with ``add_special_tokens=False``).

    Raises:
        FieldError: ``tools`` for a tokenizer without a chat template (field ``tools``).
    """
    if not getattr(tokenizer, "chat_template", None):
        if tools:
            from fourbit._errors import FieldError

            raise FieldError("tools", "the model has no chat template, so it cannot be told about tools")
        if isinstance(prompt, str):
            return prompt if system is None else f"{system}\n\n{prompt}"
        return "".join(f"{m.get('content') or ''}\n\n" for m in chat_messages(prompt, system))
    kwargs = {"tools": tools} if tools else {}
    return tokenizer.apply_chat_template(chat_messages(prompt, system), tokenize=False, add_generation_prompt=True,
                                         **kwargs)


def stop_token_ids(tokenizer: Any, model: Any = None) -> list[int]:
    """The token ids that end a reply: the tokenizer's eos, every end-of-turn token it has
    (:data:`END_OF_TURN_TOKENS`) and, given ``model``, its generation config's eos ids (Llama 3 lists eot_id
    there).

    Returns:
        Sorted ids, no duplicates.
    """
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    unknown = tokenizer.unk_token_id
    for token in END_OF_TURN_TOKENS:
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != unknown:
            ids.add(tid)
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    if eos is not None:
        ids.update(int(i) for i in ([eos] if isinstance(eos, int) else eos))
    return sorted(ids)
