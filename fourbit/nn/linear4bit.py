"""Linear4bit: a frozen linear layer whose weight is stored in 4 bits (NF4/FP4/INT4, optional double quant).

QLoRA, eq. 5: Y = X · doubleDequant(c1, c2, W^NF4) + X L1 L2; this module is the first term. The forward pass
dequantizes the weight to the compute dtype and multiplies; the backward pass returns the gradient for the
input only, dequantizing again instead of keeping a 16-bit copy, so autograd saves nothing larger than the
packed weight (section 3: "we only compute dL/dX, not dL/dW").

The state dict uses bitsandbytes' keys (``weight``, ``weight.absmax``, ``weight.quant_map``,
``weight.nested_absmax``, ``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__nf4``), so modules
load from and save to bitsandbytes-format checkpoints.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from fourbit.kernels import dispatch
from fourbit.kernels.cpu_features import native_bf16
from fourbit.kernels.scales import OUTPUT_DTYPES, SMALL_BATCH_ROWS
from fourbit.quant import QuantState, dequantize_4bit, quantize_4bit

__all__ = ["Linear4bit", "COMPUTE_DTYPES", "INPUT_DTYPES", "SMALL_BATCH_ROWS", "parse_dtype",
           "resolve_compute_dtype", "warn_if_slow"]

COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
                  "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

_warned_slow: set[tuple[torch.dtype, str]] = set()  # (dtype, device type) pairs already decided


def warn_if_slow(dtype: torch.dtype, device: torch.device | str) -> bool:
    """Say once per process (per dtype and device type) that ``dtype`` will be slow on ``device``: bf16 or fp16
    on a CPU without native bf16 (no AVX512-BF16/AMX) runs through conversions at a fraction of fp32's speed
    (about 5x slower matmuls on AVX2-only CPUs). It still runs: this is advice, not an error.

    Returns:
        True when the warning was given by this call.
    """
    device = torch.device(device)
    if (dtype, device.type) in _warned_slow:  # decided once: Linear4bit.forward calls this on every step
        return False
    _warned_slow.add((dtype, device.type))
    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16) or native_bf16(device):
        return False
    name = str(dtype).removeprefix("torch.")
    warnings.warn(f"compute dtype {name} on this CPU is slow: it has no native bf16 instructions (AVX512-BF16 or "
                  f"AMX), so {name} matmuls run several times slower than float32; use compute_dtype 'fp32' "
                  "(or 'auto', which picks it here)", RuntimeWarning, stacklevel=3)
    return True


#: Input dtypes of ``Linear4bit.forward``: the compute dtypes, and float64 (computed in the compute dtype, or
#: in float64 on the reference kernels, and returned as float64).
INPUT_DTYPES = OUTPUT_DTYPES


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


class _MatMul4bit(torch.autograd.Function):
    """y = x · dequant(W)^T; grad_x = grad_y · dequant(W). Saves only the packed weight (and the small state)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, packed: torch.Tensor, state: QuantState,
                out_features: int, in_features: int) -> torch.Tensor:
        ctx.state = state
        ctx.save_for_backward(packed)
        weight = dequantize_4bit(packed, state, dtype=x.dtype).view(out_features, in_features)
        return torch.nn.functional.linear(x, weight)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (packed,) = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            weight = dequantize_4bit(packed, ctx.state, dtype=grad_output.dtype)
            grad_x = grad_output @ weight
        return grad_x, None, None, None, None


