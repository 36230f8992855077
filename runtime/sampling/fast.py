"""The float path's candidate set: a few candidates held as Python floats (:class:`Few`), which the truncations'
fast forms cut and which draws the token.

Once a narrowing stage (top-k) has left a few dozen candidates, each NumPy call costs microseconds on the caches a
graph run has just evicted, more than a loop over the values does. A fast form computes exactly what its stage's
NumPy form computes on the kept candidates (the same values, the same float64 sums in the same order), so the
float path draws the same token and leaves the same RNG state; the tests pin it to the plain path.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections.abc import Callable
from itertools import accumulate

import numpy as np

from .ops import _FEW, _SMALL, NoCandidates, apply_temperature

FEW = _FEW  # candidate sets up to this size take the float path
assert FEW <= _SMALL  # so that their weights are float64 and their CDF one level, as ops.draw has them

FastCut = Callable[["Few"], bool]
"""A truncation's fast form: it cuts a :class:`Few` in place and returns True, or returns False where it cannot
decide on floats (the router then runs the plain stages from the same candidates; nothing random is drawn before
the draw)."""


class Few:
    """A few candidates ``ids`` (ascending, with their float32 ``logits``) as Python floats.

    ``keep`` lists the positions still in, ascending: a stage reads it and replaces it through :meth:`cut`.
    :meth:`values` are the logits as Python floats (a float32 value is exact in a float); :meth:`top` is the best
    kept value and :meth:`weights` the unnormalised probabilities ``exp(x - top)`` of every position, the values
    :func:`ops._weights` gives the kept candidates. Each is computed once, and again only after :meth:`scale` or
    a cut that drops the best candidate.
    """

    __slots__ = ("ids", "keep", "_x", "_xl", "_top", "_top_at", "_w", "_wl", "_w_top")

    def __init__(self, ids: np.ndarray, logits: np.ndarray) -> None:
        self.ids = ids
        self.keep: list[int] = list(range(len(ids)))
        self._x = logits
        self._xl: list[float] | None = None
        self._top, self._top_at = -math.inf, -1  # -1: not known
        self._w: np.ndarray | None = None
        self._wl: list[float] = []
        self._w_top = math.nan

    def scale(self, temperature: float) -> None:
        """Every logit divided by ``temperature``, in float32 as :func:`ops.apply_temperature` divides."""
        self._x = apply_temperature(self._x, temperature)
        self._xl, self._top_at, self._w = None, -1, None

    def values(self) -> list[float]:
        """The logits of every position as Python floats."""
        if self._xl is None:
            self._xl = self._x.tolist()
        return self._xl

    def top(self) -> float:
        """The best kept logit; :class:`NoCandidates` unless it is finite (nothing kept: ``-inf``)."""
        if self._top_at < 0:
            xl, keep = self.values(), self.keep
            if len(keep) == len(xl):
                top = max(xl, default=-math.inf)
                at = xl.index(top) if -math.inf < top < math.inf else -1
            else:
                at = max(keep, key=xl.__getitem__) if keep else -1
                top = xl[at] if keep else -math.inf
            if not -math.inf < top < math.inf:
                raise NoCandidates(f"best candidate at {top}")
            self._top, self._top_at = top, at
        return self._top

    def weights(self) -> list[float]:
        """``exp(x - top)`` in float64 for every position (only the kept ones are meaningful)."""
        top = self.top()
        if self._w is None or self._w_top != top:
            self._w = np.exp(np.array(self.values()) - top)
            self._wl, self._w_top = self._w.tolist(), top
        return self._wl

    def kept_sum(self) -> float:
        """The kept weights' float64 sum, added in NumPy's order (pairwise), as the stages sum them."""
        self.weights()
        w = self._w
        assert w is not None
        return float(w.sum(dtype=np.float64) if len(self.keep) == len(w) else w[self.keep].sum(dtype=np.float64))

    def cut(self, keep: list[int]) -> None:
        """Keep only the positions ``keep`` (ascending, a subset of :attr:`keep`)."""
        at = self._top_at
        if at >= 0:
            i = bisect_left(keep, at)
            if i == len(keep) or keep[i] != at:
                self._top_at = -1  # the best candidate is gone: the next top and weights are the kept set's
        self.keep = keep

    def draw(self, rng: np.random.Generator) -> int:
        """The token :func:`ops.draw` picks from the kept candidates' weights for the same RNG state: the same
        cumulative sums (in order, float64), the same uniform, the same search (``side="right"``)."""
        wl, keep = self.weights(), self.keep
        cdf = list(accumulate(wl[j] for j in keep))
        j = bisect_right(cdf, rng.random() * cdf[-1])
        if j >= len(keep):  # rounding put u past the end: the last candidate with positive weight
            j = max(i for i, t in enumerate(keep) if wl[t] > 0)
        return int(self.ids[keep[j]])
