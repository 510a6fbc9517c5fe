"""Text generation and perplexity with a (4-bit) causal LM.

:func:`generate` decodes Llama-family models on the CPU with :mod:`fourbit.models.decode` (a static KV cache and
one compiled call per token; greedy tokens are the model's own, sampling follows transformers' logits processors
and ``torch.multinomial`` on the same seed) and every other model with transformers' ``generate``.
:func:`generate_ids` is the token-level loop both paths share, for callers with their own prompts (the server).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable

import torch

from fourbit._errors import FieldError
from fourbit.models.chat import render_chat, stop_token_ids

__all__ = ["DECODERS", "build_prompt", "generate", "generate_ids", "perplexity", "reference_text"]

#: ``decoder=`` values: "auto" (the fast decoder where the model is supported, else transformers), "fast"
#: (refuse an unsupported model), "hf" (transformers' ``generate``).
DECODERS = ("auto", "fast", "hf")


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


def _hf_kwargs(stops: list[int], pad: int | None, do_sample: bool, temperature: float, top_p: float) -> dict:
    """The sampling settings given to transformers, the same on both paths."""
    kwargs = dict(do_sample=do_sample, pad_token_id=pad, eos_token_id=stops)
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs


def _logits_processors(model, kwargs: dict, prompt_len: int):
    """transformers' logits processors (and warpers) for these settings, as its ``generate`` builds them; None
    when this transformers has no such internals (the caller then uses ``generate`` itself)."""
    try:
        config, _ = model._prepare_generation_config(None, **kwargs)
        return model._get_logits_processor(generation_config=config, input_ids_seq_length=prompt_len,
                                           encoder_input_ids=None, prefix_allowed_tokens_fn=None,
                                           logits_processor=None, device="cpu", model_kwargs={})
    except (AttributeError, TypeError):
        return None


def _fast_reason(model, total_len: int, decoder: str) -> str | None:
    """Why the fast decoder will not run (None when it will)."""
    if decoder == "hf":
        return "decoder='hf'"
    from fourbit.models.decode import unsupported_reason

    return unsupported_reason(model, total_len)


def _pick(next_logits: torch.Tensor, ids: list[int], processors, do_sample: bool) -> int:
    """transformers' token choice from float32 logits [vocab]: processors, then multinomial or argmax."""
    scores = next_logits.unsqueeze(0)
    if processors:
        scores = processors(torch.tensor([ids]), scores)
    if do_sample:
        return int(torch.multinomial(torch.nn.functional.softmax(scores, dim=-1), num_samples=1)[0, 0])
    return int(torch.argmax(scores, dim=-1)[0])


def _fast_loop(dec, input_ids: list[int], max_new_tokens: int, stops: list[int], processors, do_sample: bool,
               on_token: Callable[[int], None] | None) -> list[int]:
    """Prefill, then one decoder step per token until a stop token or ``max_new_tokens``."""
    ids = list(input_ids)
    token = _pick(dec.prefill(ids), ids, processors, do_sample)
    new = [token]
    screened = not processors and not do_sample  # greedy without processors: the decoder's own argmax
    while True:
        if on_token is not None:
            on_token(token)
        if token in stops or len(new) >= max_new_tokens:
            return new
        ids.append(token)
        if screened:
            token = dec.step(token)[0]
        else:
            token = _pick(dec.step(token, logits=True)[1], ids, processors, do_sample)
        new.append(token)


