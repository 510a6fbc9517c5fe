"""QuantState: everything needed to undo a blockwise quantization, with bitsandbytes' field names.

A state round-trips through a dict in bitsandbytes' serialized form, so that fourbit and bitsandbytes
checkpoints can be exchanged:

    weight.absmax, weight.quant_map, weight.nested_absmax, weight.nested_quant_map   (tensors)
    weight.quant_state.bitsandbytes__nf4   (uint8 tensor holding a JSON dict of the non-tensor fields)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch

from fourbit.kernels.scales import BlockScales

__all__ = ["QuantState", "pack_dict_to_tensor", "unpack_tensor_to_dict"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_PACKED_PREFIX = "quant_state.bitsandbytes__"


def pack_dict_to_tensor(source: dict[str, Any]) -> torch.Tensor:
    """JSON-encode ``source`` into a uint8 tensor (how bitsandbytes stores non-tensor state in safetensors)."""
    return torch.tensor(list(json.dumps(source).encode("utf-8")), dtype=torch.uint8)


def unpack_tensor_to_dict(tensor: torch.Tensor) -> dict[str, Any]:
    """Inverse of :func:`pack_dict_to_tensor`."""
    return json.loads(bytes(tensor.cpu().numpy()).decode("utf-8"))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str, key: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"quant state field {key!r} holds unsupported dtype {name!r}; expected one of {list(_DTYPES)}")
    return _DTYPES[name]


def _version(t: torch.Tensor) -> int | None:
    """The in-place modification counter of ``t``; None for inference tensors, which have none."""
    try:
        return t._version
    except RuntimeError:
        return None


@dataclass(eq=False)
class QuantState:
    """The state of a blockwise quantization (the fields of ``bitsandbytes.functional.QuantState``).

    Attributes:
        absmax: per-block scales, float32 [n_blocks]; uint8 [n_blocks] when double-quantized.
        shape: shape of the original tensor.
        code: the codebook, float32 [16] (4-bit) or [256] (8-bit).
        blocksize: elements per block.
        quant_type: "nf4", "fp4", "int4", or None for 8-bit blockwise states.
        dtype: dtype of the original tensor (the default output dtype of dequantization).
        offset: mean of the absmax values subtracted before double quantization (0-dim float32), or None.
        state2: the QuantState of the 8-bit quantized absmax (double quantization), or None.
    """

    absmax: torch.Tensor
    shape: torch.Size | tuple[int, ...] | None = None
    code: torch.Tensor | None = None
    blocksize: int | None = None
    quant_type: str | None = None
    dtype: torch.dtype | None = None
    offset: torch.Tensor | None = None
    state2: QuantState | None = field(default=None, repr=False)
    # (tensors the scales were built from, their versions, the BlockScales): see block_scales()
    _scales_cache: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def block_scales(self) -> BlockScales:
        """The kernels' description of this state's block scales (plain absmax, or the nested form).

        Built once and reused while the state's tensors are the same objects with no in-place change since
        (each call compares identities and ``Tensor._version``; decoding calls every layer once per token).

        Raises:
            ValueError: a 4-bit state without absmax, or a nested state without offset or codebook.
        """
        if self.nested:
            s2 = self.state2
            if self.offset is None or s2.code is None or s2.blocksize is None:
                raise ValueError("a double-quantized state needs offset, state2.code and state2.blocksize")
            sources = (self.absmax, s2.code, s2.absmax, self.offset)
        else:
            sources = (self.absmax,)
        versions = tuple(_version(t) for t in sources)
        cached = self._scales_cache
        if (cached is not None and None not in versions and len(cached[0]) == len(sources)
                and all(a is b for a, b in zip(cached[0], sources, strict=True)) and cached[1] == versions):
            return cached[2]
        if self.nested:
            scales = BlockScales(self.absmax, code2=s2.code, absmax2=s2.absmax, offset=self.offset,
                                 blocksize2=int(s2.blocksize))
        else:
            scales = BlockScales(self.absmax)
        self._scales_cache = (sources, versions, scales)
        return scales

    @property
    def nested(self) -> bool:
        """True when the absmax constants are themselves 8-bit quantized (double quantization)."""
        return self.state2 is not None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape or ():
            n *= int(s)
        return n

    def to(self, device: torch.device | str) -> QuantState:
        """Move every tensor of the state to ``device`` (in place; returns self)."""
        self.absmax = self.absmax.to(device)
        if self.code is not None:
            self.code = self.code.to(device)
        if self.offset is not None:
            self.offset = self.offset.to(device)
        if self.state2 is not None:
            self.state2.to(device)
        return self

    def nbytes(self) -> int:
        """Bytes held by the state's per-block tensors (absmax, nested absmax, offset; not the codebooks)."""
        total = self.absmax.numel() * self.absmax.element_size()
        if self.offset is not None:
            total += 4
        if self.state2 is not None:
            total += self.state2.nbytes()
        return total

    def as_dict(self, packed: bool = False) -> dict[str, Any]:
        """The state as bitsandbytes serializes it.

        Args:
            packed: if True, only tensors: the non-tensor fields are JSON-packed into one uint8 tensor under
                ``quant_state.bitsandbytes__<quant_type>``, ready for ``safetensors``.
        """
        out: dict[str, Any] = {
            "quant_type": self.quant_type,
            "absmax": self.absmax,
            "blocksize": self.blocksize,
            "quant_map": self.code,
            "dtype": _dtype_name(self.dtype),
            "shape": tuple(self.shape) if self.shape is not None else None,
        }
        if self.nested:
            out.update(
                {
                    "nested_absmax": self.state2.absmax,
                    "nested_blocksize": self.state2.blocksize,
                    "nested_quant_map": self.state2.code.clone(),
                    "nested_dtype": _dtype_name(self.state2.dtype),
                    "nested_offset": self.offset.item(),
                }
            )
        if not packed or self.quant_type is None:
            return out
        tensors = {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
        rest = {k: v for k, v in out.items() if not isinstance(v, torch.Tensor)}
        tensors[_PACKED_PREFIX + self.quant_type] = pack_dict_to_tensor(rest)
        return tensors

    @classmethod
    def from_dict(cls, qs_dict: dict[str, Any], device: torch.device | str = "cpu") -> QuantState:
        """Rebuild a state from :meth:`as_dict` output (packed or not; key prefixes such as ``weight.`` allowed).

        Raises:
            ValueError: when required keys are missing or hold unsupported values.
        """
        packed_keys = [k for k, v in qs_dict.items() if "quant_state" in k and isinstance(v, torch.Tensor)]
        items = {k: v for k, v in qs_dict.items() if k not in packed_keys}
        if not any(k.split(".")[-1] == "quant_type" for k in items):
            if len(packed_keys) != 1:
                raise ValueError(
                    "expected exactly one packed 'quant_state.bitsandbytes__<type>' entry or unpacked quant state "
                    f"fields, found keys {sorted(qs_dict)}"
                )
            items.update(unpack_tensor_to_dict(qs_dict[packed_keys[0]]))
        items = {k.split(".")[-1]: v for k, v in items.items()}
        missing = {"absmax", "quant_map", "blocksize", "dtype", "shape"} - set(items)
        if missing:
            raise ValueError(f"quant state is missing {sorted(missing)}")
        state2 = offset = None
        if "nested_absmax" in items:
            need = {"nested_blocksize", "nested_quant_map", "nested_dtype", "nested_offset"} - set(items)
            if need:
                raise ValueError(f"double-quantized state is missing {sorted(need)}")
            offset = torch.tensor(float(items["nested_offset"]), dtype=torch.float32, device=device)
            state2 = cls(
                absmax=items["nested_absmax"].to(device),
                blocksize=int(items["nested_blocksize"]),
                code=items["nested_quant_map"].to(device),
                dtype=_dtype_from_name(items["nested_dtype"], "nested_dtype"),
            )
        return cls(
            quant_type=items["quant_type"],
            absmax=items["absmax"].to(device),
            blocksize=int(items["blocksize"]),
            code=items["quant_map"].to(device),
            dtype=_dtype_from_name(items["dtype"], "dtype"),
            shape=torch.Size(items["shape"]) if items["shape"] is not None else None,
            offset=offset,
            state2=state2,
        )

    def equals(self, other: QuantState) -> bool:
        """Exact equality of every field and tensor (``torch.equal``), nested state included."""

        def same(a: Any, b: Any) -> bool:
            if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
                return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a.cpu(), b.cpu())
            return a == b

        fields = ("absmax", "code", "blocksize", "quant_type", "dtype", "offset")
        if not all(same(getattr(self, f), getattr(other, f)) for f in fields):
            return False
        if tuple(self.shape or ()) != tuple(other.shape or ()):
            return False
        if (self.state2 is None) != (other.state2 is None):
            return False
        return self.state2 is None or self.state2.equals(other.state2)
