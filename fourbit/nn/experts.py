"""4-bit mixture-of-experts weights: :class:`Experts4bit` replaces transformers' fused experts module.

transformers keeps the experts of Mixtral, Qwen3-MoE, OLMoE (and others) as two fused 3-D parameters,
``gate_up_proj`` ``[experts, 2 * intermediate, hidden]`` and ``down_proj`` ``[experts, hidden, intermediate]``,
and its ``forward(hidden_states, top_k_index, top_k_weights)`` runs each routed expert as
``down(act(gate(x)) * up(x))``. :class:`Experts4bit` stores every expert matrix as its own NF4 (or FP4/INT4)
tensor with double-quantized constants -- exactly what :func:`fourbit.quant.quantize_4bit` gives for that
``[2I, H]`` or ``[H, I]`` matrix, a last partial block padded as the flat blockwise layout does -- and its
forward groups the tokens by expert and dequantizes only the experts the batch routes to (a grouped 4-bit
expert matmul). Each matmul is :class:`fourbit.nn.linear4bit.FrozenMatMul4bit`, as in
:class:`fourbit.nn.Linear4bit`: backward returns the input gradient only and reads the expert's packed weight
from the module again, so autograd keeps no copy of it. The float32 constants are held as their int32 bits,
like Linear4bit's, and saved as float32 values.

Saved format (fourbit's own: bitsandbytes has no format for 3-D expert weights). For each of ``gate_up_proj``
and ``down_proj`` the per-expert states are stacked along a leading expert axis, under the module's prefix:
``<w>`` (uint8 ``[E, ceil(n / 2)]``, n = elements of one expert matrix, codes packed as bitsandbytes packs
them), ``<w>_absmax`` (``[E, blocks]``: uint8 codes with double quantization, else float32),
``<w>_offset`` (float32 ``[E]``) and ``<w>_nested_absmax`` (float32 ``[E, ceil(blocks / 256)]``) with double
quantization, and the codebooks ``<w>_quant_map`` (``[16]``) and ``<w>_nested_quant_map`` (``[256]``). Row
``e`` of these tensors is, field for field, the bitsandbytes-style quant state of expert ``e`` (absmax, offset,
nested absmax), so a checkpoint round-trips exactly; the quant type, block size and double quantization are the
checkpoint's ``quantization_config``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fourbit.nn.linear4bit import FrozenMatMul4bit, _as_bits, _as_float
from fourbit.quant import QuantState, dequantize_4bit, quantize_4bit

__all__ = ["EXPERT_WEIGHTS", "Experts4bit", "is_fused_experts"]

#: the fused 3-D expert parameters, in the order of the computation
EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")
_NESTED_BLOCKSIZE = 256


def is_fused_experts(module: nn.Module) -> bool:
    """True for transformers' fused experts module (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``,
    ``act_fn``) in the layout fourbit's forward implements; biased or transposed variants are not matched
    (they stay in full precision and the quantization report names them)."""
    if isinstance(module, Experts4bit):
        return False
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter)):
        return False
    if gate_up.dim() != 3 or down.dim() != 3 or getattr(module, "is_transposed", False):
        return False
    if any(getattr(module, f"{w}_bias", None) is not None for w in EXPERT_WEIGHTS):
        return False
    e, two_i, h = gate_up.shape
    return tuple(down.shape) == (e, h, two_i // 2) and two_i % 2 == 0 and hasattr(module, "act_fn")


class _ExpertWeight:
    """One expert's matrix as a :class:`fourbit.nn.linear4bit.FrozenMatMul4bit` source: read from the module
    when the matmul needs it (forward and again in backward), never kept."""

    def __init__(self, experts: Experts4bit, name: str, index: int) -> None:
        self.experts, self.name, self.index = experts, name, index

    def frozen_weight(self, dtype: torch.dtype) -> torch.Tensor:
        e = self.experts
        return dequantize_4bit(getattr(e, self.name)[self.index], e.expert_state(self.name, self.index), dtype)


class Experts4bit(nn.Module):
    """Frozen 4-bit experts with transformers' fused-experts interface.

    Args:
        num_experts: E.
        hidden_dim: H.
        intermediate_dim: I (``gate_up_proj`` is ``[E, 2I, H]``, ``down_proj`` ``[E, H, I]``).
        act_fn: the activation between the two matmuls (the original module's ``act_fn``).
        compute_dtype: dtype of the matmuls.
        quant_type, blocksize, double_quant: as :func:`fourbit.quant.quantize_4bit`.
        dtype: dtype of the original weights (the default of :meth:`dequantize`).

    Shapes:
        ``forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]`` in the input's dtype.
    """

    quantized_matrices = EXPERT_WEIGHTS

    def __init__(
        self,
        num_experts: int,
        hidden_dim: int,
        intermediate_dim: int,
        act_fn: nn.Module,
        *,
        compute_dtype: torch.dtype = torch.float32,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden_dim, intermediate_dim
        self.act_fn = act_fn
        self.compute_dtype = compute_dtype
        self.quant_type, self.blocksize, self.double_quant, self.dtype = quant_type, blocksize, double_quant, dtype
        self._float_constants: set[str] = set()
        for name, shape in self.matrix_shapes().items():
            n = shape[0] * shape[1]
            blocks = -(-n // blocksize)
            self.register_parameter(name, nn.Parameter(torch.zeros(num_experts, (n + 1) // 2, dtype=torch.uint8),
                                                       requires_grad=False))
            constants = {"_absmax": torch.zeros(num_experts, blocks), "_quant_map": torch.zeros(16)}
            if double_quant:
                constants.update({"_offset": torch.zeros(num_experts),
                                  "_nested_absmax": torch.zeros(num_experts, -(-blocks // _NESTED_BLOCKSIZE)),
                                  "_nested_quant_map": torch.zeros(256)})
            for suffix, value in constants.items():
                if suffix == "_absmax" and double_quant:
                    self.register_buffer(name + suffix, value.to(torch.uint8))
                else:  # float32 held as its int32 bits: a dtype conversion of the model never rounds it
                    self.register_buffer(name + suffix, _as_bits(value))
                    self._float_constants.add(name + suffix)
        self._set_template(None)

    def _set_template(self, experts: nn.Module | None) -> None:
        # The original module with its weights on the meta device (no memory): what ``dequantized_module``
        # fills with float weights. A plain attribute, never a submodule (not in the state dict).
        if experts is not None:
            experts = copy.copy(experts)
            experts._parameters = {k: nn.Parameter(v.detach().to("meta"), requires_grad=False)
                                   for k, v in experts._parameters.items()}
            experts._modules = dict(experts._modules)
        object.__setattr__(self, "_template", experts)

    def dequantized_module(self, dtype: torch.dtype | None = None) -> nn.Module:
        """A float module of the original class (e.g. ``MixtralExperts``) holding the dequantized weights.

        Raises:
            NotImplementedError: this module was built empty, without the original module to copy.
        """
        if self._template is None:
            raise NotImplementedError("these 4-bit experts were not built from a transformers experts module; "
                                      "use dequantize() for the weights")
        module = copy.copy(self._template)
        module._parameters = {name: nn.Parameter(w, requires_grad=False)
                              for name, w in zip(EXPERT_WEIGHTS, self.dequantize(dtype), strict=True)}
        module._modules = dict(module._modules)
        return module

    def _constant(self, name: str) -> torch.Tensor:
        """A registered quantization constant as its values (float32 ones are viewed back from their bits)."""
        t = getattr(self, name)
        return _as_float(t) if name in self._float_constants else t

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in self._float_constants:  # the saved format holds the float32 values
            destination[prefix + name] = _as_float(destination[prefix + name])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for name in self._float_constants:
            key = prefix + name
            if key in state_dict and state_dict[key].is_floating_point():
                state_dict[key] = _as_bits(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def matrix_shapes(self) -> dict[str, tuple[int, int]]:
        """The shape of one expert's matrix, per fused weight."""
        return {"gate_up_proj": (2 * self.intermediate_dim, self.hidden_dim),
                "down_proj": (self.hidden_dim, self.intermediate_dim)}

    @classmethod
    def from_experts(
        cls,
        experts: nn.Module,
        *,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
    ) -> Experts4bit:
        """Quantize a fused experts module (read, not modified), one expert matrix at a time.

        Raises:
            ValueError: a weight holds NaN/Inf (naming the weight and the expert).
        """
        if not is_fused_experts(experts):
            raise TypeError(f"from_experts expects a fused experts module, got {type(experts).__name__}")
        e, two_i, h = experts.gate_up_proj.shape
        dtype = experts.gate_up_proj.dtype
        module = cls(e, h, two_i // 2, experts.act_fn, compute_dtype=compute_dtype or dtype, quant_type=quant_type,
                     blocksize=blocksize, double_quant=double_quant, dtype=dtype)
        module.to(experts.gate_up_proj.device)
        module._set_template(experts)
        with torch.no_grad():
            for name in EXPERT_WEIGHTS:
                weight = getattr(experts, name).detach()
                for i in range(e):
                    try:
                        packed, state = quantize_4bit(weight[i], quant_type, blocksize, double_quant)
                    except ValueError as err:
                        raise ValueError(f"{name}, expert {i}: {err}") from None
                    module._store(name, i, packed, state)
        return module

    def _store(self, name: str, i: int, packed: torch.Tensor, state: QuantState) -> None:
        getattr(self, name)[i].copy_(packed.view(-1))
        self._constant(f"{name}_absmax")[i].copy_(state.absmax)
        self._constant(f"{name}_quant_map").copy_(state.code)
        if self.double_quant:
            self._constant(f"{name}_offset")[i] = state.offset
            self._constant(f"{name}_nested_absmax")[i].copy_(state.state2.absmax)
            self._constant(f"{name}_nested_quant_map").copy_(state.state2.code)

    def expert_state(self, name: str, i: int) -> QuantState:
        """The :class:`QuantState` of expert ``i``'s ``name`` matrix (views of the stacked tensors)."""
        state2 = offset = None
        if self.double_quant:
            offset = self._constant(f"{name}_offset")[i]
            state2 = QuantState(absmax=self._constant(f"{name}_nested_absmax")[i], blocksize=_NESTED_BLOCKSIZE,
                                code=self._constant(f"{name}_nested_quant_map"), dtype=torch.float32)
        return QuantState(absmax=self._constant(f"{name}_absmax")[i], shape=torch.Size(self.matrix_shapes()[name]),
                          code=self._constant(f"{name}_quant_map"), blocksize=self.blocksize,
                          quant_type=self.quant_type, dtype=self.dtype, offset=offset, state2=state2)

    def dequantize(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gate_up_proj [E, 2I, H], down_proj [E, H, I])`` in ``dtype`` (default: the original dtype)."""
        return tuple(torch.stack([dequantize_4bit(getattr(self, name)[i], self.expert_state(name, i),
                                                  dtype or self.dtype) for i in range(self.num_experts)])
                     for name in EXPERT_WEIGHTS)

    def _matmul(self, x: torch.Tensor, name: str, i: int) -> torch.Tensor:
        return FrozenMatMul4bit.apply(x, _ExpertWeight(self, name, i))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        x = hidden_states.to(self.compute_dtype)
        top_k = top_k_index.shape[-1]
        flat = top_k_index.reshape(-1)
        # Group the (token, slot) pairs by expert: one matmul per routed expert, none for the others.
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts + 1)[: self.num_experts].tolist()
        tokens = order // top_k
        weights = top_k_weights.reshape(-1)[order]
        out = torch.zeros_like(x)
        start = 0
        for i, count in enumerate(counts):
            if count == 0:
                continue
            rows = slice(start, start + count)
            start += count
            gate, up = self._matmul(x[tokens[rows]], "gate_up_proj", i).chunk(2, dim=-1)
            y = self._matmul(self.act_fn(gate) * up, "down_proj", i)
            out = out.index_add(0, tokens[rows], y * weights[rows, None].to(y.dtype))
        return out.to(input_dtype)

    def quantized_params(self) -> int:
        """Elements of the original expert weights."""
        return self.num_experts * sum(a * b for a, b in self.matrix_shapes().values())

    def quant_state_bytes(self) -> int:
        """Bytes of the per-block constants (absmax codes or values, offsets, nested absmax)."""
        total = 0
        for name in EXPERT_WEIGHTS:
            for suffix in ("_absmax", "_offset", "_nested_absmax"):
                t = getattr(self, name + suffix, None)
                if t is not None:
                    total += t.numel() * t.element_size()
        return total

    def quantized_bytes(self) -> int:
        """Bytes of the packed codes and their constants (codebooks excluded)."""
        return sum(getattr(self, n).numel() for n in EXPERT_WEIGHTS) + self.quant_state_bytes()

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_dim={self.hidden_dim}, "
                f"intermediate_dim={self.intermediate_dim}, quant_type={self.quant_type}, "
                f"blocksize={self.blocksize}, double_quant={self.double_quant}, "
                f"compute_dtype={str(self.compute_dtype).removeprefix('torch.')}")
