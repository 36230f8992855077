"""Packaging: the import root, the public surface, the console script, and what `import edgeroute` pulls in."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import edgeroute as er
import pytest


def test_all_matches_public_names() -> None:
    # submodules (edgeroute.engine, edgeroute.sampling, ...) are reachable, not exported names
    public = {n for n in dir(er) if not n.startswith("_") and not isinstance(getattr(er, n), types.ModuleType)}
    assert set(er.__all__) - {"__version__"} == public
    for name in er.__all__:
        assert getattr(er, name) is not None


def test_console_script_version() -> None:
    exe = Path(sys.executable).parent / "edgeroute"
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, check=True)
    assert er.__version__ in out.stdout


def test_error_tree() -> None:
    assert issubclass(er.ManifestError, er.ModelLoadError)
    assert issubclass(er.ProviderUnavailableError, er.ModelLoadError)
    assert issubclass(er.ConfigError, ValueError) and issubclass(er.ConfigError, er.EdgerouteError)
    assert issubclass(er.ExportValidationError, er.ExportError)
    for cls in (er.ModelLoadError, er.ContextOverflowError, er.InferenceError, er.ExportError):
        assert issubclass(cls, er.EdgerouteError)


def _subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # ray[serve]'s pydantic models, imported by serve.ray
def test_the_exception_tree_in_errors_is_the_classes() -> None:
    """errors.py's drawing of the tree names every error class of the library (export and serve included), each
    under its own parent, and nothing else."""
    import re

    import edgeroute.export.core  # noqa: F401  (every module that defines an error)
    import edgeroute.export.encoder_quality  # noqa: F401
    import edgeroute.serve.ray  # noqa: F401
    from edgeroute import errors

    drawn: dict[str, str] = {}  # class -> the parent the drawing puts it under
    stack: list[tuple[int, str]] = []
    for line in (errors.__doc__ or "").splitlines():
        m = re.match(r"^([ │]*)(?:[├└]── )?([A-Z]\w+Error|Interrupted)\b", line)
        if not m or "──" not in line and m.group(2) != "EdgerouteError":
            continue
        depth = len(m.group(1)) // 4 + ("──" in line)
        while stack and stack[-1][0] >= depth:
            stack.pop()
        if stack:
            drawn[m.group(2)] = stack[-1][1]
        stack.append((depth, m.group(2)))
    classes = {c.__name__: c for c in _subclasses(er.EdgerouteError) if c.__module__.startswith("edgeroute")}
    actual = {}
    for name, cls in classes.items():
        actual[name] = next(b.__name__ for b in cls.__mro__[1:] if issubclass(b, er.EdgerouteError))
    assert drawn == actual
