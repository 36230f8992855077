"""Frozen, validated request settings: :class:`SamplingConfig` (the router) and :class:`GenerationConfig`.

Invalid values raise :class:`~edgeroute.errors.ConfigError` naming the field when the config is built, never
mid-generation. Nothing is silently clamped. Semantics follow HF/vLLM/OpenAI so that ``temperature`` and
``top_p`` mean what OpenAI clients expect.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .constraint import Constraint
from .errors import ConfigError

SCHEDULES = ("constant", "linear", "exponential")
# Ranges that keep every float32 step of the router finite for finite logits (docs/router.md): a temperature
# below 1e-3 (or above 1e3) or a repetition penalty outside [0.01, 100] would scale logits past float32, a bias
# beyond OpenAI's +-100 adds nothing a ban or +100 does not already do.
TEMPERATURE_RANGE = (1e-3, 1e3)
REPETITION_RANGE = (0.01, 100.0)
BIAS_LIMIT = 100.0
# Stop strings: OpenAI takes up to 4, vLLM any number; real ones are short ("\n\n", "</s>", "User:"). Matching is
# linear in their total length (an Aho-Corasick automaton, held text at most the longest one), and these bounds keep
# each request's share small: at most 16 000 automaton states, 1 000 characters held back.
MAX_STOPS = 16
MAX_STOP_CHARS = 1000


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """A finite int or float, not a bool (the configs' test for a number; the manifest and requests use it too)."""
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _plain(v: Any) -> Any:
    """NumPy scalars as the Python numbers they hold (``np.float32(0.7)`` -> 0.7, ``np.int64(5)`` -> 5); NumPy
    booleans stay what they are (and are refused where a number is asked for)."""
    if isinstance(v, (np.integer, np.floating)):
        return v.item()
    return v


def _plain_fields(obj: Any, names: tuple[str, ...]) -> None:
    for name in names:
        object.__setattr__(obj, name, _plain(getattr(obj, name)))


def _check(cond: bool, name: str, value: Any, reason: str) -> None:
    if not cond:
        raise ConfigError(name, value, reason)


@dataclass(frozen=True)
class SamplingConfig:
    """How the router picks each token. Applied in this fixed order (docs/router.md, "The router"):

    logit_bias -> penalties -> temperature -> top_k -> top_p -> min_p -> typical_p -> exploration mix -> draw.

    Args:
        temperature: divides the logits; ``0`` means greedy (argmax after bias and penalties), the only greedy switch;
            otherwise in [0.001, 1000].
        top_k: keep the k most likely tokens; ``0`` = off.
        top_p: nucleus: keep the smallest set whose probability reaches top_p; in (0, 1], ``1`` = off.
        min_p: drop tokens with probability below ``min_p * p_max``; in [0, 1), ``0`` = off.
        typical_p: locally typical sampling mass; in (0, 1], ``1`` = off.
        min_keep: every truncation keeps at least this many candidates (>= 1).
        repetition_penalty: HF multiplicative penalty (>1 discourages repeats), in [0.01, 100]; ``1`` = off.
        presence_penalty: OpenAI additive penalty per token that occurred; in [-2, 2], ``0`` = off.
        frequency_penalty: OpenAI additive penalty times the token's count; in [-2, 2], ``0`` = off.
        penalty_last_n: the penalties look at the last n tokens of the sequence (prompt included);
            ``-1`` = the whole sequence, ``0`` disables the penalties.
        logit_bias: token id -> additive bias on the raw logits, in [-100, 100] (OpenAI's range); ``-inf`` bans the
            token (control codes). Ids must lie inside the model's vocabulary (checked when the router is built).
        explore: q, the weight of the uniform distribution in ``p' = q*uniform + (1-q)*p`` over the allowed
            vocabulary (banned and special tokens excluded); in [0, 1], ``0`` = off.
        explore_end: the value q moves to by the schedule (defaults to ``explore``).
        explore_steps: number of generated steps over which q moves from ``explore`` to ``explore_end``.
        explore_schedule: ``constant``, ``linear`` or ``exponential`` (geometric; needs both ends > 0).
        seed: seed of the request's own ``numpy.random.Generator``; same seed, same tokens. None = fresh entropy.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    min_keep: int = 1
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_last_n: int = 64
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    explore: float = 0.0
    explore_end: float | None = None
    explore_steps: int = 0
    explore_schedule: str = "constant"
    seed: int | None = None

    def __post_init__(self) -> None:
        _plain_fields(self, _SAMPLING_NUMBERS)
        t = self.temperature
        lo, hi = TEMPERATURE_RANGE
        _check(
            is_number(t) and (t == 0 or lo <= t <= hi), "temperature", t, f"must be 0 (greedy) or in [{lo:g}, {hi:g}]"
        )
        _check(_is_int(self.top_k) and self.top_k >= 0, "top_k", self.top_k, "must be an integer >= 0 (0 = off)")
        _check(is_number(self.top_p) and 0 < self.top_p <= 1, "top_p", self.top_p, "must be in (0, 1] (1 = off)")
        _check(is_number(self.min_p) and 0 <= self.min_p < 1, "min_p", self.min_p, "must be in [0, 1) (0 = off)")
        _check(
            is_number(self.typical_p) and 0 < self.typical_p <= 1,
            "typical_p",
            self.typical_p,
            "must be in (0, 1] (1 = off)",
        )
        _check(_is_int(self.min_keep) and self.min_keep >= 1, "min_keep", self.min_keep, "must be an integer >= 1")
        lo, hi = REPETITION_RANGE
        r = self.repetition_penalty
        _check(is_number(r) and lo <= r <= hi, "repetition_penalty", r, f"must be in [{lo:g}, {hi:g}] (1 = off)")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            _check(is_number(v) and -2 <= v <= 2, name, v, "must be in [-2, 2] (0 = off)")
        _check(
            _is_int(self.penalty_last_n) and self.penalty_last_n >= -1,
            "penalty_last_n",
            self.penalty_last_n,
            "must be an integer >= -1 (-1 = whole sequence, 0 = off)",
        )
        _check(isinstance(self.logit_bias, Mapping), "logit_bias", self.logit_bias, "must be a mapping id -> bias")
        bias: dict[int, float] = {}
        for k, v in self.logit_bias.items():
            k, v = _plain(k), _plain(v)
            _check(_is_int(k) and k >= 0, "logit_bias", {k: v}, "token ids must be integers >= 0")
            ok = v == -math.inf or (is_number(v) and -BIAS_LIMIT <= v <= BIAS_LIMIT)
            _check(ok, "logit_bias", {k: v}, f"bias must be in [-{BIAS_LIMIT:g}, {BIAS_LIMIT:g}] or -inf (ban)")
            bias[int(k)] = float(v)
        object.__setattr__(self, "logit_bias", _FrozenDict(bias))
        _check(is_number(self.explore) and 0 <= self.explore <= 1, "explore", self.explore, "must be in [0, 1]")
        if self.explore_end is not None:
            e = self.explore_end
            _check(is_number(e) and 0 <= e <= 1, "explore_end", e, "must be in [0, 1]")
        _check(
            _is_int(self.explore_steps) and self.explore_steps >= 0,
            "explore_steps",
            self.explore_steps,
            "must be an integer >= 0",
        )
        s = self.explore_schedule
        _check(s in SCHEDULES, "explore_schedule", s, f"must be one of {', '.join(SCHEDULES)}")
        if s != "constant":
            _check(self.explore_steps > 0, "explore_steps", self.explore_steps, f"must be > 0 for a {s} schedule")
            _check(self.explore_end is not None, "explore_end", None, f"is needed for a {s} schedule")
        if s == "exponential":
            ends = (self.explore, self.explore_end)
            _check(
                all(x is not None and x > 0 for x in ends),
                "explore_schedule",
                s,
                "exponential needs explore > 0 and explore_end > 0 (use linear to reach 0)",
            )
        if self.seed is not None:
            _check(_is_int(self.seed) and self.seed >= 0, "seed", self.seed, "must be an integer >= 0 or None")

    @property
    def greedy(self) -> bool:
        """True when the draw is argmax (``temperature == 0``)."""
        return self.temperature == 0

    def explore_at(self, step: int) -> float:
        """The exploration weight q at generated step ``step`` (0-based) under the schedule."""
        q0 = self.explore
        q1 = q0 if self.explore_end is None else self.explore_end
        if self.explore_schedule == "constant" or self.explore_steps == 0:
            return q0
        frac = min(step / self.explore_steps, 1.0)
        if self.explore_schedule == "linear":
            return q0 + (q1 - q0) * frac
        return q0 * (q1 / q0) ** frac

    def replace(self, **changes: Any) -> SamplingConfig:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)


@dataclass(frozen=True)
class GenerationConfig:
    """One request: how long, when to stop, what to report, and the router settings.

    Args:
        max_new_tokens: the most tokens generated after each ``append`` (a modest default, never the context).
        min_new_tokens: stop tokens (EOS and ``stop_token_ids``) are suppressed until this many were generated.
        stop: strings that end generation; they never appear in the output text. At most ``MAX_STOPS`` (16) of at
            most ``MAX_STOP_CHARS`` (1,000) characters each: OpenAI allows 4, vLLM any number; the bounds are
            generous for real stop strings and keep a request's matching state (an automaton with a state per
            character, the text held back while it may still become a stop string) small.
        stop_token_ids: token ids that end generation, in addition to the model's EOS ids (which always count).
        logprobs: report the chosen token's log-probability (``True`` or ``0``) and, when an int n > 0,
            also the n most likely alternatives. Log-probabilities are the model's own (log-softmax of the raw
            logits, OpenAI/vLLM semantics), not of the routed distribution.
        sampling: the router settings.
        prefill_chunk: the prompt is fed to the graph in chunks of at most this many tokens.
        constraint: the shape of each turn's text (:class:`~edgeroute.JsonSchema`, :class:`~edgeroute.JsonObject`,
            :class:`~edgeroute.Regex`, :class:`~edgeroute.Grammar`): every token the grammar forbids is at
            ``-inf`` in the router (docs/structured-output.md); the end of sequence only where it accepts.
        prompt_logprobs: score each prompt token after the first from the raw logits of the prefill itself (vLLM's
            ``prompt_logprobs``), with this many top alternatives (0 to 20): ``Completion.prompt_logprobs``.
            ``None`` (default): off. The prompt is then fed whole (the engine reuses no cached prefix for it: a
            reused position has no logits to score); batches of prompts and beam search do not take it.
        think_first: with a constraint, a reasoning model thinks freely in ``<think>…</think>`` first and the
            constraint applies from the token after ``</think>`` (the turn's end tokens are banned while it
            thinks: the answer must follow); ``edgeroute serve`` sets it for models whose template thinks.
            Without a constraint it changes nothing (``edgeroute.thinking``).
        num_beams: beam search with this many hypotheses (``1`` = off); transformers' semantics (docs/router.md, "Beam
            search"): it scores the model's log-probabilities, so the sampling settings (temperature other than
            0 or 1, top-k/p, min-p, typical-p, exploration) are refused with it.
        length_penalty: a finished hypothesis scores ``sum log p / length ** length_penalty``.
        early_stopping: ``False`` (stop when no open hypothesis can beat the finished ones at its current length),
            ``True`` (stop when ``num_beams`` finished) or ``"never"`` (with a positive length penalty, judge
            open hypotheses at ``max_new_tokens``).
        num_return_sequences: how many of the best finished hypotheses to return (at most ``num_beams``).
        adapter: the name of a LoRA adapter loaded on the model (``Model.load_adapter``, or listed by the model
            folder) to run this request on; None (default): the base model. Every path honours it (the engine mixes
            requests on different adapters in one batch); an adapter that is not loaded is a ``ConfigError`` when
            the request starts (docs/adapters.md).
    """

    max_new_tokens: int = 256
    min_new_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logprobs: bool | int = False
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    prefill_chunk: int = 512
    constraint: Constraint | None = None
    think_first: bool = False
    prompt_logprobs: int | None = None
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1
    adapter: str | None = None

    def __post_init__(self) -> None:
        _plain_fields(
            self,
            ("max_new_tokens", "min_new_tokens", "logprobs", "prefill_chunk", "num_beams", "length_penalty"),
        )
        m = self.max_new_tokens
        _check(_is_int(m) and m >= 1, "max_new_tokens", m, "must be an integer >= 1")
        n = self.min_new_tokens
        _check(_is_int(n) and 0 <= n <= m, "min_new_tokens", n, "must be an integer in [0, max_new_tokens]")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        _check(
            isinstance(stop, (tuple, list)) and all(isinstance(s, str) and s for s in stop),
            "stop",
            self.stop,
            "must be a sequence of non-empty strings",
        )
        _check(len(stop) <= MAX_STOPS, "stop", stop[:2], f"holds {len(stop)} strings: at most {MAX_STOPS}")
        for s in stop:
            _check(
                len(s) <= MAX_STOP_CHARS,
                "stop",
                s[:20] + "...",
                f"is {len(s)} characters long: at most {MAX_STOP_CHARS} per stop string",
            )
            _check(_valid_unicode(s), "stop", s, "is not valid Unicode (it holds a lone surrogate)")
        object.__setattr__(self, "stop", tuple(stop))
        ids = self.stop_token_ids
        if isinstance(ids, (tuple, list)):
            ids = tuple(_plain(i) for i in ids)
        _check(
            isinstance(ids, (tuple, list)) and all(_is_int(i) and i >= 0 for i in ids),
            "stop_token_ids",
            ids,
            "must be a sequence of integers >= 0",
        )
        object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in ids))
        lp = self.logprobs
        _check(
            isinstance(lp, bool) or (_is_int(lp) and 0 <= lp <= 20),
            "logprobs",
            lp,
            "must be a bool or an integer in [0, 20] (top alternatives)",
        )
        _check(isinstance(self.sampling, SamplingConfig), "sampling", self.sampling, "must be a SamplingConfig")
        c = self.prefill_chunk
        _check(_is_int(c) and c >= 1, "prefill_chunk", c, "must be an integer >= 1")
        k = self.constraint
        _check(
            k is None or isinstance(k, Constraint),
            "constraint",
            k,
            "must be a JsonSchema, JsonObject, Regex or Grammar (edgeroute's constraints)",
        )
        _check(isinstance(self.think_first, bool), "think_first", self.think_first, "must be a boolean")
        pl = _plain(self.prompt_logprobs)
        _check(
            pl is None or (_is_int(pl) and 0 <= pl <= 20),
            "prompt_logprobs",
            pl,
            "must be None or an integer in [0, 20]",
        )
        object.__setattr__(self, "prompt_logprobs", None if pl is None else int(pl))
        a = self.adapter
        _check(
            a is None or (isinstance(a, str) and 1 <= len(a) <= 128), "adapter", a, "must be an adapter's name or None"
        )
        self._check_beams()

    def _check_beams(self) -> None:
        b, n = self.num_beams, _plain(self.num_return_sequences)
        _check(_is_int(b) and b >= 1, "num_beams", b, "must be an integer >= 1 (1 = no beam search)")
        _check(_is_int(n) and 1 <= n <= b, "num_return_sequences", n, f"must be an integer in [1, num_beams={b}]")
        lp = self.length_penalty
        _check(is_number(lp), "length_penalty", lp, "must be a finite number")
        e = self.early_stopping
        _check(e in (True, False, "never"), "early_stopping", e, "must be true, false or 'never'")
        if b == 1:
            return
        s = self.sampling
        sampling = {
            "temperature": s.temperature not in (0, 1),
            "top_k": s.top_k != 0,
            "top_p": s.top_p != 1,
            "min_p": s.min_p != 0,
            "typical_p": s.typical_p != 1,
            "explore": s.explore != 0,
        }
        for name, on in sampling.items():
            _check(
                not on,
                name,
                getattr(s, name),
                "is a sampling setting: beam search scores the model's log-probabilities (transformers' num_beams"
                " with do_sample=False); leave it at its default",
            )
        _check(self.constraint is None, "constraint", self.constraint, "is not supported with num_beams > 1")
        _check(
            self.prompt_logprobs is None, "prompt_logprobs", self.prompt_logprobs, "is not supported with num_beams > 1"
        )
        _check(not self.want_logprobs, "logprobs", self.logprobs, "are not reported with num_beams > 1")

    @property
    def want_logprobs(self) -> bool:
        return self.logprobs is not False

    @property
    def top_logprobs(self) -> int:
        return 0 if isinstance(self.logprobs, bool) else int(self.logprobs)

    def replace(self, **changes: Any) -> GenerationConfig:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)


_SAMPLING_NUMBERS = (
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "typical_p",
    "min_keep",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "penalty_last_n",
    "explore",
    "explore_end",
    "explore_steps",
    "seed",
)


def _valid_unicode(text: str) -> bool:
    """False when ``text`` holds a lone surrogate (what undecodable bytes become), which no tokenizer can take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class _FrozenDict(dict[int, float]):
    """A read-only dict, so a frozen config cannot be changed through its ``logit_bias``."""

    def _ro(self, *a: Any, **k: Any) -> None:
        raise TypeError("SamplingConfig.logit_bias is read-only; use config.replace(logit_bias=...)")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _ro  # type: ignore[assignment]

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))
