"""Run the real ``fourbit`` command line, paused at one exact point of a fine-tuning run, so that a test can
send a signal (SIGINT, SIGKILL) exactly there::

    python tests/train/_pause_launcher.py WHERE:N MARKER -- finetune MODEL --data ... --out ...

``WHERE:N`` is one of:

* ``parse:0``: while the command line is read, before any command began;
* ``load:0``: while the model loads, before training began;
* ``train:0``: after the loading, just before the trainer is called (its own handler not yet installed);
* ``step:N``: after optimizer step ``N`` and its evaluation, before its checkpoint; ``step:0``: before the
  first step;
* ``checkpoint:N``: while checkpoint ``step-N`` is written (its adapter and optimizer files are in its
  temporary folder, its trainer state is not yet);
* ``eval:N``: at the start of the run's ``N``-th evaluation;
* ``finish:0``: after the last step, while the finished run writes its loss curve beside its adapter;
* ``returned:0``: once the trainer has returned, before the command prints its results;
* ``exit:0``: after the command has returned, in the interpreter's teardown (an ``atexit`` function).

Several points, comma-separated, pause at each in turn (a second Ctrl-C, say): the first marks ``MARKER``, the
``i``-th ``MARKER.i``.

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


def _pause_before(module: object, name: str, marker: Path, when=lambda *a, **kw: True) -> None:
    """Wrap ``module.name`` so that it pauses before the first call for which ``when(*args, **kw)`` holds."""
    real, done = getattr(module, name), []

    def wrapper(*args, **kwargs):
        if not done and when(*args, **kwargs):
            done.append(1)
            _pause(marker)
        return real(*args, **kwargs)

    setattr(module, name, wrapper)


def _pause_after(module: object, name: str, marker: Path) -> None:
    """Wrap ``module.name`` so that it pauses after its first call has returned."""
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        result = real(*args, **kwargs)
        setattr(module, name, real)
        _pause(marker)
        return result

    setattr(module, name, wrapper)


def _install(where: str, n: int, marker: Path) -> None:
    import fourbit.cli
    from fourbit.train import checkpoint, loading, trainer
    from fourbit.train.step import Stepper

    if where == "step" and n == 0:
        _pause_before(Stepper, "step", marker, lambda self, stream, state, **kw: state.step == 0)
    elif where == "step":
        _pause_before(trainer, "_checkpoint_if_due", marker, lambda loop: loop.state.step == n)
    elif where == "checkpoint":
        _pause_before(checkpoint, "atomic_write_text", marker, lambda path, text: Path(path).name ==
                      "trainer_state.json" and Path(path).parent.name.endswith(f"step-{n:06d}"))
    elif where == "eval":
        calls = []
        _pause_before(trainer, "evaluate", marker, lambda *a, **kw: calls.append(1) or len(calls) == n)
    elif where in ("parse", "load", "train", "finish"):
        module, name = {"parse": (fourbit.cli, "build_parser"), "load": (loading, "load_for_training"),
                        "train": (trainer, "train"), "finish": (trainer, "plot_loss_curve")}[where]
        _pause_before(module, name, marker)
    elif where == "returned":
        _pause_after(trainer, "train", marker)
    elif where == "exit":
        atexit.register(_pause_at_exit, marker)
    else:
        raise SystemExit(f"unknown pause point {where!r}")


def main() -> None:
    spec, marker, dashes, *argv = sys.argv[1:]
    assert dashes == "--", "usage: _pause_launcher.py WHERE:N MARKER -- FOURBIT-ARGS..."
    for i, point in enumerate(spec.split(",")):
        where, n = point.split(":")
        _install(where, int(n), Path(marker) if i == 0 else Path(f"{marker}.{i}"))
    from fourbit.cli import console_main

    sys.argv = ["fourbit", *argv]
    console_main()


if __name__ == "__main__":
    main()
