"""Quality as a judge model reads it: the negative log-likelihood of samples (given their prompt) and of
reference texts, whose ratio to the tokens read is the perplexity the report shows."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from edgeroute.errors import ConfigError
from edgeroute.output import Completion
from edgeroute.sampling import log_softmax

if TYPE_CHECKING:
    from edgeroute.graph import Graph


class Judge:
    """Scores text under a model: the negative log-likelihood of a continuation given its context."""

    def __init__(self, model: Graph, generator_model: Graph) -> None:
        if model.manifest.logits == "last":
            raise ConfigError("judge", model_name(model), "needs a graph with logits for every position")
        self.model = model
        self.same_vocab = model is generator_model or model.shares_tokenizer(generator_model)

    def nll(self, context: list[int], continuation: list[int]) -> tuple[float, int]:
        """(sum of -log p, tokens) of ``continuation`` after ``context`` (at least one token)."""
        if not continuation:
            return 0.0, 0
        ids = context + continuation
        limit = self.model.context_length
        if len(ids) > limit:
            raise ConfigError("judge", model_name(self.model), f"context {limit} cannot hold {len(ids)} tokens")
        n = len(continuation)
        logits = self.model.forward_last(np.array([ids]), self.model.new_cache(), n + 1)[0][:-1]
        logp = np.stack([log_softmax(row.astype(np.float64)) for row in logits])
        return float(-logp[np.arange(n), continuation].sum()), n

    def sample(self, prompt_text: str, prompt_ids: list[int], completion: Completion, chat: bool) -> tuple[float, int]:
        if self.same_vocab:
            return self.nll(prompt_ids, list(completion.token_ids))
        m = self.model
        ctx = m.tokenizer.apply_chat_template([{"role": "user", "content": prompt_text}]) if chat else None
        ctx = ctx or m.encode_prompt(prompt_text)
        return self.nll(ctx, m.tokenizer.encode(completion.text, add_special_tokens=False))

    def text(self, text: str, max_tokens: int) -> tuple[float, int]:
        """A reference text on its own: its first ``max_tokens`` tokens given the BOS token (or its first)."""
        m = self.model
        ids = m.tokenizer.encode(text, add_special_tokens=False)[:max_tokens]
        bos = m.manifest.bos_token_id
        return self.nll([bos], ids) if bos is not None else self.nll(ids[:1], ids[1:])


def model_name(model: Any) -> str:
    """How a report names a model: its folder (else its repr)."""
    return str(getattr(model, "path", model))
