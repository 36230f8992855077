"""Level-1 routing: a gate that chooses or mixes two *flows* before the router's level 2 draws the token.

- **guidance**: a second KV stream of the same model on another context (a negative prompt, or an empty
  context) followed by the same generated tokens; logits mixed as ``u + w * (c - u)`` (``w = 1`` is exactly the
  single stream).
- **contrast**: a second, smaller model on the same tokens; ``log p_big - alpha * log p_small`` over the big
  model's plausible set (tokens with ``p_big >= beta * max p_big``), everything else banned.
- **the gate** (guidance and contrast): a signal of the first flow's own distribution (one minus its top-1
  margin, or its entropy) decides, per step,
  whether the second flow is mixed in (``g > θ``) or the first is used alone (the second flow is not run; its
  stream catches up on the skipped tokens in one chunk the next time it is needed); a soft gate scales the mix
  weight by a ramp around θ instead.
- **speculative**: a drafter (a second model, or n-gram lookup in the text so far) proposes k tokens; the target
  scores them in one pass; token i is accepted with probability ``min(1, p_i / q_i)`` where p and q are the
  target's and the draft's distributions *after the full router chain*; the first rejection draws from the
  normalised ``max(0, p - q)``; if all k pass, one bonus token comes from p. The output distribution is exactly
  the target's: speculation changes speed, not what is generated (Leviathan et al. 2023; Chen et al. 2023).

The Generator owns the loop; this module holds the streams, the mixes and the verification, each testable alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from .errors import ConfigError
from .kv_cache import common_prefix
from .sampling import draw, log_softmax

if TYPE_CHECKING:
    from .graph import Graph


class Stream:
    """A second KV stream: a model, its own cache, and the tokens that cache has seen.

    ``sync(tokens)`` brings the stream to exactly ``tokens``: it keeps the longest common prefix of what it has
    fed (the cache is sliced, nothing recomputed), feeds the rest, and returns the last position's logits.
    """

    def __init__(self, model: Graph, chunk: int = 512, adapter: str | None = None) -> None:
        self.model = model
        self.cache = model.new_cache(adapter=adapter)
        self.fed = np.zeros(0, dtype=np.int64)
        self.chunk = chunk
        self.runs = 0  # graph runs of this stream (a gate that skips steps saves them)
        self._logits: np.ndarray | None = None

    def sync(self, sequence: Sequence[int] | np.ndarray) -> np.ndarray:
        if len(sequence) == 0:
            raise ConfigError("tokens", [], "a stream needs at least one token")
        tokens = np.asarray(sequence, dtype=np.int64)
        common = common_prefix(self.fed, tokens)
        if common == len(tokens) == len(self.fed) and self._logits is not None:
            return self._logits
        common = min(common, len(tokens) - 1)  # feed at least one token to get its logits
        self.cache.trim(self.cache.length - common)
        self.fed = tokens[:common].copy()
        for i in range(common, len(tokens), self.chunk):
            self._logits = self.model.forward(tokens[None, i : i + self.chunk], self.cache)[0]
            self.runs += 1
            self.fed = tokens[: i + self.chunk].copy()  # what the cache holds, even if a later chunk fails
        assert self._logits is not None
        return self._logits


def entropy(logits: np.ndarray) -> float:
    """The entropy (nats) of ``softmax(logits)``, in float32: a float64 pass over a vocabulary's logits costs as much
    again in the next graph run (bench/results/gate-smollm2-fp32-2026-12-02.md)."""
    x = np.asarray(logits, dtype=np.float32)
    z = np.maximum(x - x.max(), np.float32(-1e30))  # -inf (no mass) as a finite value: 0 * z stays 0
    e = np.exp(z)
    total = float(e.sum(dtype=np.float32))
    return max(math.log(total) - float(np.dot(e, z)) / total, 0.0)


def margin_signal(logits: np.ndarray) -> float:
    """``1 - (p1 - p2)``, one minus the gap between the two most likely tokens' probabilities: 0 when one token
    holds all the mass, 1 when the two leaders tie."""
    x = np.asarray(logits, dtype=np.float32)
    if len(x) < 2:
        return 0.0
    second, first = np.partition(x, len(x) - 2)[-2:]
    total = float(np.exp(x - first).sum(dtype=np.float32))
    return 1.0 - (1.0 - math.exp(float(second) - float(first))) / total


def gate_signal(logits: np.ndarray, kind: str = "margin") -> float:
    """The gate's reading of the first flow: ``margin`` (:func:`margin_signal`) or ``entropy`` (nats)."""
    return margin_signal(logits) if kind == "margin" else entropy(logits)  # request.GATE_SIGNALS


class Gate:
    """Whether (and how much of) the second flow a step mixes in, from the first flow's logits.

    ``weight(logits)`` is 1 (mix fully) when the signal g (:func:`gate_signal`) exceeds θ and 0 (the first flow
    alone) otherwise; with ``width > 0`` it ramps linearly from 0 at ``θ - width/2`` to 1 at ``θ + width/2``.
    θ = -inf always mixes and θ = +inf never does, without computing g.
    """

    def __init__(self, threshold: float, width: float = 0.0, signal: str = "margin") -> None:
        self.threshold, self.width, self.signal = float(threshold), float(width), signal

    def weight(self, logits: np.ndarray) -> float:
        theta = self.threshold
        if theta == -np.inf:
            return 1.0
        if theta == np.inf:
            return 0.0
        g = gate_signal(logits, self.signal)
        if self.width == 0:
            return 1.0 if g > theta else 0.0
        return float(min(max((g - theta) / self.width + 0.5, 0.0), 1.0))


