"""Scoring: how likely given tokens are, from the model's raw logits (no temperature, penalties or truncation:
the router is not involved). What log-likelihood evaluation (lm-evaluation-harness's multiple-choice tasks) and
the server's ``echo`` with ``logprobs`` ask for.

The context is fed once into one KV cache, in the graph run of the first continuation; each later continuation is
fed after it and the cache cut back to the context (a branch of one cache), so a context shared by four endings is
computed once, in as many graph runs as there are endings. Positions are fed in chunks
of :data:`CHUNK` with only their logits kept (the graph's ``logits_to_keep``), and each chunk's rows are reduced to
the scored token's log-probability, its rank-1 check and the top alternatives before the next chunk runs: a long
prompt never holds ``[positions x vocabulary]`` logits (at most ``CHUNK`` rows).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .adapters import Adapter
from .errors import ConfigError
from .graph import Graph, Prompt
from .kv_cache import Cache
from .output import LOGIT_VALUES, TokenScore, token_scores
from .scoring_rows import Group, ragged, score_groups

CHUNK = 64  # positions per graph run while scoring: 64 x 49,152 float32 logits (SmolLM2) are 12.6 MB
MAX_TOP = 20  # alternatives per position, as OpenAI's logprobs allow
# score_items on graphs without query_seqlens (older exports; scoring_rows runs the others): an item whose context
# is at most SHORT_CONTEXT tokens and whose rows (context + continuation, less
# its last token) are at most SHORT_ROW runs its continuations as rows of batches; a batch holds at most
# ROW_POSITIONS positions (rows x the longest row) and keeps at most LOGIT_VALUES logits (rows x kept positions x
# vocabulary: 2**24 float32 are 64 MB). Rows compute the context once per continuation, which pays while it costs
# less than the runs it saves (a run's fixed cost is ~22 positions' worth for SmolLM2 fp32 on 2 cores): measured,
# four-choice items score faster as rows up to ~30 context tokens and faster with the context shared beyond
SHORT_CONTEXT = 32
SHORT_ROW = 128
ROW_POSITIONS = 256


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


def score(
    graph: Graph, context: Prompt, continuations: Sequence[Prompt], top: int = 0, adapter: str | None = None
) -> list[Score]:
    """Score each continuation given ``context`` (text or token ids; a continuation likewise).

    Text is split as lm-evaluation-harness splits it: the context's trailing spaces move to the continuation, the
    pair is encoded whole and the continuation's tokens are what follows the context's own encoding (a word is
    tokenised as it would be in running text). Token ids are used as given (no BOS added). ``top``: how many most
    likely alternatives each position reports (0 to 20). ``adapter``: a loaded LoRA adapter's name (None: the base).
    """
    if ragged(graph):  # one item of score_items: its context computed once, its continuations as rows after it
        return score_items(graph, [(context, continuations)], top, adapter=adapter)[0]
    _check_top(top)
    lora = graph.adapter(adapter)
    pairs = [_pair(graph, context, c) for c in _continuations(continuations)]
    if not _one_context(pairs):  # a text context can encode differently before each ending
        return [score_ids(graph, ctx, [cont], top, lora)[0] for ctx, cont in pairs]
    return score_ids(graph, pairs[0][0], [cont for _, cont in pairs], top, lora)


def score_items(
    graph: Graph,
    items: Sequence[tuple[Prompt, Sequence[Prompt]]],
    top: int = 0,
    progress: Callable[[int], None] | None = None,
    adapter: str | None = None,
) -> list[list[Score]]:
    """:func:`score` for many ``(context, continuations)`` items (an evaluation's), the same scores faster.

    A graph run has a fixed cost (its weights are read once per run: ~13 ms of SmolLM2 fp32 on 2 cores) besides
    its per-position cost, so short items do not score one continuation per run: each continuation becomes a row
    (its context and itself, less its last token), rows of similar length (sorted) run together as one batch with
    no past, padded at the end (causal attention: the padding changes no scored position), each batch bounded by
    :data:`ROW_POSITIONS` positions and :data:`LOGIT_VALUES` kept logits. A context is computed once per row then:
    an item whose context is longer than :data:`SHORT_CONTEXT` (or a row longer than :data:`SHORT_ROW`) is scored
    by :func:`score` (its context once, shared).
    ``progress(n)`` is told each time ``n`` more items are done. Scores equal :func:`score`'s (tested to 1e-5)."""
    _check_top(top)
    lora = graph.adapter(adapter)
    pairs = [[_pair(graph, ctx, c) for c in _continuations(conts)] for ctx, conts in items]
    for item in pairs:
        for ctx, cont in item:
            _check_pairs(graph, ctx, [cont])
    if ragged(graph):
        return _score_ragged(graph, pairs, top, lora, progress)
    out: list[list[Score | None]] = [[None] * len(p) for p in pairs]
    rows = []
    for i, item in enumerate(pairs):
        if all(len(ctx) <= SHORT_CONTEXT and len(ctx) + len(cont) - 1 <= SHORT_ROW for ctx, cont in item):
            rows += [(len(ctx) + len(cont) - 1, len(ctx) - 1, i, j) for j, (ctx, cont) in enumerate(item)]
        else:
            out[i] = (
                list(score_ids(graph, item[0][0], [c for _, c in item], top, lora))
                if _one_context(item)
                else [score_ids(graph, ctx, [cont], top, lora)[0] for ctx, cont in item]
            )
            _done(progress, 1)
    left = [0] * len(pairs)
    for _, _, i, _ in rows:
        left[i] += 1
    rows.sort()  # by length: similar rows share a batch (little padding)
    start = 0
    while start < len(rows):
        end, width, first = start + 1, rows[start][0], rows[start][1]
        while end < len(rows):  # the batch grows while it fits its budgets
            w, f = max(width, rows[end][0]), min(first, rows[end][1])
            count = end - start + 1
            if count * w > ROW_POSITIONS or count * (w - f) * graph.vocab_size > LOGIT_VALUES:
                break
            end, width, first = end + 1, w, f
        batch = rows[start:end]
        ids = np.zeros((len(batch), width), dtype=np.int64)  # padded at the end
        for r, (n, _, i, j) in enumerate(batch):
            ctx, cont = pairs[i][j]
            ids[r, :n] = [*ctx, *cont[:-1]]
        keep = width - first  # logits from the earliest scored position of the batch on
        logits = graph.forward_last(ids, graph.new_cache(len(batch), width, lora), keep)
        finished = 0
        for r, (_, f, i, j) in enumerate(batch):
            at = f - first  # the kept row of this row's first scored position
            cont = pairs[i][j][1]
            out[i][j] = Score(tuple(_token_scores(logits[r, at : at + len(cont)], cont, top)))
            left[i] -= 1
            finished += left[i] == 0
        _done(progress, finished)
        start = end
    return [[s for s in item if s is not None] for item in out]


def _score_ragged(
    graph: Graph,
    pairs: list[list[tuple[list[int], list[int]]]],
    top: int,
    adapter: Adapter | None,
    progress: Callable[[int], None] | None,
) -> list[list[Score]]:
    """Every item's continuations as rows after their context computed once, in batched runs
    (``scoring_rows``: graphs with ``query_seqlens``)."""
    groups = []
    for i, item in enumerate(pairs):
        # a text context can encode differently before each ending: then each is a group of its own
        shared = [list(range(len(item)))] if _one_context(item) else [[j] for j in range(len(item))]
        for js in shared:
            ctx = item[js[0]][0]
            groups.append(Group(ctx[:-1], ctx[-1], [item[j][1] for j in js], [(i, j) for j in js]))
    out: list[list[Score | None]] = [[None] * len(p) for p in pairs]
    left = [len(p) for p in pairs]

    def done(slots: list[tuple[int, int]], scores: list[list[TokenScore]]) -> None:
        finished = 0
        for (i, j), tokens in zip(slots, scores, strict=True):
            out[i][j] = Score(tuple(tokens))
            left[i] -= 1
            finished += left[i] == 0
        _done(progress, finished)

    score_groups(graph, groups, top, adapter, done)
    return [[s for s in item if s is not None] for item in out]


def _done(progress: Callable[[int], None] | None, n: int) -> None:
    if progress is not None and n:
        progress(n)


def _one_context(item: list[tuple[list[int], list[int]]]) -> bool:
    return all(ctx == item[0][0] for ctx, _ in item)


def _check_top(top: int) -> None:
    if not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= MAX_TOP:
        raise ConfigError("top", top, f"must be an integer in [0, {MAX_TOP}]")


def _continuations(continuations: Sequence[Prompt]) -> Sequence[Prompt]:
    if isinstance(continuations, (str, bytes)) or not isinstance(continuations, Sequence) or not continuations:
        raise ConfigError("continuations", continuations, "must be a non-empty list of texts or token-id lists")
    return continuations


def score_ids(
    graph: Graph,
    context: Sequence[int],
    continuations: Sequence[Sequence[int]],
    top: int = 0,
    adapter: str | Adapter | None = None,
) -> list[Score]:
    """:func:`score` on token ids: ``context`` (at least one token) fed once, each continuation after it."""
    ctx = [int(i) for i in context]
    _check_pairs(graph, ctx, continuations)
    cache = graph.new_cache(1, adapter=adapter)
    base = len(ctx) - 1  # the context but its last token, whose logits score a continuation's first token
    out = []
    for k, cont in enumerate(continuations):
        ids = [int(i) for i in cont]
        prefix = ctx[:-1] if k == 0 else []  # fed with the first continuation: one graph run fewer
        out.append(Score(tuple(_scored(graph, cache, prefix, [ctx[-1], *ids[:-1]], ids, top))))
        cache.trim(cache.length - base)
    return out


def prompt_scores(graph: Graph, ids: Sequence[int], top: int = 0, adapter: str | None = None) -> list[TokenScore]:
    """Each token of a prompt after the first, scored given the tokens before it (the server's ``echo`` with
    ``logprobs``: the first token has no score)."""
    if len(ids) < 2:
        return []
    return list(score_ids(graph, ids[:1], [ids[1:]], top, adapter)[0].tokens)


def _scored(
    graph: Graph, cache: Cache, prefix: list[int], feed: list[int], targets: list[int], top: int
) -> list[TokenScore]:
    """Feed ``prefix`` (not scored) then ``feed``, whose positions score ``targets``, in chunks of :data:`CHUNK`
    positions: each run keeps only the logits of its scored positions."""
    seq, n = prefix + feed, len(prefix)
    out: list[TokenScore] = []
    for start in range(0, len(seq), CHUNK):
        chunk = seq[start : start + CHUNK]
        first, end = max(start, n), start + len(chunk)  # the chunk's scored positions: first .. end - 1
        keep = end - first
        logits = graph.forward_last(np.asarray([chunk], dtype=np.int64), cache, max(keep, 1))[0]
        if keep > 0:
            out += _token_scores(logits[-keep:], targets[first - n : end - n], top)
    return out


def _token_scores(rows: np.ndarray, targets: Sequence[int], top: int) -> list[TokenScore]:
    vocab = rows.shape[-1]
    outside = [t for t in targets if not 0 <= t < vocab]
    if outside:
        raise ConfigError("continuations", outside[0], f"is not a token id of this model's vocabulary ({vocab})")
    return token_scores(rows, targets, top)


def _check_pairs(graph: Graph, context: Sequence[int], continuations: Sequence[Sequence[int]]) -> None:
    """A context of at least one token and continuations of at least one token each, each pair within the model's
    context."""
    if not len(context):
        raise ConfigError("context", context, "must give at least one token (a BOS token for an empty context)")
    for cont in continuations:
        if not len(cont):
            raise ConfigError("continuations", cont, "each continuation must give at least one token")
        _check_room(graph, len(context) + len(cont) - 1)


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
        ids = graph.encode_prompt(prompt)
    except ConfigError as e:
        raise ConfigError(field, prompt, e.reason) from None
    outside = [i for i in ids if not 0 <= i < graph.vocab_size]
    if outside:  # before any graph run (fed, it would be onnxruntime's error)
        raise ConfigError(field, outside[0], f"is not a token id of this model's vocabulary ({graph.vocab_size})")
    return ids
