"""Best-path routing: beam search and n-best, with transformers' semantics (its ``_beam_search``, 4.5x).

B hypotheses share the prompt's cache (prefilled once, copied into B rows); each step scores all of them in one
graph run of B rows. Per step, as transformers does it:

1. each hypothesis' log-probabilities (log-softmax of the raw logits, float32) go through the router's processors
   for that hypothesis (logit bias, the stop tokens suppressed before ``min_new_tokens``, penalties over its own
   history), and its running score is added;
2. the best ``K = max(2, 1 + n_eos) * B`` continuations over all B x vocabulary are taken; a continuation
   *finishes* when its token is a stop token, its text now holds a stop string, or it reaches ``max_new_tokens``;
3. the best B continuations that did not finish become the next hypotheses (``cache.reorder``: only the rows
   whose parent changed are copied);
4. continuations that finished among the first B ranks enter the finished set with the score
   ``sum log p / generated_length ** length_penalty`` (the finishing token counted), which keeps its best B;
5. the search ends when no open hypothesis can still beat the worst finished one (``early_stopping=False``: the
   best open score at the current length; ``"never"`` with a positive length penalty: at ``max_new_tokens``),
   when B finished with ``early_stopping=True``, or when every continuation finished.

The result is the best finished hypothesis (``Completion``), with the ``num_return_sequences`` best as
``Completion.sequences`` and their scores (transformers' ``sequences_scores``). Scores are float32, as there.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from .errors import ConfigError
from .kv_cache import KVCache, SharedKVCache
from .output import Completion, Hypothesis, TurnOutput, Usage, stop_ids
from .sampling import log_softmax, make_chain

if TYPE_CHECKING:
    from .config import GenerationConfig
    from .graph import Graph

_NEG = np.float32(-1.0e9)  # transformers' "impossible" score, added in float32 as there


def _topk(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values, largest first (ties: the lower index first)."""
    if k < len(x):
        part = np.argpartition(-x, k - 1)[:k]
        return part[np.lexsort((part, -x[part]))]
    return np.lexsort((np.arange(len(x)), -x))


