"""Codebooks: the 16 (or 256) values a 4-bit (or 8-bit) code stands for, normalised to [-1, 1].

Every blockwise quantizer in fourbit maps ``x / absmax(block)`` to the index of a value in one of these tables.
This is the one place where the tables are defined.

- NF4, NormalFloat (QLoRA, Dettmers et al. 2023, section 3 and Appendix E): quantiles of N(0, 1), with 8
  levels for the positive half and 7 for the negative half so that zero is represented exactly.
- FP4: bitsandbytes' E2M1 variant (1 sign, 2 exponent, 1 mantissa bit, exponent bias 2, normalised by 12).
- INT4: symmetric integers -7..7 divided by 7 (zero twice, as in bitsandbytes' ``get_4bit_type("int4")``).
- Dynamic 8-bit (Dettmers 2015, "8-Bit Approximations for Parallelism in Deep Learning"): a dynamic
  exponent/fraction map; the signed map quantizes the absmax constants in double quantization and the first
  Adam moment in 8-bit optimizers, the unsigned map the second moment.
"""

from __future__ import annotations

from functools import cache

import torch

__all__ = [
    "NF4_OFFSET",
    "QUANT_TYPES",
    "nf4_code",
    "fp4_code",
    "int4_code",
    "get_code",
    "dynamic_map",
]

#: delta = (1/2)(1/30 + 1/32) cuts off the infinite tails of N(0, 1): the outermost quantiles are taken at
#: 1 - delta, the mean of the last quantile positions for 15 and 16 bins (QLoRA, Appendix E).
NF4_OFFSET = 0.9677083

QUANT_TYPES = ("nf4", "fp4", "int4")


@cache
def _nf4() -> torch.Tensor:
    # Computed in the same float32/float64 steps as the published table, which it then equals bit for bit:
    # float32 probabilities, float64 inverse normal CDF, float32 values normalised by their maximum.
    positive = torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 9)[:-1].double())  # 8 levels > 0
    negative = -torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 8)[:-1].double())  # 7 levels < 0
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).float().sort().values
    return values / values.max()


def nf4_code() -> torch.Tensor:
    """The NF4 table: 16 sorted float32 values in [-1, 1] with an exact zero at index 7.

    q_i = (Q(p_i) + Q(p_{i+1})) / 2 in the paper's notation reduces, for the asymmetric construction of
    Appendix E, to the quantiles Q of N(0, 1) at 8 evenly spaced probabilities in [0.5, 1 - delta] for the
    positive half and 7 for the negative half (zero shared), normalised by the largest value.

    Returns:
        Tensor of shape [16], float32, sorted ascending.
    """
    return _nf4().clone()


@cache
def _fp4() -> torch.Tensor:
    # Index bits: sign (bit 3), then 2 exponent and 1 mantissa bit; subnormal 0b001 = 0.0625 (bnb's layout).
    magnitudes = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0]
    values = torch.tensor(magnitudes + [-m for m in magnitudes], dtype=torch.float32)
    return values / values.abs().max()


def fp4_code() -> torch.Tensor:
    """bitsandbytes' FP4 (E2M1) table in bit-pattern order (index = sign<<3 | exponent<<1 | mantissa).

    Returns:
        Tensor of shape [16], float32, not sorted (index 0 is +0, index 8 is -0).
    """
    return _fp4().clone()


@cache
def _int4() -> torch.Tensor:
    values = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0, -0, -1, -2, -3, -4, -5, -6, -7], dtype=torch.float32)
    return values / 7.0


def int4_code() -> torch.Tensor:
    """Symmetric INT4: the integers 7..-7 divided by 7 (bitsandbytes' ``int4`` order, zero at 7 and 8).

    Returns:
        Tensor of shape [16], float32, descending.
    """
    return _int4().clone()


def get_code(quant_type: str) -> torch.Tensor:
    """The 4-bit table for ``quant_type`` ("nf4", "fp4" or "int4").

    Raises:
        ValueError: for any other name.
    """
    if quant_type == "nf4":
        return nf4_code()
    if quant_type == "fp4":
        return fp4_code()
    if quant_type == "int4":
        return int4_code()
    raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


@cache
def _dynamic(signed: bool, max_exponent_bits: int, total_bits: int) -> torch.Tensor:
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        # Exponent 10^-(max_exponent_bits-1-i); the fraction region shrinks as the exponent grows.
        extra = 0 if signed else 1
        fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits + extra) + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        data += (scale * means).tolist()
        if signed:
            data += (-scale * means).tolist()
    if additional_items > 0:
        boundaries = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1)
        data += (scale * means).tolist()
        if signed:
            data += (-scale * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (2**total_bits - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The dynamic-exponent 8-bit map of bitsandbytes' ``create_dynamic_map`` (same values, same order).

    Args:
        signed: True for values in [-1, 1] (first Adam moment, double-quantized absmax), False for [0, 1].
        max_exponent_bits: the largest number of exponent bits (7: exponents 10^-6 .. 10^0).
        total_bits: the code width.

    Returns:
        Tensor of shape [2**total_bits], float32, sorted ascending.
    """
    return _dynamic(signed, max_exponent_bits, total_bits).clone()
