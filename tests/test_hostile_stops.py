"""Stop strings from a hostile client: matching stays linear in their length (an Aho-Corasick automaton, not every
prefix of every stop string), the config bounds their count and length, and the observable behaviour (text
emitted, text held back, ``finish_reason``) is the one of the former quadratic algorithm, kept here as reference."""

from __future__ import annotations

import random
import tracemalloc
from dataclasses import dataclass, field
from types import SimpleNamespace

import edgeroute as er
import numpy as np
import pytest
from conftest import GREEDY
from edgeroute.config import MAX_STOP_CHARS, MAX_STOPS
from edgeroute.output import TurnOutput, _stop_matcher, _StopMatcher
from hypothesis import given, settings
from hypothesis import strategies as st

EOS = 0
DUMMY = np.zeros(0, dtype=np.float32)


@dataclass
class FakeTokenizer:
    """Token i (i >= 1) is the text ``pieces[i - 1]``; token 0 is the EOS (no text)."""

    pieces: list[str]

    def stream(self) -> SimpleNamespace:
        return SimpleNamespace(push=lambda token: self.pieces[token - 1] if token else "")

    def decode(self, ids: list[int]) -> str:
        return "".join(self.pieces[i - 1] for i in ids if i)


@dataclass
class FakeModel:
    tokenizer: FakeTokenizer
    manifest: SimpleNamespace = field(default_factory=lambda: SimpleNamespace(eos_token_ids=(EOS,)))


class OldTurnOutput(TurnOutput):
    """The former algorithm (every prefix of every stop string in a set, a suffix scan per token): the reference."""

    def __init__(self, model: FakeModel, config: er.GenerationConfig) -> None:
        super().__init__(model, config)  # type: ignore[arg-type]
        self._prefixes = {s[:i] for s in self.stops for i in range(1, len(s))}
        self._longest_stop = max((len(s) for s in self.stops), default=0)

    def _text(self, piece: str) -> tuple[str, str | None]:
        t = self.turn
        if not self.stops:
            return piece, None
        buf = t.held + piece
        hits = [(buf.find(s), s) for s in self.stops if s in buf]
        if hits:
            at = min(hits)[0]
            t.held = ""
            return buf[:at], "stop"
        keep = 0
        for i in range(max(0, len(buf) - self._longest_stop + 1), len(buf)):
            if buf[i:] in self._prefixes:
                keep = len(buf) - i
                break
        t.held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], None


def _run(out: TurnOutput, tokens: list[int], rewind: tuple[int, int] | None) -> list[object]:
    """Feed ``tokens`` until the turn finishes; ``rewind`` = (after how many tokens, how many to keep) replays a
    shorter turn once, then goes on with the tokens after the kept ones. Returns everything observable."""
    seen: list[object] = []
    i = 0
    while i < len(tokens) and not out.done:
        st_ = out.take(tokens[i], DUMMY)
        seen.append((st_.token_id, st_.text, st_.finish_reason, out.turn.held))
        i += 1
        if rewind is not None and i == rewind[0] and not out.done:
            kept = out.turn.generated[: rewind[1]]
            out.replay(kept)
            seen.append(("replay", out.turn.held, out.turn.finish_reason))
            i, rewind = rewind[1], None
    c = out.completion(er.Usage())
    seen.append((c.text, c.token_ids, c.finish_reason))
    return seen


@st.composite
def cases(draw: st.DrawFn) -> tuple[list[str], list[str], list[int], int, tuple[int, int] | None]:
    alphabet = draw(st.sampled_from(["ab", "abc", "aab", "a\x00\U0001f916"]))
    text = st.text(alphabet, min_size=1, max_size=6)
    stops = draw(st.lists(text, max_size=5))
    pieces = draw(st.lists(st.text(alphabet, max_size=5), min_size=1, max_size=25))
    tokens = list(range(1, len(pieces) + 1))
    if draw(st.booleans()):  # an EOS somewhere
        tokens.insert(draw(st.integers(0, len(tokens))), EOS)
    max_new = draw(st.integers(1, len(tokens) + 1))
    rewind = None
    if draw(st.booleans()):
        after = draw(st.integers(1, len(tokens)))
        rewind = (after, draw(st.integers(0, after)))
    return stops, pieces, tokens, max_new, rewind


@settings(max_examples=1500, deadline=None)
@given(cases())
def test_the_automaton_behaves_as_the_former_algorithm(case) -> None:  # noqa: ANN001
    stops, pieces, tokens, max_new, rewind = case
    model = FakeModel(FakeTokenizer(pieces))
    cfg = er.GenerationConfig(max_new_tokens=max_new, stop=tuple(stops))
    new = _run(TurnOutput(model, cfg), tokens, rewind)  # type: ignore[arg-type]
    old = _run(OldTurnOutput(model, cfg), tokens, rewind)
    assert new == old


