"""The LLM behind answering and metadata generation, as a small protocol.

Anything with ``generate(prompts, max_new_tokens) -> list[str]`` and ``stream(prompt, max_new_tokens)
-> Iterator[str]`` will do: :class:`HFChatLLM` wraps a transformers causal LM (the 4-bit model from
``fourbit.models.load_model``, or a tiny random model in tests); tests of the plumbing can pass a
deterministic stand-in.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

__all__ = ["ANSWER_ADAPTER_DIR", "LLM", "HFChatLLM", "Prompt", "answer_adapter", "check_model_source", "load_llm"]

# Where a grounded-answer adapter for the bundled model ships (trained by `fourbit rag tune`); none ships yet.
ANSWER_ADAPTER_DIR = Path(__file__).resolve().parents[1] / "data" / "answer_adapter"

Prompt = str | list[dict[str, str]]  # a user message, or chat messages [{"role": ..., "content": ...}]


@runtime_checkable
class LLM(Protocol):
    """What the RAG code needs from a language model."""

    name: str

    def generate(self, prompts: list[Prompt], max_new_tokens: int = 128) -> list[str]:
        """Greedy completions of several prompts (one per prompt, without the prompt)."""
        ...

    def stream(self, prompt: Prompt, max_new_tokens: int = 256) -> Iterator[str]:
        """The completion of one prompt, piece by piece as it is generated."""
        ...


class HFChatLLM:
    """A transformers causal LM with its tokenizer: chat template, batched greedy decoding, streaming.

    Args:
        model: a ``PreTrainedModel`` (4-bit or not).
        tokenizer: its tokenizer; a chat template is used when it has one.
        name: recorded with generated metadata (cache key); default the model's name_or_path.
        system: system message prepended to string prompts.
        batch_size: prompts decoded together by :meth:`generate`.
        no_repeat_ngram_size: forbid the completion to repeat any of its own n-grams of this many tokens
            (0: off); stops small models' loops (:class:`fourbit.rag.decoding.AnswerNoRepeatNGram`).
        repeat_scope: "answer" (the default): only the completion's own n-grams are banned, so it may quote
            the prompt; "sequence": transformers' ``no_repeat_ngram_size``, which also bans every n-gram of the
            prompt (the earlier behaviour, kept to measure against).
        stop_at_paragraph: end a completion at a blank line after a complete sentence (answers); off for
            output that is a list of lines (metadata questions).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        name: str | None = None,
        system: str | None = None,
        batch_size: int = 8,
        no_repeat_ngram_size: int = 4,
        repeat_scope: str = "answer",
        stop_at_paragraph: bool = False,
    ) -> None:
        if repeat_scope not in ("answer", "sequence"):
            raise ValueError(f"`repeat_scope` must be 'answer' or 'sequence', got {repeat_scope!r}")
        self.model, self.tokenizer = model, tokenizer
        # Greedy decoding with a small model falls into loops ("They are a part of ..." again and again);
        # forbidding a repeated n-gram stops them without the drift that a repetition penalty caused.
        self.no_repeat_ngram_size = no_repeat_ngram_size
        self.repeat_scope = repeat_scope
        self.stop_at_paragraph = stop_at_paragraph
        self.name = name or str(getattr(model.config, "name_or_path", "") or type(model).__name__)
        self.system = system
        self.batch_size = batch_size
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token

    @property
    def context_window(self) -> int | None:
        """Tokens the model handles (prompt + completion), from its config; None when it does not say."""
        window = getattr(self.model.config, "max_position_embeddings", None)
        return int(window) if window else None

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` for this model (no special tokens added)."""
        return len(self.tokenizer(text, add_special_tokens=False).input_ids)

    def render(self, prompt: Prompt) -> str:
        """The prompt as text: :func:`fourbit.models.chat.render_chat`, as ``generate`` and ``serve`` render it."""
        from fourbit.models.chat import render_chat

        return render_chat(self.tokenizer, prompt, self.system)

    def _stop_ids(self) -> list[int]:
        from fourbit.models.chat import stop_token_ids

        return stop_token_ids(self.tokenizer, self.model)

    def _encode(self, texts: list[str]) -> dict[str, Any]:
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def _decoding(self, prompt_length: int, max_new_tokens: int) -> dict[str, Any]:
        """``model.generate`` arguments: greedy, the stop tokens, and the rules of :mod:`fourbit.rag.decoding`."""
        from fourbit.rag.decoding import generation_helpers

        answer_ngrams = self.no_repeat_ngram_size if self.repeat_scope == "answer" else 0
        return dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                    pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self._stop_ids(),
                    no_repeat_ngram_size=self.no_repeat_ngram_size if self.repeat_scope == "sequence" else 0,
                    **generation_helpers(self.tokenizer, prompt_length, no_repeat_ngram_size=answer_ngrams,
                                         stop_at_paragraph=self.stop_at_paragraph))

    def generate(self, prompts: list[Prompt], max_new_tokens: int = 128) -> list[str]:
        """Greedy completions, decoded in batches of similar length (left padding).

        Returns:
            One completion per prompt, in the order given, special tokens removed, stripped.
        """
        import torch

        texts = [self.render(p) for p in prompts]
        lengths = [len(self.tokenizer(t, add_special_tokens=False).input_ids) for t in texts]
        order = sorted(range(len(texts)), key=lambda i: lengths[i])
        out: list[str] = [""] * len(texts)
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        try:
            for start in range(0, len(order), self.batch_size):
                rows = order[start : start + self.batch_size]
                enc = self._encode([texts[i] for i in rows])
                with torch.inference_mode():
                    ids = self.model.generate(**enc, **self._decoding(enc["input_ids"].shape[1], max_new_tokens))
                new = ids[:, enc["input_ids"].shape[1] :]
                for row, seq in zip(rows, new, strict=True):
                    out[row] = self.tokenizer.decode(seq, skip_special_tokens=True).strip()
        finally:
            self.tokenizer.padding_side = side
        return out

    def stream(self, prompt: Prompt, max_new_tokens: int = 256) -> Iterator[str]:
        """Yield the completion of one prompt piece by piece (greedy)."""
        import torch
        from transformers import TextIteratorStreamer

        enc = self._encode([self.render(prompt)])
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = dict(**enc, streamer=streamer, **self._decoding(enc["input_ids"].shape[1], max_new_tokens))

        def run() -> None:
            with torch.inference_mode():
                self.model.generate(**kwargs)

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        yield from streamer
        worker.join()


def load_llm(
    model: str | os.PathLike | None = None,
    *,
    adapter: str | os.PathLike | None = None,
    quantize: bool = True,
    compute_dtype: str | None = None,
    answering: bool = True,
) -> HFChatLLM:
    """Load the answering model: the bundled SmolLM2 by default, in 4-bit (NF4) unless ``quantize=False``.

    Args:
        model: None (bundled SmolLM2), a folder (plain or fourbit/bnb 4-bit checkpoint) or a GGUF file.
        adapter: folder of a LoRA adapter saved by ``fourbit finetune`` (``--adapter``).
        quantize: quantize the base model's linear layers to NF4.
        compute_dtype: matmul dtype of the 4-bit layers; None: "auto" (:class:`fourbit.models.QuantConfig`:
            bf16 where the device computes it natively, else fp32; the weights stay NF4 either way).
        answering: decode answers (:mod:`fourbit.rag.decoding`: only the completion's own n-grams banned, end
            at the first paragraph); False for metadata, decoded as before those rules (n-grams of prompt and
            completion banned, no paragraph stop: lists of questions were not measured with them).

    Returns:
        An :class:`HFChatLLM`.
    """
    from fourbit.models import QuantConfig, load_model

    quant = QuantConfig(compute_dtype=compute_dtype or "auto") if quantize else None
    net, tok = load_model(model, quant=quant)
    if adapter is not None:
        from fourbit.nn.adapters import load_adapter

        net = load_adapter(net, adapter)
    net.eval()
    name = str(model) if model is not None else "SmolLM2-135M-Instruct"
    return HFChatLLM(net, tok, name=name + (f"+{Path(adapter).name}" if adapter else ""),
                     repeat_scope="answer" if answering else "sequence", stop_at_paragraph=answering)


def answer_adapter(model: str | os.PathLike | None, adapter: str | os.PathLike | None = None, *,
                   use_default: bool = True) -> Path | None:
    """The adapter to answer with: ``adapter`` when given; else, for the bundled model (``model`` None) and
    ``use_default``, the grounded-answer adapter shipped in :data:`ANSWER_ADAPTER_DIR` when there is one."""
    if adapter is not None:
        return Path(adapter)
    if model is None and use_default and (ANSWER_ADAPTER_DIR / "adapter_config.json").is_file():
        return ANSWER_ADAPTER_DIR
    return None


def check_model_source(model: str | os.PathLike | None) -> None:
    """Fail fast, before anything heavy loads, when the model to load is not there: the bundled model's package
    is missing, or a local path (``.gguf``, ``./dir``, ``~/dir``, an absolute path) does not exist. Hub ids are
    not checked (they may be in the cache).

    Raises:
        FileNotFoundError: naming the path or the package to install.
    """
    from fourbit.models import bundled_model_path

    if model is None:
        bundled_model_path()
        return
    text = str(model)
    path = Path(text).expanduser()
    looks_local = path.is_absolute() or text.startswith((".", "~")) or path.suffix == ".gguf" or text.count("/") > 1
    if looks_local and not path.exists():
        raise FileNotFoundError(errno.ENOENT, "no such file or folder", text)
