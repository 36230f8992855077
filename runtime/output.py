"""What the tokens of one sequence turn into: the result types (:class:`Step`, :class:`Usage`,
:class:`TokenLogprob`, :class:`Completion`) and :class:`TurnOutput`, which turns each chosen token into text,
stops (stop tokens, stop strings, the length limit) and logprobs.

Used by the Generator (one sequence) and by batched generation (one per row); choosing the tokens is
``choice.TokenChooser``'s, the loop state (KV cache, token buffer, flows) the Generator's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from .config import GenerationConfig
from .sampling import log_softmax, top_logprobs
from .tokenizer import TextStream

if TYPE_CHECKING:
    from .graph import Graph


@dataclass(frozen=True)
class Step:
    """One generated token: its id, the new text it completes (``""`` while held back), the model's
    log-probability (when asked for), and ``finish_reason`` (``"stop"``/``"length"`` on the last step)."""

    token_id: int
    text: str
    logprob: float | None = None
    finish_reason: str | None = None
    top_logprobs: tuple[tuple[int, float], ...] | None = None


@dataclass
class Usage:
    """Token counts and timings of a Generator (summed over its turns)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    time_to_first_token: float | None = None
    router_seconds: float = 0.0  # time spent choosing tokens (router + text), included in the above
    draft_proposed: int = 0  # speculative decoding: draft tokens proposed
    draft_accepted: int = 0  # ... and accepted by the target
    flow_steps: int = 0  # guidance/contrast: steps routed with a second flow configured
    flow_skipped: int = 0  # ... of which the gate used the first flow alone (the second flow not run)
    flow_runs: int = 0  # graph runs of the second flow (its prefill and catch-up chunks included)
    beam_rows_copied: int = 0  # beam search: KV-cache rows copied to reorder hypotheses
    cached_tokens: int = 0  # prompt positions taken from a cache (the engine's slots, the prefix cache), not computed

    def record(self, tokens: int, start: float, now: float, turn_start: float) -> None:
        """Count ``tokens`` produced by a step that ran from ``start`` to ``now`` (``perf_counter`` times): the
        first token of a generator's first turn sets ``time_to_first_token`` (measured from ``turn_start``, prefill
        included); every later step's time is decode time. Single, speculative and batched generation all count
        through here, so the figures mean the same in every path."""
        if self.completion_tokens == 0 and self.time_to_first_token is None:
            self.time_to_first_token = now - turn_start
        else:
            self.decode_seconds += now - start
        self.completion_tokens += tokens

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed draft tokens (0 without speculative decoding)."""
        return self.draft_accepted / self.draft_proposed if self.draft_proposed else 0.0

    @property
    def gated_share(self) -> float:
        """The share of guidance/contrast steps the gate ran on the first flow alone (0 without a gate)."""
        return self.flow_skipped / self.flow_steps if self.flow_steps else 0.0

    @property
    def tokens_per_second(self) -> float:
        """Decode speed: completion tokens after the first per second of decoding."""
        n = self.completion_tokens - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else 0.0

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "time_to_first_token": self.time_to_first_token,
            "prefill_seconds": self.prefill_seconds,
            "decode_seconds": self.decode_seconds,
            "tokens_per_second": self.tokens_per_second,
            "router_seconds": self.router_seconds,
            "draft_proposed": self.draft_proposed,
            "draft_accepted": self.draft_accepted,
            "flow_steps": self.flow_steps,
            "flow_skipped": self.flow_skipped,
            "flow_runs": self.flow_runs,
            "beam_rows_copied": self.beam_rows_copied,
        }


@dataclass(frozen=True)
class TokenLogprob:
    """The model's log-probability of a chosen token, and of the most likely alternatives when asked for."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Hypothesis:
    """One of the best finished hypotheses of a beam search, with its length-penalised score."""

    text: str
    token_ids: list[int]
    finish_reason: str
    score: float | None


@dataclass(frozen=True)
class TokenScore:
    """One scored token: its log-probability given everything before it, whether it is the most likely token
    there (``greedy``), and the ``top`` most likely tokens there with theirs (most likely first; the same floats
    as ``logprob`` where the token is among them)."""

    token_id: int
    logprob: float
    greedy: bool
    top: tuple[tuple[int, float], ...] = ()


#: the most logits one scoring run keeps (rows x kept positions x vocabulary: 64 MB of float32): scoring's batches
#: (``edgeroute.scoring``, ``scoring_rows``) and a scored prompt's prefill chunks in the engine
LOGIT_VALUES = 2**24


