"""Choosing the tokens of one sequence: :class:`TokenChooser` holds the request's router (``sampling.Router``, its
chain suppressing the stop tokens until ``min_new_tokens`` were generated) and its own random generator, and
tells the router which tokens the sequence commits to."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .config import GenerationConfig
from .errors import ConfigError
from .grammar import GrammarStage
from .output import stop_ids
from .sampling import Constraining, make_chain
from .thinking import ThinkFirst

if TYPE_CHECKING:
    from .graph import Graph


class TokenChooser:
    """Routes one row of logits at a time to a token, for one sequence. ``index`` is the token's position in the
    turn (0 = its first generated token): exploration schedules and the ``min_new_tokens`` suppression use it."""

    def __init__(self, model: Graph, config: GenerationConfig, rng: np.random.Generator) -> None:
        if config.num_beams > 1:
            raise ConfigError(
                "num_beams",
                config.num_beams,
                "beam search runs through Model.generate (edgeroute run --beams): it does not stream one token at a"
                " time, and the engine and batches do not run it",
            )
        outside = [i for i in config.stop_token_ids if not 0 <= i < model.vocab_size]
        if outside:
            raise ConfigError(
                "stop_token_ids", outside[0], f"is outside the vocabulary (ids 0..{model.vocab_size - 1})"
            )
        self.rng = rng
        stages: tuple[Constraining, ...] = ()
        if config.constraint is not None:
            grammar = GrammarStage(config.constraint, model)
            # think_first: the constraint applies after a reasoning model's thinking block (thinking.py)
            stages = (ThinkFirst(grammar, model.tokenizer, stop_ids(model, config)) if config.think_first else grammar,)
        self.router = make_chain(
            config.sampling,
            model.vocab_size,
            model.special_ids,
            model.undecodable_ids,
            suppress_ids=stop_ids(model, config),
            suppress_until=config.min_new_tokens,
            processors=stages,
        )

    def choose(self, logits: np.ndarray, history: np.ndarray, index: int) -> int:
        """The token for ``logits`` (one row) after ``history`` (the sequence so far, prompt included)."""
        return self.router.sample(logits, history, self.rng, index)

    def dense(self, logits: np.ndarray, history: np.ndarray, index: int) -> np.ndarray:
        """The exact routed distribution of the token at turn position ``index`` (dense, float64)."""
        return self.router.distribution(logits, history, index).dense()

    def accept(self, token: int) -> None:
        """The sequence committed to ``token`` (the router's stateful stages advance)."""
        self.router.accept(token)

    def restart(self, kept: list[int]) -> None:
        """The turn starts over with ``kept`` as its generated tokens so far (a new turn: none; a rewind: what
        remains): the router's stateful stages are reset and told them again."""
        self.router.reset()
        for token in kept:
            self.router.accept(token)
