"""The package's layers import one way: each layer imports only the layers before it (docs/architecture.md).

Every ``import`` of a fourbit module is checked, at module level and inside functions alike: a lazy import
against the direction is still a cycle, only a later one."""

from __future__ import annotations

import ast
from pathlib import Path

import fourbit

PACKAGE = Path(fourbit.__file__).resolve().parent

# In order; a module belongs to the first layer whose prefix matches it. "fourbit._io"/"fourbit._errors" are
# the foundation every layer may use.
LAYERS = [
    ("foundation", ("fourbit._errors", "fourbit._io")),
    ("codebooks", ("fourbit.quant.codebooks",)),
    ("kernels", ("fourbit.kernels",)),
    ("quant", ("fourbit.quant",)),
    ("nn", ("fourbit.nn",)),
    ("optim", ("fourbit.optim",)),
    ("models", ("fourbit.models", "fourbit.generate")),
    ("train", ("fourbit.train",)),
    ("rag", ("fourbit.rag",)),
    ("serve", ("fourbit.serve",)),
    ("cli", ("fourbit.cli", "fourbit.demo", "fourbit.__main__")),
]
TOP = ("fourbit",)  # the package's own __init__ re-exports the public API of early layers


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _layer(module: str) -> int | None:
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    return None


def _imports(path: Path, module: str) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target != "fourbit":  # ``from fourbit import __version__`` is checked by name below
                found.append((node.lineno, target))
            # ``from fourbit.x import y`` may name a submodule y: check it as well.
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
    return [(line, name) for line, name in found if name == "fourbit" or name.startswith("fourbit.")]


def _is_top_level_name(target: str) -> bool:
    """``fourbit.quantize_4bit`` (a name re-exported by the package), not a module of the package."""
    name = target.split(".")[1] if target.count(".") == 1 else None
    return name is not None and not (PACKAGE / name).is_dir() and not (PACKAGE / f"{name}.py").exists()


def test_every_module_belongs_to_a_layer():
    unplaced = [_module_name(p) for p in PACKAGE.rglob("*.py")
                if _module_name(p) not in TOP and _layer(_module_name(p)) is None]
    assert not unplaced, f"modules outside every layer of docs/architecture.md: {unplaced}"


def test_imports_go_one_way():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        own = _layer(module)
        if own is None:
            continue
        for line, target in _imports(path, module):
            if target == "fourbit.__version__":
                continue
            target_layer = _layer(target)
            if target_layer is None:
                if _is_top_level_name(target):
                    violations.append(f"{path.relative_to(PACKAGE.parent)}:{line}: imports {target} from the "
                                      "top-level package; import it from its layer's module")
                continue
            if target_layer > own:
                violations.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {module} ({LAYERS[own][0]}) "
                                  f"imports {target} ({LAYERS[target_layer][0]})")
    assert not violations, "imports against the layer order:\n" + "\n".join(violations)
