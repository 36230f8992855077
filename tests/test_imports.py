"""Imports: the runtime's modules import one another without a cycle, and none imports a subpackage of its own
folder (export, cli, serve, eval) — every import counts (top-level, inside functions and under ``TYPE_CHECKING``),
read from the source with ``ast``; and the import-hygiene table: what each entry point pulls in, and the one-line
hint each gives when its extra is missing."""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

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


# -- import hygiene: what each entry point pulls in, and the hint each one gives without its extra -----------------
# One table, run in ONE subprocess: a parent that has imported only BASE (numpy, onnxruntime, tokenizers: modules
# every row imports anyway) forks a fresh child per row, so each row starts from the same clean ``sys.modules``,
# blocks what it blocks, and is checked (and fails) on its own. A forbidden module is looked for in the child's
# whole ``sys.modules`` (BASE included), so preloading BASE hides nothing.
HEAVY = ("torch", "transformers", "optimum")
WEB = ("starlette", "uvicorn", "prometheus_client")
BASE = ("numpy", "onnxruntime", "tokenizers")
EVAL = ("sacrebleu", "jsonschema", "matplotlib")


@dataclass(frozen=True)
class Row:
    code: str  # run in the child with FOLDER (the tiny model) and EMPTY (an empty folder) defined
    forbid: tuple[str, ...] = ()  # modules (top-level or dotted) that must not be imported afterwards
    block: tuple[str, ...] = ()  # modules made unimportable first (``sys.modules[name] = None``): a missing extra
    needs: tuple[str, ...] = ()  # the row is skipped when these are not installed
    exit: int | None = None  # SystemExit's code, when the code must exit (a command)
    raises: tuple[str, str] | None = None  # (class name, message) of the exception the code must raise
    stderr: str | None = None  # in stderr (then its only line, for a command's one-line hint)
    stdout: str | None = None  # in stdout


HYGIENE = {
    # was tests/test_serve.py::test_the_runtime_does_not_import_the_web_stack
    "import-edgeroute": Row("import edgeroute", forbid=HEAVY + WEB + ("click", "llguidance", "ray")),
    # was tests/test_package.py::test_import_and_model_pull_no_heavy_modules
    "load-and-generate": Row(
        "import edgeroute\n"
        "m = edgeroute.Model.load(FOLDER)\n"
        "m.generate('Hello', edgeroute.GenerationConfig(max_new_tokens=3))",
        forbid=HEAVY + WEB + EVAL + ("click", "llguidance", "ray", "edgeroute.eval"),
    ),
    # was tests/test_package.py::test_eval_imports_its_extra_only_when_used: the command checks for the eval
    # extra's libraries and names the install line before any is imported
    "import-eval": Row("import edgeroute.eval", forbid=HEAVY + EVAL),
    # was tests/test_cli.py::test_run_help_imports_no_heavy_modules
    "run-help": Row(
        "from edgeroute.cli import cli\ncli.main(['run', '--help'])",
        forbid=HEAVY + ("ray",),
        needs=("click",),
        exit=0,
        stdout="Usage:",
    ),
    # was tests/test_ray.py::test_the_server_package_does_not_import_ray
    "server-package": Row(
        "import edgeroute.serve, edgeroute.cli.serve_cmd", forbid=HEAVY + ("ray",), needs=("click", *WEB)
    ),
    # new: the proxy's middleware is testable without Ray (tests/test_asgi.py)
    "asgi-middlewares": Row("import edgeroute.serve.asgi", forbid=HEAVY + ("ray",), needs=WEB),
    # was tests/test_constraint.py::test_without_llguidance_a_constraint_names_the_extra
    "without-llguidance": Row(
        "import edgeroute as er\ner.Regex('a')",
        block=("llguidance",),
        raises=("MissingExtraError", "structured output needs llguidance: pip install 'edgeroute[grammar]'"),
    ),
    # was tests/test_export.py::test_missing_extra_names_the_pip_command
    "without-torch": Row(
        "from edgeroute.export import export_model\nexport_model(EMPTY, EMPTY + '/o')",
        block=("torch",),
        raises=("ExportError", "pip install 'edgeroute[export]'"),
    ),
    # was the last part of tests/test_serve.py::test_command_errors_are_one_line
    "serve-without-uvicorn": Row(
        "import sys\nfrom edgeroute.cli import main\nsys.argv = ['edgeroute', 'serve', EMPTY]\nmain()",
        block=("uvicorn",),
        needs=("click",),
        exit=1,
        stderr="pip install 'edgeroute[serve]'",
    ),
    # was tests/test_ray.py::test_without_the_ray_extra_the_command_says_how_to_install_it
    "serve-ray-without-ray": Row(
        "import sys\nfrom edgeroute.cli import main\nsys.argv = ['edgeroute', 'serve', FOLDER, '--ray']\nmain()",
        block=("ray",),
        needs=("click", *WEB),
        exit=1,
        stderr="pip install 'edgeroute[ray]'",
    ),
}

