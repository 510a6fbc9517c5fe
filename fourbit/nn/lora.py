"""LoRA (Hu et al. 2021) over a plain or a 4-bit base: the one layer type behind LoRA and QLoRA.

QLoRA (Dettmers et al. 2023, Eq. 5) is LoRA whose frozen base weight is NF4:

    Y = X · doubleDequant(c1, c2, W_nf4) + s · X · L1 · L2,      s = alpha / r

Here ``base`` computes the first term (``nn.Linear`` or ``fourbit.nn.Linear4bit``) and the adapter pair
``lora_A`` (L1, ``r × in``) and ``lora_B`` (L2, ``out × r``) the second. Adapters are injected by swapping
modules of an unmodified transformers model (:func:`inject_lora`); the module names and initialisation follow
peft so that adapters move between the two (see :mod:`fourbit.nn.adapters`).
"""

from __future__ import annotations

import contextlib
import math
import re
import sys
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fourbit._errors import FieldError
from fourbit.nn import fused
from fourbit.nn.info import fourbit_info

__all__ = [
    "LoRALinear",
    "LoRASpec",
    "dequantized_layer",
    "find_target_modules",
    "AUTO_KEEP_MAX_SEQ_LEN",
    "keep_matmul_outputs",
    "is_conv1d",
    "inject_lora",
    "is_linear_4bit",
    "is_linear_like",
    "lora_modules",
    "lora_spec",
    "mark_only_lora_trainable",
    "merge_and_unload",
    "trainable_parameters",
    "trainable_parameters_report",
    "unload_lora",
]

ALL_LINEAR = "all-linear"


def is_linear_4bit(module: nn.Module) -> bool:
    """True for a frozen 4-bit linear layer (``fourbit.nn.Linear4bit`` or anything shaped like it).

    Duck-typed on ``quant_state`` + ``dequantize`` + ``in_features`` so that this module does not import the
    quantization code at import time.
    """
    return all(hasattr(module, a) for a in ("quant_state", "dequantize", "in_features", "out_features"))


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (GPT-2 style: ``y = x @ W + b`` with ``W`` stored ``[in, out]``).

    Checked without importing transformers: a model holding a ``Conv1D`` has imported it already.
    """
    utils = sys.modules.get("transformers.pytorch_utils")
    return utils is not None and isinstance(module, utils.Conv1D)


def from_conv1d(module: nn.Module) -> bool:
    """True for a 4-bit layer quantized from a ``Conv1D`` (its ``source_cls``, as transformers' bitsandbytes
    integration marks it): its weight is stored ``[out, in]`` like every 4-bit layer, but a float copy of it
    must be a ``Conv1D`` again so that the model's checkpoints keep their ``[in, out]`` layout."""
    utils = sys.modules.get("transformers.pytorch_utils")
    source = getattr(module, "source_cls", None)
    return utils is not None and isinstance(source, type) and issubclass(source, utils.Conv1D)


def is_linear_like(module: nn.Module) -> bool:
    """True for ``nn.Linear``, transformers' ``Conv1D`` and 4-bit linear layers: the layers LoRA wraps."""
    return isinstance(module, nn.Linear) or is_conv1d(module) or is_linear_4bit(module)


