"""The serving engine: one 4-bit model, its adapters, an embedder and an index, and a batching scheduler.

Requests queue (bounded: :class:`QueueFull` beyond ``max_queue`` waiting); one worker thread owns the
model and, whenever requests are waiting, takes up to ``max_batch`` of them and decodes them TOGETHER:
prompts are left-padded into one batch, prefilled in one forward pass, then decoded one token per step
for every row at once with a shared KV cache. Each row keeps its own adapter (see :mod:`.adapters`), its
own sampling settings and seed, its own stop conditions; a row that finishes (stop, length, cancelled by
a client that went away) is dropped from the batch and its KV cache rows with it. Requests that arrive
while a batch runs join it between two steps when there is room (continuous batching): they are
prefilled on their own, then their KV cache and the batch's are left-padded to a common length (the
padding is masked out) and stacked.

Two paths decode the rows of a batch, step by step together. Rows that ask for the base model run the compiled
decode step (:mod:`.fastpath`: after the batched prefill each row has a cache of its own and one compiled call
per token). Adapter rows (all rows, where the compiled step does not apply) run the model's forward with the
shared cache above, each LoRA layer adding each row's adapter as gathered for the batch (:mod:`.gathered`), so a
batch mixing many adapters costs about what a batch of one adapter costs.

Adapters are loaded and unloaded while serving (:meth:`Engine.load_adapter`, :meth:`Engine.unload_adapter`):
the change is a task the worker runs between two decode steps (the only moment no forward pass uses the
model), so a running batch pauses for one adapter read and goes on. Adapter row indices are never reused, so
a request that looked up a name just before its adapter was unloaded is refused at :meth:`Engine.submit`,
never decoded with another adapter.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from fourbit._errors import FieldError
from fourbit.models.chat import render_chat, stop_token_ids
from fourbit.serve.adapters import (
    add_adapter,
    check_adapter_folder,
    install_adapters,
    read_adapter,
    remove_adapter,
)
from fourbit.serve.batch import Batch, Row, mergeable
from fourbit.serve.constrain import GrammarTokenizer
from fourbit.serve.fastpath import FastRow, build_decoder, prefill_states, step_row
from fourbit.serve.gathered import RowGather

__all__ = ["DECODERS", "AdapterInUse", "Engine", "GenRequest", "QueueFull", "Sampling", "UnknownModel"]

#: How the engine decodes base-model batches (the ``decoder`` argument, ``fourbit serve --decoder``).
DECODERS = ("auto", "hf")

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """More requests are waiting than the engine accepts; retry after ``retry_after`` seconds."""

    def __init__(self, waiting: int, retry_after: int = 1) -> None:
        super().__init__(f"the server is busy ({waiting} requests waiting); retry later")
        self.retry_after = retry_after


class UnknownModel(LookupError):
    """The request names a model that is neither the base model nor a loaded adapter."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"model {name!r} does not exist; choose from {', '.join(known)}")


class AdapterInUse(RuntimeError):
    """An adapter cannot be unloaded: running or queued requests use it."""

    def __init__(self, name: str, users: int) -> None:
        super().__init__(f"adapter {name!r} is in use by {users} running or queued request"
                         f"{'s' if users > 1 else ''}; unload it when they have finished")


