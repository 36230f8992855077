"""Think freely, answer strictly: a constraint that applies only to a reasoning model's answer.

Reasoning models (Qwen3, SmolLM3, DeepSeek-R1 distills) write their thinking in ``<think>…</think>`` before the
answer. A JSON schema or a tool call constrains the answer; applied from the first token it would forbid the
thinking block itself (the model is pushed straight into JSON, or made to write its thoughts as JSON: vLLM #47027
and mlx-serve #331 are users hitting that). With ``GenerationConfig(think_first=True)`` the request's grammar stage
is a :class:`ThinkFirst` gate around it, in one of three phases:

- *start* (the prompt leaves the block to the model): the grammar's tokens are allowed, and so is the one token
  of ``<think>`` (where the tokenizer has it as one token); choosing it starts *thinking*, any other token is the
  answer's first;
- *thinking* (the prompt ends inside the block, or the model opened it): every token is allowed, as without a
  constraint, except the turn's end tokens (EOS, ``stop_token_ids``): a constrained answer must follow. The phase
  ends with the token that completes ``</think>`` (by its bytes: the tag may span tokens);
- *answer* (after that token, or when the prompt already closed the block, as templates do with thinking
  switched off): the grammar's matcher, started fresh on the answer's tokens, exactly as a request without
  thinking would have it.

So the routed distribution while thinking is the router's own without the end tokens, and in the answer it is the
constrained distribution of the answer's tokens alone (tested against both).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .sampling import Constraining

if TYPE_CHECKING:
    from collections.abc import Collection, Sequence

    from .grammar import GrammarStage
    from .tokenizer import Tokenizer

OPEN, CLOSE = "<think>", "</think>"
_CLOSE = CLOSE.encode()
START, THINKING, ANSWER = "start", "thinking", "answer"
TAIL = 64  # the prompt's last tokens that tell where a turn starts


def phase_of_prompt(tokenizer: Tokenizer, prompt: Sequence[int]) -> str:
    """The phase a turn starts in after ``prompt``: inside an open block, after a closed one (the template closed
    it: thinking switched off), or at the start (the model may open one)."""
    text = tokenizer.decode(list(prompt[-TAIL:]), skip_special_tokens=False)
    opened, closed = text.rfind(OPEN), text.rfind(CLOSE)
    if opened > closed:
        return THINKING
    if closed >= 0 and not text[closed + len(CLOSE) :].strip():
        return ANSWER
    return START


def one_token(tokenizer: Tokenizer, text: str) -> int | None:
    """The id of ``text`` when the tokenizer writes it as one token."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


class _State:
    """Where a turn stands: its phase, the turn index of the answer's first token, the bytes of the thinking's
    end (to find ``</think>`` across tokens)."""

    __slots__ = ("phase", "offset", "tail")

    def __init__(self, phase: str) -> None:
        self.phase, self.offset, self.tail = phase, 0, b""

    def copy(self) -> _State:
        s = _State(self.phase)
        s.offset, s.tail = self.offset, self.tail
        return s

    def step(self, token: int, at: int, open_id: int | None, token_bytes: bytes) -> None:
        """The turn's token at index ``at`` is ``token``."""
        if self.phase == START:
            if token == open_id:
                self.phase = THINKING
            else:
                self.phase, self.offset = ANSWER, at
        elif self.phase == THINKING:
            self.tail = (self.tail + token_bytes)[-(len(_CLOSE) + len(token_bytes)) :]
            if _CLOSE in self.tail:
                self.phase, self.offset = ANSWER, at + 1


