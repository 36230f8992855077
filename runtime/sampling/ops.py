"""The router's pure operations on NumPy arrays: processors over the whole logits vector, truncations over a
candidate set ``(ids, logits)``, softmax and log-softmax, exploration's mixture and the draw.

Truncations work on a *candidate set* that only shrinks (``ids is None`` means the whole vocabulary, in order), so
after top-k every later stage touches k values, not the vocabulary. Nothing sorts the whole vocabulary: top-k
partitions, top-p selects by a probability threshold whose kept mass proves the nucleus lies inside it, min-p is a
comparison in logit space. Every function here is what the stages (:mod:`.stages`) call and what their fast forms
are pinned to.
"""

from __future__ import annotations

import math

import numpy as np

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
_FEW = 256  # candidate sets up to this size are sorted whole by top-p (and take the router's float path)


def _weights(logits: np.ndarray) -> np.ndarray:
    """Unnormalised probabilities ``exp(x - max)``: float64 for small arrays, float32 for the whole vocabulary
    (float64 ``exp`` over the vocabulary costs many times what float32 does)."""
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


def top_logprobs(logp: np.ndarray, k: int) -> tuple[tuple[int, float], ...]:
    """The ``k`` most likely ids of a log-probability vector with their values, most likely first (ties in id
    order): the top alternatives of OpenAI's logprobs and of scoring."""
    if k <= 0:
        return ()
    part = np.argpartition(logp, len(logp) - k)[len(logp) - k :]
    part = part[np.argsort(-logp[part], kind="stable")]
    return tuple((int(i), float(logp[i])) for i in part)


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
