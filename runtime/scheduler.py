"""The engine's decisions, with no model inside: which request runs in which slot, what is prefilled this
iteration, which rows the decode step runs. :meth:`Scheduler.schedule` returns a :class:`Plan` (plain data: slots,
positions, requests) that the executor runs through the batch cache; its rules are tested without any graph
(``tests/test_scheduler.py``).

The rules (docs/engine.md):

- cancelled requests leave first: a running one frees its slot at once (what its row holds stays for a later
  prompt), a queued one leaves the queue;
- admission is in submission order: a request with a second flow (or any request of an engine without a batch
  cache) runs *solo*, at most ``max_batch`` of them at once; any other takes a free slot: the one whose cached
  tokens share the longest prefix with its prompt (those positions are reused; only a slot whose cache was computed
  on the request's LoRA adapter load, or on none for a request on none), else the lowest free one (a decode step
  runs rows ``0..hi``, so low slots keep it narrow); a scored prompt (``prompt_logprobs``) reuses no slot's
  positions, only the prefix cache's blocks that carry their positions' scores, less the last position (fed
  again: its logits score the next token);
- at most ``prefill_budget`` prompt tokens are prefilled per iteration (``idle_budget`` while no request is
  generating: no stream waits on the chunk), in slot order, each request into its own row — never a prompt's
  last token: it rides the decode step, so a request's first token is always chosen from a decode run's logits,
  whatever was cached or how the budget chunked the prompt;
- on a graph that runs ragged rows (``ragged``), chunks of neighbouring slots share one graph run
  (:func:`prefill_runs`: scored and unscored apart, a run's padding at most its tokens, a scored run's kept logits
  within ``scored_chunk`` positions);
- the decode step runs every request with exactly one token to feed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from .kv_cache import common_prefix

if TYPE_CHECKING:
    from .request import Request
    from .sequence import TokenSequence


class Lookup(Protocol):
    """The prefix cache's answer for a request's prompt, at most ``limit`` positions: how many positions it holds
    and what the executor copies into the row (``Engine._lookup``)."""

    def __call__(self, request: Request, limit: int) -> tuple[int, Any]: ...


@dataclass
class Slot:
    """One row of the batch cache: who runs in it, and (recorded when its request ends) the tokens its cache holds,
    valid up to ``held``, for a later prompt that starts with them."""

    index: int
    tokens: np.ndarray
    held: int = 0
    running: Running | None = None
    adapter: int = 0  # the uid of the LoRA adapter the held positions were computed with (0: the base model)


@dataclass
class Running:
    """A request in a slot: its sequence (prompt, then generated tokens) and how much of it the row's cache holds."""

    request: Request
    slot: Slot
    seq: TokenSequence
    fed: int  # positions of ``seq.ids`` the slot's cache holds
    logits: np.ndarray | None = None  # of the last fed position, when the next token is to be chosen
    restore: Any = None  # what the prefix cache gives its row before its prefill (``Lookup``), if anything


@dataclass
class Chunk:
    """Prefill ``run.seq.ids[start:stop]`` into ``run``'s row."""

    run: Running
    start: int
    stop: int


@dataclass
class Plan:
    """One iteration's work: what ended, what starts, what is prefilled, what the decode step runs."""

    cancelled: list[Running] = field(default_factory=list)  # rows freed (their requests end as cancelled)
    cancelled_solo: list[Request] = field(default_factory=list)
    cancelled_queued: list[Request] = field(default_factory=list)
    started: list[tuple[Running, int]] = field(default_factory=list)  # admitted rows and the prompt tokens reused
    started_solo: list[Request] = field(default_factory=list)
    prefill: list[Chunk] = field(default_factory=list)
    runs: list[list[Chunk]] = field(default_factory=list)  # the prefill chunks by graph run (prefill_runs)
    decode: list[Running] = field(default_factory=list)  # rows with one token to feed, in slot order
    solo: list[Request] = field(default_factory=list)  # solo requests to step (after the batch)


