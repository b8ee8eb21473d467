"""What each stage of dvc.yaml reads, derived from the code: its script's import closure within the project."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("duel", "stages")


def stages(root: Path = ROOT) -> dict[str, dict]:
    return yaml.safe_load((root / "dvc.yaml").read_text())["stages"]


def stage_module(cmd: str) -> str:
    """`python -m stages.finetune llama` -> stages.finetune."""
    words = cmd.split()
    return words[words.index("-m") + 1]


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """The project file of a dotted module name (a package's __init__.py), or None outside the project."""
    if name.split(".")[0] not in PACKAGES:
        return None
    path = root / Path(*name.split("."))
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    return path / "__init__.py" if (path / "__init__.py").is_file() else None


def imported(path: Path) -> set[str]:
    """Dotted names a file imports, at any depth of its code (a function's lazy import runs too), with the
    packages above each (importing duel.io runs duel/__init__.py first)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}  # `from duel import cli`
    parents = {".".join(n.split(".")[:i]) for n in names for i in range(1, n.count(".") + 1)}
    return names | parents


def import_closure(module: str, root: Path = ROOT) -> set[str]:
    """Project files (relative to root) that running `python -m module` imports, directly or not."""
    todo = [module, *(".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1))]
    seen: set[Path] = set()
    while todo:
        path = module_file(todo.pop(), root)
        if path is None or path in seen:
            continue
        seen.add(path)
        todo += imported(path)
    return {str(p.relative_to(root)) for p in seen}
