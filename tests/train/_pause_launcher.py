"""Run the real ``fourbit`` command line, paused at one exact point of a fine-tuning run, so that a test can
send a signal (SIGINT, SIGKILL) exactly there::

    python tests/train/_pause_launcher.py WHERE:N MARKER -- finetune MODEL --data ... --out ...

``WHERE:N`` is one of:

* ``step:N``: after optimizer step ``N`` and its evaluation, before its checkpoint; ``step:0``: before the
  first step;
* ``checkpoint:N``: while checkpoint ``step-N`` is written (its adapter and optimizer files are in its
  temporary folder, its trainer state is not yet);
* ``eval:N``: at the start of the run's ``N``-th evaluation;
* ``exit:0``: after the command has returned, in the interpreter's teardown (an ``atexit`` function).

There the launcher writes its process id to ``MARKER`` and waits, up to 120 s, for a SIGINT, which it hands on
to the handler the run had installed, and then lets the run go on; ``exit`` waits instead for the file
``MARKER.go`` (so that the handler in force at exit takes the signal itself). Nothing of this is in fourbit:
the launcher wraps fourbit's functions (monkeypatching) and then calls its console entry point,
:func:`fourbit.cli.console_main`, as the ``fourbit`` executable does.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import time
from pathlib import Path

_WAIT_S = 120.0


def _pause(marker: Path) -> None:
    """Mark the point and wait for a SIGINT (handed on to the run's own handler) or the time limit."""
    previous = signal.getsignal(signal.SIGINT)
    got: list[int] = []

    def relay(signum: int, frame: object) -> None:
        got.append(signum)
        signal.signal(signal.SIGINT, previous)
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGINT, relay)
    marker.write_text(f"{os.getpid()}\n")
    deadline = time.monotonic() + _WAIT_S
    try:
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        if not got:
            signal.signal(signal.SIGINT, previous)


def _pause_at_exit(marker: Path) -> None:
    """Mark the point and wait for ``MARKER.go``; a signal meanwhile meets whatever handler is in force."""
    go = marker.with_name(marker.name + ".go")
    marker.write_text(f"{os.getpid()}\n")
    deadline = time.monotonic() + _WAIT_S
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.01)


def _install(where: str, n: int, marker: Path) -> None:
    from fourbit.train import checkpoint, trainer
    from fourbit.train.step import Stepper

    if where == "step" and n == 0:
        real_step = Stepper.step

        def first_step(self, stream, state, **kw):
            if state.step == 0:
                Stepper.step = real_step
                _pause(marker)
            return real_step(self, stream, state, **kw)

        Stepper.step = first_step
    elif where == "step":
        real_checkpoint = trainer._checkpoint_if_due

        def checkpoint_if_due(loop):
            if loop.state.step == n:
                _pause(marker)
            return real_checkpoint(loop)

        trainer._checkpoint_if_due = checkpoint_if_due
    elif where == "checkpoint":
        real_write = checkpoint.atomic_write_text

        def write(path, text):
            path = Path(path)
            if path.name == "trainer_state.json" and path.parent.name.endswith(f"step-{n:06d}"):
                _pause(marker)
            return real_write(path, text)

        checkpoint.atomic_write_text = write
    elif where == "eval":
        real_evaluate, calls = trainer.evaluate, []

        def evaluate(*args, **kwargs):
            calls.append(1)
            if len(calls) == n:
                _pause(marker)
            return real_evaluate(*args, **kwargs)

        trainer.evaluate = evaluate
    elif where == "exit":
        atexit.register(_pause_at_exit, marker)
    else:
        raise SystemExit(f"unknown pause point {where!r}")


def main() -> None:
    spec, marker, dashes, *argv = sys.argv[1:]
    assert dashes == "--", "usage: _pause_launcher.py WHERE:N MARKER -- FOURBIT-ARGS..."
    where, n = spec.split(":")
    _install(where, int(n), Path(marker))
    from fourbit.cli import console_main

    sys.argv = ["fourbit", *argv]
    console_main()


if __name__ == "__main__":
    main()
