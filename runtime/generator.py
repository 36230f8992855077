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
from .adapters import prefix_key
from .config import GenerationConfig
from .errors import ConcurrentUseError, ConfigError, ContextOverflowError
from .kv_cache import SharedKVCache, left_padded
from .output import Completion, Step, Usage
from .params import Flows, flows_of
from .sequence import TokenSequence

if TYPE_CHECKING:
    from .graph import Graph


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
        self,
        model: Graph,
        config: GenerationConfig,
        flows: Flows | None = None,
        prefix_cache: bool = True,
        **flow_fields: Any,
    ) -> None:
        if not isinstance(config, GenerationConfig):
            raise ConfigError("config", config, "must be a GenerationConfig")
        flows = flows_of(flows, flow_fields)
        self._busy = threading.Lock()  # held by a call in progress: a second thread's call raises
        self.model = model
        self.config = config
        adapter = model.adapter(config.adapter)
        self.cache = model.new_cache(adapter=adapter)
        self._prefix_key = prefix_key(adapter)
        self._prefix = model.prefix_cache if prefix_cache else None  # off: the engine's prefix_reuse=False
        self._store_at = 0  # positions of a prompt to give the prefix cache once the turn's next token is out
        self.usage = Usage()
        rng = np.random.default_rng(config.sampling.seed)
        self._seq = TokenSequence(model, config, rng, model.context_length, self.usage)
        self._seq.output.turn.finish_reason = "length"  # nothing to generate before the first append
        self._logits: np.ndarray | None = None
        self._queue: deque[Step] = deque()
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
        return self._seq.tokens.tolist()

    @property
    def done(self) -> bool:
        """True when the current turn has finished (call ``append`` to start another)."""
        return self._seq.done and not self._queue

    @property
    def finish_reason(self) -> str | None:
        return self._seq.output.turn.finish_reason

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
        need = self._seq.n + len(arr) + self.config.max_new_tokens
        if need > self.model.context_length:
            raise ContextOverflowError(
                need,
                self.model.context_length,
                f"{self._seq.n + len(arr)} in the sequence + max_new_tokens {self.config.max_new_tokens}",
            )
        t0 = time.perf_counter()
        seq = self._seq
        seq.extend(arr)
        self._logits = None if len(arr) else self._logits
        self.usage.prompt_tokens += len(arr)
        seq.output.new_turn()
        seq.chooser.restart([])
        self._queue.clear()
        seq.turn_start = t0
        self._feed(score=self.config.prompt_logprobs is not None)
        self.usage.prefill_seconds += time.perf_counter() - t0

    def _feed(self, score: bool = False) -> None:
        """Run the graph over pending tokens in chunks; leaves the last position's logits. ``score``: the pending
        tokens are a prompt whose tokens after the first are scored (``prompt_logprobs``) from every position's
        logits of the same runs.

        When the logits of the last token are not at hand (after a rewind, or an interrupt between a graph run
        and its bookkeeping) the last cached position is recomputed.
        """
        cache, chunk, n, ids = self.cache, self.config.prefill_chunk, self._seq.n, self._seq.ids
        length = cache.length  # read once per run: a decode step feeds one token per token generated
        if self._logits is None and n and length >= n:
            cache.trim(length - (n - 1))
            length = cache.length
        cached, first = self._prefix, length
        if cached is not None and not score and n - 1 - length >= cached.block and isinstance(cache, SharedKVCache):
            # the positions the cache holds for the prompt past what the row holds (its last token is fed: its
            # logits choose the next)
            restored = cached.restore_prefix(ids[:n], n - 1, cache.kv, 0, self._prefix_key, start=length)
            if restored > length:
                cache.lengths[0] = restored
                self.usage.cached_tokens += restored - length
                length = restored
        while length < n:
            stop = min(n, length + chunk)
            if score:  # row k (position length + k) scores the token after it, while that is a prompt token
                logits = self.model.forward_last(ids[None, length:stop], cache, stop - length)[0]
                targets = ids[length + 1 : min(stop + 1, n)]
                self._seq.output.score_prompt(logits[: len(targets)], targets.tolist())
                self._logits = logits[-1]
            else:
                self._logits = self.model.step_logits(ids[None, length:stop], cache)[0]
            length = cache.length
        if cached is not None and length - first > 1:  # a prompt was fed: kept after the next token is chosen
            self._store_at = length

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
                if self._seq.done:
                    raise StopIteration
                t0 = time.perf_counter()
                steps = self._speculate() if self._drafter is not None else None
                if steps:  # a speculative round counts its tokens as one step
                    self.usage.record(len(steps), t0, time.perf_counter(), self._seq.turn_start)
                else:
                    steps = [self._plain(t0)]
                self._queue.extend(steps)
                if self._store_at:  # off the time to first token: the prompt's positions to the prefix cache
                    self._remember()
            return self._queue.popleft()
        finally:
            self._busy.release()

    def _remember(self) -> None:
        """Give the prefix cache the prompt's positions the cache still holds (those a rewind left)."""
        n, self._store_at = min(self._store_at, self.cache.length), 0
        if self._prefix is not None and isinstance(self.cache, SharedKVCache) and n >= self._prefix.block:
            self._prefix.store(self._seq.ids[:n], self.cache.kv, 0, self._prefix_key)

    def _plain(self, start: float) -> Step:
        """One token from the (possibly mixed) logits of the current position; the step started at ``start``."""
        self._feed()
        if self._logits is None:
            raise ConfigError("ids", [], "append a prompt before generating")
        raw = self._logits
        step = self._seq.commit(self._mixed(raw), raw, start)
        self._logits = None
        return step

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
            uncond = stream.sync(self._negative + self._seq.output.turn.generated)
            w = self._guidance if share == 1.0 else 1.0 + (self._guidance - 1.0) * share
            mixed = routing.guidance_mix(logits, uncond, w)
        else:
            assert self._contrast is not None
            stream, alpha, beta = self._contrast
            before = stream.runs
            mixed = routing.contrast_mix(logits, stream.sync(self._seq.tokens), alpha * share, beta)
        usage.flow_runs += stream.runs - before
        return mixed

    def _speculate(self) -> list[Step] | None:
        """One speculative round: the draft proposes, the target scores all proposals in one pass, rejection
        sampling keeps an exact prefix plus one token. None when there is nothing to propose."""
        ch, cache = self._seq.chooser, self.cache
        index = self._seq.index
        k = min(self._k.k, self.config.max_new_tokens - index - 1)
        if k < 1 or self._seq.n == 0:
            return None
        seq = self._seq.tokens
        t1 = time.perf_counter()
        assert self._drafter is not None
        proposals, q_rows = routing.propose(self._drafter, seq, k, ch.dense, ch.rng, index, self.model.vocab_size)
        valid = ch.router.valid_prefix(seq, index, proposals)  # a constraint: no draft past a forbidden token
        proposals, q_rows = proposals[:valid], q_rows[:valid]
        if not proposals:
            return None
        k = len(proposals)
        base = self._seq.n
        if cache.length == base and self._logits is not None:  # right after append: the first row is at hand
            # a copy: the next run on this cache may reuse the buffer the step's logits are a view of
            rows = [self._logits.copy(), *self.model.forward_last(np.array([proposals]), cache, k)[0]]
        else:
            if cache.length >= base:
                cache.trim(cache.length - (base - 1))
            feed = np.concatenate([self._seq.ids[cache.length : base], proposals])
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
            steps.append(self._seq.take(tok, rows[i]))
            if steps[-1].finish_reason:
                break
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
        return self._seq.completion()

    def rewind(self, n: int) -> None:
        """Remove the last ``n`` tokens of the sequence; generation continues from there.

        The KV cache is cut to the remaining tokens (the last one is recomputed on the next step). If the
        removed tokens were generated in this turn, the turn's text is rebuilt from what remains. Steps already
        generated but not yet yielded (speculative rounds) are dropped.
        """
        with self._exclusive():
            self._rewind(n)

    def _rewind(self, n: int) -> None:
        seq = self._seq
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= seq.n:
            raise ConfigError("n", n, f"must be an integer in [0, {seq.n}]")
        self._queue.clear()
        if n == 0:
            return
        seq.n -= n
        if self.cache.length > seq.n:
            self.cache.trim(self.cache.length - seq.n)
        self._logits = None
        turn = seq.output.turn
        lost = min(n, len(turn.generated))
        kept = turn.generated[: len(turn.generated) - lost]
        seq.output.replay(kept)
        seq.chooser.restart(list(kept))


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


