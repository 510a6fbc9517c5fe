"""``fourbit demo``: the whole story on the bundled model (see :mod:`fourbit.demo`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "cmd_demo"]


def cmd_demo(args: argparse.Namespace) -> int:
    """The whole story on the bundled model: quantize, fine-tune briefly, answer over a document."""
    from fourbit.demo import run_demo

    run_demo(Path(args.out), quick=args.quick)
    return 0


def add_parser(subparsers: Any) -> None:
    """Register ``demo``."""
    d = subparsers.add_parser("demo", help="quantize, fine-tune and answer over a document (a few minutes)",
                              description=cmd_demo.__doc__)
    d.add_argument("--out", default="demo_out", help="working folder (default demo_out)")
    d.add_argument("--quick", action="store_true", help="fewer training steps (for smoke tests)")
    d.set_defaults(func=cmd_demo)
