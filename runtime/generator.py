"""The Generator: the only stateful orchestrator (KV cache, token history, RNG, router, text, stops).

The sequence is ``tokens``; the cache holds ``tokens[:cache.length]``, and the tokens after it are *pending*:
they are fed to the graph (in chunks) before the next token is chosen. ``append`` adds pending tokens and starts
a turn, ``rewind(n)`` drops the last n tokens (the cache is sliced, nothing recomputed but the last token), and
each step feeds what is pending, routes the logits, and appends the chosen token as pending.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from . import routing
from .choice import TokenChooser
from .config import GenerationConfig
from .errors import ConcurrentUseError, ConfigError, ContextOverflowError
from .kv_cache import left_padded
from .output import Completion, Step, TurnOutput, Usage
from .params import Flows, flows_of

if TYPE_CHECKING:
    from .protocols import ModelLike


class Generator:
    """Stateful generation over one sequence. Create with ``model.generator(config, ...)``.

    ``append(ids)`` feeds tokens (prefill in chunks) and starts a turn of at most ``max_new_tokens``; iterating
    yields :class:`Step` objects until a stop token, a stop string or the length limit; ``rewind(n)`` removes
    the last n tokens; ``usage`` sums counts and timings.

    Level-1 flows (docs/router.md, "Two-level routing"), at most one kind per generator, come as a :class:`Flows`
    (``flows=``), or as its fields by keyword (``draft=``, ``draft_k=``, ``adaptive_k=``, ``guidance=``,
    ``negative_prompt=``, ``contrast=``, ``contrast_alpha=``, ``contrast_beta=``).
    """

    def __init__(
        self, model: ModelLike, config: GenerationConfig, flows: Flows | None = None, **flow_fields: Any
    ) -> None:
        if not isinstance(config, GenerationConfig):
            raise ConfigError("config", config, "must be a GenerationConfig")
        flows = flows_of(flows, flow_fields)
        self._busy = threading.Lock()  # held by a call in progress: a second thread's call raises
        self.model = model
        self.config = config
        self.cache = model.new_cache()
        self._ids = np.zeros(model.context_length, dtype=np.int64)
        self._n = 0
        self._logits: np.ndarray | None = None
        self._chooser = TokenChooser(model, config, np.random.default_rng(config.sampling.seed))
        self._out = TurnOutput(model, config)
        self._out.turn.finish_reason = "length"  # nothing to generate before the first append
        self._queue: deque[Step] = deque()
        self.usage = Usage()
        self._t_turn = 0.0
        self.flows = flows
        self._drafter, self._k = _make_drafter(model, flows)
        self._guidance, self._negative, self._neg_stream = _make_guidance(model, config, flows)
        self._contrast = _make_contrast(model, flows)
        theta = flows.gate_threshold
        self._gate = None if theta is None else routing.Gate(theta, flows.gate_width, flows.gate_signal)

    # -- state -----------------------------------------------------------------------------------------------
    @property
    def tokens(self) -> list[int]:
        """Every token of the sequence: prompts, generated tokens (stop tokens included) and appended ids."""
        return self._ids[: self._n].tolist()

    @property
    def done(self) -> bool:
        """True when the current turn has finished (call ``append`` to start another)."""
        return self._out.done and not self._queue

    @property
    def finish_reason(self) -> str | None:
        return self._out.turn.finish_reason

    # -- feeding ---------------------------------------------------------------------------------------------
    def append(self, ids: Sequence[int]) -> None:
        """Add tokens to the sequence and prefill them; starts a new turn of up to ``max_new_tokens``.

        Raises ``ContextOverflowError`` (and changes nothing) when the sequence plus ``max_new_tokens`` would not
        fit into the context.
        """
        with self._exclusive():
            self._append(ids)

    def _append(self, ids: Sequence[int]) -> None:
        vocab = self.model.vocab_size
        if isinstance(ids, (str, bytes, bytearray, memoryview)):
            raise ConfigError("ids", ids[:16], "must be token ids (encode text with model.tokenizer first)")
        try:
            arr = np.asarray(list(ids), dtype=np.int64)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError("ids", list(ids)[:8], f"must be token ids in [0, {vocab})") from None
        if arr.ndim != 1 or (len(arr) and (arr.min() < 0 or arr.max() >= vocab)):
            raise ConfigError("ids", list(ids)[:8], f"must be token ids in [0, {vocab})")
        need = self._n + len(arr) + self.config.max_new_tokens
        if need > self.model.context_length:
            raise ContextOverflowError(
                need,
                self.model.context_length,
                f"{self._n + len(arr)} in the sequence + max_new_tokens {self.config.max_new_tokens}",
            )
        t0 = time.perf_counter()
        self._ids[self._n : self._n + len(arr)] = arr
        self._n += len(arr)
        self._logits = None if len(arr) else self._logits
        self.usage.prompt_tokens += len(arr)
        self._out.new_turn()
        self._chooser.restart([])
        self._queue.clear()
        self._t_turn = t0
        self._feed()
        self.usage.prefill_seconds += time.perf_counter() - t0

    def _feed(self) -> None:
        """Run the graph over pending tokens in chunks; leaves the last position's logits.

        When the logits of the last token are not at hand (after a rewind, or an interrupt between a graph run
        and its bookkeeping) the last cached position is recomputed.
        """
        cache, chunk = self.cache, self.config.prefill_chunk
        length = cache.length  # read once per run: a decode step feeds one token per token generated
        if self._logits is None and self._n and length >= self._n:
            cache.trim(length - (self._n - 1))
            length = cache.length
        while length < self._n:
            stop = min(self._n, length + chunk)
            self._logits = self.model.step_logits(self._ids[None, length:stop], cache)[0]
            length = cache.length

    # -- generating ------------------------------------------------------------------------------------------
    def _exclusive(self) -> _Exclusive:
        """Held while a call runs: a call from a second thread meanwhile raises ``ConcurrentUseError``."""
        return _Exclusive(self._busy)

    def step(self) -> Step:
        """Generate one token. Raises ``StopIteration`` when the turn is done."""
        if not self._busy.acquire(blocking=False):
            raise ConcurrentUseError(_BUSY)
        try:
            if not self._queue:
                if self._out.done:
                    raise StopIteration
                t0 = time.perf_counter()
                steps = self._speculate() if self._drafter is not None else None
                if not steps:
                    steps = [self._plain()]
                self.usage.record(len(steps), t0, time.perf_counter(), self._t_turn)
                self._queue.extend(steps)
            return self._queue.popleft()
        finally:
            self._busy.release()

    def _plain(self) -> Step:
        """One token from the (possibly mixed) logits of the current position."""
        self._feed()
        if self._logits is None:
            raise ConfigError("ids", [], "append a prompt before generating")
        raw = self._logits
        routed = self._mixed(raw)
        t1 = time.perf_counter()
        token = self._chooser.choose(routed, self._ids[: self._n], self._out.index)
        self._chooser.accept(token)
        st = self._out.take(token, raw)
        self.usage.router_seconds += time.perf_counter() - t1
        self._ids[self._n] = st.token_id
        self._n += 1
        self._logits = None
        return st

    def _mixed(self, logits: np.ndarray) -> np.ndarray:
        """Level-1 mixing of the second flow, if any, into this position's logits (as much as the gate says)."""
        if self._guidance is None and self._contrast is None:
            return logits
        usage = self.usage
        usage.flow_steps += 1
        share = 1.0 if self._gate is None else self._gate.weight(logits)
        if share == 0.0:  # the first flow alone: the second is not run (its stream catches up when next needed)
            usage.flow_skipped += 1
            return logits
        if self._guidance is not None:
            stream = self._neg_stream
            assert stream is not None
            before = stream.runs
            uncond = stream.sync(self._negative + self._out.turn.generated)
            w = self._guidance if share == 1.0 else 1.0 + (self._guidance - 1.0) * share
            mixed = routing.guidance_mix(logits, uncond, w)
        else:
            assert self._contrast is not None
            stream, alpha, beta = self._contrast
            before = stream.runs
            mixed = routing.contrast_mix(logits, stream.sync(self._ids[: self._n]), alpha * share, beta)
        usage.flow_runs += stream.runs - before
        return mixed

    def _speculate(self) -> list[Step] | None:
        """One speculative round: the draft proposes, the target scores all proposals in one pass, rejection
        sampling keeps an exact prefix plus one token. None when there is nothing to propose."""
        ch, out, cache = self._chooser, self._out, self.cache
        index = out.index
        k = min(self._k.k, self.config.max_new_tokens - index - 1)
        if k < 1 or self._n == 0:
            return None
        seq = self._ids[: self._n]
        t1 = time.perf_counter()
        assert self._drafter is not None
        proposals, q_rows = routing.propose(self._drafter, seq, k, ch.dense, ch.rng, index, self.model.vocab_size)
        valid = ch.router.valid_prefix(seq, index, proposals)  # a constraint: no draft past a forbidden token
        proposals, q_rows = proposals[:valid], q_rows[:valid]
        if not proposals:
            return None
        k = len(proposals)
        base = self._n
        if cache.length == base and self._logits is not None:  # right after append: the first row is at hand
            # a copy: the next run on this cache may reuse the buffer the step's logits are a view of
            rows = [self._logits.copy(), *self.model.forward_last(np.array([proposals]), cache, k)[0]]
        else:
            if cache.length >= base:
                cache.trim(cache.length - (base - 1))
            feed = np.concatenate([self._ids[cache.length : base], proposals])
            rows = list(self.model.forward_last(feed[None], cache, k + 1)[0])
        hist = np.concatenate([seq, proposals])
        p_rows = [ch.dense(rows[i], hist[: base + i], index + i) for i in range(k + 1)]
        accepted, token = routing.verify(p_rows, q_rows, proposals, ch.rng)
        self.usage.draft_proposed += k
        self.usage.draft_accepted += accepted
        self._k.update(k, accepted)
        self.usage.router_seconds += time.perf_counter() - t1
        steps = []
        for i, tok in enumerate([*proposals[:accepted], token]):
            ch.accept(tok)
            steps.append(out.take(tok, rows[i]))
            self._ids[base + i] = tok
            if steps[-1].finish_reason:
                break
        self._n = base + len(steps)
        keep = base + min(len(steps), accepted)  # the cache holds the proposals: keep the accepted ones
        cache.trim(cache.length - keep)
        self._logits = None
        return steps

    def __iter__(self) -> Iterator[Step]:
        while not self.done:
            yield self.step()

    def run(self) -> Completion:
        """Generate until the turn is done and return the turn's :class:`Completion`."""
        for _ in self:
            pass
        return self.completion()

    def completion(self) -> Completion:
        """The current turn as a :class:`Completion` (what was generated since the last ``append``)."""
        return self._out.completion(self.usage)

    def rewind(self, n: int) -> None:
        """Remove the last ``n`` tokens of the sequence; generation continues from there.

        The KV cache is cut to the remaining tokens (the last one is recomputed on the next step). If the
        removed tokens were generated in this turn, the turn's text is rebuilt from what remains. Steps already
        generated but not yet yielded (speculative rounds) are dropped.
        """
        with self._exclusive():
            self._rewind(n)

    def _rewind(self, n: int) -> None:
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= self._n:
            raise ConfigError("n", n, f"must be an integer in [0, {self._n}]")
        self._queue.clear()
        if n == 0:
            return
        self._n -= n
        if self.cache.length > self._n:
            self.cache.trim(self.cache.length - self._n)
        self._logits = None
        turn = self._out.turn
        lost = min(n, len(turn.generated))
        kept = turn.generated[: len(turn.generated) - lost]
        self._out.replay(kept)
        self._chooser.restart(list(kept))


