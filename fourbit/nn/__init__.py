"""Neural-network layers: Linear4bit (frozen 4-bit base) and, in lora.py, the LoRA layer over it."""

from fourbit.nn.linear4bit import COMPUTE_DTYPES, Linear4bit, parse_dtype, resolve_compute_dtype

__all__ = ["COMPUTE_DTYPES", "Linear4bit", "parse_dtype", "resolve_compute_dtype"]
