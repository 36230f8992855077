"""The narrow view of a model that generation needs, so that the generator, the token chooser, the text output,
the level-1 flows and the quality measure depend on it and not on :class:`~edgeroute.Model` (which builds them):
the runtime's modules import one another without a cycle (``tests/test_imports.py``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from .kv_cache import Cache
from .manifest import Manifest
from .tokenizer import Tokenizer


class ModelLike(Protocol):
    """What a generator reads from a loaded model; :class:`~edgeroute.Model` is the implementation."""

    manifest: Manifest
    tokenizer: Tokenizer
    session: Any
    special_ids: frozenset[int]
    undecodable_ids: range

    @property
    def vocab_size(self) -> int: ...

    @property
    def context_length(self) -> int: ...

    def new_cache(self, batch_size: int = 1) -> Cache: ...

    def forward(
        self,
        input_ids: np.ndarray,
        cache: Cache,
        attention_mask: np.ndarray | None = None,
        position_ids: np.ndarray | None = None,
    ) -> np.ndarray: ...

    def forward_last(
        self,
        input_ids: np.ndarray,
        cache: Cache,
        n_last: int,
        attention_mask: np.ndarray | None = None,
        position_ids: np.ndarray | None = None,
    ) -> np.ndarray: ...

    def step_logits(self, input_ids: np.ndarray, cache: Cache) -> np.ndarray: ...

    def encode_prompt(self, prompt: str | Sequence[int]) -> list[int]: ...