_BUSY = (
    "this Generator is in use by another thread: a Generator holds one sequence; give each thread its own"
    " (model.generator(...)), the Model is shared"
)


class _Exclusive:
    """``with`` over a Generator's lock without waiting: a second thread raises ``ConcurrentUseError``."""

    __slots__ = ("_lock",)

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock

    def __enter__(self) -> None:
        if not self._lock.acquire(blocking=False):
            raise ConcurrentUseError(_BUSY)

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def _same_tokenizer(a: ModelLike, b: ModelLike) -> bool:
    return a.vocab_size == b.vocab_size and a.tokenizer.backend.get_vocab() == b.tokenizer.backend.get_vocab()


def _make_drafter(
    model: ModelLike, flows: Flows
) -> tuple[routing.NgramDrafter | routing.Stream | None, routing.AdaptiveK]:
    ak = routing.AdaptiveK(flows.draft_k, flows.adaptive_k)
    draft = flows.draft
    if draft is None:
        return None, ak
    if isinstance(draft, str):  # "ngram" (Flows checked it)
        return routing.NgramDrafter(), ak
    if model.manifest.logits == "last":
        raise ConfigError("draft", "model", "the target graph returns only the last position's logits")
    if not _same_tokenizer(model, draft):
        raise ConfigError("draft", repr(draft), "the draft model must share the target's tokenizer")
    return routing.Stream(draft), ak


