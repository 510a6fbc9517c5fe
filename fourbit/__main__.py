"""``python -m fourbit`` runs the command line."""

from fourbit.cli import console_main

console_main()
