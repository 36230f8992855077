"""The router: one request's chain of stages (:class:`Router`), built by :func:`make_chain` in the documented
order, and the distribution it routes to (:class:`Distribution`).

The chain, in order (HF/vLLM/OpenAI semantics)::

    1. processors over the whole vector: logit_bias (and bans), stop-token suppression before min_new_tokens,
       penalties (repetition: HF, multiplicative; presence and frequency: OpenAI, additive; last N tokens),
       then any extra processor; a grammar constraint (:class:`.stages.Constraining`) is the last: every token
       it forbids is at -inf (it hands the truncations only the allowed ids, or bans the forbidden ones)
    2. truncations over a candidate set: top_k -> temperature -> top_p -> min_p -> typical_p, then any extra
       truncation, each keeping at least min_keep candidates (temperature 0 = greedy: the argmax of the
       processed logits)
    3. exploration: p' = q * uniform(allowed) + (1 - q) * p, allowed = vocabulary minus banned and special ids
       (and minus what the grammar forbids at this step)
    4. the draw: inverse CDF with the request's own numpy Generator

The router knows its stages only through their interface: adding one is writing a :class:`.stages.Processor`
or a :class:`.stages.Truncation` and passing it to :func:`make_chain`. Its fast paths are the stages' own fast
forms, taken only where every stage concerned has one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from ..config import SamplingConfig
from ..errors import ConfigError, EdgerouteError, InferenceError
from .fast import FEW, FastCut, Few
from .ops import Ids, NoCandidates, _check_top, _weights, draw, explore_mix, softmax
from .stages import (
    Constraining,
    Explore,
    LogitBias,
    MinP,
    Penalties,
    Processor,
    Suppress,
    Temperature,
    TopK,
    TopP,
    Truncation,
    Typical,
)


# -- the chain ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Distribution:
    """A sparse distribution after the chain: ``probs[j]`` is the probability of token ``ids[j]``; ``q`` of the
    mass is spread uniformly over ``allowed`` on top of it (already included in ``dense()``)."""

    ids: np.ndarray
    probs: np.ndarray
    q: float
    allowed: np.ndarray
    vocab_size: int

    def dense(self) -> np.ndarray:
        """The full-vocabulary float64 probability vector."""
        return explore_mix(self.ids, self.probs, self.q, self.allowed, self.vocab_size)


class Router:
    """One request's chain (built by :func:`make_chain`): ``processors`` in order, then ``truncations`` in order
    (the best candidate checked to be finite after the first, when that is a ``prefilter`` such as top-k, else
    before it), then exploration and the draw (argmax when ``greedy``).

    One definition of what is drawn: :meth:`process` and :meth:`truncate` are the stages, :meth:`distribution`
    is the routed distribution (speculation and tests read it) and :meth:`sample_plain` draws from it stage by
    stage. :meth:`sample` is what generation calls: the same token as :meth:`sample_plain` for the same RNG
    state, through the stages' fast forms, each taken only when every stage concerned has one (each pinned to
    :meth:`sample_plain` by a test):

    - greedy when every processor is ``lowers_only``: the raw argmax, when every active one ``keeps`` it;
    - when every active processor names the positions it ``touched``: its edits written into the caller's
      vector and undone after the draw, rather than a copy of the vocabulary;
    - when the first truncation is a ``prefilter`` (top-k) that leaves at most ``FEW`` candidates and every later
      truncation has a ``fast`` form: those forms and the draw on Python floats (:class:`.fast.Few`).
    """

    def __init__(
        self,
        processors: Sequence[Processor],
        truncations: Sequence[Truncation],
        explore: Explore,
        greedy: bool,
        vocab_size: int,
        banned: np.ndarray,
    ) -> None:
        self.processors = tuple(processors)
        self.truncations = tuple(truncations)
        self.explore = explore
        self.greedy = greedy
        self.vocab_size = vocab_size
        self.banned = banned
        self.allowed = explore.allowed
        self._stateful = tuple(p for p in self.processors if p.stateful)
        found = [p for p in self.processors if isinstance(p, Constraining)]
        if len(found) > 1 or (found and self.processors[-1] is not found[0]):
            raise ValueError("a router takes at most one constraint, as its last processor")
        self._grammar = found[0] if found else None
        self._lowering = all(p.lowers_only for p in self.processors)
        first = self.truncations[0] if self.truncations else None
        self._prefilter = first if first is not None and first.prefilter else None
        self._rest = self.truncations[1:] if self._prefilter is not None else self.truncations
        fast = [t.fast() for t in self._rest]
        # the float path: after a prefilter, when every later truncation has a fast form
        self._few: tuple[FastCut, ...] | None = None
        if self._prefilter is not None and all(f is not None for f in fast):
            self._few = tuple(f for f in fast if f is not None)

    # -- the stages, one by one ----------------------------------------------------------------------------
    def _active(self, index: int) -> list[Processor]:
        return [p for p in self.processors if p.active(index)]

    def process(self, logits: np.ndarray, history: np.ndarray, index: int = 0) -> np.ndarray:
        """The processors: a new float32 vector, or ``logits`` itself when none applies at ``index`` (callers
        never write into the result)."""
        active = self._active(index)
        if not active:
            return logits  # nothing changes the logits: no copy (they are cold in cache after the graph run)
        out = np.array(logits, dtype=np.float32, copy=True)
        for p in active:
            p.apply(out, history, index)
        return out

    def _start(self, x: np.ndarray, history: np.ndarray | None, index: int) -> tuple[Ids, np.ndarray]:
        """The candidate set the truncations start from: the whole vocabulary, or the ids a constraint allows."""
        if self._grammar is not None:
            if history is None:
                raise ValueError("a router with a constraint needs the history")
            ids = self._grammar.restriction(history, index)
            if ids is not None:
                return ids, x[ids]
        return None, x

    def _argmax(self, x: np.ndarray, history: np.ndarray | None, index: int) -> int:
        """Greedy's draw: the first maximum of the candidate set; :class:`NoCandidates` unless it is finite."""
        ids, cand = self._start(x, history, index)
        if ids is None:
            return _argmax(x)
        if not len(ids):
            raise NoCandidates("the constraint allows nothing")
        return int(ids[_argmax(cand)])

    def explorable(self, history: np.ndarray | None, index: int) -> np.ndarray:
        """Exploration's uniform support at this step: the allowed vocabulary (banned and special ids out), minus
        what a constraint forbids."""
        g, a = self._grammar, self.allowed
        if g is None or history is None:
            return a
        ids = g.restriction(history, index)
        if ids is not None:
            pos = np.minimum(np.searchsorted(a, ids), len(a) - 1)
            return ids[a[pos] == ids] if len(a) else a
        banned = g.touched(history, index)
        if banned is None or not len(banned):
            return a
        pos = np.minimum(np.searchsorted(a, banned), len(a) - 1)
        keep = np.ones(len(a), dtype=bool)
        keep[pos[a[pos] == banned]] = False
        return a[keep]

    def _explore(self, history: np.ndarray, rng: np.random.Generator, index: int) -> int | None:
        """Exploration's draw, first in every path: with probability q a uniform token of :meth:`explorable`, else
        None (no random number is used when q is 0 or nothing is explorable)."""
        q = self.explore.q(index)
        if q > 0:
            allowed = self.explorable(history, index)
            if len(allowed) and rng.random() < q:
                return int(allowed[rng.integers(len(allowed))])
        return None

    def valid_prefix(self, history: np.ndarray, index: int, tokens: Sequence[int]) -> int:
        """How many of the proposed ``tokens`` the constraint (if any) accepts in a row after the turn's first
        ``index`` tokens (speculative decoding scores no draft past a token the grammar forbids)."""
        return len(tokens) if self._grammar is None else self._grammar.valid_prefix(history, index, tokens)

    def truncate(self, logits: np.ndarray, history: np.ndarray | None = None, index: int = 0) -> tuple[Ids, np.ndarray]:
        """The truncations on processed logits -> candidate ``(ids, logits)`` (not greedy). Raises
        :class:`NoCandidates` when every candidate is banned or the logits are not finite. ``history`` and
        ``index`` are needed with a constraint (it may start the candidates at the ids it allows)."""
        ids, cand = self._start(logits, history, index)
        ids, cand = self._prefilter(ids, cand) if self._prefilter is not None else (ids, cand)
        _check_top(float(cand.max()) if len(cand) else -math.inf)
        for t in self._rest:
            ids, cand = t(ids, cand)
        return ids, cand

    def distribution(self, logits: np.ndarray, history: np.ndarray, index: int = 0) -> Distribution:
        """The exact distribution the draw samples from (greedy: a point mass at the argmax, then mixed)."""
        x = self.process(logits, history, index)
        q = self.explore.q(index)
        allowed = self.explorable(history, index) if q > 0 else self.allowed  # (the mix reads it only when q > 0)
        try:
            if self.greedy:
                token = self._argmax(x, history, index)
                return Distribution(np.array([token]), np.ones(1), q, allowed, self.vocab_size)
            ids, cand = self.truncate(x, history, index)
        except NoCandidates:
            raise self._no_candidates(logits) from None
        ids = np.arange(len(cand)) if ids is None else ids
        return Distribution(ids, softmax(cand), q, allowed, self.vocab_size)

    def sample_plain(self, logits: np.ndarray, history: np.ndarray, rng: np.random.Generator, index: int = 0) -> int:
        """A draw from :meth:`distribution`, stage by stage with no shortcut: exploration as the mixture it is
        (with probability q a uniform allowed token), else the draw from the truncated candidates."""
        explored = self._explore(history, rng, index)
        if explored is not None:
            return explored
        try:
            x = self.process(logits, history, index)
            if self.greedy:
                return self._argmax(x, history, index)
            ids, cand = self.truncate(x, history, index)
            j = draw(_weights(cand), rng)
        except NoCandidates:
            raise self._no_candidates(logits) from None
        return j if ids is None else int(ids[j])

    def _no_candidates(self, x: np.ndarray) -> EdgerouteError:
        """The error for logits ``x`` that leave nothing to draw (the processors only lower values and cannot
        make NaN: the raw logits tell broken weights from bans)."""
        if np.isnan(x).any() or np.isposinf(x).any():
            return InferenceError(
                "the model returned logits that are not finite (NaN or +inf): its graph or weights are broken"
            )
        if self._grammar is not None:
            return ConfigError(
                self._grammar.param,
                "at this step",
                "allows only tokens that are banned here (by logit_bias, or the end of sequence suppressed until"
                " min_new_tokens)",
            )
        return ConfigError(
            "logit_bias",
            f"{len(self.banned)} bans",
            "leave no token to choose at this step (with the stop tokens suppressed until min_new_tokens)",
        )

    # -- state ---------------------------------------------------------------------------------------------
    def accept(self, token: int) -> None:
        """The sequence committed to ``token``: stateful stages advance."""
        for p in self._stateful:
            p.accept(token)

    def reset(self) -> None:
        """A turn starts over: stateful stages reset."""
        for p in self._stateful:
            p.reset()

    # -- the fast way --------------------------------------------------------------------------------------
    def sample(self, logits: np.ndarray, history: np.ndarray, rng: np.random.Generator, index: int = 0) -> int:
        """Pick the next token: what :meth:`sample_plain` picks for the same RNG state, faster."""
        explored = self._explore(history, rng, index)
        if explored is not None:
            return explored
        active = self._active(index)
        if self.greedy and self._lowering:
            # the stages only lower values: the first maximum stands unless a stage changes it
            token = int(logits.argmax())
            if (
                all(p.keeps(token, history, index) for p in active)
                and -math.inf < logits[token] < math.inf  # argmax propagates NaN: a finite max proves none
            ):
                return token
        try:  # costs nothing unless raised (the rare path may then scan the logits)
            if not active:
                return self._pick(logits, rng, history, index)
            touched = [t for t in (p.touched(history, index) for p in active) if t is not None]
            if not (logits.dtype == np.float32 and logits.flags.writeable) or len(touched) < len(active):
                return self._pick(self.process(logits, history, index), rng, history, index)
            # the stages touch a few dozen positions: write them into ``logits`` and put the old values back after
            # the draw, rather than copying the whole vocabulary (a full pass over cold memory per token)
            where = touched[0] if len(touched) == 1 else np.concatenate(touched)
            saved = logits[where]
            try:
                for p in active:
                    p.apply(logits, history, index)
                return self._pick(logits, rng, history, index)
            finally:
                logits[where] = saved
        except NoCandidates:
            raise self._no_candidates(logits) from None

    def _pick(self, x: np.ndarray, rng: np.random.Generator, history: np.ndarray, index: int) -> int:
        """The truncations and the draw (exploration already drawn) on processed logits; :class:`NoCandidates`
        when nothing can be drawn."""
        if self.greedy:
            return self._argmax(x, history, index)
        ids, cand = self._start(x, history, index)
        if self._prefilter is not None:
            ids, cand = self._prefilter(ids, cand)
            if self._few is not None and ids is not None and len(ids) <= FEW:
                token = self._pick_few(ids, cand, rng)
                if token is not None:
                    return token
        _check_top(float(cand.max()) if len(cand) else -math.inf)
        for t in self._rest:
            ids, cand = t(ids, cand)
        j = draw(_weights(cand), rng)
        return j if ids is None else int(ids[j])

    def _pick_few(self, ids: np.ndarray, logits: np.ndarray, rng: np.random.Generator) -> int | None:
        """The float path on the prefilter's few candidates: every later truncation's fast form, then the draw
        (the same token as the stages followed by :func:`.ops.draw`, for the same RNG state). None when a fast
        form cannot decide (the plain stages then run from the same candidates; nothing random was drawn)."""
        few = Few(ids, logits)
        assert self._few is not None
        for cut in self._few:
            if not cut(few):
                return None
        return few.draw(rng)


