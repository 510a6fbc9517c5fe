"""The optimizer seam: a config name -> ``fourbit.optim.AdamW(bits=..., paged=...)``."""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["OPTIMIZER_OPTIONS", "build_optimizer"]

# name -> (bits, paged)
OPTIMIZER_OPTIONS: dict[str, tuple[int, bool]] = {
    "adamw": (32, False),
    "adamw_8bit": (8, False),
    "paged_adamw_8bit": (8, True),
    "paged_adamw_32bit": (32, True),
}


def build_optimizer(
    name: str,
    params: Iterable[torch.nn.Parameter],
    *,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """Build the named AdamW variant (the paper uses paged 8-bit AdamW; see ``fourbit.optim``).

    Falls back to ``torch.optim.AdamW`` for plain ``adamw`` only if ``fourbit.optim`` is unavailable.

    Raises:
        ValueError: unknown name, or ``lr <= 0``.
        NotImplementedError: an 8-bit/paged variant without ``fourbit.optim``.
    """
    if name not in OPTIMIZER_OPTIONS:
        raise ValueError(f"--optim must be one of {', '.join(OPTIMIZER_OPTIONS)}; got {name!r}")
    if not lr > 0:
        raise ValueError(f"--learning-rate must be > 0; got {lr!r}")
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: inject LoRA (or mark modules_to_save) first")
    bits, paged = OPTIMIZER_OPTIONS[name]
    try:
        from fourbit.optim import AdamW
    except ImportError:
        if name != "adamw":
            raise NotImplementedError(f"--optim {name} needs fourbit.optim, which is not importable") from None
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    return AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, bits=bits, paged=paged)
