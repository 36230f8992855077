"""Scoring many continuations in few graph runs, each context computed once (graphs with ``query_seqlens``).

A *group* is a context and the continuations scored after it (an item's choices). A batch of groups runs in two
phases over two shared-KV caches:

1. each group's context but its last token is prefilled into one row of a first cache (rows of different lengths
   in the same runs, right-padded: ``SharedKVCache.run``'s ``counts``);
2. each continuation gets a row of a second cache, starts from a copy of its group's context positions and feeds
   the context's last token and its own tokens but the last: every position it feeds scores the next token.

Rows of different lengths waste the padded positions of a run, so each phase runs as a *staircase*: rows sorted
longest first, a run feeds the rows still unfinished (a leading block of rows, a view of the cache) over a span
of positions, and the spans are chosen to minimise the positions computed plus :data:`RUN_COST` per run
(:func:`staircase`, a small dynamic programme over the rows' lengths). Each run's logits are reduced to the scored
tokens' log-probabilities, greedy flags and top alternatives in one vectorised pass before the next run (no
``[positions x vocabulary]`` array outlives its run; a run keeps at most :data:`LOGIT_VALUES` logits).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .adapters import Adapter
from .kv_cache import SharedKVCache
from .output import LOGIT_VALUES, TokenScore, token_scores

if TYPE_CHECKING:
    from .graph import Graph

RUN_COST = 16  # a graph run's fixed cost in positions' worth (SmolLM2 fp32, 2 cores: ~10 ms against ~0.6 ms)
MAX_ROWS = 64  # continuation rows per batch
KV_BYTES = 256 * 2**20  # a batch's continuation cache (rows x positions x bytes per position, committed as written)
RUN_POSITIONS = 1024  # rows x positions per run (the activations' bound)


@dataclass
class Group:
    """A context (``prefix``: all but its last token, ``last``) and its continuations, each with where its scores
    go (``slots``: ``(item, choice)``)."""

    prefix: list[int]
    last: int
    continuations: list[list[int]]
    slots: list[tuple[int, int]]


def staircase(lengths: Sequence[int], run_cost: int = RUN_COST) -> list[int]:
    """Span ends ``[e_1, ..., e_m]`` (the last is the longest length) for rows of ``lengths`` sorted longest first:
    run ``j`` feeds positions ``[e_{j-1}, e_j)`` of every row longer than ``e_{j-1}``, padding shorter rows; the
    ends minimise the positions computed plus ``run_cost`` per run."""
    ends = sorted({int(n) for n in lengths if n > 0})
    if not ends:
        return []
    starts = [0, *ends[:-1]]
    longer = [sum(1 for n in lengths if n > x) for x in starts]  # the rows a run starting there feeds
    best = [0.0] + [float("inf")] * len(ends)  # best[i]: cost of covering positions [0, ends[i - 1])
    back = [0] * (len(ends) + 1)
    for i in range(1, len(ends) + 1):
        for j in range(i):  # one run from starts[j] (= ends[j - 1]) to ends[i - 1]
            cost = best[j] + run_cost + longer[j] * (ends[i - 1] - starts[j])
            if cost < best[i]:
                best[i], back[i] = cost, j
    out, i = [], len(ends)
    while i > 0:
        out.append(ends[i - 1])
        i = back[i]
    return out[::-1]


def ragged(graph: Graph) -> bool:
    """Whether ``graph`` scores this way: host shared-KV caches whose graph takes ``query_seqlens``."""
    return graph.shared_kv and graph.device is None and graph.manifest.contract.ragged


def score_groups(
    graph: Graph,
    groups: list[Group],
    top: int,
    adapter: Adapter | None,
    done: Callable[[list[tuple[int, int]], list[list[TokenScore]]], None],
) -> None:
    """Score every group's continuations on ``graph`` (:func:`ragged`) running ``adapter``; ``done(slots,
    scores)`` is told each batch's results as it finishes. Groups are taken shortest context first, a batch
    bounded by :data:`MAX_ROWS` continuations and :data:`KV_BYTES` of continuation cache."""
    m = graph.manifest
    per_position = 2 * m.num_layers * m.num_kv_heads * m.head_size * np.dtype(m.kv_dtype).itemsize
    caches = _Caches(graph, adapter)
    groups = [  # a group of more than MAX_ROWS continuations is split (its context computed once per part)
        Group(g.prefix, g.last, g.continuations[k : k + MAX_ROWS], g.slots[k : k + MAX_ROWS])
        for g in groups
        for k in range(0, len(g.continuations), MAX_ROWS)
    ]
    order = sorted(range(len(groups)), key=lambda g: len(groups[g].prefix))  # similar contexts batch together
    start = 0
    while start < len(order):
        end, rows, longest, feed = start, 0, 0, 0
        while end < len(order):
            g = groups[order[end]]
            n, f, r = max(longest, len(g.prefix)), max(feed, *map(len, g.continuations)), rows + len(g.continuations)
            # the continuation cache holds the longest context plus the longest feed: within the model's context
            too_many = r > MAX_ROWS or r * (n + f) * per_position > KV_BYTES or n + f > graph.context_length
            if end > start and too_many:
                break
            end, rows, longest, feed = end + 1, r, n, f
        _score_batch(caches, [groups[i] for i in order[start:end]], top, done)
        start = end


class _Caches:
    """The two caches of a batch's phases, kept from batch to batch while they are large enough (their memory,
    once touched, is not faulted in again) with their views of leading rows (each keeps its IO binding), and the
    memory every run's logits are carved from."""

    def __init__(self, graph: Graph, adapter: Adapter | None) -> None:
        self.graph, self.adapter = graph, adapter
        self.session, self.vocab = graph.session, graph.vocab_size
        self.held: dict[str, SharedKVCache] = {}
        self.views: dict[tuple[str, int], SharedKVCache] = {}
        self.arena = np.empty(LOGIT_VALUES, dtype=np.float32)

    def get(self, phase: str, rows: int, capacity: int) -> SharedKVCache:
        """The held cache of ``phase``, emptied, with at least ``rows`` rows of ``capacity`` positions."""
        cache = self.held.get(phase)
        if cache is None or cache.batch_size < rows or cache.capacity < capacity:
            rows_held = cache.batch_size if cache is not None else 0
            self.held.pop(phase, None)
            self.views = {key: v for key, v in self.views.items() if key[0] != phase}
            del cache  # released before the next is made
            room = min(capacity * 5 // 4, self.graph.context_length)  # some room for the next batches' growth
            made = self.graph.new_cache(max(rows, rows_held), max(room, capacity), self.adapter)
            assert isinstance(made, SharedKVCache)
            made.arena = self.arena
            cache = self.held[phase] = made
        cache.lengths[:] = 0
        return cache

    def rows(self, phase: str, k: int) -> SharedKVCache:
        """The first ``k`` rows of ``phase``'s held cache (a view sharing its lengths, made once)."""
        cache = self.held[phase]
        if k == cache.batch_size:
            return cache
        view = self.views.get((phase, k))
        if view is None:
            view = self.views[phase, k] = cache.head(k)
        return view


def _score_batch(
    caches: _Caches,
    batch: list[Group],
    top: int,
    done: Callable[[list[tuple[int, int]], list[list[TokenScore]]], None],
) -> None:
    # phase 1: the contexts (all but their last token), longest first, in a cache of their own
    ctx_order = sorted((g for g in range(len(batch)) if batch[g].prefix), key=lambda g: -len(batch[g].prefix))
    contexts = None
    if ctx_order:
        contexts = caches.get("contexts", len(ctx_order), len(batch[ctx_order[0]].prefix))
        for _ in _runs(caches, "contexts", [batch[g].prefix for g in ctx_order], keep_logits=False):
            pass
    where = {g: r for r, g in enumerate(ctx_order)}
    # phase 2: a row per continuation, longest feed first, starting from a copy of its context's positions
    rows = [(g, k) for g in range(len(batch)) for k in range(len(batch[g].continuations))]
    rows.sort(key=lambda gk: -len(batch[gk[0]].continuations[gk[1]]))
    # onnxruntime wants every row's padded span inside the buffer: the longest context plus the longest feed
    capacity = max(len(g.prefix) for g in batch) + max(len(c) for g in batch for c in g.continuations)
    cache = caches.get("continuations", len(rows), capacity)
    for r, (g, _) in enumerate(rows):
        n = len(batch[g].prefix)
        if n:
            assert contexts is not None
            cache.kv[:, r, :, :n] = contexts.kv[:, where[g], :, :n]
            cache.lengths[r] = n
    feeds = [[batch[g].last, *batch[g].continuations[k][:-1]] for g, k in rows]
    targets = [batch[g].continuations[k] for g, k in rows]
    scores: list[list[TokenScore]] = [[] for _ in rows]
    for first, block, counts, logits in _runs(caches, "continuations", feeds, keep_logits=True):
        assert logits is not None
        for r in range(block):
            c = int(counts[r])
            scores[r] += token_scores(logits[r, :c], targets[r][first : first + c], top)
    done([batch[g].slots[k] for g, k in rows], scores)


def _runs(
    caches: _Caches, phase: str, feeds: list[list[int]], keep_logits: bool
) -> Iterator[tuple[int, int, np.ndarray, np.ndarray | None]]:
    """Feed each row of ``phase``'s cache its ``feeds`` (rows sorted longest first) in staircase runs; yields
    ``(first position, rows run, counts, logits of every fed position or None)`` per run."""
    vocab = caches.vocab
    lengths = [len(f) for f in feeds]
    begin = 0
    for end in staircase(lengths):
        while begin < end:
            block = sum(1 for n in lengths if n > begin)
            limit = RUN_POSITIONS // block
            if keep_logits:
                limit = min(limit, LOGIT_VALUES // (block * vocab))
            stop = min(end, begin + max(limit, 1))
            width = stop - begin
            ids = np.zeros((block, width), dtype=np.int64)
            counts = np.zeros(block, dtype=np.int32)
            for r in range(block):
                piece = feeds[r][begin:stop]
                ids[r, : len(piece)] = piece
                counts[r] = len(piece)
            logits = caches.rows(phase, block).run(caches.session, ids, width if keep_logits else 1, counts=counts)
            yield begin, block, counts, (logits if keep_logits else None)
            begin = stop