def _argmax(x: np.ndarray) -> int:
    """Greedy's draw: the first maximum; :class:`NoCandidates` unless it is finite (argmax propagates NaN)."""
    token = int(np.argmax(x))
    _check_top(float(x[token]))
    return token


def make_chain(
    cfg: SamplingConfig,
    vocab_size: int,
    special_ids: Iterable[int] = (),
    banned_ids: Iterable[int] = (),
    suppress_ids: Iterable[int] = (),
    suppress_until: int = 0,
    processors: Iterable[Processor] = (),
    truncations: Iterable[Truncation] = (),
) -> Router:
    """The router for ``cfg`` over a vocabulary of ``vocab_size``, in the documented order:

    1. :class:`LogitBias` (``cfg.logit_bias``, and ``-inf`` at ``banned_ids``: ids never chosen, such as a
       graph's padding rows beyond its tokenizer), :class:`Suppress` (``suppress_ids`` for the first
       ``suppress_until`` tokens of a turn: the stop tokens before ``min_new_tokens``), :class:`Penalties`,
       then the extra ``processors`` (a grammar constraint);
    2. :class:`TopK`, :class:`Temperature`, :class:`TopP`, :class:`MinP`, :class:`Typical` (top-k commutes with
       a positive temperature, so it runs first and the later stages see k values), then the extra
       ``truncations`` (XTC, top-n-sigma, ...); a stage that would change nothing is left out; greedy
       (temperature 0) has no truncation, the extra ones included, and draws the argmax;
    3. :class:`Explore` (``special_ids`` and banned ids excluded), then the draw.

    Raises ``ConfigError`` for a bias outside the vocabulary or bans of every token.
    """
    outside = sorted(i for i in cfg.logit_bias if i >= vocab_size)
    if outside:
        raise ConfigError(
            "logit_bias",
            {outside[0]: cfg.logit_bias[outside[0]]},
            f"token id {outside[0]} is outside the vocabulary (ids 0..{vocab_size - 1})",
        )
    bias = dict(cfg.logit_bias)
    bias.update((int(i), -math.inf) for i in banned_ids)
    banned = np.zeros(vocab_size, dtype=bool)
    banned[[i for i, b in bias.items() if b == -np.inf]] = True
    if banned.all():
        raise ConfigError("logit_bias", f"{vocab_size} bans", "bans every token of the vocabulary")
    excluded = banned.copy()
    excluded[[i for i in special_ids if 0 <= i < vocab_size]] = True
    stages: list[Processor] = []
    if bias:
        ids = np.fromiter(bias.keys(), dtype=np.int64, count=len(bias))
        stages.append(LogitBias(ids, np.fromiter(bias.values(), dtype=np.float32, count=len(bias))))
    suppress = np.array(sorted({int(i) for i in suppress_ids if 0 <= i < vocab_size}), dtype=np.int64)
    if len(suppress) and suppress_until > 0:
        stages.append(Suppress(suppress, suppress_until))
    rep, pres, freq = cfg.repetition_penalty, cfg.presence_penalty, cfg.frequency_penalty
    if cfg.penalty_last_n != 0 and (rep != 1.0 or pres != 0.0 or freq != 0.0):
        stages.append(Penalties(rep, pres, freq, cfg.penalty_last_n))
    stages.extend(processors)
    cuts: list[Truncation] = []
    if not cfg.greedy:
        least = cfg.min_keep
        if cfg.top_k > 0:
            cuts.append(TopK(cfg.top_k, least))
        if cfg.temperature != 1.0:
            cuts.append(Temperature(cfg.temperature))
        if cfg.top_p < 1.0:
            cuts.append(TopP(cfg.top_p, least))
        if cfg.min_p > 0.0:
            cuts.append(MinP(cfg.min_p, least))
        if cfg.typical_p < 1.0:
            cuts.append(Typical(cfg.typical_p, least))
        cuts.extend(truncations)
    return Router(stages, cuts, Explore(cfg, np.flatnonzero(~excluded)), cfg.greedy, vocab_size, np.flatnonzero(banned))
