"""The router's stages: :class:`Processor` (over the whole logits vector) and :class:`Truncation` (over a candidate
set), the ones :func:`.router.make_chain` builds from a config, and :class:`Explore`.

A stage owns its fast forms, the shortcuts the router takes only when every stage concerned offers one:

- a processor's: ``lowers_only`` with :meth:`Processor.keeps` (greedy's raw argmax stands) and
  :meth:`Processor.touched` (its edits written into the caller's vector and undone after the draw);
- a truncation's: :meth:`Truncation.fast`, the stage on a few candidates held as Python floats
  (:class:`.fast.Few`).

Each fast form computes what the plain form computes, so the router draws the same token either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..config import SamplingConfig
from .fast import FastCut, Few
from .ops import Ids, apply_logit_bias, apply_penalties, apply_temperature, min_p, top_k, top_p, typical


# -- processors over the whole vector -------------------------------------------------------------------------
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


# -- truncations over a candidate set -------------------------------------------------------------------------
class Truncation:
    """A stage over the candidate set: ``(ids, logits) -> (ids, logits)``, keeping at least ``min_keep``.

    Subclasses override :meth:`__call__` and, where they can:

    - :meth:`fast`: the stage's fast form, a function that applies it to a :class:`.fast.Few` (a few candidates
      held as Python floats) in place, keeping exactly the candidates :meth:`__call__` keeps, with the same
      values; it returns True, or False where it cannot decide on floats (the router then runs the plain stages
      from the same candidates). None (the default): the stage has none, and a chain that holds it takes the
      plain path;
    - ``prefilter``: the stage only narrows the candidates, to a few, and keeps the best one (top-k). First in a
      chain it runs before the best candidate is checked to be finite (on the few, not the vocabulary), and the
      float path starts after it.
    """

    prefilter = False

    def __call__(self, ids: Ids, logits: np.ndarray) -> tuple[Ids, np.ndarray]:
        raise NotImplementedError

    def fast(self) -> FastCut | None:
        return None


@dataclass(frozen=True)
class TopK(Truncation):
    """The candidates whose logit is at least the k-th largest (ties kept): the chain's prefilter."""

    k: int
    min_keep: int = 1
    prefilter = True  # (a class attribute: not a dataclass field)

    def __call__(self, ids: Ids, logits: np.ndarray) -> tuple[Ids, np.ndarray]:
        return top_k(ids, logits, self.k, self.min_keep)


@dataclass(frozen=True)
class Temperature(Truncation):
    """Scales the candidates' logits (keeps them all); > 0, greedy is the router's argmax draw."""

    temperature: float

    def __call__(self, ids: Ids, logits: np.ndarray) -> tuple[Ids, np.ndarray]:
        return ids, apply_temperature(logits, self.temperature)

    def fast(self) -> FastCut:
        return self._on_floats

    def _on_floats(self, few: Few) -> bool:
        few.scale(self.temperature)  # on the NumPy float32 values, before they become floats: the same division
        return True


@dataclass(frozen=True)
class TopP(Truncation):
    """Nucleus: the smallest set of most likely candidates whose probability reaches ``p``."""

    p: float
    min_keep: int = 1

    def __call__(self, ids: Ids, logits: np.ndarray) -> tuple[Ids, np.ndarray]:
        return top_p(ids, logits, self.p, self.min_keep)

    def fast(self) -> FastCut:
        return self._on_floats

    def _on_floats(self, few: Few) -> bool:
        """:func:`ops.top_p`'s few-candidates branch: the same weights in the same stable descending order, a
        candidate kept while the float64 sum of those before it (added in order) is below the target."""
        if self.p >= 1.0 or len(few.keep) <= self.min_keep:
            return True
        w = few.weights()
        target = self.p * few.kept_sum()
        order = sorted(few.keep, key=w.__getitem__, reverse=True)  # = argsort(-w, kind="stable")
        total, cut = 0.0, 0
        for j in order:
            total += w[j]
            cut += total - w[j] < target
        few.cut(sorted(order[: max(cut, self.min_keep)]))
        return True


@dataclass(frozen=True)
class MinP(Truncation):
    """The candidates with probability >= ``p`` times the best one's."""

    p: float
    min_keep: int = 1

    def __call__(self, ids: Ids, logits: np.ndarray) -> tuple[Ids, np.ndarray]:
        return min_p(ids, logits, self.p, self.min_keep)

    def fast(self) -> FastCut:
        if self.p <= 0.0:
            return _unchanged
        log_p, least = float(np.log(self.p)), self.min_keep  # np.log, as min_p computes it

        def on_floats(few: Few) -> bool:
            """:func:`ops.min_p` in logit space: ``x >= top + log(p)``, compared in float64. False when fewer
            than ``min_keep`` pass (the plain stage then keeps the top ``min_keep``)."""
            x, floor = few.values(), few.top() + log_p
            keep = [j for j in few.keep if x[j] >= floor]
            if len(keep) < least:
                return False
            few.cut(keep)
            return True

        return on_floats


@dataclass(frozen=True)
class Typical(Truncation):
    """Locally typical sampling: the candidates whose surprisal is closest to the entropy, up to ``mass``."""

    mass: float
    min_keep: int = 1

    def __call__(self, ids: Ids, logits: np.ndarray) -> tuple[Ids, np.ndarray]:
        return typical(ids, logits, self.mass, self.min_keep)


def _unchanged(few: Few) -> bool:
    return True


# -- exploration ----------------------------------------------------------------------------------------------
class Explore:
    """Exploration: with weight ``q(index)`` (the config's schedule) a uniform draw over ``allowed`` (the
    vocabulary minus banned and special ids), mixed over the truncated distribution."""

    def __init__(self, cfg: SamplingConfig, allowed: np.ndarray) -> None:
        self.q, self.allowed = cfg.explore_at, allowed
