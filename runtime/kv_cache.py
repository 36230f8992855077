"""Per-sequence past keys and values: the one place that knows how the KV cache is held and fed to the graph.

Every cache kind implements :class:`Cache`: it owns its buffers and whatever binds them to the graph, and runs
the graph itself (``run``, ``step``, ``prefill_rows``), so ``Model`` and the generators never branch on its kind.
A device-resident cache or an engine's slot pool is one more class implementing it.

- :class:`KVCache` (``kv_layout: "concat"``): host NumPy arrays ``[batch, kv_heads, length, head_size]`` per
  layer; the graph's ``present.*`` outputs become the next run's ``past_key_values.*`` inputs without copies.
- :class:`SharedKVCache` (``kv_layout: "shared"``): one preallocated buffer per layer, bound through an
  onnxruntime IO binding as both the past input and the present output and written in place.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from .adapters import Adapter, LoraLayout, LoraRows
from .errors import ConfigError, ContextOverflowError, InferenceError, first_line
from .lazy_memory import lazy_arrays
from .manifest import Manifest
from .shared_binding import SharedBinding


class Cache(Protocol):
    """What every KV cache kind does. ``run`` and ``step`` append ``ids`` ``[batch, n]`` after what the cache holds
    and return logits; the arrays they return may be buffers the cache reuses (``reuses_output``): valid until the
    next run on this cache."""

    batch_size: int
    reuses_output: bool

    @property
    def length(self) -> int:
        """How many positions are cached (the longest row's count in a batch)."""
        ...

    @property
    def nbytes(self) -> int:
        """Bytes the cache holds or reserves."""
        ...

    def run(
        self,
        session: Any,
        ids: np.ndarray,
        n_last: int,
        attention_mask: np.ndarray | None = None,
        position_ids: np.ndarray | None = None,
    ) -> np.ndarray:
        """One graph run: the logits of the last ``n_last`` positions, ``[batch, n_last, vocab]`` float32."""
        ...

    def step(self, session: Any, ids: np.ndarray) -> np.ndarray:
        """One graph run for a decode loop: the last position's logits, ``[batch, vocab]``."""
        ...

    def prefill_rows(self, session: Any, prompts: list[list[int]], chunk: int) -> np.ndarray:
        """Prefill a batch cache with one prompt per row; each row's last-position logits, ``[batch, vocab]``.
        Decoding then appends one position per row (``run`` with the batch's attention mask and positions)."""
        ...

    def trim(self, n: int) -> None:
        """Drop the last ``n`` cached positions (of every row)."""
        ...

    def copy(self) -> Cache:
        """An independent cache with the same contents."""
        ...

    def set_adapter(self, adapter: Adapter | None, row: int | None = None) -> None:
        """Run ``adapter`` (None: the base) on row ``row`` (None: every row) from the next graph run on."""
        ...


def _no_adapters(adapter: Adapter) -> ConfigError:
    return ConfigError(
        "adapter", adapter.name, "this model's graph takes no adapters (export the base with --lora-rank)"
    )


def _inference_error(e: Exception) -> InferenceError:
    """onnxruntime's errors are untyped: their first line, as an ``InferenceError`` (chain it with ``from``)."""
    return InferenceError(f"onnxruntime failed: {first_line(e)}")


def common_prefix(a: Sequence[int] | np.ndarray, b: Sequence[int] | np.ndarray) -> int:
    """How many leading tokens ``a`` and ``b`` share: the part of a cache over ``a`` that ``b`` can keep."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:n], dtype=np.int64) != np.asarray(b[:n], dtype=np.int64))
    return int(diff[0]) if len(diff) else n


class KVCache:
    """The past K/V of one sequence (or one batch of sequences) for a model described by ``manifest``, for graphs
    that take the past and return the present (``kv_layout: "concat"``): attention masks and position ids are
    inputs, so rows of a batch may be left-padded."""

    reuses_output = False

    def __init__(self, manifest: Manifest, batch_size: int = 1) -> None:
        self.manifest = manifest
        self.batch_size = batch_size
        self.contract = manifest.contract
        self._layers: list[tuple[np.ndarray, np.ndarray]] = self.contract.empty_past(batch_size)
        self._outputs = self.contract.output_names()

    def run(
        self,
        session: Any,
        ids: np.ndarray,
        n_last: int,
        attention_mask: np.ndarray | None = None,
        position_ids: np.ndarray | None = None,
    ) -> np.ndarray:
        """One graph run after the cached positions; ``attention_mask`` defaults to ones over ``length + n``
        positions and ``position_ids`` to the positions after the cache."""
        n = ids.shape[1]
        feeds = self.contract.feeds(ids, self._layers, n_last, self.length, attention_mask, position_ids)
        try:
            outs = session.run(self._outputs, feeds)
        except Exception as e:  # onnxruntime's errors are untyped
            raise _inference_error(e) from e
        self.store(outs[1:], n)
        logits = outs[0]
        if logits.ndim == 2:
            logits = logits[:, None, :]
        return np.asarray(logits[:, -n_last:, :], dtype=np.float32)

    def step(self, session: Any, ids: np.ndarray) -> np.ndarray:
        return self.run(session, ids, 1)[:, -1, :]

    def prefill_rows(self, session: Any, prompts: list[list[int]], chunk: int) -> np.ndarray:
        """Left-padded rows under one attention mask, in chunks of ``chunk`` positions."""
        n = max(len(p) for p in prompts)
        ids, mask = left_padded(prompts, n)
        pos_all = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        logits = None
        while self.length < n:
            s, e = self.length, min(n, self.length + chunk)
            logits = self.run(session, ids[:, s:e], 1, mask[:, :e], pos_all[:, s:e])
        assert logits is not None
        return logits[:, -1, :]

    @property
    def length(self) -> int:
        """How many positions are cached."""
        return int(self._layers[0][0].shape[2])

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached keys and values."""
        return sum(k.nbytes + v.nbytes for k, v in self._layers)

    def store(self, presents: list[np.ndarray], new_tokens: int) -> None:
        """Take the graph's present outputs (in the contract's order) as the new cache."""
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

    def reorder(self, parents: np.ndarray) -> int:
        """Row i takes what row ``parents[i]`` held (beam search); returns how many rows changed."""
        moved = int(np.count_nonzero(parents != np.arange(len(parents))))
        if moved:
            self._layers = [(k[parents], v[parents]) for k, v in self._layers]
        return moved

    def widen(self, rows: int) -> None:
        """A one-row cache becomes ``rows`` copies of its row (a prompt prefilled once, shared by beams)."""
        self._layers = [(np.repeat(k[:1], rows, axis=0), np.repeat(v[:1], rows, axis=0)) for k, v in self._layers]
        self.batch_size = rows

    def set_adapter(self, adapter: Adapter | None, row: int | None = None) -> None:
        if adapter is not None:
            raise _no_adapters(adapter)

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

    reuses_output = True

    def __init__(self, manifest: Manifest, capacity: int, batch_size: int = 1) -> None:
        self.manifest = manifest
        self.batch_size = batch_size
        self.capacity = capacity
        shape = (batch_size, manifest.num_kv_heads, capacity, manifest.head_size)
        #: every layer's K and V in one array ``[2 * layers, batch, kv_heads, capacity, head_size]``; ``buffers``
        #: are its layers (the prefix cache copies a row's positions of all of them in one call)
        self.kv = _lazy_zeros(2 * manifest.num_layers, shape, np.dtype(manifest.kv_dtype))
        self.lengths = np.zeros(batch_size, dtype=np.int32)
        self.binding: Any = None  # the IO binding over these buffers (SharedBinding), made on the first run
        #: flat float32 memory the binding's logits are carved from when they fit (many runs of changing shapes,
        #: scoring's, then fault no new pages in); None: each shape allocates its own
        self.arena: np.ndarray | None = None
        # a LoRA graph's per-row adapter weights (edgeroute.adapters), zeros until a row is given an adapter
        lora = manifest.contract.lora
        self.lora = LoraRows.new(LoraLayout(manifest.contract), batch_size) if lora else None

    def set_adapter(self, adapter: Adapter | None, row: int | None = None) -> None:
        """Run ``adapter`` (None: the base model) on row ``row`` (None: every row) from the next graph run on: its
        weights are copied into the row's adapter inputs (nothing when the row already holds it)."""
        if self.lora is None:
            if adapter is not None:
                raise _no_adapters(adapter)
            return
        for r in range(self.batch_size) if row is None else (row,):
            self.lora.set(r, adapter)

    def run(
        self,
        session: Any,
        ids: np.ndarray,
        n_last: int,
        attention_mask: np.ndarray | None = None,
        position_ids: np.ndarray | None = None,
        counts: np.ndarray | None = None,
    ) -> np.ndarray:
        """One run: each row appends ``n`` positions after its own ``lengths[b]`` (the graph derives positions and
        the mask from them: ``attention_mask`` and ``position_ids`` are not used). Returns the bound logits
        buffer itself, overwritten by the next run.

        ``counts`` (graphs with ``query_seqlens``, see :attr:`ragged`): row ``b`` appends only its first
        ``counts[b]`` positions (0 to ``n``; the rest is right padding, its logits undefined); a row given 0 is
        left as it is and must hold at least one position."""
        b, n = ids.shape
        if b != self.batch_size:
            raise ConfigError("input_ids", ids.shape, f"batch {b} does not match the cache's batch {self.batch_size}")
        if counts is not None:
            counts = self._check_counts(counts, n)
        length = self.length
        # ragged rows too: every row's padded span (``n`` after its length) must lie inside the buffer
        end = length + n
        if end > self.capacity:
            raise ContextOverflowError(end, self.capacity, "KV buffer (raise context_size)")
        binding = self.binding
        if binding is None:
            binding = self.binding = self._bind(session)
        try:
            logits = binding.run(ids, self, length, n_last, counts)
        except Exception as e:  # onnxruntime's errors are untyped
            raise _inference_error(e) from e
        if counts is not None:
            self.lengths += counts
        elif b == 1:  # an item write: the first ufunc call after a graph run costs ~25 us more (cold caches)
            self.lengths[0] = length + n
        else:
            self.lengths += n
        return logits

    @property
    def ragged(self) -> bool:
        """Whether rows of one run may append different numbers of positions (:meth:`run`'s ``counts``): host
        caches of graphs that take ``query_seqlens`` (``GraphContract.ragged``)."""
        return self.manifest.contract.ragged

    def _check_counts(self, counts: np.ndarray, n: int) -> np.ndarray:
        if not self.ragged:
            raise ConfigError("counts", counts, "this cache runs every row at the run's width (a graph without "
                              "query_seqlens: export it again; or a device cache)")  # fmt: skip
        out = np.asarray(counts, dtype=np.int32)
        if out.shape != (self.batch_size,) or out.min() < 0 or out.max() > n:
            raise ConfigError("counts", counts, f"must give each of the {self.batch_size} rows 0 to {n} positions")
        if np.any((out == 0) & (self.lengths == 0)):
            raise ConfigError("counts", counts, "a row given no position must already hold one")
        return out

    def _bind(self, session: Any) -> Any:
        """The IO binding of this cache's buffers (made on the first run; a device cache binds addresses)."""
        return SharedBinding(session, self)

    def step(self, session: Any, ids: np.ndarray) -> np.ndarray:
        """A view of the bound output's last position (no copy of the vocabulary's logits per token)."""
        self.run(session, ids, 1)
        assert self.binding is not None and self.binding.last is not None
        return self.binding.last

    def prefill_rows(self, session: Any, prompts: list[list[int]], chunk: int) -> np.ndarray:
        """Each row prefilled alone into its own slice of the buffer: there is no mask, so no padding enters it."""
        rows = []
        for i, p in enumerate(prompts):
            row = self.row(i)
            for s in range(0, len(p), chunk):
                last = row.run(session, np.array([p[s : s + chunk]], dtype=np.int64), 1)
            self.lengths[i] = row.lengths[0]
            rows.append(last[0, -1].copy())
        return np.stack(rows)

    @property
    def length(self) -> int:
        """How many positions are cached (the longest row's count in a batch)."""
        return int(self.lengths[0]) if self.batch_size == 1 else int(self.lengths.max())

    @property
    def buffers(self) -> list[np.ndarray]:
        """Every layer's K and V buffer ``[batch, kv_heads, capacity, head_size]``: views of :attr:`kv`."""
        return list(self.kv)

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
        other.kv = self.kv[:, i : i + 1]
        other.lengths = self.lengths[i : i + 1].copy()
        other.lora = self.lora.view(i, 1) if self.lora is not None else None
        return other

    def head(self, k: int) -> SharedKVCache:
        """A cache over the first ``k`` rows' memory (views, no copy) whose ``lengths`` is a view of this cache's:
        a run on it moves these rows' lengths here too (an engine's decode step over its low slots)."""
        return self.rows(0, k)

    def rows(self, first: int, end: int) -> SharedKVCache:
        """:meth:`head` for rows ``first`` to ``end - 1`` (an engine's prefill of the requests in those slots)."""
        other = self._unbound()
        other.batch_size = end - first
        other.kv = self.kv[:, first:end]
        other.lengths = self.lengths[first:end]
        other.lora = self.lora.view(first, end - first) if self.lora is not None else None
        return other

    def reorder(self, parents: np.ndarray) -> int:
        """Row i takes what row ``parents[i]`` held (beam search): only the rows whose parent changed are copied,
        inside the buffer; returns how many."""
        moved = np.flatnonzero(parents != np.arange(len(parents)))
        if len(moved):
            used = self.length
            self.kv[:, moved, :, :used] = self.kv[:, parents[moved], :, :used]  # fancy indexing reads a copy first
        return len(moved)

    def widen(self, rows: int) -> None:
        """Rows 1..rows-1 become copies of row 0 (a prompt prefilled once, shared by beams)."""
        used = int(self.lengths[0])
        self.kv[:, 1:rows, :, :used] = self.kv[:, 0:1, :, :used]
        self.lengths[:rows] = used
        if self.lora is not None:
            for r in range(1, rows):
                self.lora.set(r, self.lora.held[0])

    def copy(self) -> SharedKVCache:
        """An independent cache with the same contents."""
        other = self._unbound()
        other.kv = _lazy_zeros(self.kv.shape[0], self.kv.shape[1:], self.kv.dtype)
        used = self.length
        other.kv[:, :, :, :used] = self.kv[:, :, :, :used]
        other.lengths = self.lengths.copy()
        other.lora = self.lora.copy() if self.lora is not None else None
        return other

    def _unbound(self) -> SharedKVCache:
        """A shallow copy without this cache's IO binding (the caller replaces ``kv`` and lengths)."""
        other = SharedKVCache.__new__(SharedKVCache)
        other.__dict__.update(self.__dict__)
        other.binding = None
        return other


def left_padded(prompts: list[list[int]], width: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts right-aligned in ``[batch, width]`` id and attention-mask matrices (zeros on the left)."""
    ids = np.zeros((len(prompts), width), dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    return ids, mask


def _lazy_zeros(count: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """``count`` zero arrays of ``shape`` as one array ``[count, *shape]`` committed as it is written
    (``lazy_memory``). Raises ``ConfigError`` on ``context_size`` when the system cannot reserve it (``shape[2]``
    positions)."""

    def refuse(size: int, why: str) -> ConfigError:
        return ConfigError(
            "context_size",
            shape[2],
            f"the KV buffer of {shape[2]} positions x {shape[0]} sequence(s) needs {size / 2**30:.1f} GiB of address"
            f" space, which the system would not reserve ({why}); lower it (--ctx-size)",
        )

    return lazy_arrays([(count, *shape)], dtype, refuse)[0]
