"""The optimizer seam: a config's ``optim`` name -> ``fourbit.optim.AdamW(bits=..., paged=...)``.

The names and what they mean live in one place, :data:`fourbit.optim.OPTIMIZER_OPTIONS`; fourbit's own AdamW
serves every one of them.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

import torch

from fourbit._errors import FieldError
from fourbit.optim import OPTIMIZER_OPTIONS, AdamW

__all__ = ["build_optimizer"]


def build_optimizer(
    name: str,
    params: Iterable[torch.nn.Parameter],
    *,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> AdamW:
    """Build the named AdamW variant (the QLoRA paper uses ``paged_adamw_8bit``).

    Args:
        name: one of :data:`fourbit.optim.OPTIMIZER_NAMES` (the config's ``optim``).
        params: the model's parameters; those that do not require a gradient are left out.
        lr: the learning rate (the config's ``learning_rate``), finite and > 0.
        weight_decay, betas, eps: as in :class:`fourbit.optim.AdamW`.

    Returns:
        The optimizer.

    Raises:
        FieldError: for an unknown ``optim`` name or a non-finite or non-positive ``learning_rate``.
        ValueError: when no parameter requires a gradient.
    """
    if name not in OPTIMIZER_OPTIONS:
        raise FieldError("optim", f"must be one of {', '.join(OPTIMIZER_OPTIONS)}; got {name!r}")
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not (math.isfinite(lr) and lr > 0):
        raise FieldError("learning_rate", f"must be a finite number > 0; got {lr!r}")
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: inject LoRA (or mark modules_to_save) first")
    return AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **OPTIMIZER_OPTIONS[name])