def token_scores(rows: np.ndarray, targets: Sequence[int], top: int) -> list[TokenScore]:
    """The score of each of ``targets`` from its row of raw logits (``rows`` ``[n, vocabulary]``) in one vectorised
    pass: the log-softmax normaliser summed in float64, ``greedy`` when the target's logit is the row's largest,
    the ``top`` most likely alternatives (ties in ``top_logprobs``' order)."""
    n = np.arange(len(rows))
    best = rows.argmax(axis=1) if top == 1 else None  # the top alternative itself (the first of tied ids)
    m = rows[n, best] if best is not None else rows.max(axis=1)
    shifted = np.subtract(rows, m[:, None])
    np.exp(shifted, out=shifted)
    norm = m.astype(np.float64) + np.log(shifted.sum(axis=1, dtype=np.float64))
    t = np.asarray(targets, dtype=np.int64)
    picked = rows[n, t]
    values = picked.astype(np.float64) - norm
    out = []
    width = rows.shape[1]
    for i in range(len(t)):
        alternatives: tuple[tuple[int, float], ...] = ()
        if best is not None:
            alternatives = ((int(best[i]), float(m[i] - norm[i])),)
        elif top > 0:  # top_logprobs' choice on the raw row (the same order as its log-probabilities')
            part = np.argpartition(rows[i], width - top)[width - top :]
            part = part[np.argsort(-rows[i, part], kind="stable")]
            alternatives = tuple((int(j), float(rows[i, j] - norm[i])) for j in part)
        out.append(TokenScore(int(t[i]), float(values[i]), bool(picked[i] == m[i]), alternatives))
    return out


@dataclass
class Completion:
    """A finished generation: ``text`` (stop strings removed), ``token_ids`` (stop tokens excluded),
    ``finish_reason`` (``"stop"`` or ``"length"``), ``usage``, and ``logprobs`` when asked for. Beam search adds
    ``score`` (transformers' ``sequences_scores``) and ``sequences``, the ``num_return_sequences`` best, this one
    first. ``prompt_logprobs`` (``GenerationConfig.prompt_logprobs``): each prompt token after the first that the
    turn fed, scored from the raw logits of the prefill itself."""

    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    logprobs: list[TokenLogprob] | None = None
    score: float | None = None
    sequences: tuple[Hypothesis, ...] | None = None
    prompt_logprobs: list[TokenScore] | None = None


@dataclass
class _Turn:
    """Per-turn output state of one sequence: what was generated since the last ``append``."""

    stream: TextStream
    generated: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    held: str = ""  # the text's longest end that begins a stop string: not emitted while it may still match
    state: int = 0  # the stop-string automaton's state after the text (its depth is len(held))
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stopped_on_token: bool = False
    prompt_scores: list[TokenScore] = field(default_factory=list)


class TurnOutput:
    """Turns the chosen tokens of one sequence into text, stops and logprobs, turn by turn (a turn is what was
    generated since the last ``append``)."""

    def __init__(self, model: Graph, config: GenerationConfig) -> None:
        self.model = model
        self.config = config
        self.stop_ids = stop_ids(model, config)
        self.stops = config.stop
        self._matcher = _stop_matcher(self.stops) if self.stops else None
        self.turn = _Turn(model.tokenizer.stream())

    def new_turn(self) -> None:
        self.turn = _Turn(self.model.tokenizer.stream())

    @property
    def done(self) -> bool:
        return self.turn.finish_reason is not None

    @property
    def index(self) -> int:
        """How many tokens this turn has generated: the index of the next one."""
        return len(self.turn.generated)

    def score_prompt(self, logits: np.ndarray, targets: Sequence[int]) -> None:
        """Score prompt tokens ``targets`` from the raw logits of the positions before each (one row each)."""
        self.turn.prompt_scores += token_scores(logits, targets, self.config.prompt_logprobs or 0)

    @property
    def prompt_scores(self) -> list[TokenScore]:
        """The prompt tokens scored so far (token ``i + 1``'s at index ``i``)."""
        return self.turn.prompt_scores

    def reuse_prompt_scores(self, scores: Sequence[TokenScore]) -> None:
        """The scores of the prompt's first tokens, computed before for the same tokens (the prefix cache's): the
        prefill scores the tokens after them."""
        self.turn.prompt_scores = list(scores)

    def take(self, token: int, raw: np.ndarray) -> Step:
        """Account for the chosen ``token``; ``raw`` (the model's own logits at its position) gives its logprob."""
        lp = self._logprob(raw, token) if self.config.want_logprobs else None
        return self._accept(token, lp)

    def _logprob(self, logits: np.ndarray, token: int) -> TokenLogprob:
        logp = log_softmax(logits)
        return TokenLogprob(int(token), float(logp[token]), top_logprobs(logp, self.config.top_logprobs))

    def _accept(self, token: int, lp: TokenLogprob | None) -> Step:
        t = self.turn
        t.generated.append(token)
        if lp is not None:
            t.logprobs.append(lp)
        finish = None
        if token in self.stop_ids:
            text, finish, t.stopped_on_token = t.held, "stop", True
            t.held, t.state = "", 0
        else:
            text, finish = self._text(t.stream.push(token))
        if finish is None and len(t.generated) >= self.config.max_new_tokens:
            text, finish = text + t.held, "length"
            t.held, t.state = "", 0
        if finish is not None and (t.stopped_on_token or finish == "length"):
            text += self._unflushed(text)
        t.text.append(text)
        t.finish_reason = finish
        return Step(token, text, lp.logprob if lp else None, finish, lp.top if lp and lp.top else None)

    def _unflushed(self, last: str) -> str:
        """At the end of a turn: what one-shot decoding has beyond the streamed text, except an incomplete UTF-8
        character at the very end (a length cut-off inside it), which ``decode`` renders as U+FFFD and the text
        leaves out: text is never emitted as U+FFFD (the token ids are all in ``token_ids``)."""
        t = self.turn
        ids = t.generated[:-1] if t.stopped_on_token else t.generated
        full = self.model.tokenizer.decode(ids)
        streamed = "".join(t.text) + last
        return full[len(streamed) :].rstrip("\ufffd") if full.startswith(streamed) else ""

    def _text(self, piece: str) -> tuple[str, str | None]:
        """Emit what can no longer be part of a stop string; detect a completed stop string (the text ends where
        the earliest-starting one begins). Linear: only the new piece goes through the automaton."""
        t = self.turn
        m = self._matcher
        if m is None:
            return piece, None
        buf = t.held + piece
        state, at = m.feed(t.state, piece, len(t.held))
        if at >= 0:
            t.held, t.state = "", 0
            return buf[:at], "stop"
        cut = len(buf) - m.depth[state]  # what follows ``cut`` begins a stop string: held back
        t.held, t.state = buf[cut:], state
        return buf[:cut], None

    def completion(self, usage: Usage) -> Completion:
        t = self.turn
        ids = t.generated[:-1] if t.stopped_on_token else list(t.generated)
        return Completion(
            text="".join(t.text),
            token_ids=ids,
            finish_reason=t.finish_reason or "length",
            usage=usage,
            logprobs=list(t.logprobs) if self.config.want_logprobs else None,
            prompt_logprobs=list(t.prompt_scores) if self.config.prompt_logprobs is not None else None,
        )

    def replay(self, ids: Sequence[int]) -> None:
        """Rebuild the turn as if only ``ids`` had been generated (after a rewind). None of them finished the
        turn: a finish only ever happens on the last token, and a rewind removes at least that one."""
        logprobs = self.turn.logprobs[: len(ids)]
        self.new_turn()
        for tok in ids:
            self._accept(int(tok), None)
        self.turn.logprobs = logprobs
        self.turn.finish_reason = None


