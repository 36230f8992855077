"""The runtime's modules import one another without a cycle, and none imports a subpackage of its own folder (export,
cli, serve, eval): every import counts (top-level, inside functions and under ``TYPE_CHECKING``), read from the
source with ``ast``."""

from __future__ import annotations

import ast
from pathlib import Path

RUNTIME = Path(__file__).resolve().parent.parent / "runtime"


def imports_of(path: Path, depth: int = 0) -> set[str]:
    """The runtime modules that ``path`` imports (relative imports and ``edgeroute.X`` ones); ``depth`` is how far
    below runtime/ the file lies (1 inside a subpackage such as ``sampling/``: its ``..x`` imports are runtime
    modules, its ``.x`` ones are siblings, counted with ``depth`` 0 for the subpackage's own graph)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level == depth + 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == depth + 1:  # from . import x
                found.update(a.name for a in node.names)
            elif node.level == 0 and node.module == "edgeroute":  # from edgeroute import x
                found.update(a.name for a in node.names)
            elif node.module and node.module.startswith("edgeroute."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("edgeroute."))
    return found


def runtime_graph() -> dict[str, set[str]]:
    """Each runtime module (a subpackage counts as one, its files' imports together) -> the ones it imports."""
    packages = {p.parent.name: p.parent for p in RUNTIME.glob("*/__init__.py")}
    modules = {p.stem for p in RUNTIME.glob("*.py") if p.stem != "__init__"} | set(packages)
    graph = {m: imports_of(RUNTIME / f"{m}.py") & modules for m in modules - set(packages)}
    for name, folder in packages.items():
        graph[name] = set().union(*(imports_of(f, 1) for f in folder.rglob("*.py"))) & modules - {name}
    return graph


def assert_acyclic(graph: dict[str, set[str]]) -> None:
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = path[path.index(n) :] + [n]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_import_cycle_between_runtime_modules() -> None:
    graph = runtime_graph()
    assert_acyclic(graph)
    assert graph["generator"] and "model" not in graph["generator"]  # the reader saw the imports
    assert "sampling" in graph["choice"] and "config" in graph["sampling"]  # and those of a subpackage


def test_no_import_cycle_inside_a_subpackage() -> None:
    for init in RUNTIME.glob("*/__init__.py"):
        files = {p.stem: p for p in init.parent.glob("*.py") if p.stem != "__init__"}
        assert_acyclic({m: imports_of(f) & set(files) for m, f in files.items()})


def test_the_runtime_imports_no_subpackage() -> None:
    """The core package stands alone: edgeroute.export, .cli, .serve and .eval (folders of their own, with their
    extras) import the runtime, never the other way."""
    subpackages = {"export", "cli", "serve", "eval"}
    found = {p.name: imports_of(p) & subpackages for p in sorted(RUNTIME.glob("*.py"))}
    assert {name: sorted(subs) for name, subs in found.items() if subs} == {}


def test_the_reader_sees_every_kind_of_import(tmp_path: Path) -> None:
    src = "from .a import x\nfrom . import b\nimport edgeroute.c\nif TYPE_CHECKING:\n    from .d import y\n"
    src += "def f():\n    from edgeroute.e import z\n    from edgeroute import f\n"
    probe = tmp_path / "probe.py"
    probe.write_text(src)
    assert imports_of(probe) == {"a", "b", "c", "d", "e", "f"}