class Scheduler:
    """The slots, the queue and the rules of the module docstring. Not thread-safe: the engine calls it under its
    lock. ``batched=False`` (a graph without a shared KV buffer) has no slots: every request runs solo."""

    def __init__(
        self,
        max_batch: int,
        max_queue: int,
        prefill_budget: int,
        prefix_reuse: bool,
        context: int,
        batched: bool,
        lookup: Lookup | None = None,
        idle_budget: int | None = None,
        scored_chunk: int | None = None,
        ragged: bool = False,
    ) -> None:
        self.lookup = lookup
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefill_budget = prefill_budget
        #: the budget while no request is decoding (no stream to stall): at least ``prefill_budget``
        self.idle_budget = max(prefill_budget, idle_budget or 0)
        #: the most positions of a scored prompt (prompt_logprobs: every position's logits kept) in one chunk
        self.scored_chunk = scored_chunk
        #: whether one graph run may prefill several rows, each its own number of positions (prefill_runs)
        self.ragged = ragged
        self.prefix_reuse = prefix_reuse
        self.slots = [Slot(i, np.zeros(context, np.int64)) for i in range(max_batch)] if batched else []
        self.batched = batched
        self.queue: deque[Request] = deque()
        self.solo: list[Request] = []

    # -- what the engine asks ---------------------------------------------------------------------------------
    def running(self) -> list[Running]:
        return [s.running for s in self.slots if s.running is not None]

    def busy(self) -> bool:
        return bool(self.solo) or any(s.running is not None for s in self.slots)

    def free(self) -> int:
        """Requests the next admission can start at once: free slots (batched), or room for solo requests."""
        if self.batched:
            return sum(1 for s in self.slots if s.running is None)
        return self.max_batch - len(self.solo)

    def room(self, n: int) -> int | None:
        """``None`` when ``n`` more requests fit in the queue after the next admission, else the number waiting."""
        waiting = sum(1 for r in self.queue if not r.cancelled) - self.free()
        return None if waiting + n <= self.max_queue else max(waiting, 0)

    def enqueue(self, requests: Iterable[Request]) -> None:
        self.queue.extend(requests)

    # -- one iteration ----------------------------------------------------------------------------------------
    def schedule(self) -> Plan:
        plan = Plan()
        self._drop_cancelled(plan)
        self._admit(plan)
        self._plan_prefill(plan)
        plan.runs = prefill_runs(plan.prefill, self.ragged, self.scored_chunk)
        plan.decode = [r for r in self.running() if r.seq.n - r.fed == 1]
        plan.solo = list(self.solo)
        return plan

    def _drop_cancelled(self, plan: Plan) -> None:
        for run in self.running():
            if run.request.cancelled:
                self.release(run, failed=False)
                plan.cancelled.append(run)
        for request in [r for r in self.solo if r.cancelled]:
            self.solo.remove(request)
            plan.cancelled_solo.append(request)
        for request in [r for r in self.queue if r.cancelled]:
            self.queue.remove(request)
            plan.cancelled_queued.append(request)

    def _admit(self, plan: Plan) -> None:
        while self.queue:
            request = self.queue[0]
            if request._sequence is None:  # a solo request (it brought its own Generator)
                if len(self.solo) >= self.max_batch:
                    return
                self.queue.popleft()
                self.solo.append(request)
                plan.started_solo.append(request)
                continue
            slot = self._free_slot(request.prompt, _uid(request))
            if slot is None:
                return
            self.queue.popleft()
            plan.started.append(self._start(request, request._sequence, slot))

    def _free_slot(self, prompt: list[int], adapter: int) -> Slot | None:
        free = [s for s in self.slots if s.running is None]
        if not free:
            return None
        same = [s for s in free if s.adapter == adapter]  # another adapter's cached keys and values are not these
        if self.prefix_reuse and same:
            shared, best = max((common_prefix(s.tokens[: s.held], prompt), -s.index) for s in same)
            if shared > 0:
                return self.slots[-best]
        # else the lowest free slot: each row a decode step runs costs more than keeping a cache for a prompt that
        # may never come back would save (bench/results/engine-smollm2-int4-fp32-2026-12-02.md)
        return free[0]

    def _start(self, request: Request, seq: TokenSequence, slot: Slot) -> tuple[Running, int]:
        prompt = request.prompt
        # a request that scores its prompt (prompt_logprobs) reuses no slot's positions (a reused position has no
        # logits to score), only the prefix cache's blocks that carry their scores (the engine's lookup)
        scored = _scores_prompt(request)
        reusable = self.prefix_reuse and not scored and slot.adapter == _uid(request)
        reuse = common_prefix(slot.tokens[: slot.held], prompt) if reusable else 0
        reuse = min(reuse, len(prompt) - 1)  # the last prompt token is fed again: its logits choose the first token
        restore = None
        # the prefix cache, when it holds more (off with prefix_reuse, as a slot's: a hit's speed tells a client
        # that another sent the same prompt)
        if self.lookup is not None and self.prefix_reuse:
            try:
                # (a scored prompt's last cached position is fed again: all its positions may come from the cache)
                positions, found = self.lookup(request, len(prompt) - (0 if scored else 1))
            except Exception:  # never lose a request taken off the queue: a cache that fails is a miss
                positions, found = 0, None
            if scored and positions:  # the last cached position is fed again: its logits score the next token
                positions -= 1
            if positions > reuse:
                reuse, restore = positions, found
        run = Running(request, slot, seq, reuse, restore=restore)
        slot.running = run
        return run, reuse

    def _plan_prefill(self, plan: Plan) -> None:
        budget = self.prefill_budget
        if not self.solo and all(_to_prefill(s.running) > 0 for s in self.slots if s.running is not None):
            budget = self.idle_budget  # nothing streams: a longer chunk stalls no one and saves graph runs
        for slot in self.slots:
            run = slot.running
            if budget <= 0:
                return
            if run is None:
                continue
            left = _to_prefill(run)
            if left <= 0:
                continue  # all fed, or only the token the decode step feeds left
            take = min(budget, left)
            if _scores_prompt(run.request) and self.scored_chunk:
                take = min(take, self.scored_chunk)
            plan.prefill.append(Chunk(run, run.fed, run.fed + take))
            run.fed += take
            budget -= take

    # -- ending -----------------------------------------------------------------------------------------------
    def release(self, run: Running, failed: bool) -> int:
        """Free ``run``'s slot; returns what the row holds from now on (a failed run's row is not trusted: 0)."""
        slot = run.slot
        if slot.running is run:
            slot.running = None
        if failed:
            slot.held = 0
        else:
            slot.held = run.fed  # what the row holds stays there for a later prompt that starts with it
            slot.tokens[: run.fed] = run.seq.ids[: run.fed]
        slot.adapter = _uid(run.request)
        return slot.held


