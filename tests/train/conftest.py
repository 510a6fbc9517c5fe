"""Fixtures of the training tests."""

from __future__ import annotations

import signal
from collections.abc import Callable

import pytest

from fourbit.train.step import Stepper


@pytest.fixture
def ctrl_c_after_step(monkeypatch) -> Callable[[int], None]:
    """``ctrl_c_after_step(n)``: the next training run of this test to finish optimizer step ``n`` gets a real
    SIGINT, as from Ctrl-C, right after it (once: a resumed run goes on). The trainer's own handler takes it:
    the run stops at that step boundary with a checkpoint and raises
    :class:`~fourbit.train.trainer.TrainingInterrupted`. (The step function is wrapped by monkeypatching;
    nothing in fourbit knows about it.)"""

    def arm(n: int) -> None:
        real, fired = Stepper.step, []

        def step(self, stream, state, **kw):
            result = real(self, stream, state, **kw)
            if state.step == n and not fired:
                fired.append(n)
                signal.raise_signal(signal.SIGINT)
            return result

        monkeypatch.setattr(Stepper, "step", step)

    return arm