def _features(base: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like layer."""
    if is_conv1d(base):
        return int(base.weight.shape[0]), int(base.weight.shape[1])
    return int(base.in_features), int(base.out_features)


def dequantized_layer(module: nn.Module, dtype: torch.dtype = torch.float32,
                      delta: torch.Tensor | None = None) -> nn.Module:
    """A float copy of a linear-like layer (a 4-bit one dequantized), plus ``delta`` (``[out, in]``) if given.

    The copy has the layer's original class and layout: ``Conv1D`` (weight ``[in, out]``) for a ``Conv1D``
    or a 4-bit layer quantized from one (:func:`from_conv1d`), else ``nn.Linear`` (weight ``[out, in]``); for
    4-bit experts (:class:`fourbit.nn.experts.Experts4bit`) the original experts module.
    """
    if hasattr(module, "dequantized_module"):  # 4-bit experts (fourbit.nn.experts): no LoRA delta there
        return module.dequantized_module(dtype)
    with torch.no_grad():
        if is_linear_4bit(module):
            w = module.dequantize(torch.float32)
        elif is_conv1d(module):
            w = module.weight.detach().float().t()
        else:
            w = module.weight.detach().float()
        if delta is not None:
            w = w + delta.to(w.device)
        out_features, in_features = w.shape
        bias = module.bias
        if is_conv1d(module) or from_conv1d(module):
            from transformers.pytorch_utils import Conv1D

            new = Conv1D(out_features, in_features).to(device=w.device, dtype=dtype)
            new.weight.copy_(w.t().to(dtype))
            if bias is None:
                new.bias = None  # Conv1D always has one; keep the layer's own structure
        else:
            new = nn.Linear(in_features, out_features, bias=bias is not None, device=w.device, dtype=dtype)
            new.weight.copy_(w.to(dtype))
        if bias is not None:
            new.bias.copy_(bias.to(dtype))
    return new.requires_grad_(False)


class _MatmulOutputs:
    """What the forward pass of a checkpointed segment kept of its LoRA layers, in call order: each layer's
    output and its ``h · A^T``, with the output's version counter (an output changed in place is not reused)."""

    def __init__(self, max_seq_len: int | None = None) -> None:
        self.kept: deque[tuple[torch.Tensor, torch.Tensor, int]] = deque()
        self.mode: str | None = None
        self.max_seq_len = max_seq_len

    def keeps(self, x: torch.Tensor) -> bool:
        """Whether to keep the output for input ``x`` ([batch, seq, features] or [tokens, features])."""
        seq = x.shape[-2] if x.dim() >= 3 else x.shape[0]
        return self.max_seq_len is None or seq <= self.max_seq_len

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        with self._as("record"):
            yield

    @contextlib.contextmanager
    def replaying(self) -> Iterator[None]:
        with self._as("replay"):
            yield
        self.kept.clear()  # whatever the recomputation did not reach (it may stop early) is not needed again

    @contextlib.contextmanager
    def _as(self, mode: str) -> Iterator[None]:
        global _active_outputs
        before, _active_outputs, self.mode = _active_outputs, self, mode
        try:
            yield
        finally:
            _active_outputs, self.mode = before, None


_active_outputs: _MatmulOutputs | None = None


#: Sequence length up to which the ``auto`` checkpointing policy keeps matmul outputs. Beyond it attention, which
#: is recomputed anyway and grows with the square of the length, dominates the recomputation: at 2,048 tokens
#: keeping the outputs saved 5% of the step for 1.5 GB more memory (SmolLM2-135M, fp32; benchmarks/RESULTS.md).
AUTO_KEEP_MAX_SEQ_LEN = 1024


def keep_matmul_outputs(
    max_seq_len: int | None = None,
) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """A selective activation-checkpointing policy: the ``context_fn`` of ``torch.utils.checkpoint.checkpoint``
    (non-reentrant), also given by :func:`fourbit.train.prepare.prepare_model_for_training`.

    Plain checkpointing recomputes a whole decoder layer in backward, its matmuls included, which costs about a
    third of the step. Under this policy the forward pass keeps the output of every LoRA layer of the segment
    (``[tokens, out]`` in the compute dtype, and ``h · A^T``), and the recomputation takes them back instead of
    dequantizing and multiplying again: only the cheap parts (norms, rotary embeddings, activation functions,
    attention) run twice. It keeps about ``(q + k + v + o + gate + up + down widths) × tokens`` values per layer
    (for SmolLM2-135M, 5,184 × tokens × 2 bytes in bf16) on top of plain checkpointing, still far below no
    checkpointing.

    Args:
        max_seq_len: keep outputs only for sequences of at most this many tokens (None: any length); longer
            ones are recomputed in full (bind it with ``functools.partial`` to make a ``context_fn``).

    Returns:
        (forward context, recomputation context), sharing what the forward kept.
    """
    outputs = _MatmulOutputs(max_seq_len)
    return outputs.recording(), outputs.replaying()


def _dense_weight(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The base layer's weight ``[out, in]`` in ``dtype``: a 4-bit one dequantized (a fresh tensor each call,
    never kept), a plain one cast (a view when the dtype already matches)."""
    if is_linear_4bit(base):
        return base.dequantize(dtype).view(base.out_features, base.in_features)
    weight = base.weight.t() if is_conv1d(base) else base.weight
    return weight.to(dtype)


class _LoRAMatMul(torch.autograd.Function):
    """QLoRA's layer (Eq. 5) as one autograd node, for training:

        y = x · W^T + b + (h · A^T) · (s B)^T          (h = x, or dropout(x))
        dL/dx = g · W [+ (g · sB) · A when h is x]     dL/dh = (g · sB) · A
        dL/dA = (g · sB)^T · h                          dL/dB = s · g^T · (h · A^T)

    with every matmul in the compute dtype ``dtype``. The low-rank product is added into the base output by
    ``addmm`` (no separate pass over ``[tokens, out]`` for the update or its scaling) and in backward the
    low-rank input gradient into the base one likewise. It saves ``h`` (the base's input: nothing extra without
    dropout), ``h · A^T`` (``[tokens, r]``) and nothing of W: a 4-bit W is dequantized again in backward
    (QLoRA, section 3: the gradient flows through the frozen 4-bit weight, no 16-bit copy is stored).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, h: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                base: nn.Module, scaling: float, dtype: torch.dtype) -> torch.Tensor:
        shape = x.shape
        xc = x.to(dtype)
        x2 = xc.reshape(-1, shape[-1])
        h2 = x2 if h is x else h.reshape(-1, shape[-1]).to(dtype)
        a = lora_a.to(dtype)
        b = (lora_b * scaling).to(dtype)
        kept = _active_outputs
        out = None
        if kept is not None and kept.mode == "replay" and kept.kept:
            out, xa, version = kept.kept.popleft()
            if out._version != version or out.shape[:-1] != shape[:-1]:
                out = None  # changed in place by the model since, or another input: recompute
        if out is None:
            # computed in x's own shape, so that the output is not a view (models may add to it in place)
            out = torch.nn.functional.linear(xc, _dense_weight(base, dtype),
                                             None if base.bias is None else base.bias.to(dtype))
            xa = h2 @ a.t()
            out.view(-1, out.shape[-1]).addmm_(xa, b.t())
            if kept is not None and kept.mode == "record" and kept.keeps(x):
                # detached aliases (same storage and version counter, no autograd identity of their own)
                kept.kept.append((out.detach(), xa.detach(), out._version))
        ctx.base, ctx.scaling, ctx.dtype, ctx.same_input = base, scaling, dtype, h is x
        ctx.shapes = (shape, h.shape)
        ctx.save_for_backward(h2, xa, a, b)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        h2, xa, a, b = ctx.saved_tensors
        x_shape, h_shape = ctx.shapes
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(ctx.dtype)
        gb = g @ b  # [tokens, r]: the gradient at the low-rank bottleneck
        grad_x = grad_h = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ _dense_weight(ctx.base, ctx.dtype)
            if ctx.same_input:
                grad_x.addmm_(gb, a)
            grad_x = grad_x.view(x_shape)
        if ctx.needs_input_grad[1] and not ctx.same_input:
            grad_h = (gb @ a).view(h_shape)
        if ctx.needs_input_grad[2]:
            grad_a = gb.t() @ h2
        if ctx.needs_input_grad[3]:
            grad_b = (xa.t() @ g).t().contiguous() * ctx.scaling  # 2x faster than g^T @ xa in BLAS, same sums
        return grad_x, grad_h, grad_a, grad_b, None, None, None


