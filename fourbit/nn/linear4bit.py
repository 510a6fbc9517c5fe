"""Linear4bit: a frozen linear layer whose weight is stored in 4 bits (NF4/FP4/INT4, optional double quant).

QLoRA, eq. 5: Y = X · doubleDequant(c1, c2, W^NF4) + X L1 L2; this module is the first term. The forward pass
dequantizes the weight to the compute dtype and multiplies; the backward pass returns the gradient for the
input only, dequantizing again instead of keeping a 16-bit copy (section 3: "we only compute dL/dX, not dL/dW").

Every tensor of the 4-bit weight is state the module registers, so ``.to()``, ``state_dict``,
``load_state_dict(assign=True)`` onto a meta-device skeleton and FSDP2 need no special case:

    weight            uint8 [ceil(n / 2), 1]   the packed codes (a frozen parameter: FSDP2 shards it)
    absmax            per-block scales: float32 [blocks], or uint8 8-bit codes with double quantization
    quant_map         the 4-bit codebook, float32 [16]
    nested_absmax     double quantization: scales of the 8-bit absmax codes, float32 [ceil(blocks / 256)]
    nested_quant_map  double quantization: the 8-bit codebook, float32 [256]
    nested_offset     double quantization: the mean subtracted from absmax, float32 []

The float32 constants are buffers holding their int32 bit patterns (``Tensor.view``, no copy): a dtype
conversion of the model (``model.to(torch.bfloat16)``, ``half()``) converts floating-point tensors only, so it
moves them with the device but never rounds them. :attr:`Linear4bit.quant_state` and the kernels' block scales
are derived from the buffers on demand.

The state dict uses bitsandbytes' keys (``weight``, ``weight.absmax``, ``weight.quant_map``,
``weight.nested_absmax``, ``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__nf4``), so modules
load from and save to bitsandbytes-format checkpoints byte for byte.
"""

from __future__ import annotations

import sys
import warnings

import torch
from torch import nn

from fourbit.kernels import dispatch
from fourbit.kernels.cpu_features import native_bf16
from fourbit.kernels.scales import OUTPUT_DTYPES, SMALL_BATCH_ROWS
from fourbit.quant import (
    QUANT_TYPES,
    QuantState,
    check_blocksize,
    dequantize_4bit,
    dynamic_map,
    get_code,
    quantize_4bit,
)
from fourbit.quant.blockwise import DOUBLE_QUANT_BLOCKSIZE

__all__ = ["Linear4bit", "COMPUTE_DTYPES", "FrozenMatMul4bit", "INPUT_DTYPES", "LAYOUTS", "SMALL_BATCH_ROWS",
           "float_layer", "frozen_weight", "is_conv1d", "parse_dtype", "resolve_compute_dtype", "warn_if_slow"]

COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
                  "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

#: The float layers a 4-bit layer converts back to: ``nn.Linear`` (weight ``[out, in]``) or transformers' GPT-2
#: ``Conv1D`` (weight ``[in, out]``). A 4-bit layer always stores ``[out, in]``; its ``layout`` says which class a
#: float copy of it (a merge, an export) must be, so that the model's checkpoints keep their layout.
LAYOUTS = ("linear", "conv1d")

#: Input dtypes of ``Linear4bit.forward``: the compute dtypes, and float64 (computed in the compute dtype, or
#: in float64 on the reference kernels, and returned as float64).
INPUT_DTYPES = OUTPUT_DTYPES

#: The registered quantization constants, in bitsandbytes' field order, and which of them hold float32 bits.
_CONSTANTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "nested_offset")


def _as_bits(t: torch.Tensor) -> torch.Tensor:
    """A float32 tensor's int32 bit pattern (a view when ``t`` is float32 already)."""
    return t.detach().to(torch.float32).contiguous().view(torch.int32)


def _as_float(bits: torch.Tensor) -> torch.Tensor:
    """The float32 values of an int32 bit pattern (a view: in-place changes and versions are shared)."""
    return bits.view(torch.float32)