class _StopMatcher:
    """An Aho–Corasick automaton over the stop strings: built in time and memory linear in their total length;
    feeding it text costs amortised O(1) per character. A state is a trie node, the longest end of the text fed so
    far that begins a stop string (``depth[state]`` its length: what to hold back); ``match[state]`` is the length
    of the longest stop string that ends the text there (0 if none)."""

    def __init__(self, stops: Sequence[str]) -> None:
        goto: dict[int, int] = {}  # state << 21 | code point (< 2**21) -> next state
        depth, parent, code, final = [0], [0], [0], [False]
        for s in stops:
            node = 0
            for ch in s:
                key = node << 21 | ord(ch)
                nxt = goto.get(key)
                if nxt is None:
                    nxt = goto[key] = len(depth)
                    depth.append(depth[node] + 1)
                    parent.append(node)
                    code.append(ord(ch))
                    final.append(False)
                node = nxt
            final[node] = True
        levels: list[list[int]] = [[] for _ in range(max(depth) + 1)]
        for v in range(1, len(depth)):
            levels[depth[v]].append(v)
        fail, match = [0] * len(depth), [0] * len(depth)
        for level in levels[1:]:  # breadth first: a state's fail link is shallower, so already known
            for v in level:
                u, c = parent[v], code[v]
                f = fail[u]
                while f and (f << 21 | c) not in goto:
                    f = fail[f]
                fail[v] = goto.get(f << 21 | c, 0) if u else 0
                match[v] = depth[v] if final[v] else match[fail[v]]
        self.goto, self.fail, self.depth, self.match = goto, fail, depth, match

    def feed(self, state: int, text: str, offset: int) -> tuple[int, int]:
        """Feed ``text`` from ``state`` (``offset``: where ``text`` starts in the caller's buffer, after the held
        text ``state`` stands for). Returns the new state and the start (in the buffer) of the earliest-starting
        stop string found, or -1. Once one is found, feeding goes on only while a stop string under way may still
        start before it."""
        goto, fail, depth, match = self.goto, self.fail, self.depth, self.match
        best = -1
        for e, ch in enumerate(text, offset):
            c = ord(ch)
            while (nxt := goto.get(state << 21 | c)) is None and state:
                state = fail[state]
            state = nxt or 0
            if match[state] and (best < 0 or e - match[state] + 1 < best):
                best = e - match[state] + 1
            if best >= 0 and e - depth[state] + 1 >= best:
                break
        return state, best


@lru_cache(maxsize=16)
def _stop_matcher(stops: tuple[str, ...]) -> _StopMatcher:
    """The automaton of a stop list, shared by the rows of a batch and the hypotheses of a beam (it never changes:
    each turn keeps its own state)."""
    return _StopMatcher(stops)


def stop_ids(model: Graph, config: GenerationConfig) -> frozenset[int]:
    """The ids that end a turn: the model's EOS ids and the request's ``stop_token_ids``."""
    return frozenset(model.manifest.eos_token_ids) | frozenset(config.stop_token_ids)
