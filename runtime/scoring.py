"""Scoring: how likely given tokens are, from the model's raw logits (no temperature, penalties or truncation:
the router is not involved). What log-likelihood evaluation (lm-evaluation-harness's multiple-choice tasks) and
the server's ``echo`` with ``logprobs`` ask for.

The context is fed once into one KV cache; each continuation is then fed after it and the cache cut back to the
context (a branch of one cache), so a context shared by four endings is computed once. Positions are fed in chunks
of :data:`CHUNK` with only their logits kept (the graph's ``logits_to_keep``), and each chunk's rows are reduced to
the scored token's log-probability, its rank-1 check and the top alternatives before the next chunk runs: a long
prompt never holds ``[positions x vocabulary]`` logits (at most ``CHUNK`` rows).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError
from .graph import Graph, Prompt
from .kv_cache import Cache
from .sampling import log_softmax, top_logprobs

CHUNK = 64  # positions per graph run while scoring: 64 x 49,152 float32 logits (SmolLM2) are 12.6 MB
MAX_TOP = 20  # alternatives per position, as OpenAI's logprobs allow


@dataclass(frozen=True)
class TokenScore:
    """One scored token: its log-probability given everything before it, whether it is the most likely token
    there (``greedy``), and the ``top`` most likely tokens there with theirs (most likely first; the same floats
    as ``logprob`` where the token is among them)."""

    token_id: int
    logprob: float
    greedy: bool
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Score:
    """A continuation's tokens, each scored given the context and the tokens of the continuation before it."""

    tokens: tuple[TokenScore, ...]

    @property
    def token_ids(self) -> list[int]:
        return [t.token_id for t in self.tokens]

    @property
    def logprob(self) -> float:
        """The continuation's log-likelihood: the sum of its tokens' log-probabilities."""
        return float(sum(t.logprob for t in self.tokens))

    @property
    def greedy(self) -> bool:
        """Whether greedy decoding from the context would produce exactly this continuation."""
        return all(t.greedy for t in self.tokens)


def score(graph: Graph, context: Prompt, continuations: Sequence[Prompt], top: int = 0) -> list[Score]:
    """Score each continuation given ``context`` (text or token ids; a continuation likewise).

    Text is split as lm-evaluation-harness splits it: the context's trailing spaces move to the continuation, the
    pair is encoded whole and the continuation's tokens are what follows the context's own encoding (a word is
    tokenised as it would be in running text). Token ids are used as given (no BOS added). ``top``: how many most
    likely alternatives each position reports (0 to 20).
    """
    if not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= MAX_TOP:
        raise ConfigError("top", top, f"must be an integer in [0, {MAX_TOP}]")
    if isinstance(continuations, (str, bytes)) or not isinstance(continuations, Sequence) or not continuations:
        raise ConfigError("continuations", continuations, "must be a non-empty list of texts or token-id lists")
    pairs = [_pair(graph, context, c) for c in continuations]
    if any(ctx != pairs[0][0] for ctx, _ in pairs):  # a text context can encode differently before each ending
        return [score_ids(graph, ctx, [cont], top)[0] for ctx, cont in pairs]
    return score_ids(graph, pairs[0][0], [cont for _, cont in pairs], top)


def score_ids(
    graph: Graph, context: Sequence[int], continuations: Sequence[Sequence[int]], top: int = 0
) -> list[Score]:
    """:func:`score` on token ids: ``context`` (at least one token) fed once, each continuation after it."""
    ctx = [int(i) for i in context]
    if not ctx:
        raise ConfigError("context", context, "must give at least one token (a BOS token for an empty context)")
    for cont in continuations:
        if not len(cont):
            raise ConfigError("continuations", cont, "each continuation must give at least one token")
        _check_room(graph, len(ctx) + len(cont) - 1)
    cache = graph.new_cache(1)
    _feed(graph, cache, ctx[:-1])  # the context but its last token, whose logits score the first continuation token
    base = cache.length
    out = []
    for cont in continuations:
        ids = [int(i) for i in cont]
        out.append(Score(tuple(_scored(graph, cache, [ctx[-1], *ids[:-1]], ids, top))))
        cache.trim(cache.length - base)
    return out


def prompt_scores(graph: Graph, ids: Sequence[int], top: int = 0) -> list[TokenScore]:
    """Each token of a prompt after the first, scored given the tokens before it (the server's ``echo`` with
    ``logprobs``: the first token has no score)."""
    if len(ids) < 2:
        return []
    return list(score_ids(graph, ids[:1], [ids[1:]], top)[0].tokens)


def _scored(graph: Graph, cache: Cache, feed: list[int], targets: list[int], top: int) -> list[TokenScore]:
    out: list[TokenScore] = []
    for start in range(0, len(feed), CHUNK):
        chunk = feed[start : start + CHUNK]
        logits = graph.forward_last(np.asarray([chunk], dtype=np.int64), cache, len(chunk))[0]
        for row, target in zip(logits, targets[start : start + len(chunk)], strict=True):
            out.append(_token_score(row, target, top))
    return out


def _token_score(row: np.ndarray, target: int, top: int) -> TokenScore:
    if not 0 <= target < len(row):
        raise ConfigError("continuations", target, f"is not a token id of this model's vocabulary ({len(row)})")
    logp = log_softmax(row)
    value = float(logp[target])
    return TokenScore(int(target), value, value == float(logp.max()), top_logprobs(logp, top))


def _feed(graph: Graph, cache: Cache, ids: list[int]) -> None:
    for start in range(0, len(ids), CHUNK):
        chunk = ids[start : start + CHUNK]
        graph.forward_last(np.asarray([chunk], dtype=np.int64), cache, 1)


def _check_room(graph: Graph, positions: int) -> None:
    if positions > graph.context_length:
        raise ConfigError(
            "continuations",
            positions,
            f"context and continuation need more positions than the model's {graph.context_length}",
        )


def _pair(graph: Graph, context: Prompt, continuation: Prompt) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids): ids as given, or text split as lm-evaluation-harness splits it."""
    text_ctx, text_cont = isinstance(context, str), isinstance(continuation, str)
    if text_ctx != text_cont:
        raise ConfigError(
            "continuations", continuation, "give the context and the continuations both as text or both as ids"
        )
    if not text_ctx:
        return _ids(graph, context, "context"), _ids(graph, continuation, "continuations")
    assert isinstance(context, str) and isinstance(continuation, str)
    stripped = context.rstrip(" ")
    continuation = context[len(stripped) :] + continuation
    if not continuation:
        raise ConfigError("continuations", continuation, "must not be empty")
    whole = graph.tokenizer.encode(stripped + continuation)
    ctx = graph.tokenizer.encode(stripped) if stripped else []
    if not ctx:  # an empty context: the model's BOS, else its end-of-sequence token, as lm-eval prefixes it
        bos = graph.manifest.bos_token_id
        prefix = bos if bos is not None else graph.manifest.eos_token_ids[0]
        return [prefix], graph.tokenizer.encode(continuation, add_special_tokens=False)
    return ctx, whole[len(ctx) :]


def _ids(graph: Graph, prompt: Prompt, field: str) -> list[int]:
    try:
        return graph.encode_prompt(prompt)
    except ConfigError as e:
        raise ConfigError(field, prompt, e.reason) from None
