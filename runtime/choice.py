"""Choosing the tokens of one sequence: :class:`TokenChooser` holds the request's router (``sampling.Router``) and
its own random generator, and suppresses the stop tokens until ``min_new_tokens`` were generated."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .config import GenerationConfig
from .output import stop_ids
from .sampling import make_chain

if TYPE_CHECKING:
    from .protocols import ModelLike


class TokenChooser:
    """Routes one row of logits at a time to a token, for one sequence. ``index`` is the token's position in the
    turn (0 = its first generated token): exploration schedules and the ``min_new_tokens`` suppression use it."""

    def __init__(self, model: ModelLike, config: GenerationConfig, rng: np.random.Generator) -> None:
        self.rng = rng
        self.router = make_chain(config.sampling, model.vocab_size, model.special_ids, model.undecodable_ids)
        stops = stop_ids(model, config)
        self._stops = np.array(sorted(i for i in stops if i < model.vocab_size), dtype=np.int64)
        self._min_new = config.min_new_tokens

    def _suppress(self, index: int) -> np.ndarray | None:
        return self._stops if index < self._min_new else None

    def choose(self, logits: np.ndarray, history: np.ndarray, index: int) -> int:
        """The token for ``logits`` (one row) after ``history`` (the sequence so far, prompt included)."""
        return self.router.sample(logits, history, self.rng, index, self._suppress(index))

    def dense(self, logits: np.ndarray, history: np.ndarray, index: int) -> np.ndarray:
        """The exact routed distribution of the token at turn position ``index`` (dense, float64)."""
        return self.router.distribution(logits, history, index, self._suppress(index)).dense()
