"""The prefix cache's disk tier: one model's block files in a directory, written by a background thread.

:class:`BlockDirectory` keeps ``ROOT/<model fingerprint[:32]>/<chain hash>.kvb`` (``prefix_files`` says what a
file holds and how it is checked): a block is written under a temporary name and renamed into place (a crash leaves
a temporary file, never a file that is later trusted; a full queue or a full disk drops the write, never blocks a
request); the directory is kept under ``disk_bytes`` (least recently used files removed first; several processes
may share it); a file is read back only when :func:`prefix_files.decode` accepts it, else removed with a log line.
:class:`~edgeroute.prefix_cache.PrefixCache` holds one when given a directory.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConfigError
from .folder_io import atomic_write
from .prefix_files import MAGIC, MAX_HEADER, SUFFIX, Block, decode, encode, mtime_of, size_of

log = logging.getLogger("edgeroute.prefix_cache")

_WRITE_QUEUE = 256  # blocks waiting for the disk writer at most; more are dropped (never block a request)


@dataclass
class _Touch:
    """The writer's order to mark a chain's files recently used (first block newest)."""

    keys: list[bytes]


class BlockDirectory:
    """One model's block files under ``root`` (module docstring); ``shape``: a block's
    ``[2 * layers, kv_heads, block, head_size]``; ``queue_blocks``: how many blocks may wait for the writer."""

    def __init__(
        self,
        root: Path,
        fingerprint: str,
        shape: tuple[int, int, int, int],
        dtype: np.dtype,
        disk_bytes: int,
        queue_blocks: int,
    ) -> None:
        self.root = root
        self.fingerprint = fingerprint
        self.shape = shape
        self.dtype = dtype
        self.disk_bytes = disk_bytes
        self.folder = root / fingerprint[:32]
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError("prefix_cache", str(root), f"cannot create the cache directory: {e.strerror}") from None
        #: the most bytes a block file may hold (its payload and a header of at most MAX_HEADER)
        self.file_bytes = int(np.prod(shape)) * dtype.itemsize + len(MAGIC) + 4 + MAX_HEADER
        self._lock = threading.Lock()
        self.counts = dict.fromkeys(("reads", "writes", "rejected", "dropped"), 0)
        self.used = self.files = 0
        for stale in self.folder.glob(".*.tmp"):  # a writer killed mid-file: never trusted, removed when old
            if time.time() - mtime_of(stale) > 60:
                stale.unlink(missing_ok=True)
        self.rescan()
        self._queue: queue.Queue[Block | _Touch | None] | None = queue.Queue(max(1, min(_WRITE_QUEUE, queue_blocks)))
        self._writer = threading.Thread(target=self._write_loop, name="edgeroute-prefix-cache", daemon=True)
        self._writer.start()
        atexit.register(self.close)  # what is queued reaches the disk when the process ends normally

    def path(self, key: bytes) -> Path:
        return self.folder / (key.hex() + SUFFIX)

    def staging(self) -> np.ndarray:
        """A buffer :meth:`read` can read a block file into (a reused one: no allocation per block)."""
        return np.empty(self.file_bytes + 1, np.uint8)

    # -- writing (the background thread) -------------------------------------------------------------------------
    def put(self, block: Block) -> None:
        """Write ``block`` in the background (dropped, and counted, when the queue is full)."""
        q = self._queue
        if q is not None:
            try:
                q.put_nowait(block)
            except queue.Full:
                self._count("dropped")

    def touch(self, keys: list[bytes]) -> None:
        """Mark a chain's files used (in the background; a hint, never in the way of a block's write)."""
        q = self._queue
        if keys and q is not None and q.qsize() < q.maxsize // 2:
            with contextlib.suppress(queue.Full):
                q.put_nowait(_Touch(keys))

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until the blocks queued are written (tests, a clean shutdown)."""
        q = self._queue
        if q is None:
            return
        end = time.monotonic() + timeout
        while q.unfinished_tasks and time.monotonic() < end:
            time.sleep(0.005)

    def close(self) -> None:
        """Write what is queued and stop the writer thread (nothing is written after)."""
        q = self._queue
        if q is not None:
            self.flush()
            self._queue = None
            q.put(None)
            self._writer.join(5)

    def _write_loop(self) -> None:
        q = self._queue
        assert q is not None
        while True:
            item = q.get()
            try:
                if item is None:
                    return
                if isinstance(item, _Touch):
                    self._touch_files(item.keys)
                else:
                    self._write(item)
            except OSError as e:  # a full disk, a removed directory: the block stays in memory only
                self._count("dropped")
                log.warning("prefix cache: could not write a block to %s: %s", self.root, e)
            finally:
                q.task_done()

    def _touch_files(self, keys: list[bytes]) -> None:
        """Mark a chain's files used now, its first block the newest (``_trim`` removes the oldest first)."""
        now = time.time()
        for depth, key in enumerate(keys):
            with contextlib.suppress(OSError):  # gone (trimmed by another process), or a read-only directory
                os.utime(self.path(key), (now - depth * 1e-3, now - depth * 1e-3))

    def _write(self, block: Block) -> None:
        path = self.path(block.key)
        if path.exists():
            return
        data = encode(block, self.fingerprint, self.dtype)
        atomic_write(path, data)  # a reader sees the whole file or none; a full disk leaves nothing behind
        self._count("writes")
        self.used += len(data)
        self.files += 1
        if self.used > self.disk_bytes:
            self._trim()

    # -- reading ---------------------------------------------------------------------------------------------
    def read(
        self, key: bytes, parent: bytes, tokens: np.ndarray, adapter: bytes, into: np.ndarray | None = None
    ) -> Block | None:
        """The block of ``key`` from disk, verified; None (and a log line) for anything else. With ``into`` (a
        :meth:`staging` buffer) the file is read there and the block's data is a view of it, valid until the next
        read into it."""
        path, most = self.path(key), self.file_bytes
        raw: bytes | memoryview
        try:
            with open(path, "rb") as f:
                if into is None:
                    raw = f.read(most + 1)  # a bigger file is not a block of this cache: never read it whole
                else:
                    view = memoryview(into.data)
                    raw = view[: f.readinto(view[: most + 1])]
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("prefix cache: cannot read %s (%s): a cold prefill", path, e)
            return None
        try:
            why = (
                decode(raw, self.fingerprint, self.shape, self.dtype, key, parent, tokens, adapter)
                if len(raw) <= most
                else "corrupt: too big"
            )
        except (ValueError, RecursionError, TypeError) as e:  # a header JSON cannot represent as a block's
            why = f"corrupt: {type(e).__name__}"
        if isinstance(why, str):
            self._count("rejected")
            log.warning("prefix cache: %s refused (%s): a cold prefill instead", path.name, why)
            with contextlib.suppress(OSError):  # in this model's folder under this block's name: garbage
                path.unlink(missing_ok=True)
            return None
        self._count("reads")
        return why

    # -- what the directory holds ----------------------------------------------------------------------------
    def remove(self, keys: list[bytes] | None) -> None:
        """Remove these blocks' files (None: every block file of this model)."""
        targets = [self.path(k) for k in keys] if keys is not None else list(self.folder.glob("*" + SUFFIX))
        for path in targets:
            path.unlink(missing_ok=True)
        self.rescan()

    def rescan(self) -> None:
        """What the directory holds now (another process may write to it too)."""
        files, self.used = self._scan()
        self.files = len(files)

    def _scan(self) -> tuple[list[Path], int]:
        files = list(self.folder.glob("*" + SUFFIX))
        return files, sum(size_of(p) for p in files)

    def _trim(self) -> None:
        """Remove the least recently used block files until the directory holds 90% of its budget (not every write
        past the budget scans the directory)."""
        files, used = self._scan()
        for path in sorted(files, key=mtime_of):
            if used <= 0.9 * self.disk_bytes:
                break
            used -= size_of(path)
            path.unlink(missing_ok=True)
        self.rescan()

    def _count(self, name: str) -> None:
        with self._lock:
            self.counts[name] += 1
