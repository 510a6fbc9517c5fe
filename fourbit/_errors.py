"""The errors fourbit raises for a caller's mistake, and how they name what to fix.

Library errors speak the library's names: a function argument or a config field (``quant_type``,
``learning_rate``), never a command-line flag. A message quotes every name it mentions in backticks
(``pass `overwrite` to replace it``); :class:`FieldError` also carries the one field at fault. The command
line (``fourbit.cli``) maps those names to its flags in one place, so the same error reads
``learning_rate: must be ...`` in Python and ``--learning-rate: must be ...`` in a shell.
"""

from __future__ import annotations

import os

__all__ = ["FieldError", "InputFileError"]


class FieldError(ValueError):
    """A caller's value for one named field (argument, config key, flag) is wrong.

    Args:
        field: the library's name of the field (``"learning_rate"``).
        message: what is wrong and what to do; other field names in backticks.
    """

    def __init__(self, field: str, message: str):
        super().__init__(f"`{field}`: {message}")
        self.field = field
        self.message = message


class InputFileError(ValueError):
    """A file the caller gave (or one inside a folder they gave) cannot be used: damaged, truncated, of the
    wrong format, or unreadable. The message names the file (and line, where there is one).

    Args:
        path: the file.
        message: what is wrong and what to do.
        line: 1-based line number in the file, when the fault is on one line.
    """

    def __init__(self, path: str | os.PathLike, message: str, *, line: int | None = None):
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {message}")
        self.path = str(path)
        self.line = line
        self.message = message
