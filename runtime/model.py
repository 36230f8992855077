"""``Model``: a loaded model folder that generates. The graph layer's :class:`~edgeroute.graph.Graph` (manifest,
session, tokenizer, KV caches) with the convenience calls on top: :meth:`Model.generator` (a stateful
:class:`~edgeroute.Generator`) and :meth:`Model.generate` (one prompt, a batch of prompts, or beam search).

:meth:`Model.score` scores continuations of a context (log-likelihood evaluation).

A Model may be used from several threads at once, each with its own Generator: it holds no per-request state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np

from .adapters import prefix_key
from .beam import beam_search
from .config import GenerationConfig
from .encoder import EncoderModel, is_encoder_folder
from .errors import ConfigError
from .generator import Generator, generate_batch
from .graph import Graph
from .kv_cache import SharedKVCache
from .output import Completion
from .params import Flows
from .scoring import Score, score, score_items

Prompt = str | Sequence[int]


class Model(Graph):
    """An exported model folder ready to generate. Build it with :meth:`Model.load`."""

    # -- scoring ---------------------------------------------------------------------------------------------
    def score(
        self, context: Prompt, continuations: Sequence[Prompt], top_logprobs: int = 0, adapter: str | None = None
    ) -> list[Score]:
        """The log-likelihood of each continuation given ``context``, token by token from the raw logits (no
        router), with greedy flags and the ``top_logprobs`` most likely alternatives per position (0 to 20).

        The context is computed once and shared by the continuations (``edgeroute.scoring``). Texts are split as
        lm-evaluation-harness splits them; token ids are used as given. ``adapter``: a loaded LoRA adapter's name
        (None: the base model).
        """
        return score(self, context, continuations, top_logprobs, adapter)

    def score_items(
        self,
        items: Sequence[tuple[Prompt, Sequence[Prompt]]],
        top_logprobs: int = 0,
        progress: Callable[[int], None] | None = None,
        adapter: str | None = None,
    ) -> list[list[Score]]:
        """:meth:`score` for many ``(context, continuations)`` items, the same scores in fewer graph runs: short
        items' continuations run as rows of batched runs (``edgeroute.scoring.score_items``); ``progress(n)`` is
        told as items finish. What ``edgeroute eval --choices`` uses."""
        return score_items(self, items, top_logprobs, progress, adapter)

    # -- the prefix cache ------------------------------------------------------------------------------------
    def cache_prefix(self, prompt: Prompt, adapter: str | None = None, chunk: int = 512) -> int:
        """Warm the prefix cache (``Model.load(prefix_cache=...)``) with ``prompt``: its whole blocks' positions
        computed now (those the cache holds already are not) and kept for later prompts that start with them, on
        disk too when the cache has a directory. Returns how many positions the cache holds for it."""
        cached = self.prefix_cache
        if cached is None:
            raise ConfigError("prefix_cache", None, "this model has no prefix cache: load it with prefix_cache=")
        ids = self.encode_prompt(prompt)
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise ConfigError("prompt", ids[:8], f"token ids must be in [0, {self.vocab_size})")
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
            raise ConfigError("chunk", chunk, "must be an integer >= 1")
        chosen = self.adapter(adapter)
        key = prefix_key(chosen)
        n = len(ids) // cached.block * cached.block
        if n == 0:
            return 0
        row = self.new_cache(1, capacity=n, adapter=chosen)
        assert isinstance(row, SharedKVCache)  # a prefix cache needs one (use_prefix_cache)
        row.lengths[0] = cached.restore_prefix(ids, n, row.kv, 0, key)
        for start in range(row.length, n, chunk):
            self.forward(np.array([ids[start : min(n, start + chunk)]]), row)
        cached.store(ids[:n], row.kv, 0, key)
        return n

    # -- generation ------------------------------------------------------------------------------------------
    def generator(
        self, config: GenerationConfig | None = None, flows: Flows | None = None, **flow_fields: Any
    ) -> Generator:
        """A new :class:`Generator` (its own KV cache, RNG and router) for ``config``.

        ``flows`` (a :class:`Flows`, or its fields by keyword) choose a level-1 route: ``draft=other_model |
        "ngram"`` (with ``draft_k``, ``adaptive_k``) for speculative decoding, ``guidance=w`` (with
        ``negative_prompt``), or ``contrast=small_model`` (with ``contrast_alpha``, ``contrast_beta``).
        """
        return Generator(self, config or GenerationConfig(), flows, **flow_fields)

    @overload
    def generate(
        self, prompt: Prompt, config: GenerationConfig | None = None, flows: Flows | None = None, **flow_fields: Any
    ) -> Completion: ...

    @overload
    def generate(
        self, prompt: list[str], config: GenerationConfig | None = None, flows: Flows | None = None, **flow_fields: Any
    ) -> list[Completion]: ...

    def generate(
        self, prompt: Any, config: GenerationConfig | None = None, flows: Flows | None = None, **flow_fields: Any
    ) -> Any:
        """Generate a completion for one prompt, or a list of completions for a list of text prompts.

        A list of prompts runs as one batch (left padding and attention masks, one graph run per step) and
        returns exactly what each prompt gets alone.
        """
        config = config or GenerationConfig()
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            if flow_fields or (flows is not None and flows.active):
                raise ConfigError("flows", sorted(flow_fields) or flows, "batches run single-stream")
            return generate_batch(self, [self.encode_prompt(p) for p in prompt], config)
        if config.num_beams > 1:
            if flow_fields or (flows is not None and flows.active):
                raise ConfigError("num_beams", config.num_beams, "beam search runs single-stream (no flows)")
            return beam_search(self, self.encode_prompt(prompt), config)
        gen = self.generator(config, flows, **flow_fields)
        gen.append(self.encode_prompt(prompt))
        return gen.run()


def load(path: str | Path, provider: str = "cpu", threads: int | None = None, **options: Any) -> Model | EncoderModel:
    """Load an edgeroute model folder as what its manifest says it is: a decoder (:class:`Model`, ``options`` as
    :meth:`Model.load` takes them) or an encoder (:class:`~edgeroute.encoder.EncoderModel`: ``embed``)."""
    if is_encoder_folder(path):
        if options:
            raise ConfigError(
                sorted(options)[0], options[sorted(options)[0]], "is a decoder option: an encoder takes none"
            )
        return EncoderModel.load(path, provider, threads)
    return Model.load(path, provider, threads, **options)
