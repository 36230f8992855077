"""The onnxruntime IO binding of a :class:`~edgeroute.kv_cache.SharedKVCache`: its layer buffers bound once as both
past and present, the small inputs (``seqlens_k``, ``total_sequence_length``, ``logits_to_keep``, ``query_seqlens``)
in arrays bound once and written in place, the logits in an output buffer reused while its shape holds."""

from __future__ import annotations

from typing import Any

import numpy as np

from .contract import Name


class SharedBinding:
    """An onnxruntime IO binding over one :class:`~edgeroute.kv_cache.SharedKVCache` (``cache``): every layer's
    buffer is bound as both the past input and the present output, and the small inputs live in arrays bound once
    and updated in place, so a decode step binds nothing new."""

    def __init__(self, session: Any, cache: Any) -> None:
        import onnxruntime as ort

        self._ort = ort
        self.session = session
        m = cache.manifest
        c = m.contract
        self.io = io = session.io_binding()
        names = [n for pair in c.past_names() for n in pair]
        outs = [n for pair in c.present_names() for n in pair]
        for name, out, buf in zip(names, outs, cache.buffers, strict=True):
            value = ort.OrtValue.ortvalue_from_numpy(buf)
            io.bind_ortvalue_input(name, value)
            io.bind_ortvalue_output(out, value)
        self.names = (str(c.name(Name.INPUT_IDS)), c.outputs[Name.LOGITS])
        # the inputs GraphContract.feeds builds for the shared layout, bound once and updated in place per run
        self.seqlens = np.zeros(cache.batch_size, dtype=np.int32)
        self.total = np.zeros((), dtype=np.int32)
        self.keep = np.ones(1, dtype=np.int64)
        for small, arr in (  # the manifest checked that shared graphs name these three
            (c.name(Name.SEQLENS_K), self.seqlens),
            (c.name(Name.TOTAL_SEQUENCE_LENGTH), self.total),
            (c.name(Name.LOGITS_TO_KEEP), self.keep),
        ):
            io.bind_ortvalue_input(str(small), ort.OrtValue.ortvalue_from_numpy(arr))
        #: each row's valid positions (graphs with query_seqlens): the run's width unless counts are given
        self.query: np.ndarray | None = None
        self.query_width = 1  # the width every row of ``query`` holds (0: per-row counts)
        if c.name(Name.QUERY_SEQLENS):
            self.query = np.ones(cache.batch_size, dtype=np.int32)
            io.bind_ortvalue_input(str(c.name(Name.QUERY_SEQLENS)), ort.OrtValue.ortvalue_from_numpy(self.query))
        if cache.lora is not None:  # each row's adapter weights, written in place when a row changes adapter
            for (name, _), buf in zip(cache.lora.layout.inputs, cache.lora.buffers, strict=True):
                io.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(buf))
        self.vocab = m.vocab_size
        self.ids: np.ndarray | None = None
        self.logits: np.ndarray | None = None
        self.last: np.ndarray | None = None  # logits[:, -1, :], the view a decode loop reads

    def run(
        self, ids: np.ndarray, cache: Any, length: int, n_last: int, counts: np.ndarray | None = None
    ) -> np.ndarray:
        """One graph run appending ``ids`` after ``length`` cached positions (``cache.length``, read once by the
        caller); rows of a batch start after their own ``cache.lengths``; ``counts``: each row's valid positions
        (checked by the cache)."""
        b, n = ids.shape
        if self.ids is None or self.ids.shape != ids.shape:
            self.ids = np.empty((b, n), dtype=np.int64)
            self.io.bind_ortvalue_input(self.names[0], self._ort.OrtValue.ortvalue_from_numpy(self.ids))
        if self.logits is None or self.logits.shape[1] != n_last:
            size, arena = b * n_last * self.vocab, cache.arena
            if arena is not None and arena.size >= size:  # carved from memory already touched: no page faults
                self.logits = arena[:size].reshape(b, n_last, self.vocab)
            else:
                self.logits = np.empty((b, n_last, self.vocab), dtype=np.float32)
            self.io.bind_ortvalue_output(self.names[1], self._ort.OrtValue.ortvalue_from_numpy(self.logits))
            self.last = self.logits[:, -1, :]
            self.keep[0] = n_last
        # a decode step writes three scalars: each NumPy call costs microseconds on caches the last run evicted
        if n == 1 and b == 1:
            self.ids[0, 0] = ids[0, 0]  # an item write, not an array assignment (13 -> ~5 us cold)
        else:
            self.ids[...] = ids
        query = self.query
        if counts is not None:
            assert query is not None
            query[...] = counts
            self.query_width = 0
            np.add(cache.lengths, counts - 1, out=self.seqlens)
            self.total[...] = int(self.seqlens.max()) + 1
        else:
            if query is not None and self.query_width != n:  # a decode loop writes nothing here
                query[...] = n
                self.query_width = n
            if b == 1:
                self.seqlens[0] = length + n - 1
            else:
                np.add(cache.lengths, n - 1, out=self.seqlens)
            self.total[...] = length + n
        self.session.run_with_iobinding(self.io)
        return self.logits