@dataclass
class Sampling:
    """Per-request decoding settings (OpenAI's names). ``temperature`` 0 is greedy.

    ``logprobs``: None for none; k >= 0 to report each token's log-probability and its k most likely
    alternatives (the model's own distribution, before temperature, top_p and any grammar), as ("logprob",
    entry) events. ``constraint``: an object with ``mask(logits) -> logits`` and ``consume(token)`` (see
    :class:`fourbit.serve.constrain.Constraint`) that restricts each step to the tokens a grammar allows.
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None
    constraint: Any = None


@dataclass
class GenRequest:
    """One generation: the prompt's token ids, the adapter row index (-1: base), and where events go.

    ``sink(kind, value)`` is called from the worker thread with ("delta", text) pieces (and, when the sampling
    asks for them, a ("logprob", entry) before each token's text; none for the token that ends the reply),
    then exactly one ("done", finish_reason) or ("error", message).
    """

    prompt_ids: list[int]
    adapter: int
    sampling: Sampling
    sink: Callable[[str, Any], None]
    completion_tokens: int = 0
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = 0.0  # time.monotonic() when queued
    last_token_at: float | None = None  # when its latest token came (time to first token, per-token latency)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    def cancel(self) -> None:
        """Stop generating for this request (its client went away); takes effect at the next step."""
        self.cancelled.set()


class Engine:
    """Owns the model, tokenizer, adapters, embedder and index; decodes queued requests in batches.

    Args:
        model: a causal LM (the 4-bit model from :func:`fourbit.models.load_model`, or a tiny one in tests).
        tokenizer: its tokenizer.
        adapters: ``{name: folder}`` of LoRA adapters served over the same base (``"model": name``).
        embedder: a :class:`fourbit.rag.embeddings.Embedder` for /v1/embeddings and document QA (optional).
        store: a :class:`fourbit.rag.store.VectorStore` built with ``embedder`` (optional).
        model_name: the name the base model is served under.
        max_batch: requests decoded together.
        max_queue: requests allowed to wait; beyond it :meth:`submit` raises :class:`QueueFull`.
        context_window: tokens the model handles (prompt + completion); default the model config's.
        default_max_tokens: completion length when a request gives none.
        upload_dir: where uploaded documents are stored (default ``<db>/uploads`` for a local index).
        index_config: a :class:`fourbit.rag.index.IndexConfig` for uploads (default sizes by default).
        decoder: "auto" decodes batches of base-model requests with the compiled decode step where the model
            allows it (:mod:`.fastpath`), "hf" always through the model's forward.
        answer_model: the served adapter that ``/v1/answers`` answers with when a request names no model (the
            grounded-answer adapter, :func:`fourbit.rag.llm.answer_adapter`); None: the base model.

    Raises:
        FieldError: a bad adapter (field ``adapters``), max_batch, max_queue or decoder; an ``answer_model``
            that is not one of ``adapters``.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        adapters: dict[str, str] | None = None,
        embedder: Any = None,
        store: Any = None,
        model_name: str = "fourbit",
        max_batch: int = 8,
        max_queue: int = 64,
        context_window: int | None = None,
        default_max_tokens: int = 256,
        upload_dir: str | None = None,
        index_config: Any = None,
        decoder: str = "auto",
        answer_model: str | None = None,
    ) -> None:
        if answer_model is not None and answer_model not in (adapters or {}):
            raise FieldError("answer_adapter", f"{answer_model!r} is not one of the served adapters")
        if max_batch < 1:
            raise FieldError("max_batch", f"must be >= 1, got {max_batch}")
        if max_queue < 1:
            raise FieldError("max_queue", f"must be >= 1, got {max_queue}")
        if decoder not in DECODERS:
            raise FieldError("decoder", f"must be one of {', '.join(DECODERS)}, got {decoder!r}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.embedder, self.store = embedder, store
        self.model_name = model_name
        self.answer_model = answer_model
        self.max_batch, self.max_queue = max_batch, max_queue
        self.default_max_tokens = default_max_tokens
        self.upload_dir = upload_dir
        if index_config is None and store is not None:
            from fourbit.rag.index import IndexConfig

            index_config = IndexConfig()
        self.index_config = index_config
        window = context_window or getattr(model.config, "max_position_embeddings", None) or 2048
        self.context_window = int(window)
        adapters = dict(adapters or {})
        for name in adapters:
            if not name or name == model_name:
                raise FieldError("adapters", f"adapter name {name!r} is empty or the base model's name")
        weights = [read_adapter(model, name, folder) for name, folder in adapters.items()]
        # name -> row index of each served adapter; indices only grow (a stale index is never another adapter)
        self._adapters = {name: i for i, name in enumerate(install_adapters(model, weights))}
        self._next_index = len(self._adapters)
        self.adapter_folders = {w.name: w.folder for w in weights}
        self._tasks: list[tuple[Callable[[], Any], Future]] = []  # run by the worker between decode steps
        self.end_ids = set(stop_token_ids(tokenizer, model))
        vocab = getattr(model.config, "vocab_size", None) or len(tokenizer)
        self.grammar_tokens = GrammarTokenizer(tokenizer, int(vocab), sorted(self.end_ids))  # built on first use
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.end_ids, default=0)
        self.device = next(model.parameters()).device
        self._cache_kw = self._cache_arg()
        self._gather = RowGather(model)  # adapter rows of the running batch, gathered into the LoRA layers
        # the compiled decode step for base-model batches: built on first use; the reason when it is not used
        self._fast: Any = None
        self._fast_reason: str | None = None if decoder == "auto" else "the model's forward (decoder 'hf')"
        self.stats = {"requests": 0, "batches": 0, "max_rows": 0, "cancelled": 0, "steps": 0,
                      "compiled_steps": 0}
        # An observer of the engine's work (fourbit.serve.metrics.ServeMetrics, set by create_app): told of
        # each generated token (token(req, now)) and each request that ends (done(req, kind, value)).
        self.metrics: Any = None
        self.index_lock = threading.Lock()  # one upload re-indexes at a time
        self._waiting: list[GenRequest] = []
        self._running: list[GenRequest] = []
        self._cond = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._loop, name="fourbit-serve-engine", daemon=True)
        self._worker.start()

    # ---- names and prompts ------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        """The served adapters, in the order they were loaded."""
        return list(self._adapters)

    @property
    def models(self) -> list[str]:
        """The served model names: the base model, then each adapter."""
        return [self.model_name, *self._adapters]

    def adapter_index(self, name: str | None) -> int:
        """-1 for the base model (or no name), the adapter's row index otherwise.

        Raises:
            UnknownModel: an unknown name.
        """
        if name in (None, "", self.model_name):
            return -1
        index = self._adapters.get(name)
        if index is None:
            raise UnknownModel(name, self.models)
        return index

    def model_of(self, index: int) -> str:
        """The served name of adapter row ``index`` (-1, or an adapter since unloaded: the base model's)."""
        return next((name for name, i in self._adapters.items() if i == index), self.model_name)

    def chat_prompt(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Token ids of chat ``messages`` rendered by :func:`fourbit.models.chat.render_chat` (as ``generate``
        and ``rag query`` render them)."""
        return self.encode(render_chat(self.tokenizer, messages, tools=tools))

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def sampling(self, prompt_tokens: int, *, max_tokens: int | None, field_name: str, **kw: Any) -> Sampling:
        """Sampling settings with ``max_tokens`` capped by the context window.

        Raises:
            FieldError: the prompt (``field_name``) leaves no room in the context window; max_tokens < 1.
        """
        room = self.context_window - prompt_tokens
        if room < 1:
            raise FieldError(field_name, f"the prompt is {prompt_tokens} tokens; the model's context window is "
                                         f"{self.context_window} tokens: shorten it")
        if max_tokens is not None and max_tokens < 1:
            raise FieldError("max_tokens", f"must be >= 1, got {max_tokens}")
        wanted = self.default_max_tokens if max_tokens is None else max_tokens
        return Sampling(max_tokens=min(wanted, room), **kw)

    # ---- queue ------------------------------------------------------------------------------------
    def submit(self, req: GenRequest) -> GenRequest:
        """Queue ``req``; events arrive through its sink.

        Raises:
            QueueFull: ``max_queue`` requests are already waiting.
            RuntimeError: the engine is closed.
        """
        with self._cond:
            if self._closed:
                raise RuntimeError("the engine is closed")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(len(self._waiting))
            if req.adapter != -1 and req.adapter not in self._adapters.values():
                raise UnknownModel(f"adapter #{req.adapter} (unloaded)", self.models)
            req.submitted = time.monotonic()
            if self.metrics is not None:
                req.sink = self.metrics.observe(req, req.sink)
            self._waiting.append(req)
            self.stats["requests"] += 1
            self._cond.notify()
        return req

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Queue requests without starting any until the block ends, so that they start as one batch
        (tests and benchmarks; a server never needs it)."""
        with self._cond:
            yield

    def generate(self, prompt_ids: list[int], sampling: Sampling, adapter: int = -1,
                 timeout: float | None = None) -> tuple[str, GenRequest]:
        """Blocking helper (tests, benchmarks): queue one request and wait for its whole text."""
        pieces: list[str] = []
        done = threading.Event()
        errors: list[str] = []

        def sink(kind: str, value: Any) -> None:
            if kind == "delta":
                pieces.append(value)
            elif kind in ("done", "error"):
                if kind == "error":
                    errors.append(value)
                done.set()

        req = self.submit(GenRequest(list(prompt_ids), adapter, sampling, sink))
        if not done.wait(timeout):
            req.cancel()
            raise TimeoutError("generation did not finish in time")
        if errors:
            raise RuntimeError(errors[0])
        return "".join(pieces), req

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker (the current step finishes; waiting requests end with an error, pending adapter
        loads and unloads with RuntimeError)."""
        with self._cond:
            self._closed = True
            waiting, self._waiting = self._waiting, []
            tasks, self._tasks = self._tasks, []
            self._cond.notify_all()
        for req in waiting:
            req.sink("error", "the server is shutting down")
        for _, future in tasks:
            future.set_exception(RuntimeError("the server is shutting down"))
        self._worker.join(timeout)

    # ---- adapters at run time ----------------------------------------------------------------------
    def load_adapter(self, name: str, folder: str) -> Future:
        """Read the adapter in ``folder`` and serve it as model ``name``, between two decode steps.

        The folder and its config are checked here, in the caller's thread; the worker reads the weights and
        registers them, pausing the running batch for that read only.

        Returns:
            A future that resolves (to None) once requests can name ``name``, or holds a FieldError naming
            ``lora_path`` (an adapter whose modules or shapes do not fit this model, damaged weights, peft's
            ``modules_to_save``) or ``lora_name`` (loaded meanwhile by another call).

        Raises:
            FieldError: ``lora_name`` empty, the base model's or already loaded; ``lora_path`` not a folder, not
                an adapter, or DoRA.
        """
        self._check_new_name(name)
        check_adapter_folder(name, folder, field="lora_path")  # a bad folder never reaches the worker
        return self._between_steps(lambda: self._load(name, folder))

    def unload_adapter(self, name: str) -> Future:
        """Stop serving adapter ``name`` and free its tensors, between two decode steps.

        Returns:
            A future that resolves (to None) once it is gone, or holds the error: UnknownModel (no adapter of
            that name) or AdapterInUse (running or queued requests use it: nothing is unloaded).
        """
        return self._between_steps(lambda: self._unload(name))

    def _check_new_name(self, name: str) -> None:
        if not name or not name.strip() or name == self.model_name:
            raise FieldError("lora_name", f"{name!r} is empty or the base model's name")
        if name in self._adapters:
            raise FieldError("lora_name", f"an adapter named {name!r} is already loaded; unload it first")

    def _between_steps(self, task: Callable[[], Any]) -> Future:
        future: Future = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._tasks.append((task, future))
            self._cond.notify()
        return future

    def _run_tasks(self) -> None:
        """Run the adapter loads and unloads asked for since the last step (worker thread, between steps)."""
        with self._cond:
            tasks, self._tasks = self._tasks, []
        if tasks:
            self._gather.clear()  # the LoRA layers may change: gathered again at the next step
        for task, future in tasks:
            try:
                future.set_result(task())
            except Exception as err:  # handed to the caller, who answers it; the worker goes on
                future.set_exception(err)

    def _load(self, name: str, folder: str) -> None:
        self._check_new_name(name)  # again: another load of the same name may have run first
        weights = read_adapter(self.model, name, folder, field="lora_path")
        index = self._next_index
        self._next_index += 1
        try:
            add_adapter(self.model, index, weights)
        except Exception:
            remove_adapter(self.model, index)
            raise
        with self._cond:  # a new dict, not changed in place: other threads iterate the old one safely
            self._adapters = {**self._adapters, name: index}
            self.adapter_folders[name] = weights.folder
        log.info("loaded adapter %r from %s (row index %d)", name, weights.folder, index)

    def _unload(self, name: str) -> None:
        with self._cond:  # no request can queue for it between this check and its removal
            index = self._adapters.get(name)
            if index is None:
                raise UnknownModel(name, self.models)
            users = [r for r in [*self._waiting, *self._running]
                     if r.adapter == index and r.finish_reason is None and not r.cancelled.is_set()]
            if users:
                raise AdapterInUse(name, len(users))
            self._adapters = {n: i for n, i in self._adapters.items() if n != name}
            self.adapter_folders.pop(name, None)
        remove_adapter(self.model, index)
        log.info("unloaded adapter %r", name)

    # ---- the worker -------------------------------------------------------------------------------
    def _take(self, n: int) -> list[GenRequest]:
        """Up to ``n`` waiting requests (those already cancelled are answered and dropped)."""
        with self._cond:
            taken, self._waiting = self._waiting[:n], self._waiting[n:]
        live = []
        for req in taken:
            if req.cancelled.is_set():
                self.stats["cancelled"] += 1
                req.finish_reason = "cancelled"
                req.sink("done", "cancelled")
            else:
                live.append(req)
        return live

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._tasks and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
            self._run_tasks()
            batch = self._take(self.max_batch)
            if not batch:
                continue
            self._running = list(batch)
            try:
                self._decode(batch)
            except Exception as err:  # a failed batch must not stop the server: report it to its requests
                log.exception("generation failed")
                for req in self._running:
                    if req.finish_reason is None:
                        req.finish_reason = "error"
                        req.sink("error", f"generation failed: {type(err).__name__}: {err}")
            finally:
                self._running = []
                self._gather.clear()

    def _cache_arg(self) -> str:
        # transformers 5.x renames ``past_key_values`` to ``cache`` (the old name warns until 5.40).
        import inspect

        params = inspect.signature(self.model.forward).parameters
        return "cache" if "cache" in params else "past_key_values"

    def _fast_decoder(self, req: GenRequest) -> Any:
        """The compiled decoder when it decodes ``req`` (it asks for the base model, the model is one the
        decoder computes, it fits a sliding attention window), else None."""
        if self._fast_reason is not None or req.adapter != -1:
            return None
        if self._fast is None:
            self._fast, self._fast_reason = build_decoder(self.model, 256)
            log.info("decoding base-model requests with %s", self._fast_reason or "the compiled decode step")
            if self._fast is None:
                return None
        window = getattr(self.model.config, "sliding_window", None)
        if window is not None and len(req.prompt_ids) + req.sampling.max_tokens > window:
            return None
        return self._fast

    @torch.inference_mode()
    def _decode(self, batch: list[GenRequest]) -> None:
        """Decode ``batch`` to the end; requests that queue meanwhile join it while there is room.

        The batch is two groups decoded step by step together: base-model rows on the compiled step (each with
        its own cache) and rows through the model's forward (adapter rows; every row when the compiled step
        does not apply), which share one left-padded cache.
        """
        self.stats["batches"] += 1
        fast, state = self._start(batch)
        while fast or state is not None:
            if self._closed:
                for row in [f.row for f in fast] + (state.rows if state is not None else []):
                    row.req.finish_reason = "error"
                    row.req.sink("error", "the server is shutting down")
                return
            if self._tasks:
                self._run_tasks()
            room = self.max_batch - len(fast) - (len(state.rows) if state is not None else 0)
            if room > 0 and self._waiting and (state is None or mergeable(state.cache)):
                joining = self._take(room)
                if joining:
                    self._running.extend(joining)
                    more, newcomers = self._start(joining)
                    fast += more
                    if state is None or newcomers is None:
                        state = state or newcomers
                    else:
                        state.merge(newcomers)
            self.stats["max_rows"] = max(self.stats["max_rows"],
                                         len(fast) + (len(state.rows) if state is not None else 0))
            fast = [f for f in fast if self._fast_step(f)]
            if state is not None:
                state = self._advance(state)

    def _start(self, batch: list[GenRequest]) -> tuple[list[FastRow], Batch | None]:
        """Prefill ``batch``, each row's first token handed out: the rows that go on, split into those of the
        compiled step and the batch of those through the forward (None when there are none)."""
        compiled, others = [], []
        for req in batch:
            (compiled if self._fast_decoder(req) is not None else others).append(req)
        fast = self._fast_prefill(self._fast, compiled) if compiled else []
        return fast, (self._advance(self._prefill_state(others)) if others else None)

    def _prefill_state(self, batch: list[GenRequest]) -> Batch:
        """The left-padded prompts of ``batch`` as a batch about to be prefilled."""
        from transformers import DynamicCache

        self.stats["max_rows"] = max(self.stats["max_rows"], len(batch))
        width = max(len(r.prompt_ids) for r in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, req in enumerate(batch):
            n = len(req.prompt_ids)
            ids[i, width - n:] = torch.tensor(req.prompt_ids, dtype=torch.long)
            mask[i, width - n:] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        adapters = torch.tensor([req.adapter for req in batch], dtype=torch.long)
        rows = [Row(req, self.tokenizer, self.end_ids) for req in batch]
        d = self.device
        return Batch(rows, DynamicCache(), ids.to(d), mask.to(d), positions.to(d), adapters.to(d))

    def _forward(self, state: Batch) -> torch.Tensor:
        """One forward pass over the pending tokens of ``state`` (its cache grows); float32 logits [B, vocab]."""
        self._gather.use(state.adapters.tolist())
        out = self.model(input_ids=state.ids, attention_mask=state.mask, position_ids=state.positions,
                         use_cache=True, logits_to_keep=1, **{self._cache_kw: state.cache})
        self.stats["steps"] += 1
        return out.logits[:, -1, :].float().cpu()

    def _emit(self, row: Row, token: int | None) -> bool:
        """Hand ``row``'s new ``token`` out (None: the row was cancelled); True while the row goes on."""
        if token is None or row.req.cancelled.is_set():
            self.stats["cancelled"] += 1
            row.req.finish_reason = "cancelled"
            row.req.sink("done", "cancelled")
            return False
        if self.metrics is not None and token not in self.end_ids:
            self.metrics.token(row.req, time.monotonic())
        if row.push(token):
            row.req.sink("done", row.req.finish_reason)
            return False
        return True

    def _advance(self, state: Batch) -> Batch | None:
        """One forward pass over the pending tokens, one new token per row; finished rows leave the batch.

        Returns:
            The batch with its next pending tokens, or None when every row has finished.
        """
        logits = self._forward(state)
        keep, tokens = [], []
        for i, row in enumerate(state.rows):
            token = None if row.req.cancelled.is_set() else row.choose(logits[i])
            if self._emit(row, token):
                keep.append(i)
                tokens.append(token)
        if not keep:
            return None
        if len(keep) < len(state.rows):
            state.select(keep)
            self._gather.select(keep)
        state.ids = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]
        state.mask = torch.cat([state.mask, torch.ones_like(state.mask[:, :1])], dim=1)
        state.positions = state.positions[:, -1:] + 1
        return state

    # ---- base-model rows through the compiled step (see .fastpath) -----------------------------------
    def _fast_prefill(self, decoder: Any, batch: list[GenRequest]) -> list[FastRow]:
        """The prompts of ``batch`` through one batched forward, each row's first token handed out; the rows
        that go on, each with its K/V in a cache of its own."""
        state = self._prefill_state(batch)
        logits = self._forward(state)
        kept, tokens = [], []
        for i, row in enumerate(state.rows):
            token = None if row.req.cancelled.is_set() else row.choose(logits[i])
            if self._emit(row, token):
                kept.append(i)
                tokens.append(token)
        if not kept:
            return []
        reqs = [state.rows[i].req for i in kept]
        lengths = [len(r.prompt_ids) for r in reqs]
        room = [r.sampling.max_tokens + 1 for r in reqs]
        states = prefill_states(decoder, state.rows_cache(kept), lengths, room)
        return [FastRow(state.rows[i], st, t) for i, st, t in zip(kept, states, tokens, strict=True)]

    def _fast_step(self, fast: FastRow) -> bool:
        """One compiled step of one row; True while the row goes on."""
        if fast.row.req.cancelled.is_set():
            return self._emit(fast.row, None)
        fast.token = step_row(self._fast, fast)
        self.stats["compiled_steps"] += 1
        return self._emit(fast.row, fast.token)

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a place in a batch."""
        return len(self._waiting)

    @property
    def running(self) -> int:
        """Requests being decoded."""
        return len(self._running)

    # ---- documents --------------------------------------------------------------------------------
    def require_index(self) -> None:
        """Raise FieldError (field ``db``) when no embedder/index was loaded."""
        if self.embedder is None or self.store is None:
            raise FieldError("db", "no document index is loaded: start the server with `db`")
