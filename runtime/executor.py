"""The engine's graph runs: :class:`Executor` runs a :class:`~edgeroute.scheduler.Plan`'s prefill chunks and decode
step through the batch cache (one :class:`~edgeroute.SharedKVCache` whose rows are the slots), and keeps each row's
length in the cache what the scheduler says it holds. It chooses nothing and knows no request."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .kv_cache import SharedKVCache

if TYPE_CHECKING:
    from .adapters import Adapter
    from .graph import Graph


class Executor:
    """Runs the graph of ``model`` over the rows of one ``max_batch``-row batch cache."""

    def __init__(self, model: Graph, max_batch: int) -> None:
        cache = model.new_cache(max_batch)
        assert isinstance(cache, SharedKVCache)
        self.session = model.session
        self.cache = cache
        self._rows = [cache.row(i) for i in range(max_batch)]
        self._heads: dict[int, SharedKVCache] = {}

    def adapt(self, row: int, adapter: Adapter | None) -> None:
        """Row ``row`` runs ``adapter`` (None: the base model) from its next run on: a copy of the adapter's weights
        into the row's LoRA inputs when the row held another one (``SharedKVCache.set_adapter``)."""
        self.cache.set_adapter(adapter, row)

    def hold(self, row: int, length: int) -> None:
        """Row ``row`` holds ``length`` positions from now on (a start after a reused prefix, a release)."""
        self.cache.lengths[row] = length

    def prefill(self, row: int, ids: np.ndarray, start: int, keep: int = 1) -> np.ndarray:
        """Run ``ids`` (1-D) after the first ``start`` positions of row ``row``, this row alone; the logits of its
        last ``keep`` positions, ``[keep, vocab]`` (the bound output itself: valid until the row's next run)."""
        view = self._rows[row]
        view.lengths[0] = start
        logits = view.run(self.session, ids[None], keep)
        self.cache.lengths[row] = start + len(ids)
        return logits[0]

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