class ThinkFirst(Constraining):
    """A grammar stage (``inner``) gated by the thinking block (module docstring). ``ends``: the turn's end ids."""

    def __init__(self, inner: GrammarStage, tokenizer: Tokenizer, ends: Collection[int]) -> None:
        self.inner = inner
        self.param = inner.param
        self._tok = tokenizer
        self._open = one_token(tokenizer, OPEN)
        self._ends = np.array(sorted(ends), dtype=np.int64)
        self._end_set = frozenset(int(i) for i in ends)
        self._bytes: dict[int, bytes] = {}
        self.reset()

    def reset(self) -> None:
        self.inner.reset()
        self._state: _State | None = None  # known at the first step that sees the prompt
        self._pending: list[int] = []  # tokens committed before that (a rewound turn's kept tokens)
        self._committed = 0

    def _token_bytes(self, token: int) -> bytes:
        b = self._bytes.get(token)
        if b is None:
            b = self._bytes[token] = self._tok.token_bytes(token)
        return b

    def accept(self, token: int) -> None:
        if self._state is None:
            self._pending.append(int(token))
            return
        self._commit(int(token))

    def _commit(self, token: int) -> None:
        s = self._state
        assert s is not None
        if s.phase == ANSWER:
            self.inner.accept(token)
        else:
            s.step(token, self._committed, self._open, self._token_bytes(token))
            if s.phase == ANSWER and s.offset == self._committed:  # the answer's first token (from the start)
                self.inner.accept(token)
        self._committed += 1

    def _at(self, history: np.ndarray, index: int) -> _State:
        """The state before the turn's token ``index`` (proposed tokens past the committed ones read from
        ``history``, as speculative decoding asks)."""
        if self._state is None:
            end = len(history) - index  # the prompt's end
            self._state = _State(phase_of_prompt(self._tok, history[max(0, end - TAIL) : end].tolist()))
            pending, self._pending = self._pending, []
            for token in pending:
                self._commit(token)
        s = self._state
        if index > self._committed:
            s = s.copy()
            for at, token in enumerate(history[len(history) - index + self._committed :].tolist(), self._committed):
                if s.phase == ANSWER:
                    break
                s.step(token, at, self._open, self._token_bytes(token))
        return s

    # -- the stage -----------------------------------------------------------------------------------------
    def restriction(self, history: np.ndarray, index: int) -> np.ndarray | None:
        s = self._at(history, index)
        if s.phase == THINKING:
            return None
        ids = self.inner.restriction(history, index - s.offset)
        if s.phase == START and ids is not None and self._open is not None and self._open not in ids:
            ids = np.insert(ids, np.searchsorted(ids, self._open), self._open)
        return ids

    def apply(self, out: np.ndarray, history: np.ndarray, index: int) -> None:
        s = self._at(history, index)
        if s.phase == THINKING:
            out[self._ends] = -np.inf
            return
        keep = out[self._open] if s.phase == START and self._open is not None else None
        self.inner.apply(out, history, index - s.offset)
        if keep is not None:
            out[self._open] = keep

    def touched(self, history: np.ndarray, index: int) -> np.ndarray:
        s = self._at(history, index)
        if s.phase == THINKING:
            return self._ends
        banned = self.inner.touched(history, index - s.offset)
        if s.phase == START and self._open is not None:
            banned = banned[banned != self._open]
        return banned

    def keeps(self, token: int, history: np.ndarray, index: int) -> bool:
        s = self._at(history, index)
        if s.phase == THINKING:
            return token not in self._end_set
        if s.phase == START and token == self._open:
            return True
        return self.inner.keeps(token, history, index - s.offset)

    def valid_prefix(self, history: np.ndarray, index: int, tokens: Sequence[int]) -> int:
        """Proposed tokens the gate accepts in a row; a proposal that changes the phase is the last one judged (the
        rest are proposed again from the new phase: fewer drafted tokens, never a wrong one)."""
        s = self._at(history, index)
        if s.phase == ANSWER:
            return self.inner.valid_prefix(history, index - s.offset, tokens)
        if s.phase == START:
            if len(tokens) and tokens[0] == self._open:
                return 1
            return self.inner.valid_prefix(history, index, tokens)
        s = s.copy()
        for n, token in enumerate(tokens):
            if int(token) in self._end_set:
                return n
            s.step(int(token), index + n, self._open, self._token_bytes(int(token)))
            if s.phase == ANSWER:
                return n + 1
        return len(tokens)
