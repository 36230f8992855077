"""One sequence's tokens: :class:`TokenSequence` holds its ids (prompt and generated), its
:class:`~edgeroute.choice.TokenChooser` (router and RNG), its :class:`~edgeroute.output.TurnOutput` (text, stops,
logprobs) and its :class:`~edgeroute.Usage`. :meth:`TokenSequence.commit` is the one place a token is chosen,
accepted, turned into text and counted: the Generator, batched generation and the engine all commit through it
(speculative decoding, whose tokens the verification chooses, goes through :meth:`TokenSequence.take`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from .choice import TokenChooser
from .config import GenerationConfig
from .output import Completion, Step, TurnOutput, Usage

if TYPE_CHECKING:
    from .graph import Graph


class TokenSequence:
    """A sequence of at most ``capacity`` tokens and what chooses its next one.

    ``ids[:n]`` is the sequence (prompt and generated tokens); ``turn_start`` is when its current turn started
    (``perf_counter``): the first token's time to first token runs from there; ``last`` is when its last commit
    ended, where the next token's decode time starts unless the caller says otherwise.
    """

    __slots__ = ("chooser", "output", "usage", "ids", "n", "turn_start", "last")

    def __init__(
        self,
        model: Graph,
        config: GenerationConfig,
        rng: np.random.Generator,
        capacity: int,
        usage: Usage | None = None,
    ) -> None:
        self.chooser = TokenChooser(model, config, rng)
        self.output = TurnOutput(model, config)
        self.usage = usage if usage is not None else Usage()
        self.ids = np.zeros(capacity, dtype=np.int64)
        self.n = 0
        self.turn_start = 0.0
        self.last = 0.0

    @property
    def tokens(self) -> np.ndarray:
        """The sequence so far (a view)."""
        return self.ids[: self.n]

    @property
    def index(self) -> int:
        """The next token's position in the turn (0 = its first generated token)."""
        return self.output.index

    @property
    def done(self) -> bool:
        """The turn ended (a stop token, a stop string or the length)."""
        return self.output.done

    def extend(self, ids: Sequence[int] | np.ndarray) -> None:
        """Add tokens that are not generated (a prompt)."""
        self.ids[self.n : self.n + len(ids)] = ids
        self.n += len(ids)

    def commit(self, logits: np.ndarray, raw: np.ndarray | None = None, start: float | None = None) -> Step:
        """Choose the next token from ``logits`` (one row, routed: after any second flow's mix), accept it, turn it
        into text (logprobs from ``raw``, the model's own logits, default ``logits``) and count it: a step that ran
        from ``start`` (default: the end of the last commit) to now."""
        t0 = time.perf_counter()
        token = self.chooser.choose(logits, self.ids[: self.n], self.output.index)
        step = self.take(token, logits if raw is None else raw)
        now = time.perf_counter()
        self.usage.router_seconds += now - t0
        self.usage.record(1, self.last if start is None else start, now, self.turn_start)
        self.last = now
        return step

    def take(self, token: int, raw: np.ndarray) -> Step:
        """Append ``token``, chosen elsewhere (a speculative round's verification), uncounted: the router's
        stateful stages accept it, the output turns it into text."""
        self.chooser.accept(token)
        step = self.output.take(token, raw)
        self.ids[self.n] = token
        self.n += 1
        return step

    def completion(self) -> Completion:
        return self.output.completion(self.usage)
