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
import copy
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fourbit._errors import FieldError
from fourbit.nn import fused
from fourbit.nn.info import fourbit_info
from fourbit.nn.linear4bit import FrozenMatMul4bit, Linear4bit, float_layer, frozen_weight, is_conv1d
from fourbit.nn.lora_matmul import AUTO_KEEP_MAX_SEQ_LEN, LoRADropout, LoRAMatMul, keep_matmul_outputs

__all__ = [
    "LoRALinear",
    "LoRASpec",
    "find_target_modules",
    "AUTO_KEEP_MAX_SEQ_LEN",
    "adapters_disabled",
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
    """True for a frozen 4-bit linear layer (:class:`fourbit.nn.Linear4bit`)."""
    return isinstance(module, Linear4bit)


def is_linear_like(module: nn.Module) -> bool:
    """True for ``nn.Linear``, transformers' ``Conv1D`` and 4-bit linear layers: the layers LoRA wraps."""
    return isinstance(module, nn.Linear | Linear4bit) or is_conv1d(module)


def _features(base: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like layer."""
    if is_conv1d(base):
        return int(base.weight.shape[0]), int(base.weight.shape[1])
    return int(base.in_features), int(base.out_features)


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
        use_dora: weight-decomposed LoRA (DoRA, Liu et al. 2024): a trainable magnitude per output row times the
            direction ``W + s·B·A`` normalised per row.
    """

    r: int = 64
    alpha: float = 16.0
    dropout: float = 0.1
    target_modules: str | tuple[str, ...] = ALL_LINEAR
    use_rslora: bool = False
    modules_to_save: tuple[str, ...] = ()
    use_dora: bool = False

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
    """``y = base(x) + scaling · lora_B(lora_A(dropout(x)))`` with a frozen ``base``: the one LoRA layer.

    ``lora_A`` is initialised like peft (Kaiming-uniform with ``a = sqrt(5)``, i.e. ``nn.Linear``'s default)
    and ``lora_B`` with zeros, so a fresh adapter leaves the model's output unchanged.

    The adapter protocol: :meth:`adapter_params` names the trainable tensors (nothing finds them by name), and
    ``disabled`` (or :func:`adapters_disabled` for a whole model) switches the adapter off for a forward pass,
    giving the base model's output (the reference model of preference training).

    Mixed-adapter batches are a mode of the same layer (as peft's ``adapter_names``): :meth:`add_row_adapter`
    registers further adapters by index, and while ``rows`` holds one index per batch row (-1: none) each row
    gets ``base(x) + scaling_a · B_a(A_a(x))`` of its own adapter only. A layer built with ``r=0`` has no
    trainable adapter of its own and serves such batches only.

    Args:
        base: the frozen layer: ``nn.Linear``, transformers' ``Conv1D`` (GPT-2; weight ``[in, out]``, peft's
            ``fan_in_fan_out=True``) or ``Linear4bit``.
        r: rank; ``lora_A`` is ``[r, in_features]`` and ``lora_B`` is ``[out_features, r]``; 0 for none.
        alpha: scaling numerator.
        dropout: dropout probability applied to the adapter's input only.
        use_rslora: scale by ``alpha / sqrt(r)`` instead of ``alpha / r``.
        use_dora: DoRA (Liu et al. 2024, eq. 5): ``W' = m · (W + s·B·A) / ||W + s·B·A||_row`` with a trainable
            magnitude ``lora_magnitude_vector`` ``[out_features]``, initialised to the row norms of W.
        dtype: dtype of the adapter weights (float32 by default: the adapters are tiny and fp32 keeps
            the optimizer update exact; the forward casts the input to it).

    Shapes:
        x: ``[..., in_features]`` -> ``[..., out_features]`` in the base output's dtype.
    """

    def __init__(self, base: nn.Module, r: int, alpha: float = 1.0, dropout: float = 0.0, *,
                 use_rslora: bool = False, use_dora: bool = False, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if not is_linear_like(base):
            raise TypeError(f"LoRALinear base must be nn.Linear, Conv1D or Linear4bit, got {type(base).__name__}")
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise FieldError("r", f"the LoRA rank must be a positive integer, got {r!r}")
        self.base = base
        self.in_features, self.out_features = _features(base)
        # peft's fan_in_fan_out: the base stores its weight [in, out] (Conv1D), so merging adds the update
        # transposed. A 4-bit layer quantized from a Conv1D stores [out, in] like every 4-bit layer.
        self.fan_in_fan_out = is_conv1d(base)
        self.r, self.alpha, self.use_rslora = int(r), float(alpha), bool(use_rslora)
        self.scaling = self.alpha / (math.sqrt(self.r) if use_rslora else self.r) if r else 0.0
        device = next((p.device for p in base.parameters()), torch.device("cpu"))
        self.lora_dropout = LoRADropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype) if r else None
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype) if r else None
        if r:
            self.reset_lora_parameters()
        for p in self.base.parameters():
            p.requires_grad_(False)
        if use_dora and not r:
            raise FieldError("use_dora", "DoRA needs an adapter of rank > 0")
        self.use_dora = bool(use_dora)
        self.lora_magnitude_vector = None
        if use_dora:
            with torch.no_grad():  # ||W||² per row, kept: the frozen part of DoRA's norm (see _dora_norm)
                norm_sq = frozen_weight(base, torch.float32).square().sum(dim=1)
            self.register_buffer("dora_base_norm_sq", norm_sq, persistent=False)
            self.lora_magnitude_vector = nn.Parameter(norm_sq.sqrt().to(dtype))
        self.merged = False
        self.disabled = False
        self.rows: torch.Tensor | None = None
        self.row_scaling: dict[int, float] = {}
        self._set_unmerged_base(None)
        object.__setattr__(self, "_dora_merged_delta", None)

    def _set_unmerged_base(self, base: nn.Module | None) -> None:
        # The 4-bit layer a merge replaced, kept for an exact ``unmerge``. A plain attribute, not a submodule:
        # a merged model's state dict holds the merged weight only, never the old 4-bit base beside it.
        object.__setattr__(self, "_unmerged_base", base)

    def reset_lora_parameters(self) -> None:
        """peft's init: A ~ Kaiming-uniform(a=sqrt(5)), B = 0 (so the initial update B·A is zero)."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    # ------------------------------------------------------------------------------------ adapter protocol
    def adapter_params(self) -> dict[str, nn.Parameter]:
        """The adapter's trainable tensors by their name inside this layer (peft's key suffixes)."""
        if self.lora_A is None:
            return {}
        params = {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}
        if self.use_dora:
            params["lora_magnitude_vector"] = self.lora_magnitude_vector
        return params

    @property
    def is_4bit(self) -> bool:
        """True when the (unmerged) base is a 4-bit layer."""
        return is_linear_4bit(self._unmerged_base if self._unmerged_base is not None else self.base)

    def delta_weight(self) -> torch.Tensor:
        """What the adapter adds to the base weight, in float32, ``[out_features, in_features]``: ``s · B @ A``;
        with DoRA ``m / ||W + s·B·A||_row · (W + s·B·A) - W`` (the merged weight minus W)."""
        update = (self.lora_B.weight.float() @ self.lora_A.weight.float()).mul_(self.scaling)
        if not self.use_dora:
            return update
        if self.merged and self._unmerged_base is None:  # W holds the merge: the delta used then
            return self._dora_merged_delta
        with torch.no_grad():
            w = frozen_weight(self._unmerged_base if self._unmerged_base is not None else self.base, torch.float32)
            scale = self.lora_magnitude_vector.detach().float() / self._dora_norm(w)
            return scale[:, None] * (w + update) - w

    def _dora_norm(self, w: torch.Tensor) -> torch.Tensor:
        """DoRA's ``||W + s·B·A||`` per output row, float32 ``[out]``, from the dequantized W ``[out, in]``.

        Not recomputed from scratch: ``||W + sBA||² = ||W||² + 2s·Σ_k B_ik (W Aᵀ)_ik + s²·Σ_k (B AAᵀ)_ik B_ik``.
        ``||W||²`` of the frozen base is computed once (at injection); per step only ``W Aᵀ`` (``[out, r]``, a
        matmul by the thin A on the W the forward has dequantized anyway) and r×r products remain, and no second
        ``[out, in]`` matrix is formed. It is a constant for autograd (DoRA, section 4.3; peft detaches it too).
        """
        with torch.no_grad():
            a, b = self.lora_A.weight, self.lora_B.weight
            wa = (w @ a.t().to(w.dtype)).float()
            a, b = a.float(), b.float()
            s = self.scaling
            norm_sq = self.dora_base_norm_sq + 2 * s * (b * wa).sum(dim=1) + s * s * ((b @ (a @ a.t())) * b).sum(1)
            return norm_sq.clamp_min(0).sqrt()

    # ---------------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rows is not None:
            return self._forward_rows(x)
        if self.merged:
            if self.disabled:
                raise RuntimeError("a merged LoRA layer cannot switch its adapter off; unmerge it first")
            if self._unmerged_base is not None:  # 16-bit layer merged from a 4-bit base
                return self.base(x.to(self.base.weight.dtype)).to(x.dtype)
            return self.base(x)
        if self.disabled or self.lora_A is None:
            return self.base(x)
        if self.use_dora:
            return self._dora_forward(x)
        dtype = self._fused_dtype(x)
        if dtype is not None:
            p, seed = self.lora_dropout.draw() if isinstance(self.lora_dropout, LoRADropout) else (0.0, 0)
            out = LoRAMatMul.apply(x, self.lora_A.weight, self.lora_B.weight, self.base, self.scaling, dtype, p,
                                   seed)
            return out if torch.is_autocast_enabled(x.device.type) else out.to(x.dtype)
        y = self.base(x)
        a = self.lora_A.weight
        # Under autocast the adapter matmuls run in the autocast dtype; otherwise cast x to the adapter dtype.
        h = self.lora_dropout(x if torch.is_autocast_enabled(x.device.type) else x.to(a.dtype))
        update = self.lora_B(self.lora_A(h)) * self.scaling
        return y + update.to(y.dtype)

    def _dora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """DoRA (Liu et al. 2024, eq. 5): ``y = m/n ⊙ (W h + s·B A h) + (W (x - h)) + b`` with ``n`` the row norms of
        ``W + s·B·A`` (constant for autograd) and ``h`` the adapter's input (``x``, or dropout of it in training):
        peft's computation, ``base(x) + (m/n - 1) ⊙ W h + m/n ⊙ s·B A h``. W is dequantized once in forward (for
        the matmul and the norm) and once in backward, also with dropout, where ``x`` and ``h`` go through W as
        one stacked matmul; autograd keeps no copy of it."""
        base = self.base
        dtype = base.compute_dtype if is_linear_4bit(base) else base.weight.dtype
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        with torch.no_grad():
            w = frozen_weight(base, dtype)
            norm = self._dora_norm(w)
        scale = (self.lora_magnitude_vector.float() / norm).to(dtype)
        a = self.lora_A.weight
        h = self.lora_dropout(x)
        lora = (self.lora_B(self.lora_A(h.to(a.dtype))) * self.scaling).to(dtype)
        if h is not x:  # the direction term sees the dropped input, the base term the whole one (as peft)
            wx, wh = FrozenMatMul4bit.apply(torch.stack([x.to(dtype), h.to(dtype)]), base, w).unbind(0)
            y = wx + (scale - 1) * wh + scale * lora
        else:
            y = scale * (FrozenMatMul4bit.apply(x.to(dtype), base, w) + lora)
        del w
        if base.bias is not None:
            y = y + base.bias.to(dtype)
        return y.to(x.dtype)

    def _fused_dtype(self, x: torch.Tensor) -> torch.dtype | None:
        """The compute dtype of the fused training path for ``x``, or None for the plain path: fused when
        autograd records (training) and the base is unmerged; the dtype is the autocast dtype under autocast
        (as ``nn.Linear`` would compute), else ``x``'s dtype when the adapters (and a 4-bit base's compute
        dtype) have it too. Mixed dtypes without autocast keep the plain path's per-part dtypes."""
        if not (fused.enabled() and torch.is_grad_enabled() and x.is_floating_point()
                and (x.requires_grad or self.lora_A.weight.requires_grad)):
            return None
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        same = x.dtype == self.lora_A.weight.dtype
        if is_linear_4bit(self.base):
            same = same and self.base.compute_dtype == x.dtype
        return x.dtype if same else None

    # -------------------------------------------------------------------------------- mixed-adapter batches
    def add_row_adapter(self, index: int, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        """Register adapter ``index`` (``A [r, in]``, ``B [out, r]``, its scaling) for mixed batches; its
        tensors are buffers of this layer (they follow ``.to()``), outside the state dict.

        Raises:
            ValueError: shapes that do not fit this layer, or a negative index.
        """
        if index < 0:
            raise ValueError(f"adapter indices are >= 0 (-1 selects the base model), got {index}")
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != self.in_features or b.shape[0] != self.out_features \
                or a.shape[0] != b.shape[1]:
            raise ValueError(f"adapter shapes {tuple(a.shape)}/{tuple(b.shape)} do not fit "
                             f"[{self.out_features}, {self.in_features}]")
        self.register_buffer(f"row_A_{index}", a, persistent=False)
        self.register_buffer(f"row_B_{index}", b, persistent=False)
        self.row_scaling[index] = float(scaling)

    def remove_row_adapter(self, index: int) -> None:
        """Forget adapter ``index`` of the mixed-batch mode (nothing when it is not registered here)."""
        if self.row_scaling.pop(index, None) is not None:
            del self._buffers[f"row_A_{index}"], self._buffers[f"row_B_{index}"]

    def _forward_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Each batch row through the adapter ``rows`` names for it: the update is computed on that adapter's
        rows only and added onto the base output (``index_add``), so a row never sees another's adapter."""
        rows = self.rows
        y = self.base(x)
        if rows.shape[0] != x.shape[0]:
            raise RuntimeError(f"row adapters set for {rows.shape[0]} rows, batch has {x.shape[0]}")
        for index in torch.unique(rows).tolist():  # the adapters in this batch, not every one resident
            scaling = self.row_scaling.get(index)
            if scaling is None:  # the base model (-1), or an adapter that does not target this layer
                continue
            selected = (rows == index).nonzero().flatten()
            a, b = self._buffers[f"row_A_{index}"], self._buffers[f"row_B_{index}"]
            h = x.index_select(0, selected).to(a.dtype)
            update = (h @ a.t()) @ b.t() * scaling
            y = y.index_add(0, selected, update.to(y.dtype))
        return y

    # ------------------------------------------------------------------------------------------------ merge
    @torch.no_grad()
    def merge(self, *, safe: bool = True, dtype: torch.dtype = torch.bfloat16) -> None:
        """Fold the update into the base weight so that ``forward`` is one matmul.

        For an ``nn.Linear`` base the weight is updated in place (``unmerge`` subtracts it again, exact up
        to float rounding). For a 4-bit base the update cannot go into the 4 bits without re-quantizing
        (which rounds the small update away and loses quality), so the base is replaced by its float copy
        (:func:`fourbit.nn.linear4bit.float_layer`, ``dtype``) holding ``W + scaling·B·A``; the 4-bit layer is
        kept and ``unmerge`` restores it exactly.

        Args:
            safe: check the merged weight for NaN/Inf before committing it (like peft's ``safe_merge``).
            dtype: dtype of the merged layer for a 4-bit base.

        Raises:
            ValueError: if ``safe`` and the merged weight is not finite.
        """
        if self.merged or self.lora_A is None:
            return
        delta = self.delta_weight()
        if is_linear_4bit(self.base):
            merged = float_layer(self.base, dtype, delta)
            if safe and not torch.isfinite(merged.weight).all():
                raise ValueError("merging the adapter gave NaN/Inf weights; the adapter is broken")
            self._set_unmerged_base(self.base)
            self.base = merged
        else:
            w = self.base.weight.data
            new = w.float() + (delta.t() if self.fan_in_fan_out else delta)
            if safe and not torch.isfinite(new).all():
                raise ValueError("merging the adapter gave NaN/Inf weights; the adapter is broken")
            w.copy_(new.to(w.dtype))
            # DoRA's delta depends on W, which now holds the merge: unmerge subtracts the delta used here
            object.__setattr__(self, "_dora_merged_delta", delta if self.use_dora else None)
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
        """A standalone frozen layer computing base + update (:func:`fourbit.nn.linear4bit.float_layer`: the
        base dequantized if 4-bit, in its layout, ``nn.Linear`` or ``Conv1D``), so a merged model saves in its
        architecture's layout.

        Args:
            dtype: dtype of the result; default the base weight's dtype, bfloat16 for a 4-bit base.
        """
        base = self._unmerged_base if self._unmerged_base is not None else self.base
        dtype = dtype or (torch.bfloat16 if is_linear_4bit(base) else base.weight.dtype)
        no_delta = self.lora_A is None or (self.merged and self._unmerged_base is None)
        return float_layer(base, dtype, None if no_delta else self.delta_weight())

    def extra_repr(self) -> str:
        fifo = ", fan_in_fan_out=True" if self.fan_in_fan_out else ""
        rows = f", row_adapters={sorted(self.row_scaling)}" if self.row_scaling else ""
        dora = ", use_dora=True" if self.use_dora else ""
        return (f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}, merged={self.merged}{fifo}{dora}"
                f"{rows}")


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Inside the block every LoRA layer of ``model`` computes its base layer only (the model as it was before
    injection, without copying it): the reference model of DPO is the same 4-bit base with the adapter off.

    Raises:
        RuntimeError: a layer is merged (its update is inside the weight and cannot be switched off).
    """
    layers = list(lora_modules(model).values())
    if any(m.merged for m in layers):
        raise RuntimeError("a merged adapter cannot be switched off; unmerge it first")
    before = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield
    finally:
        for m, was in zip(layers, before, strict=True):
            m.disabled = was


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
        have = dict.fromkeys(n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                             if n and not n.startswith(inside_lora)
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
        model.set_submodule(name, LoRALinear(base, spec.r, spec.alpha, spec.dropout, use_rslora=spec.use_rslora,
                                             use_dora=spec.use_dora))
    for m in spec.modules_to_save:
        found = [n for n, _ in model.named_modules() if n == m or n.endswith("." + m)]
        if not found:
            raise FieldError("modules_to_save", f"entry {m!r} matched no module of {type(model).__name__}")
        for n in found:
            _untie_parameters(model, n)
            model.get_submodule(n).requires_grad_(True)
    fourbit_info(model).lora_spec = spec
    return names


def _untie_parameters(model: nn.Module, name: str) -> None:
    """Put a copy in place of module ``name`` when it shares parameters with another module (a head tied to the
    input embeddings), as peft's ``modules_to_save`` does: training the head then leaves the embeddings alone,
    and the adapter file holds the head under its own name."""
    own = {id(p) for p in model.get_submodule(name).parameters()}
    if any(id(p) in own for n, m in model.named_modules() if n != name and not n.startswith(name + ".")
           for p in m.parameters(recurse=False)):
        replace_with_copy(model, name)


def replace_with_copy(model: nn.Module, name: str) -> None:
    """Put a copy of module ``name`` in its place and record the original (``fourbit_info(model).replaced_modules``)
    for :func:`unload_lora` to put back; a module already replaced is left as it is."""
    replaced = fourbit_info(model).replaced_modules
    if name not in replaced:
        original = model.get_submodule(name)
        model.set_submodule(name, copy.deepcopy(original))
        replaced[name] = original


def lora_spec(model: nn.Module) -> LoRASpec | None:
    """The :class:`LoRASpec` that :func:`inject_lora` applied to ``model`` (None if none), from
    ``fourbit_info(model)`` (:mod:`fourbit.nn.info`)."""
    return fourbit_info(model).lora_spec


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRA layers by dotted name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def mark_only_lora_trainable(model: nn.Module, modules_to_save: Iterable[str] = ()) -> None:
    """Freeze everything but the adapters' tensors (:meth:`LoRALinear.adapter_params`) and the named
    ``modules_to_save``."""
    saved = tuple(modules_to_save)
    adapter = {id(p) for m in lora_modules(model).values() for p in m.adapter_params().values()}
    for name, p in model.named_parameters():
        p.requires_grad_(id(p) in adapter or _is_saved_module(name, saved))


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
    info = fourbit_info(model)
    info.lora_spec, info.replaced_modules = None, {}  # the adapter's modules_to_save stay: they are merged too
    _untie_config_if_untied(model)
    return model


def _untie_config_if_untied(model: nn.Module) -> None:
    """A trained head copied off tied embeddings stays its own: the config must say so, or saving the merged
    model (and loading it) would tie it back to the embeddings."""
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False) or not hasattr(model, "get_output_embeddings"):
        return
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and embeddings is not None and head.weight is not embeddings.weight:
        config.tie_word_embeddings = False


def unload_lora(model: nn.Module) -> nn.Module:
    """Remove every :class:`LoRALinear`, putting its untouched base layer (4-bit or not) back in place.

    The opposite of :func:`inject_lora` (peft's ``unload``): the adapters are dropped, not merged, so the
    model computes exactly what it computed before injection; modules a loaded adapter's ``modules_to_save``
    replaced get their originals back. Save the adapter first to keep it.
    """
    for name, m in list(lora_modules(model).items()):
        if m.merged:
            m.unmerge()
        m.rows = None
        model.set_submodule(name, m.base)
    info = fourbit_info(model)
    for name, original in info.replaced_modules.items():  # an adapter's modules_to_save: the originals back
        model.set_submodule(name, original)
    info.lora_spec, info.replaced_modules = None, {}
    return model
