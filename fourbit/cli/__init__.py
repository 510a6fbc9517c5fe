"""The ``fourbit`` command line: one thin function per subcommand over the Python API.

    fourbit quantize [MODEL] --out DIR        fourbit generate [MODEL_OR_DIR] PROMPT
    fourbit info DIR                          fourbit eval-quant [MODEL]
    fourbit finetune [MODEL] --data PATH ...  fourbit merge [MODEL] --adapter DIR --out DIR
    fourbit rag index|query|compare|eval ...  fourbit demo
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

__all__ = ["build_parser", "main"]

_COMMAND_MODULES = ("fourbit.cli.quant", "fourbit.cli.train", "fourbit.cli.rag")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand registered by its module's ``add_parser``."""
    from fourbit import __version__

    parser = argparse.ArgumentParser(prog="fourbit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"fourbit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError as err:  # an optional part whose dependencies are missing
            logging.getLogger(__name__).debug("skipping %s: %s", name, err)
            continue
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fourbit`` console script. Returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, NotImplementedError) as err:
        if args.verbose:
            raise
        print(f"fourbit {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
