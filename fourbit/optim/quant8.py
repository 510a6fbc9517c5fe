"""Blockwise 8-bit quantization of optimizer states (Dettmers et al. 2022, "8-bit Optimizers via Block-wise
Quantization", section 2).

A state tensor is cut into blocks of ``block_size`` elements; each block is divided by its absolute maximum
(one float32 ``absmax`` per block) and every normalised value in [-1, 1] is stored as the index of the nearest
entry of the dynamic 8-bit map (signed for the first Adam moment, unsigned for the second; ``dynamic_map``
from :mod:`fourbit.quant.codebooks`, bit-identical to bitsandbytes' ``create_dynamic_map``).

Nearest-code search is the hot loop of the 8-bit optimizer, so it avoids ``torch.bucketize`` (a binary search
per element, with eight dependent, unpredictable branches) and uses a lookup table on the float32 bit pattern
instead:

1. ``bucket = (bits(x) >> 16) + 32768`` keeps the sign, the 8 exponent bits and the top 7 mantissa bits, so a bucket
   spans at most 2^-7 (0.8 %) of its value, finer than the smallest relative gap between neighbouring
   midpoints of the dynamic map (~1.4 %, checked when the table is built). Hence at most one decision
   midpoint falls inside any bucket.
2. ``lut[bucket]`` is the nearest code for the bucket's smallest value and ``thr[bucket]`` the midpoint
   just above that code; the answer is ``lut[bucket] + (x > thr[bucket])``.

This gives exactly the index ``torch.bucketize(x, midpoints)`` gives (ties go to the lower code), with two
table reads and one comparison per element. The tables (64 Ki entries each) are built once per codebook and
cached.

The optimizer's update (:mod:`fourbit.optim.functional`) normalises each block by its absmax and calls
:func:`nearest_code`; dequantization is ``code[codes] * absmax``. Both work on whole tensors (no Python loop
over blocks), so callers can process a large tensor in chunks of whole blocks to keep temporaries in cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from fourbit.quant.codebooks import dynamic_map

__all__ = [
    "StateCodebook",
    "state_codebook",
    "num_blocks",
    "nearest_code",
]

_SHIFT = 16  # bits(x) >> 16: sign, 8 exponent bits, 7 mantissa bits
_NUM_BUCKETS = 1 << (32 - _SHIFT)
_OFFSET = 1 << 15  # (int32 bits >> 16) is in [-32768, 32767]; the table index is that + 32768


@dataclass(frozen=True)
class StateCodebook:
    """A sorted 8-bit codebook with the lookup tables of its nearest-code search.

    Attributes:
        code: [256] float32, sorted ascending (the dynamic map).
        midpoints: [255] float32, ``(code[i] + code[i + 1]) / 2``.
        thresholds: [256] float32, ``midpoints`` followed by +inf.
        lut: [65536] int32, indexed by ``(bits(x) >> 16) + 32768`` (arithmetic shift of the int32 bit
            pattern): the nearest code of the bucket's smallest value.
        signed: whether this is the signed map.
    """

    code: torch.Tensor
    midpoints: torch.Tensor
    thresholds: torch.Tensor
    lut: torch.Tensor
    signed: bool


def _bucket_bounds() -> tuple[torch.Tensor, torch.Tensor]:
    """Smallest and largest float32 value of each bucket, in table order (index = ``(bits >> 16) + 32768``)."""
    top = torch.arange(_NUM_BUCKETS, dtype=torch.int64) - _OFFSET  # the signed high half
    start = (top << _SHIFT).to(torch.int32)  # fits: top in [-32768, 32767]
    end = (start.to(torch.int64) | ((1 << _SHIFT) - 1)).to(torch.int32)
    start_f, end_f = start.view(torch.float32), end.view(torch.float32)
    # For negative floats (top < 0) a larger bit pattern is a more negative value.
    lo = torch.where(top < 0, end_f, start_f)
    hi = torch.where(top < 0, start_f, end_f)
    return lo, hi


@lru_cache(maxsize=8)
def _build(signed: bool) -> StateCodebook:
    code = dynamic_map(signed)
    assert bool((code[1:] >= code[:-1]).all()), "dynamic map must be sorted"
    midpoints = (code[:-1] + code[1:]) / 2
    thresholds = torch.cat([midpoints, torch.tensor([float("inf")])])
    lo, hi = _bucket_bounds()
    finite = torch.isfinite(lo) & torch.isfinite(hi)
    lo = torch.where(finite, lo, torch.zeros_like(lo))
    hi = torch.where(finite, hi, torch.zeros_like(hi))
    lut = torch.bucketize(lo, midpoints)  # nearest code of the bucket's smallest value
    # Invariant behind the two-step search: no second midpoint inside any bucket of [-1, 1].
    nxt = thresholds[(lut + 1).clamp(max=255)]
    ok = (nxt >= hi) | (lut == 255)
    in_range = (lo >= -1.0) & (hi <= 1.0)
    assert bool(ok[in_range].all()), "bucket resolution too coarse for this codebook"
    return StateCodebook(
        code=code, midpoints=midpoints, thresholds=thresholds, lut=lut.to(torch.int32), signed=signed
    )


@lru_cache(maxsize=16)
def _on_device(signed: bool, device: str) -> StateCodebook:
    cb = _build(signed)
    return StateCodebook(
        code=cb.code.to(device),
        midpoints=cb.midpoints.to(device),
        thresholds=cb.thresholds.to(device),
        lut=cb.lut.to(device),
        signed=signed,
    )


def state_codebook(signed: bool, device: torch.device | str | None = None) -> StateCodebook:
    """The (cached) dynamic 8-bit codebook for the first (``signed=True``) or second moment.

    Args:
        signed: True for the signed map (first moment), False for the unsigned map (second moment).
        device: where the tables live (default CPU).

    Returns:
        A :class:`StateCodebook`; its tensors are shared, do not modify them.
    """
    dev = torch.device("cpu" if device is None else device)
    if dev.type == "cpu":
        return _build(bool(signed))
    return _on_device(bool(signed), str(dev))


def num_blocks(numel: int, block_size: int) -> int:
    """Number of blocks (and absmax values) for ``numel`` elements: ``ceil(numel / block_size)``."""
    return -(-numel // block_size)


def nearest_code(
    normed: torch.Tensor,
    cb: StateCodebook,
    *,
    out: torch.Tensor | None = None,
    work: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Index of the nearest code for each value of ``normed`` (float32 in [-1, 1]).

    Equal to ``torch.bucketize(normed, cb.midpoints)`` (a value exactly on a midpoint takes the lower code).

    Args:
        normed: contiguous float32 tensor of any shape, values in [-1, 1] (NaN gives an unspecified code).
        cb: the codebook.
        out: optional contiguous uint8 tensor with ``normed.numel()`` elements to write into.
        work: optional scratch buffers ``(int32 [n], int32 [n], float32 [n])`` (reused across calls so the
            hot loop allocates nothing and stays in cache); their contents are overwritten.

    Returns:
        uint8 tensor of ``normed``'s shape (or ``out``).
    """
    if normed.dtype != torch.float32:
        raise TypeError(f"nearest_code expects float32 values, got {normed.dtype}")
    flat = normed.reshape(-1)
    n = flat.numel()
    if work is None:
        bucket = torch.empty(n, dtype=torch.int32, device=flat.device)
        lo = torch.empty(n, dtype=torch.int32, device=flat.device)
        thr = torch.empty(n, dtype=torch.float32, device=flat.device)
    else:
        bucket, lo, thr = (w[:n] for w in work)
    torch.bitwise_right_shift(flat.view(torch.int32), _SHIFT, out=bucket)
    bucket.add_(_OFFSET)
    torch.index_select(cb.lut, 0, bucket, out=lo)
    torch.index_select(cb.thresholds, 0, lo, out=thr)
    # x > thr  <=>  thr - x < 0 (exact for finite floats; thr is never 0): the sign bit of thr - x, as an
    # arithmetic shift, is -1 exactly where the value lies above the bucket's midpoint. Cheaper than gt + add.
    thr.sub_(flat)
    torch.bitwise_right_shift(thr.view(torch.int32), 31, out=bucket)
    lo.sub_(bucket)
    if out is None:
        return lo.to(torch.uint8).view(normed.shape)
    out.view(-1).copy_(lo)
    return out
