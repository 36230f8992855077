"""The engine's graph runs: :class:`Executor` runs a :class:`~edgeroute.scheduler.Plan`'s prefill chunks and decode
step through the batch cache (one :class:`~edgeroute.SharedKVCache` whose rows are the slots), and keeps each row's
length in the cache what the scheduler says it holds. It chooses nothing and knows no request."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .kv_cache import SharedKVCache
from .output import LOGIT_VALUES

if TYPE_CHECKING:
    from .adapters import Adapter
    from .graph import Graph


class Executor:
    """Runs the graph of ``model`` over the rows of one ``max_batch``-row batch cache."""

    def __init__(self, model: Graph, max_batch: int) -> None:
        cache = model.new_cache(max_batch)
        assert isinstance(cache, SharedKVCache)
        # every run's logits carved from one buffer (pages faulted once, not per run whose shape changed): a scored
        # prompt's prefill keeps up to LOGIT_VALUES of them; each run's are read before the next run
        cache.arena = np.empty(LOGIT_VALUES, dtype=np.float32)
        self.session = model.session
        self.cache = cache
        self._heads: dict[int, SharedKVCache] = {}  # the decode step's views of rows 0..hi-1, each bound once
        self._spans: dict[tuple[int, int], SharedKVCache] = {}  # the prefill's views of rows first..end-1

    def adapt(self, row: int, adapter: Adapter | None) -> None:
        """Row ``row`` runs ``adapter`` (None: the base model) from its next run on: a copy of the adapter's weights
        into the row's LoRA inputs when the row held another one (``SharedKVCache.set_adapter``)."""
        self.cache.set_adapter(adapter, row)

    def hold(self, row: int, length: int) -> None:
        """Row ``row`` holds ``length`` positions from now on (a start after a reused prefix, a release)."""
        self.cache.lengths[row] = length

    def prefill(self, chunks: list[tuple[int, np.ndarray, int]], keep: bool) -> list[np.ndarray]:
        """One graph run of the chunks ``(row, ids, start)`` (in row order): each chunk's ``ids`` (1-D) after the
        first ``start`` positions of its row. One chunk runs its row alone; several (a ragged graph) run rows
        ``first..last`` right-padded to the longest chunk, a row in between without a chunk appending nothing (or,
        holding no position, a placeholder whose position is given back). ``keep``: every position's logits, one
        ``[len(ids), vocab]`` view of the bound output per chunk (valid until these rows run again), else none."""
        first, end = chunks[0][0], chunks[-1][0] + 1
        width = max(len(ids) for _, ids, _ in chunks)
        lengths = self.cache.lengths[first:end]
        for row, _, start in chunks:
            lengths[row - first] = start
        # onnxruntime wants every row's padded span inside the buffer: rows near its end run alone
        if len(chunks) > 1 and int(lengths.max()) + width > self.cache.capacity:
            # copies: every run's logits are carved from the same buffer, which the next chunk's run overwrites
            return [out.copy() for chunk in chunks for out in self.prefill([chunk], keep)]
        span = self._span(first, end)  # its lengths are a view of the cache's: a run moves them there
        if len(chunks) == 1:
            ids = chunks[0][1]
            logits = span.run(self.session, ids[None], len(ids) if keep else 1)
            return [logits[0]] if keep else []
        batch = np.zeros((end - first, width), dtype=np.int64)
        counts = np.zeros(end - first, dtype=np.int32)
        for row, ids, _ in chunks:
            batch[row - first, : len(ids)] = ids
            counts[row - first] = len(ids)
        empty = np.flatnonzero((counts == 0) & (lengths == 0))
        counts[empty] = 1  # a row that holds nothing writes its first position, given back below
        try:
            logits = span.run(self.session, batch, width if keep else 1, counts=counts)
        finally:
            lengths[empty] = 0
        return [logits[row - first, : len(ids)] for row, ids, _ in chunks] if keep else []

    def decode(self, tokens: dict[int, int]) -> np.ndarray:
        """One graph run of rows ``0..hi`` (``hi`` the highest row in ``tokens``): each row in ``tokens`` appends its
        token after its own length; rows in between get a placeholder whose position is given back, so their cached
        tokens are untouched. Returns the logits ``[hi, vocab]`` (row i's valid for the rows in ``tokens``); on a
        failure every length is as before and the error propagates."""
        cache = self.cache
        hi = max(tokens) + 1
        head = self._heads.get(hi)
        if head is None:
            head = self._heads[hi] = cache.head(hi)
        ids = np.zeros((hi, 1), dtype=np.int64)
        for row, token in tokens.items():
            ids[row, 0] = token
        saved = cache.lengths[:hi].copy()
        try:
            logits = head.run(self.session, ids, 1)
        finally:
            cache.lengths[:hi] = saved  # rows not decoding keep their length (their placeholder is overwritten later)
        for row in tokens:
            cache.lengths[row] = saved[row] + 1
        return logits[:, -1]

    def _span(self, first: int, end: int) -> SharedKVCache:
        view = self._spans.get((first, end))
        if view is None:
            view = self._spans[first, end] = self.cache.rows(first, end)
        return view