def _make_guidance(
    model: ModelLike, config: GenerationConfig, flows: Flows
) -> tuple[float | None, list[int], routing.Stream | None]:
    scale, negative = flows.guidance, flows.negative_prompt
    if scale is None:
        return None, [], None
    if negative is None:
        m = model.manifest
        ids = [m.bos_token_id] if m.bos_token_id is not None else [m.eos_token_ids[0]]
    else:
        ids = model.encode_prompt(negative)  # refuses a prompt that gives no token
    if len(ids) + config.max_new_tokens > model.context_length:
        raise ContextOverflowError(len(ids) + config.max_new_tokens, model.context_length, "negative prompt")
    return float(scale), ids, routing.Stream(model, config.prefill_chunk)


def _make_contrast(model: ModelLike, flows: Flows) -> tuple[routing.Stream, float, float] | None:
    small = flows.contrast
    if small is None:
        return None
    if not _same_tokenizer(model, small):
        raise ConfigError("contrast", repr(small), "the contrast model must share the target's tokenizer")
    return routing.Stream(small), float(flows.contrast_alpha), float(flows.contrast_beta)


def generate_batch(model: ModelLike, prompts: list[list[int]], config: GenerationConfig) -> list[Completion]:
    """Generate for several prompts in one graph run per step (left padding, attention masks).

    Each row has its own router state and RNG (row i's seed is ``[seed, i]`` when a seed is given); rows that
    finish keep running until all are done, and their extra tokens are discarded.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("prompt", prompts, "every prompt needs at least one token")
    b = len(prompts)
    width = max(len(p) for p in prompts)
    need = width + config.max_new_tokens
    if need > model.context_length:
        raise ContextOverflowError(need, model.context_length, "longest prompt + max_new_tokens")
    for p in prompts:
        if min(p) < 0 or max(p) >= model.vocab_size:
            raise ConfigError("prompt", p[:8], f"token ids must be in [0, {model.vocab_size})")
    seed = config.sampling.seed
    choosers = [
        TokenChooser(model, config, np.random.default_rng(None if seed is None else [seed, i])) for i in range(b)
    ]
    outputs = [TurnOutput(model, config) for _ in range(b)]
    total = width + config.max_new_tokens
    ids = np.zeros((b, total), dtype=np.int64)
    mask = np.zeros((b, total), dtype=np.int64)
    ids[:, :width], mask[:, :width] = left_padded(prompts, width)
    starts = [width - len(p) for p in prompts]  # row i's tokens are ids[i, starts[i]:n]
    cache = model.new_cache(b)
    usage = [Usage(prompt_tokens=len(p)) for p in prompts]
    t0 = time.perf_counter()
    n = width
    logits = cache.prefill_rows(model.session, prompts, config.prefill_chunk)
    ts = time.perf_counter()  # a step runs from the end of the last one: its graph run and every row's choice
    for u in usage:
        u.prefill_seconds = ts - t0
    while not all(o.done for o in outputs):
        active = []
        for i, out in enumerate(outputs):
            if out.done:
                ids[i, n] = ids[i, n - 1]
                continue
            t1 = time.perf_counter()
            token = choosers[i].choose(logits[i], ids[i, starts[i] : n], out.index)
            choosers[i].accept(token)
            st = out.take(token, logits[i])
            usage[i].router_seconds += time.perf_counter() - t1
            ids[i, n] = st.token_id
            active.append(usage[i])
        now = time.perf_counter()
        for u in active:
            u.record(1, ts, now, t0)
        ts = now
        mask[:, n] = 1
        n += 1
        if all(o.done for o in outputs):
            break
        pos = (np.sum(mask[:, :n], axis=1, keepdims=True) - 1).astype(np.int64)
        logits = model.forward(ids[:, n - 1 : n], cache, mask[:, :n], pos)
    return [out.completion(u) for out, u in zip(outputs, usage, strict=True)]
