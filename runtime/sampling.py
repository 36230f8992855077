"""The router's second level: one vector of logits -> one token, as pure NumPy functions and a fixed chain.

Order (HF/vLLM/OpenAI semantics)::

    1. logit_bias (and bans, and EOS suppression before min_new_tokens)
    2. penalties: repetition (HF, multiplicative), presence and frequency (OpenAI, additive), last N tokens
    3. temperature (0 = greedy: argmax of the result of 1-2)
    4. truncation: top_k -> top_p -> min_p -> typical_p, each keeping at least min_keep candidates
    5. exploration: p' = q * uniform(allowed) + (1 - q) * p, allowed = vocabulary minus banned and special ids
    6. draw: inverse CDF with the request's own numpy Generator

Truncations work on a *candidate set* ``(ids, logits)`` that only shrinks (``ids is None`` means the whole
vocabulary, in order), so after top-k every later stage touches k values, not the vocabulary. Nothing sorts the
whole vocabulary: top-k partitions, top-p selects by a probability threshold whose kept mass proves the nucleus
lies inside it, min-p is a comparison in logit space.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Iterable
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


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable log-softmax (float64 for small arrays, float32 for the vocabulary)."""
    x = np.asarray(logits)
    if x.size <= _SMALL:
        x = x.astype(np.float64, copy=False)
    m = x.max()
    return x - (m + np.log(np.exp(x - m).sum(dtype=np.float64)))


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
    """The fixed-order chain for one request (built by :func:`make_chain`). Stateless between calls: the
    token window and the RNG are passed in by the Generator, which owns all loop state."""

    def __init__(
        self, cfg: SamplingConfig, vocab_size: int, special_ids: Iterable[int] = (), banned_ids: Iterable[int] = ()
    ) -> None:
        self.cfg = cfg
        self.vocab_size = vocab_size
        outside = sorted(i for i in cfg.logit_bias if i >= vocab_size)
        if outside:
            raise ConfigError(
                "logit_bias",
                {outside[0]: cfg.logit_bias[outside[0]]},
                f"token id {outside[0]} is outside the vocabulary (ids 0..{vocab_size - 1})",
            )
        bias = dict(cfg.logit_bias)
        bias.update((int(i), -math.inf) for i in banned_ids)  # ids the model may not produce (no text)
        self._bias_ids = np.fromiter(bias.keys(), dtype=np.int64, count=len(bias))
        self._bias = np.fromiter(bias.values(), dtype=np.float32, count=len(bias))
        # biases that only lower values leave the argmax standing unless it is one of them (greedy shortcut)
        self._lowering = frozenset(bias) if all(b <= 0 for b in bias.values()) else None
        banned = np.zeros(vocab_size, dtype=bool)
        banned[[i for i, b in bias.items() if b == -np.inf]] = True
        self.banned = np.flatnonzero(banned)
        if len(self.banned) == vocab_size:
            raise ConfigError("logit_bias", f"{len(self.banned)} bans", "bans every token of the vocabulary")
        excluded = banned.copy()
        excluded[[i for i in special_ids if 0 <= i < vocab_size]] = True
        self.allowed = np.flatnonzero(~excluded)
        self._log_min_p = float(np.log(cfg.min_p)) if cfg.min_p > 0 else 0.0
        self._penalise = cfg.penalty_last_n != 0 and (
            cfg.repetition_penalty != 1.0 or cfg.presence_penalty != 0.0 or cfg.frequency_penalty != 0.0
        )

    def process(self, logits: np.ndarray, history: np.ndarray, suppress: np.ndarray | None = None) -> np.ndarray:
        """Steps 1-2: bias, suppression (``-inf`` at ``suppress``) and penalties. Returns a new float32 vector,
        or ``logits`` itself when none of them applies (callers never write into the result)."""
        if not self._edits(suppress):
            return logits  # nothing changes the logits: no copy (they are cold in cache after the graph run)
        out = np.array(logits, dtype=np.float32, copy=True)
        self._apply(out, history, suppress)
        return out

    def _edits(self, suppress: np.ndarray | None) -> bool:
        return bool(len(self._bias_ids) or (suppress is not None and len(suppress)) or self._penalise)

    def _apply(self, out: np.ndarray, history: np.ndarray, suppress: np.ndarray | None) -> None:
        """Steps 1-2 in place on ``out``."""
        cfg = self.cfg
        if len(self._bias_ids):
            apply_logit_bias(out, self._bias_ids, self._bias, out)
        if suppress is not None and len(suppress):
            out[suppress] = -np.inf
        if self._penalise:
            window = self._window(history)
            apply_penalties(out, window, cfg.repetition_penalty, cfg.presence_penalty, cfg.frequency_penalty, out)

    def _window(self, history: np.ndarray) -> np.ndarray:
        """The last ``penalty_last_n`` tokens of ``history`` (all of it for -1)."""
        n = self.cfg.penalty_last_n
        return history if n < 0 else history[-n:]

    def _touched(self, history: np.ndarray, suppress: np.ndarray | None) -> np.ndarray:
        """Every position :meth:`_apply` may write (repeats allowed)."""
        parts = [self._bias_ids] if len(self._bias_ids) else []
        if suppress is not None and len(suppress):
            parts.append(suppress)
        if self._penalise:
            parts.append(self._window(history))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def truncate(self, logits: np.ndarray) -> tuple[Ids, np.ndarray]:
        """Steps 3-4 on processed logits: temperature and truncation -> candidate ``(ids, scaled logits)``.
        Raises :class:`NoCandidates` when every candidate is banned or the logits are not finite."""
        ids, cand = self._top_k(logits)
        _check_top(float(cand.max()) if len(cand) else -math.inf)
        return self._after_top_k(ids, cand)

    def _top_k(self, logits: np.ndarray) -> tuple[Ids, np.ndarray]:
        # top-k commutes with a positive temperature: cut first, scale k values only
        cfg = self.cfg
        return top_k(None, logits, cfg.top_k, cfg.min_keep) if cfg.top_k else (None, logits)

    def _after_top_k(self, ids: Ids, logits: np.ndarray) -> tuple[Ids, np.ndarray]:
        """Steps 3-4 after top-k: temperature, top-p, min-p, typical-p."""
        cfg = self.cfg
        logits = apply_temperature(logits, cfg.temperature)
        ids, logits = top_p(ids, logits, cfg.top_p, cfg.min_keep)
        ids, logits = min_p(ids, logits, cfg.min_p, cfg.min_keep)
        ids, logits = typical(ids, logits, cfg.typical_p, cfg.min_keep)
        return ids, logits

    def distribution(
        self, logits: np.ndarray, history: np.ndarray, step: int = 0, suppress: np.ndarray | None = None
    ) -> Distribution:
        """The exact distribution the draw samples from (greedy: a point mass at the argmax, then mixed)."""
        x = self.process(logits, history, suppress)
        q = self.cfg.explore_at(step)
        try:
            if self.cfg.greedy:
                token = int(np.argmax(x))
                _check_top(float(x[token]))
                return Distribution(np.array([token]), np.ones(1), q, self.allowed, self.vocab_size)
            ids, cand = self.truncate(x)
        except NoCandidates:
            raise self._no_candidates(x) from None
        ids = np.arange(len(cand)) if ids is None else ids
        return Distribution(ids, softmax(cand), q, self.allowed, self.vocab_size)

    def _no_candidates(self, x: np.ndarray) -> EdgerouteError:
        """The error for logits ``x`` (raw or processed) that leave nothing to draw."""
        if np.isnan(x).any() or np.isposinf(x).any():
            return InferenceError(
                "the model returned logits that are not finite (NaN or +inf): its graph or weights are broken"
            )
        return ConfigError(
            "logit_bias",
            f"{len(self.banned)} bans",
            "leave no token to choose at this step (with the stop tokens suppressed until min_new_tokens)",
        )

    def sample(
        self,
        logits: np.ndarray,
        history: np.ndarray,
        rng: np.random.Generator,
        step: int = 0,
        suppress: np.ndarray | None = None,
    ) -> int:
        """Pick the next token. Exploration is drawn as the mixture it is: with probability q a uniform
        allowed token, else a draw from the truncated distribution (no dense vector is built)."""
        q = self.cfg.explore_at(step)
        if q > 0 and len(self.allowed) and rng.random() < q:
            return int(self.allowed[rng.integers(len(self.allowed))])
        if self.cfg.greedy and self._lowering is not None and not self._penalise:
            # bans, lowering biases and suppression only lower values: the argmax stands unless it is one of them
            token = int(logits.argmax())
            if (
                token not in self._lowering
                and (suppress is None or token not in suppress.tolist())
                and -math.inf < logits[token] < math.inf  # argmax propagates NaN: a finite max proves none
            ):
                return token
        try:  # costs nothing unless raised (the rare path may then scan the logits)
            if not self._edits(suppress):
                return self._pick(logits, rng)
            if not (logits.dtype == np.float32 and logits.flags.writeable):
                return self._pick(self.process(logits, history, suppress), rng)
            # steps 1-2 touch a few dozen positions: write them into ``logits`` and put the old values back after
            # the draw, rather than copying the whole vocabulary (a full pass over cold memory per token)
            touched = self._touched(history, suppress)
            saved = logits[touched]
            try:
                self._apply(logits, history, suppress)
                return self._pick(logits, rng)
            finally:
                logits[touched] = saved
        except NoCandidates:
            # the edits only lower values and cannot make NaN: the raw logits tell broken weights from bans
            raise self._no_candidates(logits) from None

    def _pick(self, x: np.ndarray, rng: np.random.Generator) -> int:
        """Steps 3-6 (exploration already drawn) on processed logits; :class:`NoCandidates` when nothing can be
        drawn."""
        cfg = self.cfg
        if cfg.greedy:
            token = int(np.argmax(x))
            if not -math.inf < x[token] < math.inf:  # argmax propagates NaN: a finite max proves none
                raise NoCandidates("best candidate not finite")
            return token
        ids, cand = self._top_k(x)
        if ids is not None and len(ids) <= _FEW and cfg.typical_p >= 1.0:
            few = self._pick_few(ids, cand, rng)
            if few is not None:
                return few
        _check_top(float(cand.max()) if len(cand) else -math.inf)
        ids, cand = self._after_top_k(ids, cand)
        j = draw(_weights(cand), rng)
        return j if ids is None else int(ids[j])

    def _pick_few(self, ids: np.ndarray, logits: np.ndarray, rng: np.random.Generator) -> int | None:
        """Steps 3-6 after top-k left a few candidates: the same arithmetic as :meth:`truncate` followed by
        :func:`draw` (same weights, same kept set in the same order, float64 sums in the same order, so the same
        token for the same RNG state), with the weights computed once and the cuts and the draw done on Python
        floats: each NumPy call costs microseconds on the caches the graph run has just evicted, a loop over a
        few dozen floats less. None when min-p would keep fewer than ``min_keep`` (the general chain decides)."""
        cfg = self.cfg
        x = apply_temperature(logits, cfg.temperature)
        n, least = len(x), cfg.min_keep
        xl = x.tolist()  # float32 values as exact Python floats
        top = max(xl, default=-math.inf)
        if not -math.inf < top < math.inf:
            raise NoCandidates("best candidate not finite")
        w = np.exp(np.array(xl) - top)  # = _weights(x); the top candidate survives every cut, so also the draw's
        wl = w.tolist()
        keep = sorted(range(n), key=wl.__getitem__, reverse=True)  # = argsort(-w, kind="stable")
        if cfg.top_p < 1.0 and n > least:  # top_p's few-candidates branch: count(cumsum - w < target)
            target = cfg.top_p * float(w.sum(dtype=np.float64))
            total, cut = 0.0, 0
            for j in keep:
                total += wl[j]
                cut += total - wl[j] < target
            keep = keep[: max(cut, least)]
        if cfg.min_p > 0.0:  # min_p in logit space: x >= max + log(p), compared in float64
            floor = top + self._log_min_p
            keep = [j for j in keep if xl[j] >= floor]
            if len(keep) < least:
                return None
        keep.sort()
        cdf = list(accumulate(wl[j] for j in keep))  # draw(): cumsum, then searchsorted(side="right")
        j = bisect_right(cdf, rng.random() * cdf[-1])
        if j >= len(keep):  # rounding put u past the end: the last candidate with positive weight
            j = max(i for i, t in enumerate(keep) if wl[t] > 0)
        return int(ids[keep[j]])


def make_chain(
    cfg: SamplingConfig, vocab_size: int, special_ids: Iterable[int] = (), banned_ids: Iterable[int] = ()
) -> Router:
    """The router for ``cfg`` over a vocabulary of ``vocab_size`` with ``special_ids`` excluded from exploration
    and ``banned_ids`` never chosen (a graph's padding rows beyond its tokenizer). Raises ``ConfigError`` for a
    bias outside the vocabulary or bans of every token."""
    return Router(cfg, vocab_size, special_ids, banned_ids)
