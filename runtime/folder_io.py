"""Writing files that are read by other processes, never half-written: :func:`atomic_write` (a temporary name in
the same folder, renamed into place: a reader sees the old file or the new one, a failed write leaves nothing) and
:func:`update_json` (a JSON file such as a model folder's ``edgeroute.json`` read, changed and rewritten atomically
under a lock file, so that two processes changing it at once both land). The prefix cache's block files, a model
folder's manifest and the adapters it keeps, and the export's validation figures are written through them."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: one writer at a time is the user's care
    fcntl = None  # type: ignore[assignment]


def temporary(path: Path) -> Path:
    """A hidden name beside ``path`` that no other process or thread writing it at the same time uses."""
    return path.parent / f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp"


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` under a temporary name and rename it into place."""
    tmp = temporary(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """``path``'s lock (a lock file beside it), held while it is read, changed and rewritten."""
    if fcntl is None:
        yield
        return
    with open(path.parent / f".{path.name}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def update_json(path: Path, change: Callable[[dict[str, Any]], None], lock: bool = True) -> None:
    """Read the JSON object at ``path``, ``change`` it in place, and write it back atomically, under its lock (a
    lock file beside it; ``lock=False`` for a folder no other process sees yet, such as an export's)."""
    with _locked(path) if lock else contextlib.nullcontext():
        data = json.loads(path.read_text(encoding="utf-8"))
        change(data)
        atomic_write(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
