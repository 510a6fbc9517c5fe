"""Fast batch-1 decoding of Llama-family models on the CPU: a static KV cache and one compiled call per token.

transformers' ``generate`` runs each new token through the model's modules: at batch 1 a small model's step is
hundreds of tiny operations (SmolLM2-135M: 30 layers of norms, seven matmuls, RoPE, attention, cache updates),
each paying Python and dispatch costs larger than its arithmetic, and a growing ``DynamicCache``. Here the prompt
runs through the model's own forward once (its K/V copied into a preallocated cache), then every further token
is one call of ``fb_decode_step`` (``fourbit/kernels/csrc/decode.c``), which reads the model's weights where
they are -- fourbit's 4-bit layers in their packed form, dense layers as they are -- and computes the step in
float32 inside one OpenMP region.

Supported: ``model_type`` llama (SmolLM, Llama 2/3), mistral (within its sliding window), qwen2 (Q/K/V biases)
and qwen3 (per-head Q/K norms), with :class:`fourbit.nn.Linear4bit` or plain ``nn.Linear`` projections, SiLU
MLPs, any RoPE scaling (the tables come from the model's own rotary module) and a tied or separate head.
Anything else (LoRA layers, hooks, other architectures, weights off the CPU) gets a reason from
:func:`unsupported_reason`, and callers fall back to ``generate``.

Greedy tokens: with a dense head the step scores every vocabulary row with an int8 copy of the head and computes
exact logits only for the rows that can still be the maximum (``decode.c`` explains the bound), so the token is
the exact head's argmax at about a quarter of a float32 head's memory traffic.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from fourbit.kernels import cpu
from fourbit.nn.linear4bit import Linear4bit

__all__ = ["SUPPORTED_MODEL_TYPES", "DecodeState", "Decoder", "decoder_for", "unsupported_reason"]

#: ``config.model_type`` values whose layers :class:`Decoder` computes.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_PROJECTIONS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
                ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))
#: The attribute under which :func:`decoder_for` keeps a model's decoder.
_ATTR = "_fourbit_decoder"


def _linear_reason(name: str, module: nn.Module) -> str | None:
    if isinstance(module, Linear4bit):
        return None if module.weight.is_cpu else f"{name} is not on the CPU"
    if type(module) is nn.Linear:
        ok = module.weight.dtype in _DTYPE_CODES and module.weight.is_cpu
        return None if ok else f"{name} holds a {module.weight.dtype} weight on {module.weight.device}"
    return f"{name} is a {type(module).__name__} (only Linear4bit and nn.Linear are computed)"


def _hooked(model: nn.Module) -> str | None:
    for name, module in model.named_modules():
        if module._forward_hooks or module._forward_pre_hooks:
            return f"{name or 'the model'} has forward hooks"
    return None


def unsupported_reason(model: nn.Module, total_len: int | None = None) -> str | None:
    """Why :class:`Decoder` cannot run ``model`` (one line), or None when it can.

    Args:
        total_len: prompt plus new tokens, checked against a sliding attention window.
    """
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED_MODEL_TYPES:
        return f"model_type {kind!r} is not one of {', '.join(SUPPORTED_MODEL_TYPES)}"
    if not cpu.available():
        return "the compiled CPU kernels are unavailable"
    if getattr(config, "hidden_act", "silu") != "silu" or getattr(config, "mlp_bias", False):
        return f"hidden_act {config.hidden_act!r} / mlp_bias are not Llama's SiLU MLP"
    window = getattr(config, "sliding_window", None)
    if window is not None and total_len is not None and total_len > window:
        return f"{total_len} tokens exceed the sliding attention window of {window}"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not len(inner.layers) or not hasattr(model, "lm_head"):
        return "the model has no .model.layers / .lm_head"
    for i, layer in enumerate(inner.layers):
        for part, proj in _PROJECTIONS:
            reason = _linear_reason(f"layer {i} {proj}", getattr(getattr(layer, part), proj))
            if reason:
                return reason
    if type(inner.embed_tokens) is not nn.Embedding or inner.embed_tokens.weight.dtype not in _DTYPE_CODES \
            or not inner.embed_tokens.weight.is_cpu:
        return "the input embedding is not a float nn.Embedding on the CPU"
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    attn = inner.layers[0].self_attn
    if heads % kv or head_dim > 1024 or head_dim % 2 or attn.q_proj.out_features != heads * head_dim \
            or attn.k_proj.out_features != kv * head_dim:
        return f"attention shapes ({heads} heads, {kv} K/V heads of {head_dim}) the decoder does not take"
    return _linear_reason("lm_head", model.lm_head) or _hooked(model)


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32).contiguous()


def _screen(weight: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The int8 copy of a dense head [vocab, hidden] (blocks of 32, scale absmax / 127) and each row's error
    bound: ||w - w~||_2 plus hidden * 2^-22 * max(||w||, ||w~||), which covers the float32 rounding of both the
    approximate and the exact dot products (each within hidden * 2^-24 * ||x|| ||w|| of its real value)."""
    vocab, hidden = weight.shape
    q = torch.empty(vocab, hidden, dtype=torch.int8)
    scale = torch.empty(vocab, hidden // 32, dtype=torch.float32)
    err = torch.empty(vocab, dtype=torch.float32)
    for r0 in range(0, vocab, chunk):
        w = weight[r0:r0 + chunk].detach().to(torch.float32).view(-1, hidden // 32, 32)
        d = w.abs().amax(-1) / 127
        codes = torch.where(d[..., None] > 0, torch.round(w / d.clamp_min(1e-30)[..., None]), 0.0)
        approx = codes * d[..., None]
        w64, a64 = w.double().flatten(1), approx.double().flatten(1)
        slack = hidden * 2.0**-22 * torch.maximum(w64.norm(dim=1), a64.norm(dim=1))
        err[r0:r0 + chunk] = (((w64 - a64).norm(dim=1) + slack) * (1 + 1e-5)).float()
        q[r0:r0 + chunk] = codes.to(torch.int8).flatten(1)
        scale[r0:r0 + chunk] = d
    return q, scale, err


@dataclass
class DecodeState:
    """One sequence decoded beside others by one :class:`Decoder` (:meth:`Decoder.using`): its own K/V cache
    (per layer, float32 ``[kv_heads, length, head_dim]``) and the position of its next step."""

    caches: list[tuple[torch.Tensor, torch.Tensor]]
    pos: int


class Decoder:
    """Batch-1 decoding of one sequence of ``model`` with a static KV cache (see the module docstring).

    Build it with :func:`decoder_for` (cached on the model). :meth:`prefill` runs a prompt, :meth:`step` one
    token; positions count from 0 with each call. Not thread-safe: hold :attr:`lock` while using it.

    Args:
        model: a supported causal LM (:func:`unsupported_reason` returns None for it), in eval mode.
        max_len: tokens the cache holds (prompt plus new tokens); :meth:`reserve` grows it.
        screen_head: keep an int8 copy of a dense head for greedy steps (memory: a quarter of a float32 head).
    """

    def __init__(self, model: nn.Module, max_len: int, screen_head: bool = True) -> None:
        reason = unsupported_reason(model)
        if reason:
            raise NotImplementedError(f"fast decoding: {reason}")
        self.model, self.lock, self.pos = model, threading.Lock(), 0
        self._keep: list = []
        self._codes: dict[bytes, torch.Tensor] = {}
        self._key = _weights_key(model)
        cfg, inner = model.config, model.model
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.n_layers = len(inner.layers)
        self.layers = (cpu.DecodeLayer * self.n_layers)()
        for i, layer in enumerate(inner.layers):
            self._set_layer(self.layers[i], layer)
        self.struct = self._model_struct(screen_head)
        self.max_len, self._caches = 0, []
        self.work = torch.empty(0, dtype=torch.float32)
        self._rope = (torch.empty(0, self.head_dim), torch.empty(0, self.head_dim))  # grown by _attach
        self.reserve(max(max_len, 1))

    # ----------------------------------------------------------------------------------------- building
    def _hold(self, t: torch.Tensor | None) -> int | None:
        if t is None:
            return None
        self._keep.append(t)
        return t.data_ptr()

    def _linear(self, module: nn.Module) -> cpu.DecodeLinear:
        bias = self._hold(_f32(module.bias)) if module.bias is not None else None
        if isinstance(module, Linear4bit):
            qs = module.quant_state
            scales, keep = cpu._scales(qs.block_scales())
            self._keep.extend(keep)
            code = _f32(qs.code)
            code = self._codes.setdefault(code.numpy().tobytes(), code)
            packed = module.weight.detach().reshape(-1)
            return cpu.DecodeLinear(self._hold(packed), scales, self._hold(code), qs.blocksize, None, 0, bias,
                                    module.out_features, module.in_features)
        weight = module.weight.detach().contiguous()
        return cpu.DecodeLinear(None, cpu._Scales(), None, 0, self._hold(weight), _DTYPE_CODES[weight.dtype], bias,
                                weight.shape[0], weight.shape[1])

    def _set_layer(self, out: cpu.DecodeLayer, layer: nn.Module) -> None:
        attn = layer.self_attn
        out.attn_norm = self._hold(_f32(layer.input_layernorm.weight))
        out.mlp_norm = self._hold(_f32(layer.post_attention_layernorm.weight))
        for name in ("q_norm", "k_norm"):
            norm = getattr(attn, name, None)
            setattr(out, name, self._hold(_f32(norm.weight)) if norm is not None else None)
        for (part, proj), field in zip(_PROJECTIONS, ("q", "k", "v", "o", "gate", "up", "down"), strict=True):
            setattr(out, field, self._linear(getattr(getattr(layer, part), proj)))

    def _model_struct(self, screen_head: bool) -> cpu.DecodeModel:
        model, inner, cfg = self.model, self.model.model, self.model.config
        norms = [inner.norm] + [m for layer in inner.layers for m in (layer.input_layernorm,
                                                                        layer.post_attention_layernorm)]
        eps = {float(getattr(n, "variance_epsilon", getattr(n, "eps", cfg.rms_norm_eps))) for n in norms}
        if len(eps) != 1:
            raise NotImplementedError(f"fast decoding: the model's norms use several epsilons {sorted(eps)}")
        embed = inner.embed_tokens.weight.detach().contiguous()
        head = self._linear(model.lm_head)
        first = inner.layers[0]
        m = cpu.DecodeModel(n_layers=self.n_layers, hidden=cfg.hidden_size, n_heads=self.n_heads,
                            n_kv_heads=self.n_kv, head_dim=self.head_dim, intermediate=first.mlp.gate_proj.out_features,
                            vocab=model.lm_head.out_features, max_len=0,
                            embed_rows=embed.shape[0], eps=eps.pop(), embed=self._hold(embed),
                            embed_dtype=_DTYPE_CODES[embed.dtype], final_norm=self._hold(_f32(inner.norm.weight)),
                            head=head, layers=self.layers)
        m.attn_scale = float(getattr(first.self_attn, "scaling", self.head_dim ** -0.5))
        if screen_head and type(model.lm_head) is nn.Linear and cfg.hidden_size % 32 == 0:
            q, scale, err = _screen(model.lm_head.weight)
            m.screen_q, m.screen_scale, m.screen_err = self._hold(q), self._hold(scale), self._hold(err)
        if len(self._codes) == 1:  # one 4-bit codebook: the vector code takes every 4-bit layer
            m.code4 = self._hold(next(iter(self._codes.values())))
        return m

    def reserve(self, max_len: int) -> None:
        """Make the cache hold at least ``max_len`` positions (a larger cache keeps what it held)."""
        if max_len <= self.max_len:
            return
        caches = self._new_caches(max_len)
        for (k, v), (old_k, old_v) in zip(caches, self._caches, strict=False):
            k[:, :self.max_len], v[:, :self.max_len] = old_k, old_v
        self._attach(caches, self.pos)

    def _new_caches(self, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        shape = (self.n_kv, length, self.head_dim)
        return [(torch.zeros(shape), torch.zeros(shape)) for _ in range(self.n_layers)]

    def _attach(self, caches: list[tuple[torch.Tensor, torch.Tensor]], pos: int) -> None:
        """Point the compiled step at ``caches`` (their length is the cache size) and continue at ``pos``; the
        RoPE tables and the scratch buffer grow to fit."""
        length = caches[0][0].shape[1]
        if length > self._rope[0].shape[0]:
            self._rope = self._rope_tables(length)
            self.struct.rope_cos, self.struct.rope_sin = self._rope[0].data_ptr(), self._rope[1].data_ptr()
        for layer, (k, v) in zip(self.layers, caches, strict=True):
            layer.k_cache, layer.v_cache = k.data_ptr(), v.data_ptr()
        self._caches, self.pos = caches, pos
        self.struct.max_len = self.max_len = length
        need = cpu.decode_work_floats(self.struct)
        if self.work.numel() < need:
            self.work = torch.empty(need, dtype=torch.float32)

    # ------------------------------------------------------------------------------ several sequences
    def new_state(self, length: int, keys_values: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                  ) -> DecodeState:
        """A sequence of its own (a server's batch row) for :meth:`using`: a cache of ``length`` positions,
        holding ``keys_values`` (per layer, K and V ``[kv_heads, tokens, head_dim]``, e.g. one row of a batched
        prefill) at positions ``0..tokens-1``, the next step at position ``tokens`` (0 without them)."""
        tokens = keys_values[0][0].shape[1] if keys_values else 0
        caches = self._new_caches(max(length, tokens, 1))
        for (k, v), (keys, values) in zip(caches, keys_values or (), strict=False):
            k[:, :tokens], v[:, :tokens] = keys, values
        return DecodeState(caches, tokens)

    @contextmanager
    def using(self, state: DecodeState) -> Iterator[None]:
        """Inside the block :meth:`step` continues ``state`` (its cache, grown when full, and its position);
        the decoder's own sequence is back afterwards. Several sequences share the weights this way, each
        decoded batch-1."""
        home = (self._caches, self.pos)
        self._attach(state.caches, state.pos)
        try:
            yield
        finally:
            state.caches, state.pos = self._caches, self.pos
            self._attach(*home)

    def _rope_tables(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [n, head_dim] float32 from the model's own rotary module (its scaling included)."""
        rotary = self.model.model.rotary_emb
        probe = torch.zeros(1, 1, self.head_dim, dtype=torch.float32)
        with torch.no_grad():
            cos, sin = rotary(probe, torch.arange(n).unsqueeze(0))
        return cos[0].float().contiguous(), sin[0].float().contiguous()

    # ------------------------------------------------------------------------------------------- running
    def current(self) -> bool:
        """Whether the model still holds the weights this decoder reads (no module or tensor replaced or
        changed in place since it was built)."""
        return _weights_key(self.model) == self._key

    @torch.inference_mode()
    def prefill(self, ids: list[int]) -> torch.Tensor:
        """Run the prompt ``ids`` through the model's forward (the reference computation, all positions at
        once) from position 0, copy its K/V into the cache, and return the last position's float32 logits
        [vocab]."""
        if not ids:
            raise ValueError("prefill needs at least one token")
        self.reserve(len(ids))
        x = torch.tensor([ids], dtype=torch.long)
        out = self.model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=True, logits_to_keep=1)
        for (k, v), (keys, values) in zip(self._caches, _cache_tensors(out), strict=True):
            k[:, :len(ids)] = keys[0].float()
            v[:, :len(ids)] = values[0].float()
        self.pos = len(ids)
        return out.logits[0, -1].float()

    def step(self, token: int, logits: bool = False) -> tuple[int | None, torch.Tensor | None]:
        """Run ``token`` at the next position: (the greedy next token, or None with ``logits``; the float32
        logits [vocab] with ``logits``, else None). The cache grows when full."""
        if self.pos >= self.max_len:
            self.reserve(max(2 * self.max_len, self.pos + 1))
        out = torch.empty(self.struct.vocab, dtype=torch.float32) if logits else None
        nxt = cpu.decode_step(self.struct, token, self.pos, self.work, out, want_token=not logits)
        self.pos += 1
        return nxt, out

    # A copied or pickled model gets no decoder (it holds raw pointers into this model); one is built on demand.
    def __deepcopy__(self, memo: dict) -> None:
        return None

    def __reduce__(self):
        return (_none, ())


def _cache_tensors(out) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's (keys, values) [1, kv_heads, tokens, head_dim] from a forward's cache (``out.cache`` in
    transformers 5, ``past_key_values`` before; layer objects since 4.56, lists before)."""
    cache = out["cache"] if "cache" in out else out["past_key_values"]
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # an inference tensor: cannot change in place outside inference mode
        return -1


def _weights_key(model: nn.Module) -> tuple:
    """Identity and version of every module and tensor the decoder reads."""
    key = []
    for module in model.modules():
        key.append(id(module))
        for t in (*module._parameters.values(), *module._buffers.values()):
            if t is not None:
                key += [id(t), _version(t)]
    return tuple(key)


def _none() -> None:
    return None


def decoder_for(model: nn.Module, max_len: int, screen_head: bool = True) -> Decoder:
    """The model's :class:`Decoder`, built on first use and kept on the model until its weights change.

    Raises:
        NotImplementedError: :func:`unsupported_reason` names why the model cannot be decoded here.
    """
    dec = model.__dict__.get(_ATTR)
    if not isinstance(dec, Decoder) or not dec.current():
        model.__dict__.pop(_ATTR, None)
        dec = Decoder(model, max_len, screen_head)
        model.__dict__[_ATTR] = dec
    dec.reserve(max_len)
    return dec
