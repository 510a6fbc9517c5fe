"""Every function in fourbit/ fits on a screen (STYLE.md, principle 17): at most 80 lines, docstring included."""

from __future__ import annotations

import ast
from pathlib import Path

import fourbit

MAX_LINES = 80


def _long_functions(root: Path) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_LINES:
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_function_in_the_package_is_longer_than_a_screen() -> None:
    assert _long_functions(Path(fourbit.__file__).parent) == []


def test_the_check_sees_a_long_function(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    (package / "mod.py").write_text(f"def short():\n    return 1\n\n\ndef long():\n{body}\n", encoding="utf-8")
    assert _long_functions(package) == [f"pkg/mod.py:5 long ({MAX_LINES + 1} lines)"]