@pytest.mark.parametrize(
    ("stops", "pieces", "emitted"),
    [
        (["abcd", "c"], ["xabcdy"], "x"),  # "c" ends first, "abcd" started earlier: cut at the earliest start
        (["abcd", "c"], ["x", "a", "b", "c", "d"], "xab"),  # ... among the stop strings complete at that token
        (["bc", "abcde"], ["abcdx"], "a"),  # "abcde" under way fails: the cut is at "bc"
        (["b", "ab"], ["a", "ab"], "a"),
        (["aab"], ["a", "a", "a", "b"], "a"),  # the fail link of "aa" is "a"
    ],
)
def test_earliest_start_among_completed_stops(stops: list[str], pieces: list[str], emitted: str) -> None:
    model = FakeModel(FakeTokenizer(pieces))
    out = TurnOutput(model, er.GenerationConfig(max_new_tokens=len(pieces), stop=tuple(stops)))  # type: ignore[arg-type]
    got = _run(out, list(range(1, len(pieces) + 1)), None)
    assert got[-1][0] == emitted and got[-1][2] == "stop"  # type: ignore[index]


def test_huge_or_many_stop_strings_are_refused() -> None:
    for stop in [("x" * 65536,), ("y" * (MAX_STOP_CHARS + 1),), tuple(f"s{i}" for i in range(MAX_STOPS + 1))]:
        with pytest.raises(er.ConfigError) as e:
            er.GenerationConfig(stop=stop)
        assert e.value.field == "stop"
        assert len(str(e.value)) < 200  # the error does not echo a huge string back
    er.GenerationConfig(stop=tuple("z" * MAX_STOP_CHARS for _ in range(MAX_STOPS)))  # the limits themselves pass


def _limit_stops(seed: int = 0) -> tuple[str, ...]:
    """MAX_STOPS stop strings of MAX_STOP_CHARS characters over a large alphabet: a state per character."""
    rng = random.Random(seed)
    return tuple("".join(chr(rng.randrange(0x4E00, 0x9FFF)) for _ in range(MAX_STOP_CHARS)) for _ in range(MAX_STOPS))


def test_the_automaton_is_linear_in_the_stop_strings() -> None:
    stops = _limit_stops()
    total = sum(map(len, stops))
    m = _StopMatcher(stops)
    assert len(m.depth) == total + 1 and len(m.goto) == total  # no shared prefixes: a state per character
    _stop_matcher.cache_clear()
    model = FakeModel(FakeTokenizer(["a"]))
    cfg = er.GenerationConfig(stop=stops)
    tracemalloc.start()
    try:
        TurnOutput(model, cfg)  # type: ignore[arg-type]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20  # 16,000 states: a few MB (the prefix set was 16 x 1,000^2 / 2 characters = 8 M)


class CountingDict(dict):
    lookups = 0

    def get(self, key, default=None):  # noqa: ANN001, ANN201
        CountingDict.lookups += 1
        return super().get(key, default)


@pytest.mark.parametrize("piece", ["a", "aaaaaaa", "ab"])
def test_per_token_matching_is_amortised_constant_per_character(piece: str) -> None:
    """The worst case of the former scan: the text keeps ending in a long prefix of a stop string (999 characters
    held back on every token). The automaton looks up at most two transitions per character fed."""
    stops = ("a" * (MAX_STOP_CHARS - 1) + "b", ("ab" * MAX_STOP_CHARS)[: MAX_STOP_CHARS - 1] + "c", "x")
    n = 4000
    model = FakeModel(FakeTokenizer([piece]))
    out = TurnOutput(model, er.GenerationConfig(max_new_tokens=n, stop=stops))  # type: ignore[arg-type]
    assert out._matcher is not None
    out._matcher.goto = CountingDict(out._matcher.goto)
    CountingDict.lookups = 0
    texts = []
    for _ in range(n):
        texts.append(out.take(1, DUMMY).text)
        assert len(out.turn.held) < MAX_STOP_CHARS  # what is held back never outgrows the longest stop string
    out._matcher.goto = dict(out._matcher.goto)
    assert out.done and out.turn.finish_reason == "length" and "".join(texts) == piece * n
    assert CountingDict.lookups <= 2 * n * len(piece)


def test_stops_at_the_limits_on_the_tiny_model(tiny: er.Model) -> None:
    """Fifteen long stop strings that never match beside one that does: the same text as with that one alone."""
    prompt = "The capital of France is"
    text = tiny.generate(prompt, GREEDY).text
    assert len(text) > 6
    stop = text[3:6]
    one = tiny.generate(prompt, GREEDY.replace(stop=(stop,)))
    many = GREEDY.replace(stop=(*_limit_stops(1)[: MAX_STOPS - 1], stop))
    out = tiny.generate(prompt, many)
    assert (out.text, out.token_ids, out.finish_reason) == (one.text, one.token_ids, "stop")
    gen = tiny.generator(many)
    gen.append(tiny.tokenizer.encode(prompt))
    assert "".join(s.text for s in gen) == one.text