class Linear4bit(nn.Module):
    """A frozen linear layer with a 4-bit weight.

    Args:
        in_features, out_features: the layer's shape (weight is [out_features, in_features]).
        bias: whether the layer has a bias (kept in full precision, frozen).
        compute_dtype: dtype of the matmul: bf16 (fast on CPUs with AVX-512/AMX and on GPUs), fp16 or fp32.
        quant_type: "nf4", "fp4" or "int4".
        blocksize: absmax block size (QLoRA: 64).
        double_quant: 8-bit quantize the absmax constants (QLoRA: True).

    Shapes:
        input [..., in_features] -> output [..., out_features], in the input's dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        compute_dtype: str | torch.dtype = torch.bfloat16,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"in_features and out_features must be positive, got {in_features}, {out_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = parse_dtype(compute_dtype)
        # Quantize zeros so that a freshly built module is usable; from_linear / load_state_dict replace them.
        packed, state = quantize_4bit(torch.zeros(out_features, in_features, device=device), quant_type,
                                      blocksize, double_quant)
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.quant_state = state
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    # ----------------------------------------------------------------------------------------------- build
    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: str | torch.dtype | None = None,
    ) -> Linear4bit:
        """Quantize an ``nn.Linear`` (its weight is read, not modified).

        Args:
            compute_dtype: default: the linear layer's own dtype.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features = linear.in_features
        module.out_features = linear.out_features
        module.compute_dtype = parse_dtype(compute_dtype or linear.weight.dtype)
        packed, state = quantize_4bit(linear.weight.detach(), quant_type, blocksize, double_quant)
        module.weight = nn.Parameter(packed, requires_grad=False)
        module.quant_state = state
        module.bias = None
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return module

    @classmethod
    def _empty(cls, in_features: int, out_features: int, bias: bool, compute_dtype: torch.dtype) -> Linear4bit:
        """A shell to be filled by ``load_state_dict`` (no quantization work, no large allocation)."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features, module.out_features = in_features, out_features
        module.compute_dtype = compute_dtype
        module.weight = nn.Parameter(torch.empty(0, 1, dtype=torch.uint8), requires_grad=False)
        module.quant_state = QuantState(absmax=torch.empty(0), shape=torch.Size([out_features, in_features]))
        module.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        return module

    # -------------------------------------------------------------------------------------------- compute
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight in ``dtype`` (default the compute dtype; float64 allowed), shape [out_features, in_features]."""
        return dequantize_4bit(self.weight, self.quant_state, dtype or self.compute_dtype)

    def to_linear(self, dtype: torch.dtype = torch.float32) -> nn.Linear:
        """The dequantized layer: an ``nn.Linear`` of ``dtype`` on this layer's device, with the same bias.

        Its weight is :meth:`dequantize` (``dtype``) and its bias this layer's bias cast to ``dtype``; both are
        new tensors (changing them leaves this layer alone) and, as in any fresh ``nn.Linear``, trainable.

        Args:
            dtype: float32 (default), bfloat16, float16 or float64.

        Raises:
            TypeError: for any other dtype.
        """
        if dtype not in OUTPUT_DTYPES:
            raise TypeError(f"to_linear: dtype must be float32, bfloat16, float16 or float64, got {dtype}")
        weight = self.dequantize(dtype)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(weight.contiguous())
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().to(dtype=dtype, copy=True))
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W^T + bias`` with the 4-bit weight W, returned in ``x.dtype``.

        Without autograd and with at most :data:`SMALL_BATCH_ROWS` rows (decoding) the kernels compute in
        ``x.dtype`` (:func:`fourbit.kernels.dispatch.linear_4bit`: the fused 4-bit matmul with float32 sums where
        the backend takes ``x``, else the weight dequantized to ``x.dtype``); otherwise ``x`` is cast to the
        compute dtype and multiplied by the weight dequantized to it.

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
            # Decoding: the kernels' fused 4-bit matmul where it takes x (float32 sums), else dequantize to
            # x.dtype + matmul; no autograd bookkeeping either way.
            qs = self.quant_state
            out = dispatch.linear_4bit(x, self.weight, qs.block_scales(), qs.code, qs.blocksize, self.out_features,
                                       self.in_features)
        else:
            if self.compute_dtype is not torch.float32 and x.device.type == "cpu":
                warn_if_slow(self.compute_dtype, x.device)
            out = _MatMul4bit.apply(x.to(self.compute_dtype), self.weight, self.quant_state,
                                    self.out_features, self.in_features)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.to(input_dtype)

    # -------------------------------------------------------------------------------------------- sizes
    def quantized_bytes(self) -> int:
        """Bytes of the 4-bit weight and its quantization constants (codebooks excluded)."""
        return self.weight.numel() + self.quant_state.nbytes()

    def extra_repr(self) -> str:
        qs = self.quant_state
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={qs.quant_type}, blocksize={qs.blocksize}, double_quant={qs.nested}, "
                f"compute_dtype={str(self.compute_dtype).removeprefix('torch.')}")

    # ------------------------------------------------------------------------------- bitsandbytes format
    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        # Keep the quant state on the weight's device; never convert the packed bytes' dtype.
        self.quant_state.to(self.weight.device)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for key, value in self.quant_state.as_dict(packed=True).items():
            destination[prefix + "weight." + key] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        qs_prefix = prefix + "weight."
        qs_items = {k[len(qs_prefix):]: v for k, v in state_dict.items() if k.startswith(qs_prefix)}
        if prefix + "weight" in state_dict and qs_items:
            state = QuantState.from_dict(qs_items, device=self.weight.device)
            packed = state_dict[prefix + "weight"]
            if packed.dtype != torch.uint8:
                packed = packed.view(torch.uint8)
            if packed.numel() != (state.numel + 1) // 2 or tuple(state.shape) != (self.out_features,
                                                                                    self.in_features):
                error_msgs.append(
                    f"{prefix}weight: packed size {packed.numel()} / shape {tuple(state.shape)} does not fit a "
                    f"Linear4bit({self.in_features}, {self.out_features})"
                )
                return
            self.weight = nn.Parameter(packed.reshape(-1, 1).to(self.weight.device), requires_grad=False)
            self.quant_state = state
            for key in qs_items:
                state_dict.pop(qs_prefix + key)
            local = {prefix + "weight": self.weight}
            if self.bias is not None and prefix + "bias" in state_dict:
                with torch.no_grad():
                    self.bias.copy_(state_dict[prefix + "bias"])
                local[prefix + "bias"] = self.bias
            elif self.bias is not None:
                missing_keys.append(prefix + "bias")
            for key in list(state_dict):
                if key.startswith(prefix) and key not in local and "." not in key[len(prefix):]:
                    unexpected_keys.append(key)
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
