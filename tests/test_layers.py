"""Imports point only downward (docs/design.md): checked on the source, not by convention."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "storage": {"torch", "torchvision", "hiresctl"},
    "hiresctl/data": {"hiresctl.models", "hiresctl.train", "hiresctl.eval", "hiresctl.cli"},
    "hiresctl/models": {"hiresctl.data", "hiresctl.train", "hiresctl.eval", "hiresctl.cli"},
    "hiresctl/train": {"hiresctl.eval", "hiresctl.cli", "hiresctl.report"},
    "hiresctl/eval": {"hiresctl.cli"},
}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_layers_import_only_downward() -> None:
    offenders = []
    for folder, banned in FORBIDDEN.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            for name in _imports(path):
                if any(name == b or name.startswith(b + ".") for b in banned):
                    offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not offenders, offenders
    assert (ROOT / "storage").is_dir()
