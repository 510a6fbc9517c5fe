"""What every kernel needs to know about a tensor's block scales, and the constants the backends share.

The kernels do not see ``fourbit.quant.QuantState``: ``quant`` builds a :class:`BlockScales` from a state
(``state.block_scales()``) and every backend (reference, compiled CPU, Triton) takes it in the same argument
position and reads it the same way. A block's scale is either

* plain: ``absmax[b]`` (float32), or
* nested, double quantization (QLoRA section 3): ``code2[q[b]] * absmax2[b // blocksize2] + offset``, computed
  in float32 with two roundings (the product, then the sum), exactly as bitsandbytes computes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "BlockScales",
    "dequantize_absmax",
    "SMALL_BATCH_ROWS",
    "KERNEL_DTYPES",
    "OUTPUT_DTYPES",
    "check_output_dtype",
]

#: Inputs with at most this many rows (decoding, small batches) go through the fused 4-bit matmul of the
#: backend; larger ones dequantize the weight once and call the BLAS matmul, which is faster when each weight
#: element is reused many times. The one threshold for every backend and for ``Linear4bit``. 8: on an
#: AVX-512/AMX Xeon the compiled fused kernel (2048 x 2048, fp32) beats dequantize + matmul up to ~8-12 rows
#: and loses by 1.45x at 16 (the Triton kernel takes up to 16 rows; bitsandbytes fuses only 1 row on GPUs).
SMALL_BATCH_ROWS = 8

#: dtypes the compiled and Triton kernels read and write natively (float32 arithmetic inside).
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: dtypes a dequantization may produce: the kernel dtypes, and float64, which is the float32 result widened
#: (exact: every float32 value is a float64 value).
OUTPUT_DTYPES = (*KERNEL_DTYPES, torch.float64)


def check_output_dtype(dtype: torch.dtype, what: str = "dtype") -> torch.dtype:
    """Return ``dtype`` if the kernels can produce it, else raise a TypeError naming it.

    Raises:
        TypeError: for integer, complex, float8 or any other dtype outside :data:`OUTPUT_DTYPES`.
    """
    if dtype not in OUTPUT_DTYPES:
        raise TypeError(f"{what} must be float32, float16, bfloat16 or float64, got {dtype}")
    return dtype


@dataclass(frozen=True, eq=False)
class BlockScales:
    """The per-block scales of a 4-bit tensor, in the one form every backend consumes.

    Attributes:
        absmax: plain: float32 [n_blocks]; nested: uint8 [n_blocks], 8-bit codes of ``absmax - offset``.
        code2: nested only: float32 [256], the codebook of those 8-bit codes (the signed dynamic map).
        absmax2: nested only: float32 [ceil(n_blocks / blocksize2)], the scales of the 8-bit codes.
        offset: nested only: float32 [1], the mean subtracted before the 8-bit quantization.
        blocksize2: nested only: 8-bit codes per ``absmax2`` entry (256 in QLoRA and bitsandbytes).

    Every tensor is 1-D, contiguous and on one device (the constructor reshapes and converts, without a copy
    when the input already is so).

    Raises:
        TypeError: codes that are not uint8 (nested) or scales that are not floating point.
        ValueError: a partial nested description, a codebook without 256 entries, a bad ``blocksize2``.
    """

    absmax: torch.Tensor
    code2: torch.Tensor | None = None
    absmax2: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    blocksize2: int = 0

    def __post_init__(self) -> None:
        nested_parts = (self.code2, self.absmax2, self.offset)
        if any(p is None for p in nested_parts) and not all(p is None for p in nested_parts):
            raise ValueError("nested block scales need code2, absmax2 and offset together")
        if self.nested:
            if self.absmax.dtype != torch.uint8:
                raise TypeError(f"nested block scales hold uint8 codes, got absmax of {self.absmax.dtype}")
            if self.code2.numel() != 256:
                raise ValueError(f"code2 must have 256 entries, got {self.code2.numel()}")
            if isinstance(self.blocksize2, bool) or not isinstance(self.blocksize2, int) or self.blocksize2 < 1:
                raise ValueError(f"blocksize2 must be a positive int, got {self.blocksize2!r}")
            for name in ("code2", "absmax2", "offset"):
                t = getattr(self, name)
                if not t.is_floating_point():
                    raise TypeError(f"{name} must be floating point, got {t.dtype}")
                object.__setattr__(self, name, _flat32(t, self.absmax.device))
            if self.offset.numel() != 1:
                raise ValueError(f"offset must hold one value, got {self.offset.numel()}")
            if self.absmax.dim() != 1 or not self.absmax.is_contiguous():
                object.__setattr__(self, "absmax", self.absmax.reshape(-1).contiguous())
        else:
            if not self.absmax.is_floating_point():
                raise TypeError(f"plain block scales must be floating point, got absmax of {self.absmax.dtype}")
            object.__setattr__(self, "absmax", _flat32(self.absmax, self.absmax.device))
            object.__setattr__(self, "blocksize2", 0)

    @property
    def nested(self) -> bool:
        """True for double-quantized scales."""
        return self.code2 is not None

    @property
    def num_blocks(self) -> int:
        return self.absmax.numel()

    @property
    def device(self) -> torch.device:
        return self.absmax.device

    def to(self, device: torch.device | str) -> BlockScales:
        """The same scales on ``device`` (a new object; ``self`` when already there)."""
        device = torch.device(device)
        if self.absmax.device == device:
            return self
        if not self.nested:
            return BlockScales(self.absmax.to(device))
        return BlockScales(self.absmax.to(device), self.code2.to(device), self.absmax2.to(device),
                           self.offset.to(device), self.blocksize2)


def _flat32(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if t.dim() == 1 and t.dtype == torch.float32 and t.device == device and t.is_contiguous() and not t.requires_grad:
        return t  # already in kernel form: the very tensor, so in-place changes stay visible
    return t.detach().to(device=device, dtype=torch.float32).reshape(-1).contiguous()


def dequantize_absmax(scales: BlockScales) -> torch.Tensor:
    """The float32 scale of every block: ``absmax`` itself, or the nested form decoded.

    For nested scales: ``code2[q] * absmax2[b // blocksize2]`` rounded to float32, then ``+ offset`` rounded
    again (QLoRA section 3; bitsandbytes' arithmetic, which the compiled and Triton kernels reproduce).

    Returns:
        float32 [n_blocks] on the scales' device.
    """
    if not scales.nested:
        return scales.absmax
    q = scales.absmax
    n = q.numel()
    groups = -(-n // scales.blocksize2)
    values = torch.nn.functional.pad(scales.code2[q.long()], (0, groups * scales.blocksize2 - n))
    products = (values.view(groups, scales.blocksize2) * scales.absmax2[:groups].view(-1, 1)).reshape(-1)[:n]
    return products + scales.offset
