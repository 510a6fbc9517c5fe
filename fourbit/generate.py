"""Text generation and perplexity with a (4-bit) causal LM."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable

import torch

from fourbit._errors import FieldError
from fourbit.models.chat import render_chat, stop_token_ids

__all__ = ["build_prompt", "generate", "perplexity", "reference_text"]


def build_prompt(tokenizer, prompt: str | list[dict], system: str | None = None) -> str:
    """The prompt text for ``prompt``: :func:`fourbit.models.chat.render_chat` (kept under this name for callers)."""
    return render_chat(tokenizer, prompt, system)


def _streamer(tokenizer, sink: Callable[[str], None]):
    """A transformers streamer that decodes incrementally and hands each new piece of text to ``sink``
    (transformers' TextStreamer prints whole words only, and only to stdout)."""
    from transformers.generation.streamers import BaseStreamer

    class _Printer(BaseStreamer):
        def __init__(self) -> None:
            self.ids, self.printed, self.first = [], 0, True

        def put(self, value: torch.Tensor) -> None:
            if self.first:  # the prompt
                self.first = False
                return
            self.ids.extend(value.reshape(-1).tolist())
            decoded = tokenizer.decode(self.ids, skip_special_tokens=True)
            if not decoded.endswith("\ufffd"):
                sink(decoded[self.printed:])
                self.printed = len(decoded)

        def end(self) -> None:
            decoded = tokenizer.decode(self.ids, skip_special_tokens=True)
            sink(decoded[self.printed:])

    return _Printer()


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    prompt: str | list[dict],
    *,
    max_new_tokens: int = 128,
    stream: bool | Callable[[str], None] = False,
    do_sample: bool = False,
    temperature: float = 0.7,
    top_p: float = 0.9,
    system: str | None = None,
    return_num_tokens: bool = False,
) -> str | tuple[str, int]:
    """Generate a reply to ``prompt``; greedy by default. The prompt is rendered by
    :func:`fourbit.models.chat.render_chat` and the reply ends at :func:`fourbit.models.chat.stop_token_ids`,
    as in ``rag query`` and ``fourbit serve``.

    Args:
        prompt: a user message (string) or a list of chat messages ``{"role", "content"}``.
        max_new_tokens: upper bound on generated tokens.
        stream: True prints tokens to stdout as they come; a callable receives each new piece of text.
        do_sample, temperature, top_p: sampling settings (ignored when greedy).
        system: an optional system message.
        return_num_tokens: also return the number of generated tokens (an end token included: it was computed).

    Returns:
        The generated text (without the prompt); with ``return_num_tokens``, (text, tokens).

    Raises:
        FieldError: ``max_new_tokens`` is not positive.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise FieldError("max_new_tokens", f"must be a positive integer, got {max_new_tokens!r}")
    text = render_chat(tokenizer, prompt, system)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    streamer = None
    if stream:
        sink = stream if callable(stream) else (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
        streamer = _streamer(tokenizer, sink)
    stops = stop_token_ids(tokenizer, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else None)
    gen_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, streamer=streamer, pad_token_id=pad,
                      eos_token_id=stops)
    if do_sample:
        gen_kwargs.update(temperature=temperature, top_p=top_p)
    else:
        gen_kwargs.update(temperature=None, top_p=None, top_k=None)
    out = model.generate(**inputs, **gen_kwargs)
    new_ids = out[0, inputs["input_ids"].shape[1]:].tolist()
    end = next((i for i, t in enumerate(new_ids) if t in stops), len(new_ids))
    text = tokenizer.decode(new_ids[:end], skip_special_tokens=True)
    return (text, len(new_ids)) if return_num_tokens else text


def reference_text(chars: int = 40_000) -> str:
    """A fixed slice of real English prose that needs no download: Python's own documentation topics."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    text = "\n\n".join(topics[k] for k in keys)
    return text[:chars]


@torch.inference_mode()
def perplexity(model, tokenizer, text: str, *, window: int = 512, max_windows: int | None = None,
               progress: bool = False) -> float:
    """Perplexity of ``text`` under ``model``: exp(mean token negative log-likelihood) over
    non-overlapping windows of ``window`` tokens (each window scored on its own)."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise FieldError("window", f"must be an integer >= 2 (tokens per scored window), got {window!r}")
    if max_windows is not None and max_windows <= 0:
        raise FieldError("max_windows", f"must be positive, got {max_windows!r}")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    starts = list(range(0, max(len(ids) - 1, 1), window))
    if max_windows is not None:
        starts = starts[:max_windows]
    iterator = starts
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(starts, desc="perplexity", unit="window", leave=False)
    total_nll, total_tokens = 0.0, 0
    for s in iterator:
        chunk = ids[s : s + window].unsqueeze(0)
        if chunk.shape[1] < 2:
            continue
        logits = model(chunk).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], chunk[0, 1:], reduction="sum")
        total_nll += nll.item()
        total_tokens += chunk.shape[1] - 1
    return math.exp(total_nll / max(total_tokens, 1))
