"""Imports point only downward (docs/design.md): checked on the source, not by convention."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "storage": {"torch", "torchvision", "hiresctl"},
    "hiresctl/data": {"hiresctl.models", "hiresctl.train", "hiresctl.eval", "hiresctl.cli"},
    "hiresctl/models": {"hiresctl.data", "hiresctl.train", "hiresctl.eval", "hiresctl.cli"},
    "hiresctl/train": {"hiresctl.eval", "hiresctl.cli", "hiresctl.report", "hiresctl.features"},
    "hiresctl/eval": {"hiresctl.cli", "hiresctl.report"},
    "hiresctl/report": {"hiresctl.cli"},
    "hiresctl/features": {"hiresctl.train", "hiresctl.eval", "hiresctl.cli", "hiresctl.report"},
}


def _imports(path: Path) -> set[str]:
    """Every absolute import of ``path``, function-level ones included."""
    return {name for name, _ in _imported(path)}


def _imported(path: Path, skip_type_checking: bool = False) -> list[tuple[str, str | None]]:
    """(module, name) of every absolute import: ``import a.b`` gives ("a.b", None), ``from a
    import b`` gives ("a", "b"). ``skip_type_checking`` leaves out ``if TYPE_CHECKING:`` blocks,
    which never run (annotations only)."""
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    if skip_type_checking:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skipped.update(id(n) for child in node.body for n in ast.walk(child))
    out: list[tuple[str, str | None]] = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            out.extend((alias.name, None) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.extend((node.module, alias.name) for alias in node.names)
    return out


def _module_graph() -> dict[str, set[str]]:
    """The project's modules and, for each, the project modules it imports (at any level of
    the code, ``TYPE_CHECKING`` blocks included: a type-only cycle is still a knot two modules
    tie each other into); ``from pkg import mod`` points at ``pkg.mod``."""
    modules: dict[str, Path] = {}
    for folder in ("hiresctl", "storage"):
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        edges = set()
        for name, member in _imported(path):
            target = f"{name}.{member}" if member and f"{name}.{member}" in modules else name
            found = owner(target)
            if found and found != module:
                edges.add(found)
        graph[module] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    """No two modules import each other, directly or around a loop, lazy and type-only imports
    counted: a cycle hidden in a function or under ``TYPE_CHECKING`` is still one the next
    change trips over."""
    graph = _module_graph()
    assert "hiresctl.train.methods" in graph["hiresctl.train.detection.base"]  # the graph is real
    assert "hiresctl.train.task" in graph["hiresctl.train.run"]
    assert _cycles(graph) == []


def test_cycle_finder_finds_a_loop_through_a_function_level_import(tmp_path: Path) -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    module = tmp_path / "m.py"
    module.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import x.y\n"
        "def f():\n    from p import q\n"
    )
    assert _imported(module, skip_type_checking=True)[-1] == ("p", "q")
    assert ("x.y", None) not in _imported(module, skip_type_checking=True)
    assert ("x.y", None) in _imported(module)


def test_errors_import_nothing_heavy() -> None:
    """Every layer raises the storage errors; importing them (or the models) loads no reader,
    store or tiler, and the errors not even numpy."""
    import subprocess
    import sys

    code = (
        "import sys, storage.errors; a = sorted(m for m in ('numpy', 'zarr', 'storage.tiler') "
        "if m in sys.modules); import hiresctl.models; b = sorted(m for m in ('zarr', "
        "'storage.tiler', 'storage.synth', 'storage.readers') if m in sys.modules); print(a, b)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "[] []", out.stderr


def test_layers_import_only_downward() -> None:
    offenders = []
    for folder, banned in FORBIDDEN.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            for name in _imports(path):
                if any(name == b or name.startswith(b + ".") for b in banned):
                    offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not offenders, offenders
    assert (ROOT / "storage").is_dir()


# Packages the product imports only where a user installed them, each from one module that
# checks first and otherwise says in one line how to install it (none is on the package index).
OPTIONAL = {"conch": "hiresctl/models/conch.py"}


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
                if OPTIONAL.get(top) == path.relative_to(ROOT).as_posix():
                    continue
                names = {d.lower().replace("_", "-") for d in distributions.get(top, [top])}
                if not names & declared:
                    missing.append(f"{path.relative_to(ROOT)} imports {top} ({', '.join(names)})")
    assert not missing, missing
