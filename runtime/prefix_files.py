"""The prefix cache's block files (``edgeroute.prefix_cache``): the format, what a file must hold to be trusted,
and the model fingerprint that names a cache directory's folder.

A block file is ``MAGIC``, a 4-byte little-endian header length, a JSON header (the model fingerprint, the block's
chain hash, its parent's, the adapter's digest, its exact tokens, the payload's shape, dtype, CRC-32 and length),
then the payload: the keys and values ``[2 * layers, kv_heads, block, head_size]``. :func:`decode` trusts a file only
when every field is the one expected for the prompt at hand.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"EDGEROUTE-KV\x01\n"
SUFFIX = ".kvb"
MAX_HEADER = 1 << 16  # bytes of a block file's JSON header at most (64 tokens and a few hashes need ~1 KB)


@dataclass
class Block:
    """One cached block: its chain hash, its parent's, its tokens and the positions' keys and values."""

    key: bytes
    parent: bytes
    tokens: np.ndarray  # [block] int64
    data: np.ndarray  # [2 * layers, kv_heads, block, head_size]
    adapter: bytes = b""  # the LoRA adapter's digest the positions were computed on (b"": the base)
    #: in memory only: each position's token scored given the tokens before it (``output.TokenScore``; None for a
    #: prompt's first token), with ``top`` alternatives each, when a scored prompt (``prompt_logprobs``) computed it
    scores: tuple[Any, ...] | None = None
    top: int | None = None


def encode(block: Block, fingerprint: str, dtype: np.dtype) -> bytes:
    """A block file's bytes."""
    payload = np.ascontiguousarray(block.data).tobytes()
    header = {
        "fingerprint": fingerprint,
        "key": block.key.hex(),
        "parent": block.parent.hex(),
        "adapter": block.adapter.hex(),
        "tokens": block.tokens.tolist(),
        "shape": list(block.data.shape),
        "dtype": dtype.str,
        "crc32": zlib.crc32(payload),
        "bytes": len(payload),
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    return MAGIC + len(head).to_bytes(4, "little") + head + payload


def decode(
    raw: bytes | memoryview,
    fingerprint: str,
    shape: tuple[int, int, int, int],
    dtype: np.dtype,
    key: bytes,
    parent: bytes,
    tokens: np.ndarray,
    adapter: bytes,
) -> Block | str:
    """The block in a file's bytes when it is exactly the one expected (this model, this chain hash and parent,
    these tokens, this adapter, a whole payload with its checksum), else why it is refused. May raise
    ``RecursionError`` on a header nested past the parser's limit (the caller refuses it)."""
    if len(raw) < len(MAGIC) + 4 or bytes(raw[: len(MAGIC)]) != MAGIC:
        return "corrupt: not a block file"
    n = int.from_bytes(raw[len(MAGIC) : len(MAGIC) + 4], "little")
    if n > MAX_HEADER:
        return "corrupt: its header is too long"
    start = len(MAGIC) + 4 + n
    try:
        header = json.loads(bytes(raw[len(MAGIC) + 4 : start]))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "corrupt: its header is not JSON"
    if not isinstance(header, dict):
        return "corrupt: its header is not an object"
    if header.get("fingerprint") != fingerprint:
        return "another model's block"
    if header.get("key") != key.hex() or header.get("shape") != list(shape) or header.get("dtype") != dtype.str:
        return "corrupt: its key or shape is not this block's"
    if header.get("parent") != parent.hex() or header.get("tokens") != tokens.tolist():
        return "its tokens are not the prompt's"
    if header.get("adapter") != adapter.hex():
        return "computed on another adapter"
    payload = raw[start:]
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(payload) != header.get("bytes") or len(payload) != expected:
        return f"cut short: {len(payload)} of {header.get('bytes')} bytes"
    if zlib.crc32(payload) != header.get("crc32"):
        return "corrupt: its checksum does not match"
    return Block(key, parent, tokens.copy(), np.frombuffer(payload, dtype=dtype).reshape(shape), adapter)


def size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def mtime_of(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def fingerprint(graph: Any) -> str:
    """What a cached position depends on, for one loaded model: its files as the export recorded them (SHA-256
    and size) and as they are now (size, modification time), precision, quantisation, KV layout and dtype,
    geometry and context size."""
    m = graph.manifest
    files = {}
    for name in sorted({m.graph, *m.files}):
        path = Path(graph.path) / name
        st = path.stat() if path.exists() else None
        recorded = m.files.get(name, {})
        files[name] = [recorded.get("sha256"), recorded.get("bytes"), st.st_size if st else None,
                       st.st_mtime_ns if st else None]  # fmt: skip
    what = {
        "files": files,
        "precision": m.precision,
        "quantization": dict(m.quantization),
        "kv_layout": m.kv_layout,
        "kv_dtype": m.kv_dtype,
        "geometry": [m.num_layers, m.num_kv_heads, m.head_size, m.vocab_size],
        "context": graph.context_length,
        "lora": m.lora,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()