def warn_if_slow(dtype: torch.dtype, device: torch.device | str) -> bool:
    """Say that ``dtype`` will be slow on ``device``: bf16 or fp16 on a CPU without native bf16 (no
    AVX512-BF16/AMX) runs through conversions at a fraction of fp32's speed (about 5x slower matmuls on
    AVX2-only CPUs). It still runs: this is advice, not an error. Called where a compute dtype is chosen (a
    layer is built or its dtype set), never per forward; Python's warning filter shows it once per call site.

    Returns:
        True when the warning was given by this call.
    """
    device = torch.device(device)
    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16) or native_bf16(device):
        return False
    name = str(dtype).removeprefix("torch.")
    warnings.warn(f"compute dtype {name} on this CPU is slow: it has no native bf16 instructions (AVX512-BF16 or "
                  f"AMX), so {name} matmuls run several times slower than float32; use compute_dtype 'fp32' "
                  "(or 'auto', which picks it here)", RuntimeWarning, stacklevel=3)
    return True


def parse_dtype(dtype: str | torch.dtype, name: str = "compute_dtype") -> torch.dtype:
    """Accept "bf16"/"fp16"/"fp32" (or torch names, or a torch.dtype) and return the torch.dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"{name} must be bf16, fp16 or fp32, got {dtype}")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in COMPUTE_DTYPES:
        raise ValueError(f"{name} must be one of bf16, fp16, fp32, got {dtype!r}")
    return COMPUTE_DTYPES[key]


def resolve_compute_dtype(spec: str | torch.dtype, device: torch.device | str | None = None,
                          name: str = "compute_dtype") -> torch.dtype:
    """The compute dtype for ``spec`` on ``device``: "auto" is bf16 where the device computes bf16 natively
    (:func:`fourbit.kernels.cpu_features.native_bf16`: CUDA with bf16 support, CPUs with AVX512-BF16 or AMX),
    else fp32; any other value goes through :func:`parse_dtype`.

    Raises:
        ValueError: naming ``name`` for an unknown dtype.
    """
    if isinstance(spec, str) and spec.strip().lower() == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    return parse_dtype(spec, name)


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (GPT-2 style: ``y = x @ W + b`` with ``W`` stored ``[in, out]``).

    Checked without importing transformers: a model holding a ``Conv1D`` has imported it already.
    """
    utils = sys.modules.get("transformers.pytorch_utils")
    return utils is not None and isinstance(module, utils.Conv1D)


