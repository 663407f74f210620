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
    "hiresctl/features": {"hiresctl.train", "hiresctl.eval", "hiresctl.cli", "hiresctl.report"},
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


def test_every_third_party_import_is_declared() -> None:
    """What the product imports is in pyproject's dependencies, not present by accident (cv2
    once arrived only through albumentations): a clean ``pip install .`` then imports it all."""
    import importlib.metadata as md
    import re
    import sys
    import tomllib

    declared = {
        re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")
        for requirement in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
            "dependencies"
        ]
    }
    distributions = md.packages_distributions()
    missing = []
    for folder in ("hiresctl", "storage"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for name in _imports(path):
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in ("hiresctl", "storage"):
                    continue
                names = {d.lower().replace("_", "-") for d in distributions.get(top, [top])}
                if not names & declared:
                    missing.append(f"{path.relative_to(ROOT)} imports {top} ({', '.join(names)})")
    assert not missing, missing
