"""The router's second level: one vector of logits -> one token, as pure NumPy functions and a chain of stages.

The chain :func:`make_chain` builds, in order (HF/vLLM/OpenAI semantics)::

    1. processors over the whole vector: logit_bias (and bans), stop-token suppression before min_new_tokens,
       penalties (repetition: HF, multiplicative; presence and frequency: OpenAI, additive; last N tokens),
       then any extra processor; a grammar constraint (:class:`Constraining`) is the last: every token it
       forbids is at -inf (it hands the truncations only the allowed ids, or bans the forbidden ones)
    2. truncations over a candidate set: top_k -> temperature -> top_p -> min_p -> typical_p, each keeping at
       least min_keep candidates (temperature 0 = greedy: the argmax of the processed logits)
    3. exploration: p' = q * uniform(allowed) + (1 - q) * p, allowed = vocabulary minus banned and special ids
       (and minus what the grammar forbids at this step)
    4. the draw: inverse CDF with the request's own numpy Generator

Truncations work on a *candidate set* ``(ids, logits)`` that only shrinks (``ids is None`` means the whole
vocabulary, in order), so after top-k every later stage touches k values, not the vocabulary. Nothing sorts the
whole vocabulary: top-k partitions, top-p selects by a probability threshold whose kept mass proves the nucleus
lies inside it, min-p is a comparison in logit space.

Adding a stage is writing a :class:`Processor` (or a :class:`Truncation`) and putting it into the chain:
:class:`Router` reads the stage list and keeps its fast paths only where the stages allow them.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import accumulate

import numpy as np

from .config import SamplingConfig
from .errors import ConfigError, EdgerouteError, InferenceError

Ids = np.ndarray | None  # candidate token ids; None = the whole vocabulary in order


# -- level-2 processors over the full logits vector -----------------------------------------------------------
def apply_logit_bias(
    logits: np.ndarray, ids: np.ndarray, bias: np.ndarray, out: np.ndarray | None = None
) -> np.ndarray:
    """``logits`` with ``bias[j]`` added at ``ids[j]`` (``-inf`` bans). Returns a new array (or writes into
    ``out``, which may be ``logits`` itself)."""
    if out is None:
        out = np.array(logits, dtype=np.float32, copy=True)
    if len(ids):
        out[ids] += bias
    return out


def apply_penalties(
    logits: np.ndarray,
    window: np.ndarray,
    repetition: float = 1.0,
    presence: float = 0.0,
    frequency: float = 0.0,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Penalise tokens that occur in ``window`` (the last N token ids). Returns a new array (or writes into
    ``out``, which may be ``logits`` itself).

    repetition (HF): a positive logit is divided by it, a negative one multiplied. presence/frequency (OpenAI):
    ``logit -= presence * [count > 0] + frequency * count``.
    """
    if out is None:
        out = np.array(logits, dtype=np.float32, copy=True)
    if len(window) == 0 or (repetition == 1.0 and presence == 0.0 and frequency == 0.0):
        return out
    if presence == 0.0 and frequency == 0.0:  # repetition only: repeated ids read and write the same value
        # on Python floats: a few dozen values, and fewer cold NumPy calls than np.where over two products. The
        # float64 quotient/product of float32 operands rounds to the float32 NumPy would compute (53 >= 2*24+2)
        r = float(np.float32(repetition))
        out[window] = [v / r if v > 0 else v * r for v in out[window].tolist()]
        return out
    uniq, counts = np.unique(window, return_counts=True)
    sel = out[uniq]
    if repetition != 1.0:
        sel = np.where(sel > 0, sel / repetition, sel * repetition)
    out[uniq] = sel - (presence + frequency * counts.astype(np.float32))
    return out


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """``logits / temperature`` (temperature > 0; 0 is greedy and handled by the draw)."""
    if temperature <= 0:
        raise ValueError("temperature must be > 0 here; 0 means greedy")
    return logits if temperature == 1.0 else logits / np.float32(temperature)


_SMALL = 4096  # arrays up to this size are handled in float64; larger ones (the vocabulary) stay float32
_FEW = 256  # candidate sets up to this size are sorted whole by top-p (and take the router's few-candidates path)