def _make_drafter(model: Graph, flows: Flows) -> tuple[routing.NgramDrafter | routing.Stream | None, routing.AdaptiveK]:
    ak = routing.AdaptiveK(flows.draft_k, flows.adaptive_k)
    draft = flows.draft
    if draft is None:
        return None, ak
    if isinstance(draft, str):  # "ngram" (Flows checked it)
        return routing.NgramDrafter(), ak
    if model.manifest.logits == "last":
        raise ConfigError("draft", "model", "the target graph returns only the last position's logits")
    if not model.shares_tokenizer(draft):
        raise ConfigError("draft", repr(draft), "the draft model must share the target's tokenizer")
    return routing.Stream(draft), ak


def _make_guidance(
    model: Graph, config: GenerationConfig, flows: Flows
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
    return float(scale), ids, routing.Stream(model, config.prefill_chunk, config.adapter)  # the same fine-tune


def _make_contrast(model: Graph, flows: Flows) -> tuple[routing.Stream, float, float] | None:
    small = flows.contrast
    if small is None:
        return None
    if not model.shares_tokenizer(small):
        raise ConfigError("contrast", repr(small), "the contrast model must share the target's tokenizer")
    return routing.Stream(small), float(flows.contrast_alpha), float(flows.contrast_beta)


def generate_batch(model: Graph, prompts: list[list[int]], config: GenerationConfig) -> list[Completion]:
    """Generate for several prompts in one graph run per step (left padding, attention masks).

    Each row has its own router state and RNG (row i's seed is ``[seed, i]`` when a seed is given); rows that
    finish keep running until all are done, and their extra tokens are discarded.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("prompt", prompts, "every prompt needs at least one token")
    if config.prompt_logprobs is not None:
        raise ConfigError(
            "prompt_logprobs", config.prompt_logprobs, "a batch of prompts does not score them: one prompt at a time"
        )
    b = len(prompts)
    width = max(len(p) for p in prompts)
    need = width + config.max_new_tokens
    if need > model.context_length:
        raise ContextOverflowError(need, model.context_length, "longest prompt + max_new_tokens")
    for p in prompts:
        if min(p) < 0 or max(p) >= model.vocab_size:
            raise ConfigError("prompt", p[:8], f"token ids must be in [0, {model.vocab_size})")
    seed = config.sampling.seed
    seqs = []
    for i, prompt in enumerate(prompts):
        rng = np.random.default_rng(None if seed is None else [seed, i])
        seq = TokenSequence(model, config, rng, len(prompt) + config.max_new_tokens, Usage(prompt_tokens=len(prompt)))
        seq.extend(prompt)
        seqs.append(seq)
    total = width + config.max_new_tokens
    mask = np.zeros((b, total), dtype=np.int64)
    feed, mask[:, :width] = left_padded(prompts, width)
    feed = feed[:, -1:].copy()  # each row's next token to feed (a finished row feeds its last one again)
    cache = model.new_cache(b, adapter=config.adapter)
    t0 = time.perf_counter()
    n = width
    logits = cache.prefill_rows(model.session, prompts, config.prefill_chunk)
    ts = time.perf_counter()  # a step runs from the end of the last one: its graph run and every row's choice
    for seq in seqs:
        seq.usage.prefill_seconds = ts - t0
        seq.turn_start = t0
    while True:
        for i, seq in enumerate(seqs):
            if not seq.done:
                feed[i, 0] = seq.commit(logits[i], start=ts).token_id
        ts = time.perf_counter()
        mask[:, n] = 1
        n += 1
        if all(seq.done for seq in seqs):
            break
        pos = (np.sum(mask[:, :n], axis=1, keepdims=True) - 1).astype(np.int64)
        logits = model.forward(feed, cache, mask[:, :n], pos)
    return [seq.completion() for seq in seqs]
