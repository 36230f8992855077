"""A prefix cache that remembers: the KV positions of many prompts, in memory and optionally on disk across restarts.

The cache holds **blocks** of ``block`` positions (32): the keys and values of every layer for those positions,
``[2 * layers, kv_heads, block, head_size]``, as the model computed them after the tokens before them. A block is
found by its **chain hash**: ``h_k = blake2b(h_{k-1} | adapter | tokens of block k)``, so the hash of a prompt's k-th
block names the whole prefix up to it, and the longest cached prefix of a prompt is found by hashing its blocks in
order until one is missing: time proportional to the prompt, independent of how many entries the cache holds.

- **Memory**: blocks under ``memory_bytes``, least recently used evicted first (a hit touches a chain from its end
  to its start, so a prefix's first blocks, which every longer prompt needs, outlive its last ones).
- **Disk** (``directory``; ``edgeroute.prefix_disk``): every block stored in memory is also written, by a
  background thread, to ``DIR/<model fingerprint>/<chain hash>.kvb`` under a temporary name and renamed into place
  (a crash leaves a temporary file, never a file that is later trusted; a full queue or a full disk drops the
  write, never blocks a request); the directory is kept under ``disk_bytes`` (least recently used files removed).
  After a restart, a prompt's blocks missing from memory are read back from disk.
- **Trust**: a block is used only when it provably belongs. The model fingerprint (the manifest's recorded file
  hashes, the files' sizes and modification times, precision, quantisation, KV layout and dtype, geometry and
  context size) names the folder the files live in and is checked again in each file; each file holds its
  block's exact tokens, its parent's chain hash and a CRC-32 of its keys and values, all compared before use (the
  tokens of every block of the chain against the prompt's: a hash collision or a forged token list cannot pass).
  Anything else (a changed model, a truncated or flipped file) is a miss: a log line on ``edgeroute.prefix_cache``
  and a cold prefill, never wrong tokens.
- **Adapters**: a LoRA adapter's digest enters every chain hash: one adapter's cached positions never serve another.

Exactness: a hit copies positions computed by the same graph for the same tokens, so fp32 generation is identical
to a cold prefill (``tests/test_prefix_cache.py``). The engine, ``Generator`` and ``ChatSession`` use it
(``Model.load(prefix_cache=...)``); ``Model.cache_prefix`` warms it.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError
from .prefix_disk import BlockDirectory
from .prefix_files import MAGIC, SUFFIX, Block, fingerprint

BLOCK = 32  # positions per block (a prompt reuses whole blocks: at most 31 positions of it are computed again)
DEFAULT_MEMORY = 512 << 20
DEFAULT_DISK = 8 << 30


@dataclass
class PrefixCacheStats:
    """What the cache did (the server's metrics read it)."""

    hits: int  # lookups that found at least one block
    misses: int
    hit_tokens: int  # positions served from the cache
    memory_blocks: int
    memory_bytes: int
    disk_blocks: int
    disk_bytes: int
    disk_reads: int  # blocks read back from disk
    disk_writes: int
    disk_rejected: int  # files refused (another model, corrupt, not the prompt's tokens)
    dropped_writes: int  # blocks not written (queue full, disk error)
    evicted: int


@dataclass(frozen=True)
class PrefixEntry:
    """A cached prefix: the chain hash of its last block, how many positions it holds, where it is."""

    key: str
    tokens: int
    bytes: int
    on_disk: bool


class PrefixCache:
    """Blocks of KV positions by chain hash, in memory under a budget and optionally on disk (module docstring).
    Thread-safe: the engine's thread, Generators and the server's threads share it."""

    def __init__(
        self,
        fingerprint: str,
        shape: tuple[int, int, int],
        dtype: np.dtype,
        memory_bytes: int = DEFAULT_MEMORY,
        directory: str | Path | None = None,
        disk_bytes: int = DEFAULT_DISK,
        block: int = BLOCK,
    ) -> None:
        for name, value in (("prefix_cache_memory", memory_bytes), ("prefix_cache_disk", disk_bytes)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(name, value, "must be a number of bytes >= 0")
        self.fingerprint = fingerprint
        self.layers2, self.kv_heads, self.head_size = shape
        self.dtype = np.dtype(dtype)
        self.block = block
        self.block_bytes = self.layers2 * self.kv_heads * block * self.head_size * self.dtype.itemsize
        self.memory_bytes = memory_bytes
        self.disk_bytes = disk_bytes
        self._blocks: OrderedDict[bytes, Block] = OrderedDict()
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(("hits", "misses", "hit_tokens", "evicted"), 0)
        #: the disk tier (``edgeroute.prefix_disk``), with a directory; blocks waiting for it are memory too: at
        #: most the memory budget's worth wait
        self.disk: BlockDirectory | None = None
        if directory is not None:
            block_shape = (self.layers2, self.kv_heads, block, self.head_size)
            queued = memory_bytes // max(self.block_bytes, 1)
            root = Path(directory).expanduser()
            self.disk = BlockDirectory(root, fingerprint, block_shape, self.dtype, disk_bytes, queued)

    @property
    def directory(self) -> Path | None:
        """The directory blocks are kept in across restarts (None: memory only)."""
        return self.disk.root if self.disk is not None else None

    # -- keys ------------------------------------------------------------------------------------------------
    def keys(self, tokens: Sequence[int] | np.ndarray, adapter: bytes = b"") -> list[bytes]:
        """The chain hash of each full block of ``tokens``."""
        ids = np.ascontiguousarray(tokens, dtype="<i8")
        out, parent = [], self.fingerprint.encode()
        for k in range(len(ids) // self.block):
            h = hashlib.blake2b(parent, digest_size=16)
            h.update(adapter)
            h.update(ids[k * self.block : (k + 1) * self.block].tobytes())
            parent = h.digest()
            out.append(parent)
        return out

    # -- lookup and restore ----------------------------------------------------------------------------------
    def lookup(
        self,
        tokens: Sequence[int] | np.ndarray,
        limit: int,
        adapter: bytes = b"",
        count: bool = True,
        disk: bool = True,
        top: int | None = None,
    ) -> list[Block]:
        """The longest chain of cached blocks that starts ``tokens``, at most ``limit`` positions; from memory, then
        (``disk``) from the directory, read back into memory. Counts a hit or a miss unless ``count`` is False (the
        caller counts with :meth:`counted` once it knows whether it uses them). Never raises for what a file
        holds: a block that cannot be read or verified ends the chain there. ``top``: only blocks that carry their
        positions' scores with ``top`` alternatives (a scored prompt's, :meth:`store`)."""
        found = []
        for _, block in self._chain(tokens, limit, adapter, disk):
            if top is not None and (block.scores is None or block.top != top):
                break
            found.append(block)
        self._touch(found)
        self._evict()
        if count:
            self.counted(len(found) * self.block)
        return found

    def restore_prefix(
        self,
        tokens: Sequence[int] | np.ndarray,
        limit: int,
        kv: np.ndarray,
        row: int,
        adapter: bytes = b"",
        start: int = 0,
    ) -> int:
        """Copy the longest cached prefix of ``tokens`` (at most ``limit`` positions) into row ``row`` of ``kv``,
        past the ``start`` positions the row holds already (their blocks are neither fetched nor copied), and return
        the prefix's positions; what it adds is counted as a hit (nothing: a miss). Blocks on disk go straight from
        a reused buffer into the row, not into memory first (a restart's first prompt pays one copy, not an
        allocation too: the blocks enter memory when the caller stores the prompt after its first token)."""
        staging = self.disk.staging() if self.disk is not None else None
        done, used = 0, []
        for k, got in self._chain(tokens, limit, adapter, True, staging, first=start // self.block):
            done = self._copy(kv, row, k, got)
            if got.key in self._blocks:
                used.append(got)
        self._touch(used)
        self.counted(max(done - start, 0))
        return max(done, start)

    def _chain(
        self,
        tokens: Sequence[int] | np.ndarray,
        limit: int,
        adapter: bytes,
        disk: bool,
        staging: np.ndarray | None = None,
        first: int = 0,
    ) -> Iterator[tuple[int, Block]]:
        """``(k, block)`` for the blocks ``first``, ``first + 1``, ... of the longest cached chain that starts
        ``tokens`` (at most ``limit`` positions), each verified against the prompt's tokens and its parent; from
        memory, else (``disk``) from the directory: into memory, or (``staging``) as a view of that buffer, valid
        until the next block. The blocks before ``first`` are the caller's already: only their hashes are used."""
        ids = np.asarray(tokens, dtype=np.int64)[: max(limit, 0)]
        keys = self.keys(ids, adapter)
        parent = keys[first - 1] if 0 < first <= len(keys) else self.fingerprint.encode()
        for k in range(first, len(keys)):
            key, want = keys[k], ids[k * self.block : (k + 1) * self.block]
            with self._lock:
                got = self._blocks.get(key)
            if got is None and disk and self.disk is not None:
                got = self.disk.read(key, parent, want, adapter, staging)
                if got is not None and staging is None:
                    self._insert(got, write=False)
            if got is None or got.parent != parent or not np.array_equal(got.tokens, want):
                return
            yield k, got
            parent = key

    def _touch(self, chain: Sequence[Block]) -> None:
        """A chain was used: most recent in memory, its start most recent of all (every longer prompt needs it, so
        its end is evicted first), and its files likewise on disk (in the background)."""
        with self._lock:
            for b in reversed(chain):
                if b.key in self._blocks:
                    self._blocks.move_to_end(b.key)
        if self.disk is not None:
            self.disk.touch([b.key for b in chain])

    def counted(self, positions: int) -> None:
        """Count a prompt the cache served ``positions`` of (0: a miss)."""
        with self._lock:
            self._counts["hits" if positions else "misses"] += 1
            self._counts["hit_tokens"] += positions

    def restore(self, kv: np.ndarray, row: int, blocks: Sequence[Block]) -> int:
        """Copy ``blocks`` into positions ``0..len(blocks) * block`` of row ``row`` of a shared KV cache's ``kv``
        (``[2 * layers, rows, kv_heads, capacity, head_size]``); returns the positions."""
        for k, b in enumerate(blocks):
            self._copy(kv, row, k, b)
        return len(blocks) * self.block

    def _copy(self, kv: np.ndarray, row: int, k: int, block: Block) -> int:
        """Block ``k`` of a chain into its positions of row ``row`` of ``kv``; returns the positions up to its end."""
        kv[:, row, :, k * self.block : (k + 1) * self.block] = block.data
        return (k + 1) * self.block

    # -- storing ---------------------------------------------------------------------------------------------
    def store(
        self,
        tokens: Sequence[int] | np.ndarray,
        kv: np.ndarray,
        row: int,
        adapter: bytes = b"",
        scores: Sequence[Any] = (),
        top: int | None = None,
    ) -> int:
        """Keep the full blocks of ``tokens`` (positions ``0..len(tokens)`` of row ``row`` of a shared KV cache's
        ``kv`` hold their keys and values) that the cache does not hold yet; returns how many blocks were added.
        ``scores``: a scored prompt's (``scores[i]`` token ``i + 1``'s, with ``top`` alternatives each), kept with
        each block whose tokens they all cover (a block held without them gets them: the same tokens, the same
        scores), in memory only."""
        if self.memory_bytes < self.block_bytes:
            return 0
        ids = np.asarray(tokens, dtype=np.int64)
        keys = self.keys(ids, adapter)
        added, parent, chain = 0, self.fingerprint.encode(), []
        by_position = (None, *scores) if scores else ()  # position p's token's score (the first token has none)
        for k, key in enumerate(keys):
            s = k * self.block
            scored = tuple(by_position[s : s + self.block]) if s + self.block <= len(by_position) else None
            with self._lock:
                block = self._blocks.get(key)
                if block is not None and scored is not None and block.scores is None:
                    block.top, block.scores = top, scored  # top first: a reader that sees scores sees it
            if block is None:
                data = np.ascontiguousarray(kv[:, row, :, s : s + self.block])
                block = Block(key, parent, ids[s : s + self.block].copy(), data, adapter, scored, top)
                self._insert(block, write=True)
                added += 1
            chain.append(block)
            parent = key
        self._touch(chain)
        self._evict()
        return added

    def _insert(self, block: Block, write: bool) -> None:
        with self._lock:
            if block.key in self._blocks:
                return
            self._blocks[block.key] = block
        if write and self.disk is not None:
            self.disk.put(block)

    def _evict(self) -> None:
        """Least recently used blocks out until the budget holds (after a chain was inserted and touched: never a
        chain's start while its end stays)."""
        with self._lock:
            while len(self._blocks) * self.block_bytes > self.memory_bytes:
                self._blocks.popitem(last=False)
                self._counts["evicted"] += 1

    # -- entries and stats -----------------------------------------------------------------------------------
    def entries(self) -> list[PrefixEntry]:
        """The cached prefixes in memory: one per chain end (a block no other block continues)."""
        with self._lock:
            blocks = dict(self._blocks)
        parents = {b.parent for b in blocks.values()}
        out: list[PrefixEntry] = []
        for key, b in blocks.items():
            if key in parents:
                continue
            n, node = 0, b.parent
            while True:  # up the chain while its blocks are held
                n += 1
                up = blocks.get(node)
                if up is None:
                    break
                node = up.parent
            on_disk = self.disk is not None and self.disk.path(key).exists()
            out.append(PrefixEntry(key.hex(), n * self.block, n * self.block_bytes, on_disk))
        return out

    def drop(self, key: str | None = None) -> int:
        """Drop one prefix (its chain-end ``key`` from :meth:`entries`: the chain's blocks that no other cached
        prefix continues), or everything (``None``), from memory and disk; returns the blocks dropped."""
        with self._lock:
            if key is None:
                gone = list(self._blocks)
                self._blocks.clear()
            else:
                gone, node = [], bytes.fromhex(key)
                while node in self._blocks:
                    if any(b.parent == node for b in self._blocks.values()):
                        break  # another prefix continues it
                    gone.append(node)
                    node = self._blocks.pop(node).parent
        if self.disk is not None:
            self.disk.remove(gone if key is not None else None)
        return len(gone)

    def stats(self) -> PrefixCacheStats:
        with self._lock:
            c, n = dict(self._counts), len(self._blocks)
        disk = self.disk
        d = dict(disk.counts) if disk is not None else dict.fromkeys(("reads", "writes", "rejected", "dropped"), 0)
        files, used = (disk.files, disk.used) if disk is not None else (0, 0)
        return PrefixCacheStats(
            c["hits"], c["misses"], c["hit_tokens"], n, n * self.block_bytes, files, used,
            d["reads"], d["writes"], d["rejected"], d["dropped"], c["evicted"],
        )  # fmt: skip

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until the blocks queued for disk are written (tests, a clean shutdown)."""
        if self.disk is not None:
            self.disk.flush(timeout)

    def close(self) -> None:
        """Write what is queued and stop the writer thread (the cache then keeps to memory)."""
        if self.disk is not None:
            self.disk.close()


__all__ = ["MAGIC", "SUFFIX", "Block", "PrefixCache", "PrefixCacheStats", "PrefixEntry", "fingerprint"]