def _weights(logits: np.ndarray) -> np.ndarray:
    """Unnormalised probabilities ``exp(x - max)``: float64 for small arrays, float32 for the whole vocabulary
    (float64 ``exp`` over 49k entries costs ~20x more than float32 here)."""
    x = np.asarray(logits)
    if x.size <= _SMALL or x.dtype == np.float64:
        x = x.astype(np.float64, copy=False)
    return np.exp(x - x.max())


def softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable softmax (``-inf`` entries get probability 0)."""
    w = _weights(logits)
    return w / w.sum()


def log_softmax(logits: np.ndarray, dtype: type[np.floating] | None = None) -> np.ndarray:
    """Numerically stable log-softmax, the normaliser summed in float64. ``dtype`` None: the exponentials in
    float64 for small arrays and in float32 for the vocabulary, the result float64 (logprobs, quality figures);
    ``np.float32``: float32 throughout but the sum, the result float32 (the contrast mix)."""
    x = np.asarray(logits)
    if dtype is not None:
        x = x.astype(dtype, copy=False)
    elif x.size <= _SMALL:
        x = x.astype(np.float64, copy=False)
    m = x.max()
    lse = np.log(np.exp(x - m).sum(dtype=np.float64))
    return x - (m + (lse if dtype is None else lse.astype(dtype)))


# -- truncation over a candidate set --------------------------------------------------------------------------
def _take(ids: Ids, logits: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return (keep if ids is None else ids[keep]), logits[keep]


def top_k(ids: Ids, logits: np.ndarray, k: int, min_keep: int = 1) -> tuple[Ids, np.ndarray]:
    """Keep the candidates whose logit is at least the k-th largest (ties at the boundary are kept, as in HF)."""
    n = len(logits)
    if k <= 0:
        return ids, logits
    k = max(k, min_keep)
    if k >= n:
        return ids, logits
    keep, values = _top_k_positions(logits, k)
    return (keep if ids is None else ids[keep]), values


_STRIDE = 32


def _top_k_positions(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Ascending positions of the values ``>= `` the k-th largest of ``x``, and those values, exactly, in one pass
    over a large vector: a threshold ``t`` from a strided sample usually leaves a few hundred positions with values
    ``>= t``; when at least k do, the k-th largest is among them and so is every value that reaches it (else the
    whole vector is partitioned). Array methods, not ``np.*`` wrappers, and no second gather over ``x``: each
    call costs microseconds on the caches a graph run has just evicted."""
    n = len(x)
    if n >= 64 * _STRIDE and k <= n // (4 * _STRIDE):
        sample = x[::_STRIDE].copy()
        r = len(sample) - (k // _STRIDE + 4)
        sample.partition(r)
        cand = (x >= sample[r]).nonzero()[0]
        if len(cand) >= k:
            v = x[cand]
            part = v.copy()
            part.partition(len(v) - k)
            hit = v >= part[len(v) - k]
            return cand[hit], v[hit]
    part = x.copy()
    part.partition(n - k)
    keep = (x >= part[n - k]).nonzero()[0]
    return keep, x[keep]


def _mass_prefix(weights: np.ndarray, order: np.ndarray, mass: float, min_keep: int) -> np.ndarray:
    """The first entries of ``order`` (descending preference) whose exclusive cumulative weight is below
    ``mass`` (an absolute amount of the unnormalised ``weights``)."""
    w = weights[order].astype(np.float64)
    excl = np.cumsum(w) - w
    keep = max(int(np.count_nonzero(excl < mass)), min_keep)
    return order[:keep]


def top_p(ids: Ids, logits: np.ndarray, p: float, min_keep: int = 1) -> tuple[Ids, np.ndarray]:
    """Nucleus: keep the smallest set of most likely candidates whose probability reaches ``p``.

    A token is kept iff the mass of the tokens more likely than it is below ``p`` (HF/llama.cpp semantics).
    Exact without sorting everything: if the tokens with weight >= t already carry mass >= p, the nucleus lies
    among them, so only they are sorted; t starts at ``w_max / 1024`` and falls until that holds.
    """
    n = len(logits)
    if p >= 1.0 or n <= min_keep:
        return ids, logits
    w = _weights(logits)
    target = p * float(w.sum(dtype=np.float64))
    if n <= _FEW:  # a few candidates (after top-k): sort them all
        keep = _mass_prefix(w, np.argsort(-w, kind="stable"), target, min_keep)
        return _take(ids, logits, np.sort(keep))
    t = 1.0 / 1024.0  # w.max() == 1
    while True:
        sub = np.flatnonzero(w >= t) if t > 0 else np.arange(n)
        if t == 0 or (len(sub) >= min_keep and float(w[sub].sum(dtype=np.float64)) >= target):
            break
        t = t / 1024.0 if t > 1e-30 else 0.0
    order = sub[np.argsort(-w[sub], kind="stable")]
    keep = _mass_prefix(w, order, target, min_keep)
    return _take(ids, logits, np.sort(keep))


def min_p(ids: Ids, logits: np.ndarray, p: float, min_keep: int = 1) -> tuple[Ids, np.ndarray]:
    """Keep candidates with probability >= ``p * p_max``: in logit space, ``logit >= max + log(p)``."""
    if p <= 0.0:
        return ids, logits
    keep = np.flatnonzero(logits >= logits.max() + np.log(p))
    if len(keep) < min_keep:
        return top_k(ids, logits, min_keep)
    return _take(ids, logits, keep)


def typical(ids: Ids, logits: np.ndarray, mass: float, min_keep: int = 1) -> tuple[Ids, np.ndarray]:
    """Locally typical sampling (Meister et al.): keep the candidates whose surprisal is closest to the entropy
    until their probability reaches ``mass`` (HF semantics)."""
    if mass >= 1.0 or len(logits) <= min_keep:
        return ids, logits
    logp = log_softmax(logits).astype(np.float64)
    probs = np.exp(logp)
    entropy = -np.sum(probs * np.where(probs > 0, logp, 0.0))  # 0 * log 0 = 0 (a banned token: no 0 * -inf)
    dev = np.abs(-logp - entropy)
    order = np.argsort(dev, kind="stable")
    keep = _mass_prefix(probs, order, mass * float(probs.sum()), min_keep)
    return _take(ids, logits, np.sort(keep))


# -- exploration and the draw ---------------------------------------------------------------------------------
def explore_mix(ids: Ids, probs: np.ndarray, q: float, allowed: np.ndarray, vocab_size: int) -> np.ndarray:
    """The dense distribution ``q * uniform(allowed) + (1 - q) * p`` over the whole vocabulary."""
    out = np.zeros(vocab_size, dtype=np.float64)
    out[np.arange(len(probs)) if ids is None else ids] = (1.0 - q) * probs
    if q > 0 and len(allowed):
        out[allowed] += q / len(allowed)
    return out


_BLOCK = 256


def draw(weights: np.ndarray, rng: np.random.Generator) -> int:
    """Index drawn from ``weights`` (need not be normalised) by inverse CDF with one uniform from ``rng``.

    Over a large vector the CDF is two-level (sums of blocks of 256, then a cumsum inside one block), which
    avoids a full-length cumulative sum.
    """
    n = len(weights)
    if n <= _SMALL:
        cdf = np.cumsum(weights, dtype=np.float64)
        if not 0 < cdf[-1] < math.inf:  # also NaN
            raise NoCandidates("no weight to draw from")
        j = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
        return _last_positive(weights, j) if j >= n else j
    full = n - n % _BLOCK
    sums = weights[:full].reshape(-1, _BLOCK).sum(axis=1, dtype=np.float64)
    if full < n:
        sums = np.append(sums, weights[full:].sum(dtype=np.float64))
    cdf = np.cumsum(sums)
    if not 0 < cdf[-1] < math.inf:
        raise NoCandidates("no weight to draw from")
    u = rng.random() * cdf[-1]
    b = min(int(np.searchsorted(cdf, u, side="right")), len(cdf) - 1)
    while sums[b] == 0:  # u at the very top edge of a zero-weight tail: step back to the last block with mass
        b -= 1
    u -= cdf[b - 1] if b else 0.0
    seg = weights[b * _BLOCK : min((b + 1) * _BLOCK, n)]
    j = int(np.searchsorted(np.cumsum(seg, dtype=np.float64), u, side="right"))
    return b * _BLOCK + (_last_positive(seg, j) if j >= len(seg) else j)


class NoCandidates(ValueError):
    """Nothing can be drawn: every candidate is at -inf (banned), or the logits are not finite (NaN, +inf).
    :class:`Router` turns it into a ``ConfigError`` (bans) or an ``InferenceError`` (broken logits)."""


def _check_top(top: float) -> None:
    """Raise :class:`NoCandidates` unless ``top``, the best candidate's logit, is finite: -inf means everything
    is banned, NaN or +inf that the logits are broken. NumPy's max and argmax propagate NaN, so a finite maximum
    also proves the candidates hold no NaN."""
    if not -math.inf < top < math.inf:
        raise NoCandidates(f"best candidate at {top}")


def _last_positive(weights: np.ndarray, j: int) -> int:
    """Rounding put u past the end: the last index with positive weight."""
    return int(np.flatnonzero(weights > 0)[-1])


# -- the stages ---------------------------------------------------------------------------------------------
class Processor:
    """A stage that edits the whole logits vector in place before truncation (bias and bans, stop-token
    suppression, penalties; a grammar constraint is one more). ``history`` is the sequence so far (prompt
    included) and ``index`` the position of the token being chosen in the turn (0 = its first generated token).

    Subclasses override :meth:`apply` and, where they can, the hints the router's fast paths use:

    - ``lowers_only``: :meth:`apply` only ever lowers values, so greedy's argmax stands unless :meth:`keeps`
      says the stage changes it;
    - :meth:`touched`: the positions :meth:`apply` may write, so the router writes into the caller's vector and
      puts those values back after the draw instead of copying the vocabulary (``None``: it may write anywhere,
      the router copies);
    - :meth:`active`: False for a step the stage leaves alone;
    - ``stateful``, :meth:`accept`, :meth:`reset`: a stage that keeps state between tokens (a grammar matcher)
      is told every token the sequence commits to, and reset when a turn starts or is rewound (the kept tokens
      of the turn are then accepted again). Speculative decoding asks for distributions at proposed tokens
      before they are committed: a stateful stage reads what it needs of them from ``history``.
    """

    lowers_only = False
    stateful = False

    def active(self, index: int) -> bool:
        return True

    def apply(self, out: np.ndarray, history: np.ndarray, index: int) -> None:
        raise NotImplementedError

    def touched(self, history: np.ndarray, index: int) -> np.ndarray | None:
        return None

    def keeps(self, token: int, history: np.ndarray, index: int) -> bool:
        """True when :meth:`apply` leaves ``token``'s logit as it is (asked only of ``lowers_only`` stages)."""
        return False

    def accept(self, token: int) -> None:
        """The sequence committed to ``token`` (stateful stages)."""

    def reset(self) -> None:
        """A turn starts over (stateful stages)."""


class Constraining(Processor):
    """A stage that forbids tokens by a rule that follows the sequence (a grammar: ``grammar.GrammarStage``).
    Forbidden tokens are at ``-inf``. Per step it either bans a few (through :meth:`apply` and :meth:`touched`,
    like a logit bias) or says which few are allowed (:meth:`restriction`: the candidate set starts at them and
    :meth:`apply` writes nothing); :meth:`keeps` tells whether one token is allowed."""

    lowers_only = True
    stateful = True
    param = "constraint"  # the setting named in errors

    def restriction(self, history: np.ndarray, index: int) -> np.ndarray | None:
        """The allowed ids (ascending) when the step restricts the candidates to them, else None."""
        return None

    def valid_prefix(self, history: np.ndarray, index: int, tokens: Sequence[int]) -> int:
        """How many of ``tokens``, proposed after the turn's first ``index`` tokens, the rule accepts in a row."""
        return len(tokens)


class LogitBias(Processor):
    """``logit_bias`` and bans: ``bias[j]`` added at ``ids[j]`` (``-inf`` bans)."""

    def __init__(self, ids: np.ndarray, bias: np.ndarray) -> None:
        self.ids, self.bias = ids, bias
        self.lowers_only = bool((bias <= 0).all())
        self._set = frozenset(ids.tolist())

    def apply(self, out: np.ndarray, history: np.ndarray, index: int) -> None:
        apply_logit_bias(out, self.ids, self.bias, out)

    def touched(self, history: np.ndarray, index: int) -> np.ndarray:
        return self.ids

    def keeps(self, token: int, history: np.ndarray, index: int) -> bool:
        return token not in self._set


class Suppress(Processor):
    """``-inf`` at ``ids`` for the first ``until`` tokens of a turn (the stop tokens before ``min_new_tokens``)."""

    lowers_only = True

    def __init__(self, ids: np.ndarray, until: int) -> None:
        self.ids, self.until = ids, until
        self._set = frozenset(ids.tolist())

    def active(self, index: int) -> bool:
        return index < self.until

    def apply(self, out: np.ndarray, history: np.ndarray, index: int) -> None:
        out[self.ids] = -np.inf

    def touched(self, history: np.ndarray, index: int) -> np.ndarray:
        return self.ids

    def keeps(self, token: int, history: np.ndarray, index: int) -> bool:
        return token not in self._set


class Penalties(Processor):
    """Repetition (HF), presence and frequency (OpenAI) penalties over the last ``last_n`` tokens (-1: all)."""

    def __init__(self, repetition: float, presence: float, frequency: float, last_n: int) -> None:
        self.repetition, self.presence, self.frequency, self.last_n = repetition, presence, frequency, last_n

    def window(self, history: np.ndarray) -> np.ndarray:
        return history if self.last_n < 0 else history[-self.last_n :]

    def apply(self, out: np.ndarray, history: np.ndarray, index: int) -> None:
        apply_penalties(out, self.window(history), self.repetition, self.presence, self.frequency, out)

    def touched(self, history: np.ndarray, index: int) -> np.ndarray:
        return self.window(history)


class Truncation:
    """A stage over the candidate set: ``(ids, logits) -> (ids, logits)``, keeping at least ``min_keep``."""

    def __call__(self, ids: Ids, logits: np.ndarray) -> tuple[Ids, np.ndarray]:
        raise NotImplementedError


@dataclass(frozen=True)
class TopK(Truncation):
    k: int
    min_keep: int = 1

    def __call__(self, ids: Ids, logits: np.ndarray) -> tuple[Ids, np.ndarray]:
        return top_k(ids, logits, self.k, self.min_keep)


@dataclass(frozen=True)
class Temperature(Truncation):
    """Scales the candidates' logits (keeps them all); > 0, greedy is the :class:`Router`'s argmax draw."""

    temperature: float

    def __call__(self, ids: Ids, logits: np.ndarray) -> tuple[Ids, np.ndarray]:
        return ids, apply_temperature(logits, self.temperature)


@dataclass(frozen=True)
class TopP(Truncation):
    p: float
    min_keep: int = 1

    def __call__(self, ids: Ids, logits: np.ndarray) -> tuple[Ids, np.ndarray]:
        return top_p(ids, logits, self.p, self.min_keep)


@dataclass(frozen=True)
class MinP(Truncation):
    p: float
    min_keep: int = 1

    def __call__(self, ids: Ids, logits: np.ndarray) -> tuple[Ids, np.ndarray]:
        return min_p(ids, logits, self.p, self.min_keep)


@dataclass(frozen=True)
class Typical(Truncation):
    mass: float
    min_keep: int = 1

    def __call__(self, ids: Ids, logits: np.ndarray) -> tuple[Ids, np.ndarray]:
        return typical(ids, logits, self.mass, self.min_keep)


class Explore:
    """Exploration: with weight ``q(index)`` (the config's schedule) a uniform draw over ``allowed`` (the
    vocabulary minus banned and special ids), mixed over the truncated distribution."""

    def __init__(self, cfg: SamplingConfig, allowed: np.ndarray) -> None:
        self.q, self.allowed = cfg.explore_at, allowed


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
    (each checked to leave something drawable after the first, which is top-k when there is one), then
    exploration and the draw (argmax when ``greedy``).

    One definition of what is drawn: :meth:`process` and :meth:`truncate` are the stages, :meth:`distribution`
    is the routed distribution (speculation and tests read it) and :meth:`sample_plain` draws from it stage by
    stage. :meth:`sample` is what generation calls: the same token as :meth:`sample_plain` for the same RNG
    state, through fast paths that the stage list makes valid (each pinned to :meth:`sample_plain` by a test):

    - greedy over stages that only lower values: the raw argmax, unless a stage touches it;
    - edits written into the caller's vector at the positions the stages touch and undone after the draw,
      rather than a copy of the vocabulary;
    - top-k leaving at most 256 candidates, followed only by temperature/top-p/min-p: those cuts and the draw on
      Python floats (same arithmetic, same order).
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
        self._top_k = first if isinstance(first, TopK) else None
        rest = self.truncations[1:] if self._top_k else self.truncations
        self._rest = rest
        self._few = self._top_k is not None and all(isinstance(t, (Temperature, TopP, MinP)) for t in rest)
        self._few_t = next((t.temperature for t in rest if isinstance(t, Temperature)), 1.0)
        self._few_p = next((t.p for t in rest if isinstance(t, TopP)), 1.0)
        few_min_p = next((t.p for t in rest if isinstance(t, MinP)), 0.0)
        self._few_log_min_p = float(np.log(few_min_p)) if few_min_p > 0 else None
        self._min_keep = self._top_k.min_keep if self._top_k else 1

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
        ids, cand = self._top_k(ids, cand) if self._top_k else (ids, cand)
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
        ids, cand = self._top_k(ids, cand) if self._top_k else (ids, cand)
        if self._few and ids is not None and len(ids) <= _FEW:
            few = self._pick_few(ids, cand, rng)
            if few is not None:
                return few
        _check_top(float(cand.max()) if len(cand) else -math.inf)
        for t in self._rest:
            ids, cand = t(ids, cand)
        j = draw(_weights(cand), rng)
        return j if ids is None else int(ids[j])

    def _pick_few(self, ids: np.ndarray, logits: np.ndarray, rng: np.random.Generator) -> int | None:
        """Temperature, top-p, min-p and the draw after top-k left a few candidates: the same arithmetic as the
        stages followed by :func:`draw` (same weights, same kept set in the same order, float64 sums in the same
        order, so the same token for the same RNG state), with the weights computed once and the cuts and the
        draw done on Python floats: each NumPy call costs microseconds on the caches the graph run has just
        evicted, a loop over a few dozen floats less. None when min-p would keep fewer than ``min_keep`` (the
        stages decide)."""
        x = apply_temperature(logits, self._few_t)
        n, least = len(x), self._min_keep
        xl = x.tolist()  # float32 values as exact Python floats
        top = max(xl, default=-math.inf)
        if not -math.inf < top < math.inf:
            raise NoCandidates("best candidate not finite")
        w = np.exp(np.array(xl) - top)  # = _weights(x); the top candidate survives every cut, so also the draw's
        wl = w.tolist()
        keep = sorted(range(n), key=wl.__getitem__, reverse=True)  # = argsort(-w, kind="stable")
        if self._few_p < 1.0 and n > least:  # top_p's few-candidates branch: count(cumsum - w < target)
            target = self._few_p * float(w.sum(dtype=np.float64))
            total, cut = 0.0, 0
            for j in keep:
                total += wl[j]
                cut += total - wl[j] < target
            keep = keep[: max(cut, least)]
        if self._few_log_min_p is not None:  # min_p in logit space: x >= max + log(p), compared in float64
            floor = top + self._few_log_min_p
            keep = [j for j in keep if xl[j] >= floor]
            if len(keep) < least:
                return None
        keep.sort()
        cdf = list(accumulate(wl[j] for j in keep))  # draw(): cumsum, then searchsorted(side="right")
        j = bisect_right(cdf, rng.random() * cdf[-1])
        if j >= len(keep):  # rounding put u past the end: the last candidate with positive weight
            j = max(i for i, t in enumerate(keep) if wl[t] > 0)
        return int(ids[keep[j]])


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
) -> Router:
    """The router for ``cfg`` over a vocabulary of ``vocab_size``, in the documented order:

    1. :class:`LogitBias` (``cfg.logit_bias``, and ``-inf`` at ``banned_ids``: ids never chosen, such as a
       graph's padding rows beyond its tokenizer), :class:`Suppress` (``suppress_ids`` for the first
       ``suppress_until`` tokens of a turn: the stop tokens before ``min_new_tokens``), :class:`Penalties`,
       then the extra ``processors`` (a grammar constraint);
    2. :class:`TopK`, :class:`Temperature`, :class:`TopP`, :class:`MinP`, :class:`Typical` (top-k commutes with
       a positive temperature, so it runs first and the later stages see k values); a stage that would change
       nothing is left out; greedy (temperature 0) has no truncation and draws the argmax;
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
    return Router(stages, cuts, Explore(cfg, np.flatnonzero(~excluded)), cfg.greedy, vocab_size, np.flatnonzero(banned))