def beam_search(model: Graph, prompt: list[int], config: GenerationConfig) -> Completion:
    """Beam search over ``prompt`` (token ids) with ``config.num_beams`` hypotheses (module docstring)."""
    if not prompt:
        raise ConfigError("prompt", [], "needs at least one token")
    b, n_ret = config.num_beams, config.num_return_sequences
    vocab = model.vocab_size
    p_len, max_new = len(prompt), config.max_new_tokens
    max_len = p_len + max_new
    if max_len > model.context_length:
        from .errors import ContextOverflowError

        raise ContextOverflowError(max_len, model.context_length, "prompt + max_new_tokens")
    lp_pow, early = float(config.length_penalty), config.early_stopping
    stops = stop_ids(model, config)
    eos = np.array(sorted(stops), dtype=np.int64)
    keep = max(2, 1 + len(eos)) * b
    router = make_chain(
        config.sampling,
        vocab,
        model.special_ids,
        model.undecodable_ids,
        suppress_ids=stops,
        suppress_until=config.min_new_tokens,
    )
    tok = model.tokenizer
    usage = Usage(prompt_tokens=p_len)
    t0 = time.perf_counter()

    fill = int(eos[0]) if len(eos) else 0
    running = np.full((b, max_len), fill, dtype=np.int64)
    running[:, :p_len] = prompt
    running_scores = np.zeros(b, dtype=np.float32)
    running_scores[1:] = _NEG
    finished = running.copy()
    fin_scores = np.full(b, _NEG, dtype=np.float32)
    fin_len = np.zeros(b, dtype=np.int64)
    fin_done = np.zeros(b, dtype=bool)
    unsatisfied = True
    top_b = np.arange(keep) < b

    cache = model.new_cache(b, adapter=config.adapter)  # every hypothesis on the request's adapter
    assert isinstance(cache, (KVCache, SharedKVCache))
    first = cache.row(0) if isinstance(cache, SharedKVCache) else model.new_cache(1, adapter=config.adapter)
    assert isinstance(first, (KVCache, SharedKVCache))
    logits0 = None
    for s in range(0, p_len, config.prefill_chunk):
        logits0 = first.run(model.session, np.array([prompt[s : s + config.prefill_chunk]]), 1)[0, -1].copy()
    assert logits0 is not None
    if isinstance(cache, SharedKVCache):
        assert isinstance(first, SharedKVCache)
        cache.lengths[0] = first.lengths[0]
    else:
        cache = first
    cache.widen(b)
    usage.prefill_seconds = time.perf_counter() - t0
    logits = np.repeat(logits0[None], b, axis=0)
    cur = p_len
    copied: int = 0
    ts = time.perf_counter()
    while True:
        index = cur - p_len
        scores = np.empty((b, vocab), dtype=np.float32)
        for i in range(b):
            lp = log_softmax(logits[i], np.float32)
            scores[i] = router.process(lp, running[i, :cur], index)
        acc = (scores + running_scores[:, None]).reshape(-1)
        best = _topk(acc, keep)
        top_lp = acc[best]
        src, ids = best // vocab, best % vocab
        cand = running[src]
        cand[:, cur] = ids
        hits = np.isin(ids, eos) | (cur + 1 >= max_len)
        if config.stop:
            for row in np.flatnonzero(~hits):
                text = tok.decode(cand[row, p_len : cur + 1].tolist())
                hits[row] = any(s in text for s in config.stop)
        # the next open hypotheses: the best B continuations that did not finish
        run_lp = top_lp + hits.astype(np.float32) * _NEG
        nxt = _topk(run_lp, b)
        running, running_scores, parents = cand[nxt], run_lp[nxt], src[nxt]
        # the finished set: what finished among the first B ranks, at its length-penalised score
        did = hits & top_b
        fin = (top_lp / np.float32((cur + 1 - p_len) ** lp_pow)).astype(np.float32)
        if early is True and fin_done.all():
            fin = fin + _NEG
        if not unsatisfied:
            fin = fin + _NEG
        fin = fin + (~did).astype(np.float32) * _NEG
        m_scores = np.concatenate([fin_scores, fin])
        sel = _topk(m_scores, b)
        finished = np.concatenate([finished, cand])[sel]
        fin_scores = m_scores[sel]
        fin_len = np.concatenate([fin_len, np.full(keep, cur + 1 - p_len)])[sel]
        fin_done = np.concatenate([fin_done, did])[sel]
        cur += 1
        # can an open hypothesis still beat the worst finished one?
        length = (max_len - p_len) if (early == "never" and lp_pow > 0) else (cur - p_len)
        best_open = running_scores[0] / np.float32(length**lp_pow)
        worst = np.where(fin_done, fin_scores.min(), _NEG)
        unsatisfied = unsatisfied and bool(np.any(best_open > worst))
        if not (unsatisfied and not (fin_done.all() and early is True) and not hits.all()):
            break
        copied += cache.reorder(parents)
        logits = model.forward(running[:, cur - 1 : cur], cache)
    usage.decode_seconds = time.perf_counter() - ts
    usage.beam_rows_copied = copied
    usage.time_to_first_token = usage.prefill_seconds
    hyps = []
    for j in range(min(n_ret, b)):
        ids_j = finished[j, p_len : p_len + int(fin_len[j])].tolist()
        hyps.append(_completion(model, config, ids_j, float(fin_scores[j]), replace(usage)))
    best_c = hyps[0]
    best_c.sequences = tuple(Hypothesis(h.text, h.token_ids, h.finish_reason, h.score) for h in hyps)
    return best_c


def _completion(model: Graph, config: GenerationConfig, ids: list[int], score: float, usage: Usage) -> Completion:
    """A finished hypothesis as the Completion a Generator would give for these tokens (stop strings cut)."""
    out = TurnOutput(model, replace(config, logprobs=False))
    dummy = np.zeros(0, dtype=np.float32)
    for t in ids:
        out.take(t, dummy)
        if out.done:
            break
    usage.completion_tokens = len(ids)
    c = out.completion(usage)
    c.score = score
    return c
