"""Optimizers: AdamW with 32-bit or blockwise 8-bit states, optionally paged to host memory.

``AdamW(params, lr, betas, eps, weight_decay, bits=32 | 8, paged=False, block_size=256)`` is the one optimizer
class; ``state_bytes(optimizer)`` measures its state memory; ``OPTIMIZER_OPTIONS`` maps the optimizer names
the trainer accepts (``OPTIMIZER_NAMES``) to ``AdamW`` arguments.
"""

from fourbit.optim.adamw import OPTIMIZER_NAMES, OPTIMIZER_OPTIONS, AdamW, state_bytes
from fourbit.optim.paging import StatePager

__all__ = ["OPTIMIZER_NAMES", "OPTIMIZER_OPTIONS", "AdamW", "StatePager", "state_bytes"]