# The parent: reads {"rows": {id: {code, block}}, "names": {...}} on stdin, forks a child per row (stdout and
# stderr captured at the file descriptors), prints {id: {exit, raised, stdout, stderr, modules}} as JSON.
RUNNER = r"""
import json, os, sys, tempfile, traceback
spec = json.load(sys.stdin)
for name in spec["base"]:
    __import__(name)
out = {}
tmp = tempfile.mkdtemp()
for i, (rid, row) in enumerate(spec["rows"].items()):
    paths = [os.path.join(tmp, f"{i}.{k}") for k in ("out", "err", "json")]
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        result = {"exit": None, "raised": None}
        try:
            for k, path in zip((1, 2), paths):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), k)
            for name in row["block"]:
                sys.modules[name] = None
            try:
                exec(compile(row["code"], rid, "exec"), {"__name__": "__main__", **spec["names"]})
            except SystemExit as e:
                result["exit"] = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
            except BaseException as e:
                traceback.print_exc()
                result["raised"] = [type(e).__name__, str(e)]
            result["modules"] = sorted(m for m, v in list(sys.modules.items()) if v is not None)
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            with open(paths[2], "w") as f:
                json.dump(result, f)
            os._exit(0)
    os.waitpid(pid, 0)
    with open(paths[0]) as o, open(paths[1]) as e, open(paths[2]) as r:
        out[rid] = {**json.load(r), "stdout": o.read(), "stderr": e.read()}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def hygiene(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Every row of HYGIENE, run once in one subprocess."""
    names = {"FOLDER": str(tiny_dir), "EMPTY": str(tmp_path_factory.mktemp("empty"))}
    rows = {rid: {"code": row.code, "block": list(row.block)} for rid, row in HYGIENE.items()}
    spec = json.dumps({"base": BASE, "rows": rows, "names": names})
    proc = subprocess.run([sys.executable, "-c", RUNNER], input=spec, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("rid", list(HYGIENE))
def test_import_hygiene(rid: str, hygiene: dict[str, dict[str, Any]]) -> None:
    row, got = HYGIENE[rid], hygiene[rid]
    missing = [m for m in row.needs if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")
    assert not set(row.forbid) & set(BASE)  # the parent's preloads cannot be what a row forbids
    if row.raises is None:
        assert got["raised"] is None, got["stderr"]
    else:
        assert got["raised"] is not None and got["raised"][0] == row.raises[0], got["stderr"]
        assert row.raises[1] in got["raised"][1]
    assert got["exit"] == row.exit, got["stderr"]
    assert sorted(set(row.forbid) & set(got["modules"])) == []
    if row.stdout is not None:
        assert row.stdout in got["stdout"]
    if row.stderr is not None:
        assert row.stderr in got["stderr"] and len(got["stderr"].strip().splitlines()) == 1, got["stderr"]
