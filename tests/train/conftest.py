"""tests/train setup: make the tiny-model builders in ``_tiny_models.py`` importable from the test files
(pytest does not put this folder on sys.path when the run starts at the repository root)."""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
