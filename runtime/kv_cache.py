"""Per-sequence past keys and values: the one place that knows how the KV cache is held.

:class:`KVCache` holds host NumPy arrays ``[batch, kv_heads, length, head_size]`` per layer. The graph's
``present.*`` outputs become the next step's ``past_key_values.*`` inputs without copies. A device-resident
cache (IO binding on CUDA) subclasses it and overrides :meth:`feeds` / :meth:`store`; the Generator and the
router never see the difference.
"""

from __future__ import annotations

import mmap
from collections.abc import Sequence

import numpy as np

from .errors import ConfigError
from .manifest import Manifest


def common_prefix(a: Sequence[int] | np.ndarray, b: Sequence[int] | np.ndarray) -> int:
    """How many leading tokens ``a`` and ``b`` share: the part of a cache over ``a`` that ``b`` can keep."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:n], dtype=np.int64) != np.asarray(b[:n], dtype=np.int64))
    return int(diff[0]) if len(diff) else n


class KVCache:
    """The past K/V of one sequence (or one batch of sequences) for a model described by ``manifest``."""

    def __init__(self, manifest: Manifest, batch_size: int = 1) -> None:
        self.manifest = manifest
        self.batch_size = batch_size
        self._past_names = manifest.past_names()
        self._present_names = manifest.present_names()
        shape = (batch_size, manifest.num_kv_heads, 0, manifest.head_size)
        empty = np.zeros(shape, dtype=np.dtype(manifest.kv_dtype))
        self._layers: list[tuple[np.ndarray, np.ndarray]] = [(empty, empty)] * manifest.num_layers

    @property
    def length(self) -> int:
        """How many positions are cached."""
        return int(self._layers[0][0].shape[2])

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached keys and values."""
        return sum(k.nbytes + v.nbytes for k, v in self._layers)

    def feeds(self) -> dict[str, np.ndarray]:
        """Graph inputs ``past_key_values.N.key/value`` for the next run."""
        out: dict[str, np.ndarray] = {}
        for (kn, vn), (k, v) in zip(self._past_names, self._layers, strict=False):
            out[kn] = k
            out[vn] = v
        return out

    def output_names(self) -> list[str]:
        """Graph outputs that :meth:`store` expects, in order."""
        return [n for pair in self._present_names for n in pair]

    def store(self, presents: list[np.ndarray], new_tokens: int) -> None:
        """Take the graph's ``present.*`` outputs (in :meth:`output_names` order) as the new cache."""
        layers = [(presents[2 * i], presents[2 * i + 1]) for i in range(self.manifest.num_layers)]
        expect = self.length + new_tokens
        got = int(layers[0][0].shape[2])
        if got != expect:
            from .errors import InferenceError

            raise InferenceError(f"graph returned {got} cached positions, expected {expect}")
        self._layers = layers

    def trim(self, n: int) -> None:
        """Drop the last ``n`` cached positions (rewinding is slicing: no copy)."""
        if n <= 0:
            return
        keep = max(self.length - n, 0)
        self._layers = [(k[:, :, :keep], v[:, :, :keep]) for k, v in self._layers]

    def copy(self) -> KVCache:
        """An independent cache with the same contents."""
        other = KVCache.__new__(KVCache)
        other.__dict__.update(self.__dict__)
        other._layers = [(k.copy(), v.copy()) for k, v in self._layers]
        return other


class SharedKVCache:
    """Preallocated past/present buffers ``[batch, kv_heads, capacity, head_size]``, one K and one V per layer,
    for graphs with ``kv_layout: "shared"``: the graph reads the past from the same memory it writes the new
    positions into, so a step copies nothing. Row ``b`` holds ``lengths[b]`` valid positions from the start of
    its buffer (rows of a batch may differ); rewinding is lowering ``lengths``.

    The buffers live in one anonymous memory map, so memory is committed page by page as positions fill up
    (``np.zeros`` would not guarantee that: once a freed cache raised malloc's mmap threshold, the next one came
    from the heap and was zeroed in full, 160 MB of resident memory for SmolLM2 at 4,096 positions);
    ``nbytes`` is what the capacity reserves.
    """

    def __init__(self, manifest: Manifest, capacity: int, batch_size: int = 1) -> None:
        self.manifest = manifest
        self.batch_size = batch_size
        self.capacity = capacity
        shape = (batch_size, manifest.num_kv_heads, capacity, manifest.head_size)
        self.buffers = _lazy_zeros(2 * manifest.num_layers, shape, np.dtype(manifest.kv_dtype))
        self.lengths = np.zeros(batch_size, dtype=np.int32)
        self.binding: object | None = None  # the Model's IO binding over these buffers, made on first use

    @property
    def length(self) -> int:
        """How many positions are cached (the longest row's count in a batch)."""
        return int(self.lengths[0]) if self.batch_size == 1 else int(self.lengths.max())

    @property
    def nbytes(self) -> int:
        """Bytes the buffers reserve (committed as positions fill)."""
        return sum(b.nbytes for b in self.buffers)

    def trim(self, n: int) -> None:
        """Drop the last ``n`` cached positions of every row (their memory is overwritten later)."""
        if n > 0:
            self.lengths = np.maximum(self.lengths - n, 0).astype(np.int32)

    def row(self, i: int) -> SharedKVCache:
        """A one-row cache over row ``i``'s memory (views, no copy); its ``lengths`` are its own."""
        other = self._unbound()
        other.batch_size = 1
        other.buffers = [b[i : i + 1] for b in self.buffers]
        other.lengths = self.lengths[i : i + 1].copy()
        return other

    def copy(self) -> SharedKVCache:
        """An independent cache with the same contents."""
        other = self._unbound()
        other.buffers = _lazy_zeros(len(self.buffers), self.buffers[0].shape, self.buffers[0].dtype)
        used = self.length
        for dst, src in zip(other.buffers, self.buffers, strict=True):
            dst[:, :, :used] = src[:, :, :used]
        other.lengths = self.lengths.copy()
        return other

    def _unbound(self) -> SharedKVCache:
        """A shallow copy without this cache's IO binding (the caller replaces buffers and lengths)."""
        other = SharedKVCache.__new__(SharedKVCache)
        other.__dict__.update(self.__dict__)
        other.binding = None
        return other


def _lazy_zeros(count: int, shape: tuple[int, ...], dtype: np.dtype) -> list[np.ndarray]:
    """``count`` zero arrays of ``shape`` in one anonymous memory map (pages are committed when first written).

    Raises ``ConfigError`` on ``context_size`` when the system cannot reserve the map (``shape[2]`` positions)."""
    size = count * int(np.prod(shape)) * dtype.itemsize
    try:
        region = mmap.mmap(-1, max(size, 1))
    except (OSError, OverflowError, MemoryError, ValueError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
        raise ConfigError(
            "context_size",
            shape[2],
            f"the KV buffer of {shape[2]} positions x {shape[0]} sequence(s) needs {size / 2**30:.1f} GiB of address"
            f" space, which the system would not reserve ({why}); lower it (--ctx-size)",
        ) from None
    block = np.frombuffer(region, dtype=dtype, count=count * int(np.prod(shape))).reshape((count, *shape))
    return list(block)
