"""Run the ``fourbit`` command line in-process, as a user would, and check how it failed.

``run_cli`` calls the console script's entry point with ``argv`` and returns the exit code and what it
printed. An exception that escapes ``main`` is a bug (a user would see a traceback), so it is raised as is and
fails the test. ``assert_clean_error`` checks the contract for a user's mistake: exit code 1 (2 for usage), one
line on stderr that names what to fix, no traceback.
"""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

from fourbit.cli import main


@dataclass
class CliResult:
    code: int
    out: str
    err: str


def run_cli(*argv: str) -> CliResult:
    """``fourbit ARGV...`` in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exit_:  # argparse usage errors and --help
            code = int(exit_.code or 0)
    return CliResult(code, out.getvalue(), err.getvalue())


def assert_clean_error(result: CliResult, *names: str, code: int = 1) -> str:
    """Assert a clean failure that names each of ``names`` (a file, field or flag); returns the message."""
    assert result.code == code, f"exit code {result.code}, expected {code}; stderr: {result.err!r}"
    assert "Traceback" not in result.err and "Traceback" not in result.out, result.err
    lines = [line for line in result.err.splitlines() if line.strip()]
    if code == 1:
        errors = [line for line in lines if ": error: " in line]
        assert len(errors) == 1, f"expected one error line, got: {result.err!r}"
        message = errors[0]
    else:
        message = result.err
    for name in names:
        assert str(name) in message, f"{name!r} not named in: {message!r}"
    return message


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a ``fourbit`` child process (torchrun or ``python -m fourbit``): this checkout first on
    the path, one thread each, no hub, and no torchrun variables inherited from the test's own process."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.update(PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", TORCH_CPP_LOG_LEVEL="FATAL", **extra)
    return env