@dataclass(frozen=True)
class LoRASpec:
    """What to inject. Defaults are the QLoRA paper's (r=64, alpha=16, dropout 0.1 for models up to 13B).

    Args:
        r: adapter rank (> 0).
        alpha: scaling numerator; the update is scaled by ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).
        dropout: dropout probability on the adapter input, in [0, 1).
        target_modules: ``"all-linear"`` (every linear but the output head, as the paper does), a regex
            matched against the full module name (peft semantics), or a sequence of names each matching
            a module whose dotted path equals it or ends with ``"." + name``.
        use_rslora: scale by ``alpha / sqrt(r)`` (Kalajdzievski 2023) instead of ``alpha / r``.
        modules_to_save: extra modules (e.g. a classification ``score`` head) that are trained in full and
            saved with the adapter; never wrapped by LoRA.
    """

    r: int = 64
    alpha: float = 16.0
    dropout: float = 0.1
    target_modules: str | tuple[str, ...] = ALL_LINEAR
    use_rslora: bool = False
    modules_to_save: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise FieldError("r", f"the LoRA rank must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise FieldError("alpha", f"must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise FieldError("dropout", f"must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
            if not self.target_modules:
                raise FieldError("target_modules", "is empty: give module names or 'all-linear'")
        object.__setattr__(self, "modules_to_save", tuple(self.modules_to_save))


class LoRALinear(nn.Module):
    """``y = base(x) + scaling · lora_B(lora_A(dropout(x)))`` with a frozen ``base``.

    ``lora_A`` is initialised like peft (Kaiming-uniform with ``a = sqrt(5)``, i.e. ``nn.Linear``'s default)
    and ``lora_B`` with zeros, so a fresh adapter leaves the model's output unchanged.

    Args:
        base: the frozen layer: ``nn.Linear``, transformers' ``Conv1D`` (GPT-2; weight ``[in, out]``, peft's
            ``fan_in_fan_out=True``) or ``Linear4bit``.
        r: rank; ``lora_A`` is ``[r, in_features]`` and ``lora_B`` is ``[out_features, r]``.
        alpha: scaling numerator.
        dropout: dropout probability applied to the adapter's input only.
        use_rslora: scale by ``alpha / sqrt(r)`` instead of ``alpha / r``.
        dtype: dtype of the adapter weights (float32 by default: the adapters are tiny and fp32 keeps
            the optimizer update exact; the forward casts the input to it).

    Shapes:
        x: ``[..., in_features]`` -> ``[..., out_features]`` in the base output's dtype.
    """

    def __init__(
        self,
        base: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        *,
        use_rslora: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if not is_linear_like(base):
            raise TypeError(f"LoRALinear base must be nn.Linear, Conv1D or Linear4bit, got {type(base).__name__}")
        if r <= 0:
            raise FieldError("r", f"the LoRA rank must be > 0, got {r}")
        self.base = base
        self.in_features, self.out_features = _features(base)
        # peft's fan_in_fan_out: the base stores its weight [in, out] (Conv1D), so merging adds the update
        # transposed. A 4-bit layer quantized from a Conv1D stores [out, in] like every 4-bit layer.
        self.fan_in_fan_out = is_conv1d(base)
        self.r = int(r)
        self.alpha = float(alpha)
        self.use_rslora = bool(use_rslora)
        self.scaling = self.alpha / (math.sqrt(self.r) if use_rslora else self.r)
        device = next((p.device for p in base.parameters()), torch.device("cpu"))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, self.r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(self.r, self.out_features, bias=False, device=device, dtype=dtype)
        self.reset_lora_parameters()
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.merged = False
        self._set_unmerged_base(None)

    def _set_unmerged_base(self, base: nn.Module | None) -> None:
        # The 4-bit layer a merge replaced, kept for an exact ``unmerge``. A plain attribute, not a submodule:
        # a merged model's state dict holds the merged weight only, never the old 4-bit base beside it.
        object.__setattr__(self, "_unmerged_base", base)

    def reset_lora_parameters(self) -> None:
        """peft's init: A ~ Kaiming-uniform(a=sqrt(5)), B = 0 (so the initial update B·A is zero)."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def is_4bit(self) -> bool:
        """True when the (unmerged) base is a 4-bit layer."""
        return is_linear_4bit(self._unmerged_base if self._unmerged_base is not None else self.base)

    def delta_weight(self) -> torch.Tensor:
        """The low-rank update ``scaling · B @ A`` in float32, shape ``[out_features, in_features]``."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            if self._unmerged_base is not None:  # 16-bit layer merged from a 4-bit base
                return self.base(x.to(self.base.weight.dtype)).to(x.dtype)
            return self.base(x)
        dtype = self._fused_dtype(x)
        if dtype is not None:
            h = self.lora_dropout(x)
            out = _LoRAMatMul.apply(x, h, self.lora_A.weight, self.lora_B.weight, self.base, self.scaling, dtype)
            return out if torch.is_autocast_enabled(x.device.type) else out.to(x.dtype)
        y = self.base(x)
        a = self.lora_A.weight
        # Under autocast the adapter matmuls run in the autocast dtype; otherwise cast x to the adapter dtype.
        h = self.lora_dropout(x if torch.is_autocast_enabled(x.device.type) else x.to(a.dtype))
        update = self.lora_B(self.lora_A(h)) * self.scaling
        return y + update.to(y.dtype)

    def _fused_dtype(self, x: torch.Tensor) -> torch.dtype | None:
        """The compute dtype of the fused training path for ``x``, or None for the plain path: fused when
        autograd records (training) and the base is unmerged; the dtype is the autocast dtype under autocast
        (as ``nn.Linear`` would compute), else ``x``'s dtype when the adapters (and a 4-bit base's compute
        dtype) have it too. Mixed dtypes without autocast keep the plain path's per-part dtypes."""
        if not (fused.enabled() and torch.is_grad_enabled() and not self.merged and x.is_floating_point()
                and (x.requires_grad or self.lora_A.weight.requires_grad)):
            return None
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        same = x.dtype == self.lora_A.weight.dtype
        if is_linear_4bit(self.base):
            same = same and self.base.compute_dtype == x.dtype
        return x.dtype if same else None

    @torch.no_grad()
    def merge(self, *, safe: bool = True, dtype: torch.dtype = torch.bfloat16) -> None:
        """Fold the update into the base weight so that ``forward`` is one matmul.

        For an ``nn.Linear`` base the weight is updated in place (``unmerge`` subtracts it again, exact up
        to float rounding). For a 4-bit base the update cannot go into the 4 bits without re-quantizing
        (which rounds the small update away and loses quality), so the base is dequantized to ``dtype``
        and replaced by a 16-bit ``nn.Linear`` holding ``W + scaling·B·A``; the 4-bit layer is kept and
        ``unmerge`` restores it exactly.

        Args:
            safe: check the merged weight for NaN/Inf before committing it (like peft's ``safe_merge``).
            dtype: dtype of the merged layer for a 4-bit base.

        Raises:
            ValueError: if ``safe`` and the merged weight is not finite.
        """
        if self.merged:
            return
        delta = self.delta_weight()
        if is_linear_4bit(self.base):
            w = self.base.dequantize(torch.float32) + delta
            if safe and not torch.isfinite(w).all():
                raise ValueError("merging the adapter gave NaN/Inf weights; the adapter is broken")
            merged = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None,
                               device=w.device, dtype=dtype)
            merged.weight.copy_(w.to(dtype))
            if self.base.bias is not None:
                merged.bias.copy_(self.base.bias.to(dtype))
            merged.requires_grad_(False)
            self._set_unmerged_base(self.base)
            self.base = merged
        else:
            w = self.base.weight.data
            new = w.float() + (delta.t() if self.fan_in_fan_out else delta)
            if safe and not torch.isfinite(new).all():
                raise ValueError("merging the adapter gave NaN/Inf weights; the adapter is broken")
            w.copy_(new.to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`: restore the 4-bit base, or subtract the update from a plain weight."""
        if not self.merged:
            return
        if self._unmerged_base is not None:
            # the held layer is outside the module tree, so .to(device) did not move it: follow the merged one
            device = self.base.weight.device
            self.base = self._unmerged_base.to(device)
            self._set_unmerged_base(None)
        else:
            w = self.base.weight.data
            delta = self.delta_weight()
            w.copy_((w.float() - (delta.t() if self.fan_in_fan_out else delta)).to(w.dtype))
        self.merged = False

    def merged_linear(self, dtype: torch.dtype | None = None) -> nn.Module:
        """A standalone layer computing base + update (the base is dequantized if 4-bit).

        It has the base's original class (:func:`dequantized_layer`): ``nn.Linear``, or ``Conv1D`` for a
        GPT-2-style layer (also when its base is 4-bit), so a merged model saves in its architecture's layout.

        Args:
            dtype: dtype of the result; default the base weight's dtype, bfloat16 for a 4-bit base.
        """
        base = self._unmerged_base if self._unmerged_base is not None else self.base
        dtype = dtype or (torch.bfloat16 if is_linear_4bit(base) else base.weight.dtype)
        delta = None if (self.merged and self._unmerged_base is None) else self.delta_weight()
        return dequantized_layer(base, dtype, delta)

    def extra_repr(self) -> str:
        fifo = ", fan_in_fan_out=True" if self.fan_in_fan_out else ""
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}, merged={self.merged}{fifo}"


def _matches(name: str, targets: str | Sequence[str]) -> bool:
    """peft's matching rule: a regex fullmatch for a string, else equal-or-suffix (``.name``) for a list."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _is_saved_module(name: str, modules_to_save: Sequence[str]) -> bool:
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in modules_to_save)


def find_target_modules(
    model: nn.Module, target_modules: str | Sequence[str], modules_to_save: Sequence[str] = ()
) -> list[str]:
    """Names of the linear modules that ``target_modules`` selects.

    ``"all-linear"`` means every ``nn.Linear``/``Linear4bit`` except the output embedding (``lm_head``),
    as in the QLoRA paper, and except ``modules_to_save``.

    Raises:
        ValueError: if nothing matches, or a named target matches a module that is not linear.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inside_lora = tuple(n + "." for n, m in model.named_modules() if isinstance(m, LoRALinear))
    names: list[str] = []
    for name, module in model.named_modules():
        if not name or isinstance(module, LoRALinear) or _is_saved_module(name, modules_to_save):
            continue
        if inside_lora and name.startswith(inside_lora):
            continue
        if target_modules == ALL_LINEAR:
            if is_linear_like(module) and module is not head and name.split(".")[-1] != "lm_head":
                names.append(name)
        elif _matches(name, target_modules):
            if not is_linear_like(module):
                raise FieldError(
                    "target_modules", f"module {name!r} is a {type(module).__name__}; LoRA wraps only "
                    "nn.Linear/Conv1D/Linear4bit"
                )
            names.append(name)
    if not names:
        asked = target_modules if isinstance(target_modules, str) else ",".join(target_modules)
        have = dict.fromkeys(n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and not n.startswith(inside_lora)
                             and (isinstance(m, LoRALinear) or is_linear_like(m)))
        raise FieldError("target_modules", f"{asked!r} matched no linear module of {type(model).__name__} (its linear "
                                           f"modules: {', '.join(have) or 'none'})")
    return names


def inject_lora(model: nn.Module, spec: LoRASpec) -> list[str]:
    """Swap the selected linear layers of ``model`` for :class:`LoRALinear` in place and freeze the rest.

    Args:
        model: any torch model (e.g. an unmodified ``transformers`` model, quantized or not).
        spec: what to inject.

    Returns:
        The dotted names of the wrapped modules.

    Raises:
        ValueError: if the model already has LoRA layers or nothing matches ``spec.target_modules``.
    """
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("model already has LoRA layers; merge_and_unload() it first")
    names = find_target_modules(model, spec.target_modules, spec.modules_to_save)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        base = model.get_submodule(name)
        model.set_submodule(name, LoRALinear(base, spec.r, spec.alpha, spec.dropout, use_rslora=spec.use_rslora))
    for m in spec.modules_to_save:
        found = [n for n, _ in model.named_modules() if n == m or n.endswith("." + m)]
        if not found:
            raise FieldError("modules_to_save", f"entry {m!r} matched no module of {type(model).__name__}")
        for n in found:
            model.get_submodule(n).requires_grad_(True)
    fourbit_info(model).lora_spec = spec
    return names


def lora_spec(model: nn.Module) -> LoRASpec | None:
    """The :class:`LoRASpec` that :func:`inject_lora` applied to ``model`` (None if none), from
    ``fourbit_info(model)`` (:mod:`fourbit.nn.info`)."""
    return fourbit_info(model).lora_spec


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRA layers by dotted name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def mark_only_lora_trainable(model: nn.Module, modules_to_save: Iterable[str] = ()) -> None:
    """Freeze everything but the LoRA A/B weights and the named ``modules_to_save``."""
    saved = tuple(modules_to_save)
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_A." in name or ".lora_B." in name or _is_saved_module(name, saved))


def _logical_numel(module: nn.Module, name: str, p: torch.Tensor) -> int:
    if name == "weight" and is_linear_4bit(module):
        return int(module.in_features) * int(module.out_features)
    return p.numel()


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a 4-bit weight counts as ``in × out``, not its packed bytes."""
    trainable = total = 0
    seen: set[int] = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:  # tied weights (embeddings = lm_head) count once, as in peft
                continue
            seen.add(id(p))
            n = _logical_numel(module, name, p)
            total += n
            if p.requires_grad:
                trainable += n
    return trainable, total


def trainable_parameters_report(model: nn.Module) -> str:
    """peft's one-line report: ``trainable params: X || all params: Y || trainable%: Z``."""
    trainable, total = trainable_parameters(model)
    pct = 100.0 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}"


def merge_and_unload(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every :class:`LoRALinear` with a plain ``nn.Linear`` holding ``W + scaling·B·A``.

    A 4-bit base is dequantized first, so the result is a 16/32-bit layer: merging back into 4 bits would
    re-quantize and round most of the small update away (QLoRA's adapters are meant to stay separate, or to
    be merged into a 16-bit copy of the model).

    Args:
        model: a model with LoRA layers (modified in place and returned).
        dtype: dtype of the merged layers; default the dtype of the model's input embeddings (so the merged
            layers take the activations the rest of the model produces), else the base's dtype. Pass
            ``torch.bfloat16`` (and cast the model) for a 16-bit checkpoint.

    Returns:
        ``model`` without LoRA layers.
    """
    if dtype is None and hasattr(model, "get_input_embeddings") and model.get_input_embeddings() is not None:
        dtype = model.get_input_embeddings().weight.dtype
    for name, m in list(lora_modules(model).items()):
        model.set_submodule(name, m.merged_linear(dtype))
    fourbit_info(model).lora_spec = None
    return model


def unload_lora(model: nn.Module) -> nn.Module:
    """Remove every :class:`LoRALinear`, putting its untouched base layer (4-bit or not) back in place.

    The opposite of :func:`inject_lora` (peft's ``unload``): the adapters are dropped, not merged, so the
    model computes exactly what it computed before injection. Save the adapter first to keep it.
    """
    for name, m in list(lora_modules(model).items()):
        if m.merged:
            m.unmerge()
        model.set_submodule(name, m.base)
    fourbit_info(model).lora_spec = None
    return model
