"""The ``fourbit`` command line: one thin function per subcommand over the Python API.

    fourbit quantize [MODEL] --out DIR        fourbit generate [MODEL_OR_DIR] PROMPT
    fourbit info DIR                          fourbit eval-quant [MODEL]
    fourbit finetune [MODEL] --data PATH ...  fourbit merge [MODEL] --adapter DIR --out DIR
    fourbit rag index|query|compare|eval ...  fourbit demo
    fourbit serve [MODEL] [--adapter NAME=DIR] [--db DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["CtrlCOutsideImports", "build_parser", "console_main", "main", "user_message"]

_COMMAND_MODULES = ("fourbit.cli.quant", "fourbit.cli.generate", "fourbit.cli.demo", "fourbit.cli.train",
                    "fourbit.cli.rag", "fourbit.cli.serve", "fourbit.cli.export", "fourbit.cli.plan")

# Library names whose flag is not simply ``--`` + the name with dashes (the CLI's spelling of the same field).
_FLAG_ALIASES = {"out_dir": "--out", "output_dir": "--out", "db_path": "--db", "persist_dir": "--db",
                 "lr": "--learning-rate"}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand registered by its module's ``add_parser``.

    Every command module imports only the standard library and fourbit's light modules at import time, so a
    failure to import one is a bug and is raised, not hidden.
    """
    from fourbit import __version__

    parser = argparse.ArgumentParser(prog="fourbit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"fourbit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def _flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    """``dest -> flag`` for every option of ``parser`` and its subcommands (positionals by metavar)."""
    flags: dict[str, str] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                for dest, flag in _flags(sub).items():
                    flags.setdefault(dest, flag)
        elif action.option_strings:
            long = [o for o in action.option_strings if o.startswith("--") and not o.startswith("--no-")]
            flags.setdefault(action.dest, long[0] if long else max(action.option_strings, key=len))
        elif action.dest not in (argparse.SUPPRESS, None):
            flags.setdefault(action.dest, str(action.metavar or action.dest.upper()))
    return flags


def user_message(err: BaseException, flags: dict[str, str]) -> str:
    """The one-line message for a caller's mistake, with the library's `names` turned into flags."""
    if isinstance(err, OSError) and not isinstance(err, FileNotFoundError | FileExistsError):
        what = {errno.ENOSPC: "no space left on device: free some space and run again",
                errno.EROFS: "read-only file system: choose a writable folder",
                errno.EACCES: "permission denied: choose a folder you can write to",
                errno.ENOTDIR: "a path in it is a file, not a folder"}.get(err.errno, err.strerror or str(err))
        text = f"{err.filename}: {what}" if err.filename else what
    elif isinstance(err, FileNotFoundError) and err.filename:
        text = f"{err.filename}: no such file or folder"
    else:
        text = str(err)

    def flag(match: re.Match) -> str:
        name = match.group(1)
        return _FLAG_ALIASES.get(name) or flags.get(name) or name

    text = re.sub(r"`([A-Za-z_][A-Za-z0-9_.]*)`", flag, " ".join(text.split()))
    # A message that already starts with its field's name, wrapped by a caller that names the same field
    # ("--x: --x: ..."), says it once.
    return re.sub(r"(?<!\S)(\S+): (?:\1: )+", r"\1: ", text)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fourbit`` console script. Returns the process exit code: 0, 1 for an error the
    user can fix (one line on stderr), 2 for bad usage, 130 for Ctrl-C.

    A Ctrl-C raises ``KeyboardInterrupt`` as usual, but not inside an import (the commands import torch,
    transformers and more as they go: see :class:`CtrlCOutsideImports`)."""
    with CtrlCOutsideImports.installed() as ctrl_c:
        parser = build_parser()
        if ctrl_c.pending:  # kept while the commands' modules imported torch (seconds)
            raise KeyboardInterrupt
        args = parser.parse_args(argv)
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(message)s")
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        return _run(parser, args)


_BOOTSTRAP_FILES = (os.path.join("importlib", "_bootstrap.py"), os.path.join("importlib", "_bootstrap_external.py"))


def _inside_import(frame: Any) -> bool:
    """Whether ``frame`` runs inside an ``import`` (under importlib's bootstrap frames, frozen or not)."""
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith("<frozen importlib._bootstrap") or name.endswith(_BOOTSTRAP_FILES):
            return True
        frame = frame.f_back
    return False


class CtrlCOutsideImports:
    """A SIGINT handler that raises ``KeyboardInterrupt`` as Python's does, but never inside an ``import``.

    An exception raised while a module initializes can leave it half-made for the rest of the process, or be
    swallowed by a library that guards the import with its own ``except`` (seen with torch and numpy: a Ctrl-C
    while they loaded let the run go on and fail later with a RecursionError, or run to the end). Inside an
    import the Ctrl-C is kept (``pending``) and SIGINT sent again 20 ms later, until it lands outside. A second
    Ctrl-C while one is kept raises at once, wherever it lands (the way out of an import that hangs).
    """

    def __init__(self) -> None:
        self.pending = False
        self._resent = False
        self._timer: threading.Timer | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        ours, self._resent = self._resent, False
        if not _inside_import(frame) or (self.pending and not ours):
            self.pending = False
            raise KeyboardInterrupt
        self.pending = True
        if self._timer is None or not self._timer.is_alive():
            self._timer = threading.Timer(0.02, self._send_again)
            self._timer.daemon = True
            self._timer.start()

    def _send_again(self) -> None:
        self._resent = True
        os.kill(os.getpid(), signal.SIGINT)

    def cancel(self) -> None:
        """No more SIGINT sent again (a kept one stays in ``pending``)."""
        if self._timer is not None:
            self._timer.cancel()

    @classmethod
    @contextlib.contextmanager
    def installed(cls) -> Iterator[Any]:
        """A new handler in force inside the block, in the main thread (elsewhere nothing is installed); the
        previous handler back after it."""
        handler = cls()
        if threading.current_thread() is not threading.main_thread():
            yield handler
            return
        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield handler
        finally:
            handler.cancel()
            signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


def console_main() -> None:
    """The ``fourbit`` executable and ``python -m fourbit``: :func:`main`, then exit with its code.

    Ctrl-C: a command handles it itself (``finetune`` stops at a step boundary with a checkpoint; the others
    stop at once, exit code 130); one that comes before the command started (while the arguments are parsed)
    ends with exit code 130 too. Once :func:`main` has returned, SIGINT is ignored: nothing is left to stop,
    and the interpreter's teardown, which can take seconds after a training run, restores the default action
    before the last objects are freed, so a Ctrl-C then would end the process by the signal itself (exit
    status -2) with its output already printed as a success.

    torch's gloo threads can abort the interpreter's teardown ("terminate called without an active exception",
    exit -6) after a multi-process run, most often a failed one; once the message is out and the process group
    is closed, such a process leaves without the teardown and keeps its exit code. (``main`` itself never
    exits and leaves the signal handlers as they were, so tests and other Python callers can run it
    in-process.)"""
    try:
        try:
            code = main()
        finally:
            _ignore_sigint()
    except KeyboardInterrupt:  # before the command's own handling began
        _ignore_sigint()
        print("fourbit: interrupted", file=sys.stderr)
        code = 130
    distributed = sys.modules.get("fourbit.train.distributed")
    if distributed is not None and distributed.process_group_started():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _ignore_sigint() -> None:
    """Ignore SIGINT from now on (the main thread alone can set a handler)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        return int(args.func(args) or 0)
    except (ValueError, NotImplementedError, OSError) as err:
        # ValueError (FieldError, InputFileError), NotImplementedError and OSError are the caller's to fix:
        # bad values, files or folders. Anything else is a bug and keeps its traceback.
        if args.verbose:
            raise
        print(f"fourbit {args.command}: error: {user_message(err, _flags(parser))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"fourbit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    console_main()