def guidance_mix(cond: np.ndarray, uncond: np.ndarray, scale: float) -> np.ndarray:
    """Classifier-free guidance: ``u + w * (c - u)``; ``w = 1`` returns ``cond`` exactly."""
    if scale == 1.0:
        return cond
    return (uncond + np.float32(scale) * (cond - uncond)).astype(np.float32, copy=False)


def contrast_mix(big: np.ndarray, small: np.ndarray, alpha: float, beta: float = 0.1) -> np.ndarray:
    """Contrastive decoding: ``log p_big - alpha * log p_small`` over ``{x: p_big(x) >= beta * max p_big}``;
    tokens outside that plausible set get ``-inf``."""
    lb = log_softmax(big, np.float32)
    ls = log_softmax(small, np.float32)
    out = (lb - np.float32(alpha) * ls).astype(np.float32)
    out[lb < lb.max() + np.float32(np.log(beta))] = -np.inf
    return out


# -- speculative decoding -------------------------------------------------------------------------------------
def verify(
    p_rows: Sequence[np.ndarray], q_rows: Sequence[np.ndarray], draft: Sequence[int], rng: np.random.Generator
) -> tuple[int, int]:
    """Speculative verification by rejection sampling.

    Args:
        p_rows: the target's k+1 routed distributions (dense, over the vocabulary): row i is the distribution of
            the token after ``draft[:i]``; the last row gives the bonus token.
        q_rows: the draft's k routed distributions (dense), row i the one ``draft[i]`` was drawn from.
        draft: the k proposed tokens.
        rng: the request's generator.

    Returns:
        ``(accepted, token)``: how many draft tokens were accepted, and the one token that follows them (drawn
        from the residual ``max(0, p - q)`` at the first rejection, or from the last p row as a bonus).
    """
    k = len(draft)
    for i in range(k):
        x = int(draft[i])
        p, q = p_rows[i], q_rows[i]
        if q[x] <= 0:  # cannot happen for a token drawn from q; treated as a rejection
            ratio = 0.0
        else:
            ratio = p[x] / q[x]
        if ratio >= 1.0 or rng.random() < ratio:
            continue
        residual = np.maximum(p - q, 0.0)
        total = residual.sum()
        if total <= 0:  # p == q: the rejection had probability 0; fall back to p
            residual = p
        return i, draw(residual, rng)
    return k, draw(p_rows[k], rng)


def one_hot(token: int, vocab_size: int) -> np.ndarray:
    out = np.zeros(vocab_size, dtype=np.float64)
    out[token] = 1.0
    return out


class NgramDrafter:
    """Prompt lookup: propose the tokens that followed the most recent earlier occurrence of the sequence's
    last n-gram (n from ``max_ngram`` down to ``min_ngram``). No second model; q is a point mass."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ConfigError("ngram", (min_ngram, max_ngram), "need 1 <= min_ngram <= max_ngram")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, tokens: np.ndarray, k: int) -> list[int]:
        n_tok = len(tokens)
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if n_tok <= n:
                continue
            windows = np.lib.stride_tricks.sliding_window_view(tokens[:-1], n)
            hits = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
            if len(hits):
                start = int(hits[-1]) + n
                cont = tokens[start : start + k]
                if len(cont):
                    return [int(t) for t in cont]
        return []


class AdaptiveK:
    """k for the next round: fixed, or adapting to acceptance (+2 after a fully accepted round, -1 otherwise,
    within [1, k_max]), as transformers' assisted generation does."""

    def __init__(self, k: int, adaptive: bool, k_max: int = 16) -> None:
        if not isinstance(k, int) or k < 1:
            raise ConfigError("draft_k", k, "must be an integer >= 1")
        self.k, self.adaptive, self.k_max = k, adaptive, max(k_max, k)

    def update(self, proposed: int, accepted: int) -> None:
        if self.adaptive and proposed:
            self.k = min(self.k + 2, self.k_max) if accepted == proposed else max(self.k - 1, 1)


def propose(
    drafter: NgramDrafter | Stream,
    tokens: np.ndarray,
    k: int,
    dense: Callable[..., np.ndarray],
    rng: np.random.Generator,
    first_index: int,
    vocab_size: int,
) -> tuple[list[int], list[np.ndarray]]:
    """The draft's k proposals and the routed distributions they were drawn from.

    ``dense(logits, history, index)`` is the request's router (the same chain as the target's); an n-gram
    drafter proposes deterministically, so its q rows are point masses.
    """
    if isinstance(drafter, NgramDrafter):
        out = drafter.propose(tokens, k)
        return out, [one_hot(x, vocab_size) for x in out]
    proposals: list[int] = []
    q_rows: list[np.ndarray] = []
    seq = [int(t) for t in tokens]
    for i in range(k):
        q = dense(drafter.sync(seq), np.asarray(seq, dtype=np.int64), first_index + i)
        x = draw(q, rng)
        proposals.append(x)
        q_rows.append(q)
        seq.append(x)
    return proposals, q_rows
