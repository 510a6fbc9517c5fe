"""Optimizers: AdamW with 32-bit or blockwise 8-bit states, optionally paged to host memory.

``AdamW(params, lr, betas, eps, weight_decay, bits=32 | 8, paged=False, block_size=256)`` is the one optimizer
class; ``state_bytes(optimizer)`` measures its state memory.
"""

from fourbit.optim.adamw import AdamW, state_bytes
from fourbit.optim.paging import StatePager

__all__ = ["AdamW", "StatePager", "state_bytes"]
