"""The package ships ``py.typed``: mypy finds no error in it (runtime, export, cli, serve and eval), as installed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LAYOUT = {  # pyproject's package-dir
    "runtime": "edgeroute",
    "export": "edgeroute/export",
    "cli": "edgeroute/cli",
    "serve": "edgeroute/serve",
    "eval": "edgeroute/eval",
}


def test_mypy_finds_no_error(tmp_path: Path) -> None:
    for src, dst in LAYOUT.items():  # the source folders as the package they install as, file by file
        (tmp_path / dst).mkdir(parents=True, exist_ok=True)
        for f in (REPO / src).iterdir():
            if f.suffix == ".py" or f.name == "py.typed" or (f / "__init__.py").is_file():  # subpackages whole
                (tmp_path / dst / f.name).symlink_to(f)
    res = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(REPO / "pyproject.toml"), "edgeroute"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={"MYPY_CACHE_DIR": str(REPO / ".mypy_cache"), "PATH": "/usr/bin:/bin"},
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Success: no issues found" in res.stdout
