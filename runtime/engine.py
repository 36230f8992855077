"""Many requests at once: a continuous-batching engine over one :class:`~edgeroute.Model`.

An :class:`Engine` owns one background thread and, for graphs with a shared KV buffer, one batch cache of
``max_batch`` rows (*slots*). Each iteration of its loop is schedule → execute → commit:

1. the :class:`~edgeroute.scheduler.Scheduler` (no model inside) drops cancelled requests, admits queued ones into
   free slots (preferring a slot whose cached tokens start the prompt), plans at most ``prefill_budget`` prompt
   tokens of prefill and the decode step's rows, and returns a plain :class:`~edgeroute.scheduler.Plan`;
2. the :class:`~edgeroute.executor.Executor` runs the plan's prefill chunks (each request into its own row) and one
   decode run for every request with one token to feed (the token it chose last, or its prompt's last token);
3. each decoded request's :class:`~edgeroute.sequence.TokenSequence` commits its next token from the logits that run
   gave it (its own router, RNG, stop strings, limits, logprobs: what a Generator uses) and the
   :class:`~edgeroute.Step` goes to the request at once, before the next iteration's admissions and prefill.

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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from itertools import count
from typing import TYPE_CHECKING, Any

import numpy as np

from .adapters import prefix_key
from .config import GenerationConfig
from .errors import (
    ConfigError,
    ContextOverflowError,
    EdgerouteError,
    EngineClosedError,
    InferenceError,
    QueueFullError,
)
from .executor import Executor
from .generator import Generator
from .output import LOGIT_VALUES, Completion, Usage
from .params import Flows, flows_of
from .request import Request
from .scheduler import Chunk, Plan, Running, Scheduler
from .sequence import TokenSequence

if TYPE_CHECKING:
    from .graph import Graph

DEFAULT_PREFILL_BUDGET = 64  # prompt tokens prefilled per iteration (see docs/engine.md)
IDLE_PREFILL_BUDGET = 256  # the same while no request is generating (no stream to stall)


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
        prefill_budget: prompt tokens prefilled per iteration (the stall a new prompt costs running streams);
            while no request is generating, :data:`IDLE_PREFILL_BUDGET` if larger (nothing stalls). A scored
            prompt (``prompt_logprobs``) keeps every position's logits: its chunks hold at most
            ``output.LOGIT_VALUES`` of them (64 MB).
        prefix_reuse: reuse a free slot's cached tokens that start a new prompt.
        gather: seconds an idle engine waits, at most, for requests announced with :meth:`incoming` before it
            starts the first one, so that requests arriving together start in one step (a server's burst).
    """

    def __init__(
        self,
        model: Graph,
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
        # the prefix cache, unless prefix reuse is off (a hit's speed tells a client what another sent)
        self._prefix = model.prefix_cache if self.mode == "batched" and prefix_reuse else None
        self._executor = Executor(model, max_batch) if self.mode == "batched" else None
        self._scheduler = Scheduler(
            max_batch, max_queue, prefill_budget, prefix_reuse, model.context_length, self.mode == "batched",
            self._lookup if self._prefix is not None else None, IDLE_PREFILL_BUDGET,
            max(1, LOGIT_VALUES // model.vocab_size), self._executor is not None and self._executor.cache.ragged,
        )  # fmt: skip
        self._lock = threading.Condition()
        self._generators: dict[int, Generator] = {}  # a running solo request's Generator, by request id
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
            waiting = self._scheduler.room(len(built))  # queued requests the next admission leaves waiting
            if waiting is not None:
                raise QueueFullError(
                    f"{waiting} requests are waiting for a slot (max_queue {self.max_queue})"
                    + (f" and {len(built)} more do not fit" if len(built) > 1 else "")
                    + ": retry later"
                )
            for request in built:
                request.id = next(self._ids)
            self._scheduler.enqueue(built)
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
            request._generator = Generator(self.model, config, flows, prefix_cache=self.prefix_reuse)
        else:
            # resolved now: an unknown adapter is the caller's error, and one unloaded while the request waits
            # still runs it (what was accepted finishes as accepted)
            request._adapter = self.model.adapter(config.adapter)
            if self._prefix is not None and self._prefix.directory is not None and config.prompt_logprobs is None:
                # the prompt's blocks on disk read into memory now, not under the lock (admission looks in memory);
                # not a scored prompt's: block files keep no scores, so it could not use them
                self._prefix.lookup(ids, len(ids) - 1, _digest(request), count=False)
            rng = np.random.default_rng(config.sampling.seed)
            seq = TokenSequence(self.model, config, rng, len(ids) + config.max_new_tokens, Usage(len(ids)))
            seq.extend(ids)
            seq.turn_start = request.submitted
            request._sequence = seq
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
            sched, c = self._scheduler, self._counts
            return EngineStats(
                self.mode,
                self.max_batch,
                len(sched.running()) + len(sched.solo),
                len(sched.queue),
                len(sched.solo),
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

    # -- the loop: schedule, execute, commit --------------------------------------------------------------------
    def _loop(self) -> None:
        sched = self._scheduler
        while True:
            with self._lock:
                while not self._closed and not sched.queue and not sched.busy():
                    self._lock.wait()
                if self._incoming and not sched.busy():  # a burst arriving at an idle engine: start it together
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

    def _iteration(self) -> None:
        with self._lock:
            plan = self._scheduler.schedule()
        self._end_cancelled(plan)
        for request in plan.started_solo:
            self._start_solo(request)
        for run, reused in plan.started:
            assert self._executor is not None
            self._executor.adapt(run.slot.index, run.request._adapter)  # a copy into the row, if it changes
            if run.restore is not None:  # the prefix cache's positions, copied into the row
                assert self._prefix is not None
                self._prefix.restore(self._executor.cache.kv, run.slot.index, run.restore)
                self._prefix.counted(reused)  # a scored prompt's last restored position is fed again
                if run.request.config.prompt_logprobs is not None:  # and the scores of the tokens they hold
                    scores = [s for block in run.restore for s in block.scores]
                    run.seq.output.reuse_prompt_scores(scores[1 : reused + 1])
                run.restore = None
            self._hold(run.slot.index, reused)
            run.seq.usage.cached_tokens = reused
            self._count("reused", reused)
        for chunks in plan.runs:
            self._prefill(chunks)
        self._decode([r for r in plan.decode if r.slot.running is r])  # not those a failed prefill released
        self._step_solo(plan.solo)

    def _end_cancelled(self, plan: Plan) -> None:
        for run in plan.cancelled:
            self._hold(run.slot.index, run.slot.held)
            run.request._finish(_with_reason(run.seq.completion(), "cancelled"))
            self._count("cancelled")
        for request in plan.cancelled_solo:
            generator = self._generators.pop(request.id)
            request._finish(_with_reason(generator.completion(), "cancelled"))
            self._count("cancelled")
        for request in plan.cancelled_queued:
            request._finish(_empty_completion(request, "cancelled"))
            self._count("cancelled")

    def _start_solo(self, request: Request) -> None:
        generator = request._generator
        assert generator is not None  # built at submission
        try:
            generator.append(request.prompt)
        except Exception as e:
            with self._lock:
                self._scheduler.solo.remove(request)
            request._finish(None, _own(e))
            self._count("failed")
            return
        self._generators[request.id] = generator

    def _prefill(self, chunks: list[Chunk]) -> None:
        """One graph run of prefill chunks (the scheduler's ``runs``: each request in its own row); a scored
        prompt's chunk scores its positions (every position's logits kept) and its last chunk chooses the first
        token at once. A failing run fails its requests; a failing score, its request alone."""
        assert self._executor is not None
        scored = chunks[0].run.request.config.prompt_logprobs is not None  # a run's chunks all are, or none
        try:
            parts = [(c.run.slot.index, c.run.seq.ids[c.start : c.stop], c.start) for c in chunks]
            logits = self._executor.prefill(parts, keep=scored)
        except Exception as e:
            for chunk in chunks:
                self._fail(chunk.run, _own(e))
            return
        self._count("prefilled", sum(c.stop - c.start for c in chunks))
        for i, chunk in enumerate(chunks):
            if scored:
                self._scored(chunk, logits[i])

    def _scored(self, chunk: Chunk, logits: np.ndarray) -> None:
        """Score ``chunk``'s positions from their logits; its prompt's last chunk chooses the first token."""
        run, seq = chunk.run, chunk.run.seq
        try:
            targets = seq.ids[chunk.start + 1 : min(chunk.stop + 1, seq.n)].tolist()
            seq.output.score_prompt(logits[: len(targets)], targets)
        except Exception as e:
            self._fail(run, _own(e))
            return
        if chunk.stop == seq.n:  # a scored prompt's last chunk (scheduler): it chooses the first token
            run.logits = logits[-1].copy()  # the rows' output buffer is written again by their next run
            self._commit(run)

    def _decode(self, going: list[Running]) -> None:
        """One graph run for every request with one token to feed (the token it chose last, or its prompt's last
        token), then each chooses its next token from the logits that run gave it and hands the step over at once."""
        if not going:
            return
        prompts = [r for r in going if r.seq.n == r.seq.usage.prompt_tokens]  # their prompt's last token now
        self._count("prefilled", len(prompts))
        assert self._executor is not None
        try:  # the run of every decoding row
            logits = self._executor.decode({r.slot.index: int(r.seq.ids[r.fed]) for r in going})
        except Exception as e:
            for run in going:
                self._fail(run, _own(e))
            return
        for run in going:
            run.fed += 1
            run.logits = logits[run.slot.index]
        for run in going:
            self._commit(run)
        for run in prompts:  # after the first tokens are out: their prompts' positions to the prefix cache
            if run.slot.running is run:
                self._remember(run)

    def _commit(self, run: Running) -> None:
        assert run.logits is not None
        try:
            step = run.seq.commit(run.logits)
        except Exception as e:  # this request's router, grammar or stop strings: it alone fails
            self._fail(run, _own(e))
            return
        run.logits = None
        run.request._push(step)
        if run.seq.done:
            self._release(run)

    def _step_solo(self, solo: list[Request]) -> None:
        for request in solo:
            gen = self._generators.get(request.id)
            if gen is None:  # its start failed
                continue
            try:
                if not gen.done:
                    with suppress(StopIteration):
                        request._push(gen.step())
                if gen.done:
                    self._end_solo(request)
                    request._finish(gen.completion())
                    self._count("finished")
            except Exception as e:  # this request's generator alone
                self._end_solo(request)
                request._finish(None, _own(e))
                self._count("failed")

    def _end_solo(self, request: Request) -> None:
        self._generators.pop(request.id, None)
        with self._lock:
            self._scheduler.solo.remove(request)

    # -- ending requests --------------------------------------------------------------------------------------
    def _lookup(self, request: Request, limit: int) -> tuple[int, Any]:
        """The prefix cache's longest hit for ``request``'s prompt (the scheduler's ``lookup``)."""
        assert self._prefix is not None
        top = request.config.prompt_logprobs  # a scored prompt needs its positions' scores too
        blocks = self._prefix.lookup(request.prompt, limit, _digest(request), count=False, disk=False, top=top)
        if not blocks:
            self._prefix.counted(0)
        return len(blocks) * self._prefix.block, blocks

    def _remember(self, run: Running) -> None:
        """Give the prefix cache what ``run``'s row holds (the blocks it does not hold yet)."""
        if self._prefix is not None and run.fed >= self._prefix.block:
            assert self._executor is not None
            top = run.request.config.prompt_logprobs
            scores = run.seq.output.prompt_scores if top is not None else ()  # kept for later scored prompts
            kv, row, digest = self._executor.cache.kv, run.slot.index, _digest(run.request)
            self._prefix.store(run.seq.ids[: run.fed], kv, row, digest, scores, top)

    def _release(self, run: Running) -> None:
        self._remember(run)
        with self._lock:
            held = self._scheduler.release(run, failed=False)
        self._hold(run.slot.index, held)
        run.request._finish(run.seq.completion())
        self._count("finished")

    def _fail(self, run: Running, error: BaseException) -> None:
        with self._lock:
            held = self._scheduler.release(run, failed=True)  # what the failed run left in the row is not trusted
        self._hold(run.slot.index, held)
        run.request._finish(None, error)
        self._count("failed")

    def _hold(self, row: int, length: int) -> None:
        assert self._executor is not None
        self._executor.hold(row, length)

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            running, solo = self._scheduler.running(), list(self._scheduler.solo)
        for run in running:
            self._fail(run, error)
        for request in solo:
            self._end_solo(request)
            request._finish(None, error)
        with self._lock:
            queue = self._scheduler.queue
            while queue:
                queue.popleft()._finish(None, error)

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n


def _digest(request: Request) -> bytes:
    return prefix_key(request._adapter)


def _own(e: Exception) -> EdgerouteError:
    """A request's own failure as the library's error: an ``EdgerouteError`` as it is, anything else (a bug, or a
    native library's error on this request's input) as an ``InferenceError`` that says what it was."""
    return e if isinstance(e, EdgerouteError) else InferenceError(f"{type(e).__name__}: {e}")


def _with_reason(completion: Completion, reason: str) -> Completion:
    return replace(completion, finish_reason=reason)


def _empty_completion(request: Request, reason: str) -> Completion:
    usage = Usage(prompt_tokens=len(request.prompt))
    return Completion(text="", token_ids=[], finish_reason=reason, usage=usage)