def prefill_runs(chunks: list[Chunk], ragged: bool, scored_positions: int | None = None) -> list[list[Chunk]]:
    """The graph runs of an iteration's prefill ``chunks`` (in slot order): one run per chunk unless ``ragged``;
    then a chunk joins the run before it when both keep logits or neither does (a scored prompt's), the run's rows
    (its first slot to its last, those between included) times its longest chunk stay within twice its tokens (the
    padding a run computes for nothing at most what it feeds), and a scored run keeps at most ``scored_positions``
    positions' logits (rows times longest chunk)."""
    runs: list[list[Chunk]] = []
    for chunk in chunks:
        last = runs[-1] if runs and ragged else None
        if last is not None and _scored(last[0]) == _scored(chunk):
            group = [*last, chunk]
            rows = chunk.run.slot.index - last[0].run.slot.index + 1
            padded = rows * max(c.stop - c.start for c in group)
            fits = padded <= 2 * sum(c.stop - c.start for c in group)
            if fits and (not _scored(chunk) or scored_positions is None or padded <= scored_positions):
                last.append(chunk)
                continue
        runs.append([chunk])
    return runs


def _scored(chunk: Chunk) -> bool:
    return _scores_prompt(chunk.run.request)


def _scores_prompt(request: Request) -> bool:
    """Whether ``request`` scores its prompt (``prompt_logprobs``: every prompt position's logits kept)."""
    return request.config.prompt_logprobs is not None


def _to_prefill(run: Running) -> int:
    """Prompt tokens the prefill still feeds ``run`` (none: it decodes, and a prefill chunk stalls its next token).
    The prompt's last token is left to the decode step (its logits choose the first token with the other rows'),
    but a scored prompt (prompt_logprobs) is prefilled whole: its chunks keep every position's logits anyway, and
    the last one chooses the first token (engine._prefill): one graph run fewer."""
    scored = _scores_prompt(run.request) and run.fed < len(run.request.prompt)
    return run.seq.n - run.fed - (0 if scored else 1)


def _uid(request: Request) -> int:
    """Which load of which adapter a request runs (0: the base model): what a reused prefix must match."""
    return request._adapter.uid if request._adapter is not None else 0