def frozen_weight(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """A frozen linear-like layer's weight ``[out, in]`` in ``dtype``: a 4-bit one dequantized (a fresh tensor
    each call, never kept), a plain ``nn.Linear``/``Conv1D`` one cast (a view when the dtype matches); any other
    source answers through its own ``frozen_weight(dtype)``."""
    if isinstance(layer, Linear4bit):
        return layer.dequantize(dtype).view(layer.out_features, layer.in_features)
    if isinstance(layer, nn.Linear) or is_conv1d(layer):
        weight = layer.weight.t() if is_conv1d(layer) else layer.weight
        return weight.to(dtype)
    return layer.frozen_weight(dtype)  # another source of a frozen weight (one expert of Experts4bit)


class FrozenMatMul4bit(torch.autograd.Function):
    """The frozen 4-bit matmul: ``y = x · W^T``, ``dL/dx = g · W``, no gradient for W.

    ``source`` is a frozen linear layer or anything with ``frozen_weight(dtype) -> [out, in]`` (one expert of
    :class:`fourbit.nn.experts.Experts4bit`); W is :func:`frozen_weight` of it. W is read from it in forward and
    read again in backward, never saved: autograd keeps no copy of the weight, not even the packed one, and under
    FSDP2 backward uses whatever weight FSDP2 has gathered into the module by then (QLoRA, section 3).
    ``weight``, if given, is W already dequantized by the caller for another use in the same forward (DoRA's
    norm), so that forward does not dequantize twice; it is not kept either.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, source, weight: torch.Tensor | None = None) -> torch.Tensor:
        ctx.source = source
        w = frozen_weight(source, x.dtype) if weight is None else weight.to(x.dtype)
        return torch.nn.functional.linear(x, w)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_output @ frozen_weight(ctx.source, grad_output.dtype)
        return grad_x, None, None


class Linear4bit(nn.Module):
    """A frozen linear layer with a 4-bit weight.

    Args:
        in_features, out_features: the layer's shape (weight is [out_features, in_features]).
        bias: whether the layer has a bias (kept in full precision, frozen).
        compute_dtype: dtype of the matmul: bf16 (fast on CPUs with AVX-512/AMX and on GPUs), fp16 or fp32.
        quant_type: "nf4", "fp4" or "int4".
        blocksize: absmax block size (QLoRA: 64).
        double_quant: 8-bit quantize the absmax constants (QLoRA: True).
        device: where to allocate; ``"meta"`` builds a skeleton for ``load_state_dict(assign=True)``.
        layout: the float layer this one converts back to (:data:`LAYOUTS`).
        source_dtype: dtype of the original weight (bitsandbytes' ``dtype`` field, the default output dtype of
            :meth:`dequantize`).

    A new layer holds zero codes and scales (its output is the bias); :meth:`from_linear`, :meth:`from_weight`
    or ``load_state_dict`` fill it.

    Shapes:
        input [..., in_features] -> output [..., out_features], in the input's dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 compute_dtype: str | torch.dtype = torch.bfloat16, quant_type: str = "nf4", blocksize: int = 64,
                 double_quant: bool = True, device: torch.device | str | None = None, layout: str = "linear",
                 source_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"in_features and out_features must be positive, got {in_features}, {out_features}")
        if quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {', '.join(QUANT_TYPES)}, got {quant_type!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        check_blocksize(blocksize)
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = parse_dtype(compute_dtype)
        self.layout = layout
        self.quant_type, self.blocksize, self.source_dtype = quant_type, blocksize, source_dtype
        n = in_features * out_features
        blocks = -(-n // blocksize)
        self.weight = nn.Parameter(torch.zeros((n + 1) // 2, 1, dtype=torch.uint8, device=device),
                                   requires_grad=False)
        absmax = (torch.zeros(blocks, dtype=torch.uint8, device=device) if double_quant
                  else _as_bits(torch.zeros(blocks, device=device)))
        self.register_buffer("absmax", absmax, persistent=False)
        self.register_buffer("quant_map", _as_bits(get_code(quant_type).to(device)), persistent=False)
        self.nested_blocksize = DOUBLE_QUANT_BLOCKSIZE if double_quant else None
        nested = (torch.zeros(-(-blocks // DOUBLE_QUANT_BLOCKSIZE), device=device), dynamic_map().to(device),
                  torch.zeros((), device=device))
        for name, value in zip(_CONSTANTS[2:], nested, strict=True):
            self.register_buffer(name, _as_bits(value) if double_quant else None, persistent=False)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None
        warn_if_slow(self.compute_dtype, self.weight.device)

    # ----------------------------------------------------------------------------------------------- build
    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, *, quant_type: str = "nf4",
                    blocksize: int = 64, double_quant: bool = True, compute_dtype: str | torch.dtype | None = None,
                    layout: str = "linear") -> Linear4bit:
        """Quantize a float weight ``[out_features, in_features]`` (read, not modified) into a new layer.

        Args:
            bias: ``[out_features]``, copied (frozen).
            compute_dtype: default: the weight's own dtype.
            layout: the float layer this one converts back to (``weight`` is ``[out, in]`` either way).
        """
        out_features, in_features = weight.shape
        packed, state = quantize_4bit(weight.detach(), quant_type, blocksize, double_quant)
        module = cls(in_features, out_features, bias=bias is not None,
                     compute_dtype=compute_dtype or weight.dtype, quant_type=quant_type, blocksize=blocksize,
                     double_quant=double_quant, device="meta", layout=layout, source_dtype=weight.dtype)
        module.set_quantized(packed, state)
        if bias is not None:
            module.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        warn_if_slow(module.compute_dtype, module.weight.device)
        return module

    @classmethod
    def from_linear(cls, linear: nn.Module, *, quant_type: str = "nf4", blocksize: int = 64,
                    double_quant: bool = True, compute_dtype: str | torch.dtype | None = None) -> Linear4bit:
        """Quantize an ``nn.Linear`` or transformers' ``Conv1D`` (read, not modified); a ``Conv1D`` gives a
        layer of layout ``"conv1d"``.

        Args:
            compute_dtype: default: the layer's own dtype.
        """
        if not (isinstance(linear, nn.Linear) or is_conv1d(linear)):
            raise TypeError(f"from_linear expects an nn.Linear or Conv1D, got {type(linear).__name__}")
        conv = is_conv1d(linear)
        return cls.from_weight(linear.weight.t() if conv else linear.weight, linear.bias, quant_type=quant_type,
                               blocksize=blocksize, double_quant=double_quant, compute_dtype=compute_dtype,
                               layout="conv1d" if conv else "linear")

    @torch.no_grad()
    def set_quantized(self, packed: torch.Tensor, state: QuantState) -> None:
        """Install packed codes and their :class:`QuantState` (from :func:`fourbit.quant.quantize_4bit` or a
        checkpoint) as this layer's registered tensors, on their own device.

        Raises:
            ValueError: a state of another shape than ``[out_features, in_features]``, or a packed size that
                does not fit it.
        """
        if tuple(state.shape or ()) != (self.out_features, self.in_features) or \
                packed.numel() != (state.numel + 1) // 2:
            raise ValueError(f"packed size {packed.numel()} / shape {tuple(state.shape or ())} does not fit a "
                             f"Linear4bit({self.in_features}, {self.out_features})")
        if packed.dtype != torch.uint8:
            packed = packed.view(torch.uint8)
        self.weight = nn.Parameter(packed.reshape(-1, 1), requires_grad=False)
        self.quant_type, self.blocksize, self.source_dtype = state.quant_type, int(state.blocksize), state.dtype
        self.absmax = state.absmax if state.nested else _as_bits(state.absmax)
        self.quant_map = _as_bits(state.code)
        s2 = state.state2
        self.nested_blocksize = int(s2.blocksize) if s2 is not None else None
        self.nested_absmax = _as_bits(s2.absmax) if s2 is not None else None
        self.nested_quant_map = _as_bits(s2.code) if s2 is not None else None
        self.nested_offset = _as_bits(state.offset.reshape(())) if s2 is not None else None

    # ------------------------------------------------------------------------------------------------ state
    @property
    def quant_state(self) -> QuantState:
        """The :class:`QuantState` of the weight, derived from the registered buffers (views, no copies).

        Rebuilt only when a buffer was replaced (``.to()``, loading): decoding calls every layer once per token,
        and the state's block scales cache their kernel form while its tensors stay the same.
        """
        key = (*(self._buffers[n] for n in _CONSTANTS), self.quant_type, self.blocksize, self.nested_blocksize,
               self.source_dtype)
        cached = self.__dict__.get("_quant_state_cache")
        if cached is not None and len(cached[0]) == len(key) and all(
                a is b if isinstance(a, torch.Tensor) or a is None else a == b
                for a, b in zip(cached[0], key, strict=True)):
            return cached[1]
        state2 = offset = None
        if self.nested_absmax is not None:
            state2 = QuantState(absmax=_as_float(self.nested_absmax), blocksize=self.nested_blocksize,
                                code=_as_float(self.nested_quant_map), dtype=torch.float32)
            offset = _as_float(self.nested_offset)
        absmax = self.absmax if state2 is not None else _as_float(self.absmax)
        state = QuantState(absmax=absmax, shape=torch.Size([self.out_features, self.in_features]),
                           code=_as_float(self.quant_map), blocksize=self.blocksize, quant_type=self.quant_type,
                           dtype=self.source_dtype, offset=offset, state2=state2)
        self.__dict__["_quant_state_cache"] = (key, state)
        return state

    # -------------------------------------------------------------------------------------------- compute
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight in ``dtype`` (default the compute dtype; float64 allowed), shape [out_features, in_features]."""
        return dequantize_4bit(self.weight, self.quant_state, dtype or self.compute_dtype)

    def frozen_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight ``[out, in]`` in ``dtype``, for :class:`FrozenMatMul4bit`."""
        return self.dequantize(dtype).view(self.out_features, self.in_features)

    def to_float(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        """The dequantized layer, of this layer's layout (:func:`float_layer`)."""
        return float_layer(self, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W^T + bias`` with the 4-bit weight W, returned in ``x.dtype``.

        Without autograd and with at most :data:`SMALL_BATCH_ROWS` rows (decoding) the kernels compute in
        ``x.dtype`` (:func:`fourbit.kernels.dispatch.linear_4bit`: the fused 4-bit matmul with float32 sums where
        the backend takes ``x``, else the weight dequantized to ``x.dtype``); otherwise ``x`` is cast to the
        compute dtype and multiplied by the weight dequantized to it (:class:`FrozenMatMul4bit`).

        Args:
            x: [..., in_features] float32, bfloat16, float16 or float64.

        Raises:
            TypeError: ``x`` of another dtype (integers, complex, float8). ValueError: a wrong last dimension.
        """
        if not isinstance(x, torch.Tensor) or x.dtype not in INPUT_DTYPES:
            raise TypeError(f"Linear4bit takes float32, bfloat16, float16 or float64 inputs, got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"Linear4bit expects inputs with last dimension {self.in_features}, got {tuple(x.shape)}")
        input_dtype = x.dtype
        if x.numel() <= SMALL_BATCH_ROWS * self.in_features and not (torch.is_grad_enabled() and x.requires_grad):
            qs = self.quant_state
            out = dispatch.linear_4bit(x, self.weight, qs.block_scales(), qs.code, qs.blocksize, self.out_features,
                                       self.in_features)
        else:
            out = FrozenMatMul4bit.apply(x.to(self.compute_dtype), self)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.to(input_dtype)

    # -------------------------------------------------------------------------------------------- sizes
    def quantized_bytes(self) -> int:
        """Bytes of the 4-bit weight and its quantization constants (codebooks excluded)."""
        return self.weight.numel() + self.quant_state.nbytes()

    def extra_repr(self) -> str:
        layout = ", layout=conv1d" if self.layout != "linear" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={self.quant_type}, blocksize={self.blocksize}, "
                f"double_quant={self.nested_absmax is not None}, "
                f"compute_dtype={str(self.compute_dtype).removeprefix('torch.')}{layout}")

    # ------------------------------------------------------------------------------- bitsandbytes format
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for key, value in self.quant_state.as_dict(packed=True).items():
            destination[prefix + "weight." + key] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        qs_prefix = prefix + "weight."
        qs_items = {k[len(qs_prefix):]: v for k, v in state_dict.items() if k.startswith(qs_prefix)}
        if prefix + "weight" not in state_dict or not qs_items:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)
            return
        packed = state_dict[prefix + "weight"]
        # A meta skeleton takes the loaded tensors where they are; a real layer keeps its device.
        device = packed.device if self.weight.is_meta else self.weight.device
        try:
            self.set_quantized(packed.to(device), QuantState.from_dict(qs_items, device=device))
        except ValueError as err:
            error_msgs.append(f"{prefix}weight: {err}")
            return
        for key in qs_items:
            state_dict.pop(qs_prefix + key)
        local = {prefix + "weight"}
        if self.bias is not None and prefix + "bias" in state_dict:
            bias = state_dict[prefix + "bias"]
            if self.bias.is_meta or local_metadata.get("assign_to_params_buffers", False):
                self.bias = nn.Parameter(bias.to(device), requires_grad=False)
            else:
                with torch.no_grad():
                    self.bias.copy_(bias)
            local.add(prefix + "bias")
        elif self.bias is not None:
            missing_keys.append(prefix + "bias")
        for key in list(state_dict):
            if key.startswith(prefix) and key not in local and "." not in key[len(prefix):]:
                unexpected_keys.append(key)


def float_layer(module: nn.Module, dtype: torch.dtype = torch.float32,
                delta: torch.Tensor | None = None) -> nn.Module:
    """The one conversion to a float layer: a frozen copy of a linear-like layer (a 4-bit one dequantized) in
    ``dtype``, plus ``delta`` (``[out, in]``, e.g. a LoRA update ``s·B·A``) if given.

    The copy has the layer's layout: ``Conv1D`` (weight ``[in, out]``) for a ``Conv1D`` or a 4-bit layer of
    layout ``"conv1d"``, else ``nn.Linear`` (weight ``[out, in]``); the weight is summed in float32.

    Raises:
        TypeError: ``dtype`` is not a float dtype the layers take; ValueError: the result is not finite.
    """
    if dtype not in OUTPUT_DTYPES:
        raise TypeError(f"a float layer's dtype must be float32, bfloat16, float16 or float64, got {dtype}")
    work = torch.float64 if dtype == torch.float64 else torch.float32
    with torch.no_grad():
        w = frozen_weight(module, work)
        if delta is not None:  # in place on a dequantized weight, the fresh tensor of this call alone
            delta = delta.to(device=w.device, dtype=work)
            w = w.add_(delta) if isinstance(module, Linear4bit) else w + delta
        out_features, in_features = w.shape
        bias = module.bias
        if is_conv1d(module) or getattr(module, "layout", "linear") == "conv1d":
            from transformers.pytorch_utils import Conv1D

            new = Conv1D(out_features, in_features).to(device=w.device, dtype=dtype)
            new.weight.copy_(w.t())
            if bias is None:
                new.bias = None  # Conv1D always has one; keep the layer's own structure
        else:
            # no random initialization of a matrix about to be overwritten (it costs as much as the dequantization)
            new = torch.nn.utils.skip_init(nn.Linear, in_features, out_features, bias=bias is not None,
                                           device=w.device, dtype=dtype)
            new.weight.copy_(w)
        if bias is not None:
            new.bias.copy_(bias)
    return new.requires_grad_(False)