@torch.inference_mode()
def generate_ids(model, input_ids: list[int], *, max_new_tokens: int, stops: list[int], pad: int | None = None,
                 do_sample: bool = False, temperature: float = 0.7, top_p: float = 0.9, decoder: str = "auto",
                 on_token: Callable[[int], None] | None = None) -> list[int]:
    """The new token ids after ``input_ids`` (batch 1): up to ``max_new_tokens``, ending with the first token of
    ``stops`` if one comes (it is included, as transformers does).

    Llama-family models on the CPU run :class:`fourbit.models.decode.Decoder` (``decoder`` "auto" or "fast");
    others, and ``decoder="hf"``, run ``model.generate``. Both apply the model's generation config and the
    same logits processors; greedy tokens agree to float32 rounding of the logits.

    Args:
        on_token: called with each new id as soon as it is chosen (streaming).

    Raises:
        FieldError: ``decoder`` not in :data:`DECODERS`; no ``stops`` (transformers needs an end token).
        NotImplementedError: ``decoder="fast"`` for a model the fast decoder does not run (the reason named).
    """
    if decoder not in DECODERS:
        raise FieldError("decoder", f"must be one of {', '.join(DECODERS)}, got {decoder!r}")
    if not stops:
        raise FieldError("stops", "must name at least one token id that ends generation")
    kwargs = _hf_kwargs(stops, pad, do_sample, temperature, top_p)
    reason = _fast_reason(model, len(input_ids) + max_new_tokens, decoder)
    processors = None if reason else _logits_processors(model, dict(kwargs, max_new_tokens=max_new_tokens),
                                                        len(input_ids))
    if reason is None and processors is None:
        reason = "this transformers version has no _get_logits_processor"
    if reason is None:
        from fourbit.models.decode import Decoder, decoder_for

        dec = decoder_for(model, len(input_ids) + max_new_tokens)
        if not dec.lock.acquire(blocking=False):  # in use by another thread: a private one for this call
            dec = Decoder(model, len(input_ids) + max_new_tokens)
            dec.lock.acquire()
        try:
            return _fast_loop(dec, input_ids, max_new_tokens, stops, processors, do_sample, on_token)
        finally:
            dec.lock.release()
    if decoder == "fast":
        raise NotImplementedError(f"the fast decoder cannot run this model: {reason}")
    return _hf_generate(model, input_ids, max_new_tokens, kwargs, on_token)


def _hf_generate(model, input_ids: list[int], max_new_tokens: int, kwargs: dict,
                 on_token: Callable[[int], None] | None) -> list[int]:
    """transformers' ``generate`` for one sequence, its new ids passed to ``on_token`` as they come."""
    device = next(model.parameters()).device
    x = torch.tensor([input_ids], device=device)
    streamer = None
    if on_token is not None:
        from transformers.generation.streamers import BaseStreamer

        class _Ids(BaseStreamer):
            def __init__(self) -> None:
                self.prompt_seen = False

            def put(self, value: torch.Tensor) -> None:
                if self.prompt_seen:
                    for t in value.reshape(-1).tolist():
                        on_token(t)
                self.prompt_seen = True

            def end(self) -> None:
                pass

        streamer = _Ids()
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                         streamer=streamer, **kwargs)
    return out[0, len(input_ids):].tolist()


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
    decoder: str = "auto",
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
        decoder: "auto" (the fast decoder for Llama-family models on the CPU, else transformers' ``generate``),
            "fast" or "hf" (see :func:`generate_ids`).

    Returns:
        The generated text (without the prompt); with ``return_num_tokens``, (text, tokens).

    Raises:
        FieldError: ``max_new_tokens`` is not positive, or an unknown ``decoder``.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise FieldError("max_new_tokens", f"must be a positive integer, got {max_new_tokens!r}")
    text = render_chat(tokenizer, prompt, system)
    input_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    on_token = None
    if stream:
        sink = stream if callable(stream) else (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
        streamer = _streamer(tokenizer, sink)
        streamer.put(torch.tensor(input_ids))
        on_token = lambda t: streamer.put(torch.tensor([t]))  # noqa: E731
    stops = stop_token_ids(tokenizer, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else None)
    new_ids = generate_ids(model, input_ids, max_new_tokens=max_new_tokens, stops=stops, pad=pad,
                           do_sample=do_sample, temperature=temperature, top_p=top_p, decoder=decoder,
                           on_token=on_token)
    if stream:
        streamer.end()
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
