"""Learning-rate schedules with linear warmup: constant (the QLoRA paper's), cosine and linear decay.

A schedule is a pure function of the step, so the only scheduler state a checkpoint needs is the step.
"""

from __future__ import annotations

import math

from fourbit._errors import FieldError

__all__ = ["lr_factor"]


def lr_factor(step: int, *, schedule: str, warmup: int, total: int) -> float:
    """Multiplier of the base learning rate for optimizer step ``step`` (0-based).

    Warmup ramps linearly ``(step + 1) / warmup`` over the first ``warmup`` steps; afterwards ``constant``
    stays at 1, ``linear`` decays to 0 at ``total`` and ``cosine`` follows half a cosine to 0 at ``total``.

    Raises:
        FieldError: unknown schedule (field ``lr_scheduler``).
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise FieldError("lr_scheduler", f"must be constant, cosine or linear; got {schedule!r}")
