"""Many requests at once: a continuous-batching engine over one :class:`~edgeroute.Model`.

An :class:`Engine` owns one background thread and, for graphs with a shared KV buffer, one batch cache of
``max_batch`` rows (*slots*). Each iteration of its loop:

1. drops cancelled requests (their slot is free at once);
2. admits queued requests into free slots, preferring the free slot whose cached tokens share the longest prefix
   with the prompt (those positions are reused, not prefilled again), else the lowest free one (a step runs rows
   0..hi, so low slots keep it narrow; the caches of higher free slots live on until their slot is needed);
3. prefills at most ``prefill_budget`` prompt tokens (one chunk of one or more requests, each into its own row),
   so a long prompt arriving costs the running streams one chunk per step, not the whole prompt;
4. runs the graph once for every request with one token to feed (the token it chose last, or its prompt's last
   token): rows ``0..hi`` of the batch cache, each appending its own token after its own length (rows in between
   that are not decoding get a placeholder token whose position is given back, so their cached tokens are
   untouched);
5. chooses the next token of every request from the logits that run gave it (its own router, RNG, stop strings,
   limits, logprobs: the same :class:`~edgeroute.choice.TokenChooser` and :class:`~edgeroute.output.TurnOutput` a
   Generator uses) and hands the :class:`~edgeroute.Step` to the request at once, before the next iteration's
   admissions and prefill chunk (a new request's first token does not wait for the next prompt's chunk).

An idle engine told that requests are on their way (:meth:`Engine.incoming`, which a server wraps around reading
and parsing each request) waits for them, at most ``gather`` seconds, so that a burst starts in one graph run.

Requests with a second flow (a draft model, guidance, contrast) and every request on a graph with a concatenated
KV cache (the optimum backend) run *solo*: each on a Generator of its own, one step per iteration, interleaved
with the batch. ``Engine.mode`` says ``"batched"`` or ``"solo"``.

Submission is thread-safe and never blocks: a full queue raises :class:`~edgeroute.QueueFullError`, a prompt that
cannot fit raises ``ContextOverflowError``, a bad config ``ConfigError``. A failing graph run fails the requests
it was running with ``InferenceError``; the engine keeps serving the others.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from itertools import count
from typing import TYPE_CHECKING, Any

import numpy as np

from .choice import TokenChooser
from .config import GenerationConfig
from .errors import (
    ConfigError,
    ContextOverflowError,
    EdgerouteError,
    EngineClosedError,
    InferenceError,
    QueueFullError,
)
from .generator import Generator
from .kv_cache import SharedKVCache, common_prefix
from .output import Completion, TurnOutput, Usage
from .params import Flows, flows_of
from .request import Request

if TYPE_CHECKING:
    from .model import Model

DEFAULT_PREFILL_BUDGET = 64  # prompt tokens prefilled per iteration (see docs/engine.md)


# -- the engine's state per running request --------------------------------------------------------------------
@dataclass
class _Slot:
    """One row of the batch cache: who runs in it, and (recorded when its request ends) the tokens its cache holds,
    valid up to ``held``, for a later prompt that starts with them."""

    index: int
    tokens: np.ndarray
    held: int = 0
    running: _Running | None = None


@dataclass
class _Running:
    """A request in a slot: its chooser and output, its sequence so far, where its prefill stands."""

    request: Request
    slot: _Slot
    chooser: TokenChooser
    output: TurnOutput
    usage: Usage
    ids: np.ndarray  # prompt + generated tokens
    n: int  # tokens in ``ids``
    fed: int  # positions of ``ids`` the slot's cache holds
    logits: np.ndarray | None = None  # of the last fed position, when the next token is to be chosen
    last: float = 0.0  # when its last step ended (decode time runs from there)


@dataclass
class _Solo:
    request: Request
    generator: Generator


@dataclass
class EngineStats:
    """A snapshot of the engine (the server's metrics read it)."""

    mode: str
    max_batch: int
    active: int
    queued: int
    solo: int
    submitted: int
    finished: int
    failed: int
    cancelled: int
    reused_prompt_tokens: int
    prefilled_prompt_tokens: int
    incoming: int = 0  # requests announced with Engine.incoming() and not submitted yet


class Engine:
    """Continuous batching over one model (module docstring). Use as a context manager, or call :meth:`close`.

    Args:
        model: a loaded :class:`~edgeroute.Model`; its ``context_length`` is each slot's context.
        max_batch: slots of the batch cache (rows run in one graph run per step).
        max_queue: requests waiting for a slot at most (beyond the free slots); one more raises
            :class:`QueueFullError`. ``0`` queues nothing: a request starts at once or is refused.
        prefill_budget: prompt tokens prefilled per iteration (the stall a new prompt costs running streams).
        prefix_reuse: reuse a free slot's cached tokens that start a new prompt.
        gather: seconds an idle engine waits, at most, for requests announced with :meth:`incoming` before it
            starts the first one, so that requests arriving together start in one step (a server's burst).
    """

    def __init__(
        self,
        model: Model,
        max_batch: int = 8,
        max_queue: int = 64,
        prefill_budget: int = DEFAULT_PREFILL_BUDGET,
        prefix_reuse: bool = True,
        gather: float = 0.02,
    ) -> None:
        for name, value, least in (("max_batch", max_batch, 1), ("max_queue", max_queue, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ConfigError(name, value, f"must be an integer >= {least}")
        if not isinstance(prefill_budget, int) or isinstance(prefill_budget, bool) or prefill_budget < 1:
            raise ConfigError("prefill_budget", prefill_budget, "must be an integer >= 1")
        self.model = model
        self.max_batch = max_batch
        self.max_queue = max_queue
        if not isinstance(gather, (int, float)) or isinstance(gather, bool) or not 0 <= gather <= 1:
            raise ConfigError("gather", gather, "must be a number of seconds in [0, 1]")
        self.prefill_budget = prefill_budget
        self.gather = float(gather)
        self._incoming = 0
        self.prefix_reuse = prefix_reuse
        self.mode = "batched" if model.shared_kv else "solo"
        self._cache: SharedKVCache | None = None
        self._slots: list[_Slot] = []
        self._rows: list[SharedKVCache] = []
        self._heads: dict[int, SharedKVCache] = {}
        if self.mode == "batched":
            cache = model.new_cache(max_batch)
            assert isinstance(cache, SharedKVCache)
            self._cache = cache
            self._slots = [_Slot(i, np.zeros(model.context_length, np.int64)) for i in range(max_batch)]
            self._rows = [cache.row(i) for i in range(max_batch)]
        self._lock = threading.Condition()
        self._queue: deque[Request] = deque()
        self._solo: list[_Solo] = []
        self._ids = count(1)
        self._closed = False
        self._counts = dict.fromkeys(("submitted", "finished", "failed", "cancelled", "reused", "prefilled"), 0)
        self._thread = threading.Thread(target=self._loop, name="edgeroute-engine", daemon=True)
        self._thread.start()

    # -- submission -------------------------------------------------------------------------------------------
    def submit(
        self,
        prompt: str | Sequence[int],
        config: GenerationConfig | None = None,
        flows: Flows | None = None,
        **flow_fields: Any,
    ) -> Request:
        """Queue a request and return its handle at once. Raises ``ConfigError`` (bad prompt, config or flows),
        ``ContextOverflowError`` (prompt + ``max_new_tokens`` over a slot's context), :class:`QueueFullError`
        (``max_queue`` requests already wait) or :class:`EngineClosedError`."""
        return self.submit_all([(prompt, config)], flows_of(flows, flow_fields))[0]

    def submit_all(
        self, items: Sequence[tuple[str | Sequence[int], GenerationConfig | None]], flows: Flows | None = None
    ) -> list[Request]:
        """Queue several requests (``(prompt, config)`` pairs sharing ``flows``) all or none: one that fails
        validation, or a queue without room for every one, queues nothing. More requests than the engine can ever
        hold (``max_batch + max_queue``) is a ``ConfigError`` (``requests``), not a :class:`QueueFullError` to
        retry. Raises what :meth:`submit` raises otherwise."""
        flows = flows_of(flows, {})
        capacity = self.max_batch + self.max_queue
        if not 1 <= len(items) <= capacity:
            raise ConfigError(
                "requests", len(items), f"must be 1 to {capacity} at once (max_batch + max_queue of this engine)"
            )
        built = [self._build(prompt, config, flows) for prompt, config in items]
        with self._lock:
            if self._closed:
                raise EngineClosedError("the engine is closed")
            # queued requests that the next admission leaves waiting (cancelled ones hold no place)
            waiting = sum(1 for r in self._queue if not r.cancelled) - self._free()
            if waiting + len(built) > self.max_queue:
                raise QueueFullError(
                    f"{max(waiting, 0)} requests are waiting for a slot (max_queue {self.max_queue})"
                    + (f" and {len(built)} more do not fit" if len(built) > 1 else "")
                    + ": retry later"
                )
            for request in built:
                request.id = next(self._ids)
                self._queue.append(request)
            self._counts["submitted"] += len(built)
            self._lock.notify_all()
        return built

    def _build(self, prompt: str | Sequence[int], config: GenerationConfig | None, flows: Flows) -> Request:
        """A request and what runs it, validated (in the caller's thread: a config or flow the model refuses is the
        caller's error, at submission)."""
        config = config or GenerationConfig()
        if not isinstance(config, GenerationConfig):
            raise ConfigError("config", config, "must be a GenerationConfig")
        ids = self.model.encode_prompt(prompt)
        vocab = self.model.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise ConfigError("prompt", ids[:8], f"token ids must be in [0, {vocab})")
        need = len(ids) + config.max_new_tokens
        if need > self.model.context_length:
            raise ContextOverflowError(need, self.model.context_length, "prompt + max_new_tokens")
        request = Request(0, ids, config, flows)
        if flows.active or self.mode == "solo":
            request._generator = self.model.generator(config, flows)
        else:
            request._chooser = TokenChooser(self.model, config, np.random.default_rng(config.sampling.seed))
            request._output = TurnOutput(self.model, config)
        return request

    @contextmanager
    def incoming(self) -> Iterator[None]:
        """Announce a request on its way (a server reading and parsing it) for the block's duration. An idle engine
        that has a request to start waits (at most ``gather`` seconds) while announced ones are still outside
        :meth:`submit`, so that a burst of requests starts in one graph run instead of one run per arrival.
        Nothing waits while requests are running: a new one joins them at the next step, as always."""
        with self._lock:
            self._incoming += 1
        try:
            yield
        finally:
            with self._lock:
                self._incoming -= 1
                self._lock.notify_all()

    def generate(self, prompt: str | Sequence[int], config: GenerationConfig | None = None, **flows: Any) -> Completion:
        """Submit and wait: the :class:`Completion` that ``Model.generate`` returns."""
        return self.submit(prompt, config, **flows).result()

    def stats(self) -> EngineStats:
        with self._lock:
            active = sum(1 for s in self._slots if s.running is not None)
            c = self._counts
            return EngineStats(
                self.mode,
                self.max_batch,
                active + len(self._solo),
                len(self._queue),
                len(self._solo),
                c["submitted"],
                c["finished"],
                c["failed"],
                c["cancelled"],
                c["reused"],
                c["prefilled"],
                self._incoming,
            )

    @property
    def alive(self) -> bool:
        """Whether the engine takes requests: not closed, and its loop's thread is running (a replica's health)."""
        return not self._closed and self._thread.is_alive()

    def close(self, timeout: float = 5.0) -> None:
        """Stop: queued and running requests end with :class:`EngineClosedError`; waits for the loop's thread."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        self._thread.join(timeout)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the loop ---------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._closed and not self._queue and not self._busy():
                    self._lock.wait()
                if self._incoming and not self._busy():  # a burst arriving at an idle engine: start it together
                    end = time.monotonic() + self.gather
                    while self._incoming and not self._closed and (left := end - time.monotonic()) > 0:
                        self._lock.wait(left)
                if self._closed:
                    break
            try:
                self._iteration()
            except Exception as e:  # a bug: fail everything running rather than hang every caller
                self._fail_all(InferenceError(f"the engine failed: {type(e).__name__}: {e}"))
        self._fail_all(EngineClosedError("the engine was closed"))

    def _free(self) -> int:
        """Requests the next admission can start at once: free slots (batched), or room for solo requests."""
        if self.mode == "batched":
            return sum(1 for s in self._slots if s.running is None)
        return self.max_batch - len(self._solo)

    def _busy(self) -> bool:
        return bool(self._solo) or any(s.running is not None for s in self._slots)

    def _iteration(self) -> None:
        self._drop_cancelled()
        self._admit()
        self._prefill()
        self._decode()
        self._choose()
        self._step_solo()

    def _drop_cancelled(self) -> None:
        for slot in self._slots:
            run = slot.running
            if run is not None and run.request.cancelled:
                self._release(run, "cancelled")
        for solo in list(self._solo):
            if solo.request.cancelled:
                self._solo.remove(solo)
                comp = solo.generator.completion()
                solo.request._finish(_with_reason(comp, "cancelled"))
                self._count("cancelled")
        with self._lock:
            for request in [r for r in self._queue if r.cancelled]:
                self._queue.remove(request)
                request._finish(_empty_completion(request, "cancelled"))
                self._counts["cancelled"] += 1

    def _admit(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    return
                request = self._queue[0]
                solo, slot = request._generator, None
                if solo is not None:
                    if len(self._solo) >= self.max_batch:  # at most max_batch solo requests at once
                        return
                else:
                    slot = self._free_slot(request.prompt)
                    if slot is None:
                        return
                self._queue.popleft()
            if solo is not None:
                self._start_solo(request, solo)
            elif slot is not None:
                self._start(request, slot)

    def _free_slot(self, prompt: list[int]) -> _Slot | None:
        free = [s for s in self._slots if s.running is None]
        if not free:
            return None
        if self.prefix_reuse:
            shared, best = max((common_prefix(s.tokens[: s.held], prompt), -s.index) for s in free)
            if shared > 0:
                return self._slots[-best]
        # else the lowest free slot: a decode step runs rows 0..hi, and each row costs (int4 SmolLM2: 6.6 ms for one
        # row, 9.6 ms for two), more than keeping a cache for a prompt that may never come back would save
        return free[0]

    def _start(self, request: Request, slot: _Slot) -> None:
        cfg = request.config
        prompt = np.asarray(request.prompt, dtype=np.int64)
        reuse = common_prefix(slot.tokens[: slot.held], prompt) if self.prefix_reuse else 0
        reuse = min(reuse, len(prompt) - 1)  # the last prompt token is fed again: its logits choose the first token
        ids = np.zeros(len(prompt) + cfg.max_new_tokens, dtype=np.int64)
        ids[: len(prompt)] = prompt
        assert request._chooser is not None and request._output is not None  # built at submission
        usage = Usage(prompt_tokens=len(prompt))
        run = _Running(request, slot, request._chooser, request._output, usage, ids, len(prompt), reuse)
        slot.running = run
        assert self._cache is not None
        self._cache.lengths[slot.index] = reuse
        self._count("reused", reuse)

    def _start_solo(self, request: Request, generator: Generator) -> None:
        try:
            generator.append(request.prompt)
        except Exception as e:
            request._finish(None, _own(e))
            self._count("failed")
            return
        self._solo.append(_Solo(request, generator))

    def _prefill(self) -> None:
        """Up to ``prefill_budget`` prompt tokens, oldest admission first, each request into its own row."""
        budget = self.prefill_budget
        cache = self._cache
        for slot in self._slots:
            run = slot.running
            if budget <= 0:
                return
            if run is None or run.n - run.fed <= 1:
                continue  # all fed, or only the prompt's last token left: the decode step feeds it
            assert cache is not None
            row = self._rows[slot.index]
            take = min(budget, run.n - run.fed - 1)  # never the last token (see _decode)
            row.lengths[0] = run.fed
            try:
                row.run(self.model.session, run.ids[None, run.fed : run.fed + take], 1)
            except Exception as e:  # a run of this request's row alone
                self._release(run, None, _own(e))
                continue
            run.fed += take
            cache.lengths[slot.index] = run.fed
            budget -= take
            self._count("prefilled", take)

    def _choose(self) -> None:
        """The next token of every request whose logits are at hand (each then has one token to feed)."""
        for slot in self._slots:
            run = slot.running
            if run is not None and run.logits is not None:
                self._choose_one(run)

    def _choose_one(self, run: _Running) -> None:
        t0 = time.perf_counter()
        out = run.output
        assert run.logits is not None
        try:
            token = run.chooser.choose(run.logits, run.ids[: run.n], out.index)
            run.chooser.accept(token)
            step = out.take(token, run.logits)
        except Exception as e:  # this request's router, grammar or stop strings: it alone fails
            self._release(run, None, _own(e))
            return
        now = time.perf_counter()
        run.usage.router_seconds += now - t0
        run.usage.record(1, run.last or now, now, run.request.submitted)
        run.last = now
        run.ids[run.n] = token
        run.n += 1
        run.logits = None
        run.request._push(step)
        if out.done:
            self._release(run, "done")

    def _decode(self) -> None:
        """One graph run for every request with one token to feed, rows ``0..hi`` of the batch cache: the token a
        decoding request just chose, or the last token of a prompt (after its prefill chunks, or after a reused
        prefix): both are "one token after the row's length", so a request whose prompt is cached joins without a
        graph run of its own. The first token is always chosen from this run, never from a prefill chunk's: a
        request's logits then do not depend on whether its prompt was cached or how the budget chunked it (int8
        and int4 kernels can give a row different logits in a run of another shape)."""
        going = [r for r in (s.running for s in self._slots) if r is not None and r.n - r.fed == 1]
        if not going:
            return
        self._count("prefilled", sum(1 for r in going if r.n == r.usage.prompt_tokens))
        cache = self._cache
        assert cache is not None
        hi = max(r.slot.index for r in going) + 1
        head = self._heads.get(hi)
        if head is None:
            head = self._heads[hi] = cache.head(hi)
        ids = np.zeros((hi, 1), dtype=np.int64)
        for run in going:
            ids[run.slot.index, 0] = run.ids[run.fed]
        saved = cache.lengths[:hi].copy()
        try:
            logits = head.run(self.model.session, ids, 1)
        except Exception as e:  # the run of every decoding row
            cache.lengths[:hi] = saved
            for run in going:
                self._release(run, None, _own(e))
            return
        cache.lengths[:hi] = saved  # rows not decoding keep their length (their placeholder is overwritten later)
        for run in going:
            i = run.slot.index
            cache.lengths[i] = saved[i] + 1
            run.fed += 1
            run.logits = logits[i, -1]

    def _step_solo(self) -> None:
        for solo in list(self._solo):
            gen, request = solo.generator, solo.request
            try:
                if not gen.done:
                    with suppress(StopIteration):
                        request._push(gen.step())
                if gen.done:
                    self._solo.remove(solo)
                    request._finish(gen.completion())
                    self._count("finished")
            except Exception as e:  # this request's generator alone
                self._solo.remove(solo)
                request._finish(None, _own(e))
                self._count("failed")

    # -- ending requests --------------------------------------------------------------------------------------
    def _release(self, run: _Running, how: str | None, error: BaseException | None = None) -> None:
        slot = run.slot
        slot.running = None
        assert self._cache is not None
        if error is not None:
            slot.held = 0  # what the failed run left in the row is not trusted
            self._cache.lengths[slot.index] = 0
            run.request._finish(None, error)
            self._count("failed")
            return
        slot.held = run.fed  # what the row holds stays there for a later prompt that starts with it
        slot.tokens[: run.fed] = run.ids[: run.fed]
        self._cache.lengths[slot.index] = slot.held
        completion = run.output.completion(run.usage)
        if how == "cancelled":
            run.request._finish(_with_reason(completion, "cancelled"))
            self._count("cancelled")
        else:
            run.request._finish(completion)
            self._count("finished")

    def _fail_all(self, error: BaseException) -> None:
        for slot in self._slots:
            if slot.running is not None:
                self._release(slot.running, None, error)
        for solo in self._solo:
            solo.request._finish(None, error)
        self._solo.clear()
        with self._lock:
            while self._queue:
                self._queue.popleft()._finish(None, error)

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n


def _own(e: Exception) -> EdgerouteError:
    """A request's own failure as the library's error: an ``EdgerouteError`` as it is, anything else (a bug, or a
    native library's error on this request's input) as an ``InferenceError`` that says what it was."""
    return e if isinstance(e, EdgerouteError) else InferenceError(f"{type(e).__name__}: {e}")


def _with_reason(completion: Completion, reason: str) -> Completion:
    return replace(completion, finish_reason=reason)


def _empty_completion(request: Request, reason: str) -> Completion:
    usage = Usage(prompt_tokens=len(request.prompt))
    return Completion(text="", token_ids=[], finish_reason=reason, usage=usage)
