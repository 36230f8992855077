"""Packaging: the import root, the public surface, the console script, and what `import edgeroute` pulls in."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import edgeroute as er


def test_all_matches_public_names() -> None:
    public = {n for n in dir(er) if not n.startswith("_")} - {
        "beam",
        "chat",
        "chat_template",
        "choice",
        "cli",
        "config",
        "constraint",
        "engine",
        "evaluation",
        "evalplots",
        "contract",
        "device_cache",
        "errors",
        "export",
        "generator",
        "grammar",
        "kv_cache",
        "manifest",
        "model",
        "output",
        "protocols",
        "quality",
        "request",
        "routing",
        "sampling",
        "serve",
        "session",
        "tokenizer",
    }
    assert set(er.__all__) - {"__version__"} == public
    for name in er.__all__:
        assert getattr(er, name) is not None


def test_import_and_model_pull_no_heavy_modules(tiny_dir: Path) -> None:
    code = f"""
import json, sys
import edgeroute
m = edgeroute.Model.load({str(tiny_dir)!r})
m.generate("Hello", edgeroute.GenerationConfig(max_new_tokens=3))
print(json.dumps(sorted(k for k in ("torch", "transformers", "optimum", "click", "llguidance") if k in sys.modules)))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


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
