"""The router stage of a constraint (``constraint.py``): a llguidance matcher per sequence, and the grammar's
view of a model's tokenizer (built once per tokenizer).

The routed distribution (docs/router.md, "The router") is the router's with every token the grammar forbids at ``-inf``
after the logit bias, bans, stop-token suppression and penalties; so truncation and temperature act on allowed
tokens only, exploration's uniform covers allowed tokens the grammar also allows, greedy is the argmax over valid
tokens, and the end-of-sequence token is allowed only where the grammar accepts the text.

What it costs: llguidance computes a packed bitmask of the vocabulary per step (tens of microseconds); the stage
never expands it into a full-vocabulary vector. Where the grammar allows few tokens it hands the router only
those (the candidate set starts at them); where it forbids few it bans those few, as a logit bias would; greedy
first checks the argmax against one bit of the mask.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .constraint import Constraint, first_line, load_llguidance, shorten
from .errors import ConfigError, InferenceError
from .sampling import Constraining

if TYPE_CHECKING:
    from .graph import Graph
    from .tokenizer import Tokenizer


# -- the grammar's view of a tokenizer --------------------------------------------------------------------------
_TOKENIZERS: weakref.WeakKeyDictionary[Tokenizer, dict[tuple[int, tuple[int, ...]], Any]] = weakref.WeakKeyDictionary()
_TOKENIZERS_LOCK = threading.Lock()


class _Vocabulary:
    """What llguidance reads of a tokenizer (``TokenizerWrapper``'s duck type): every token's raw bytes (the same
    bytes the streamed text is made of, so a grammar sees exactly the text the model writes), the special ids
    and an encoder."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_ids: Sequence[int], bos_id: int | None) -> None:
        self._tok = tokenizer
        self.eos_token_id = int(eos_ids[0])
        self.bos_token_id = bos_id
        n = min(vocab_size, tokenizer.vocab_size)
        self.tokens = [tokenizer.token_bytes(i) for i in range(n)] + [b""] * (vocab_size - n)
        self.special_token_ids = sorted(i for i in tokenizer.special_ids if i < vocab_size)

    def __call__(self, text: bytes | str) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tok.encode(text, add_special_tokens=False)


def grammar_tokenizer(model: Graph) -> Any:
    """The llguidance tokenizer of ``model`` (built once per tokenizer, vocabulary size and EOS ids: ~0.5 s for a
    49k vocabulary)."""
    llg = load_llguidance()
    eos = tuple(int(i) for i in model.manifest.eos_token_ids)
    key = (int(model.vocab_size), eos)
    with _TOKENIZERS_LOCK:
        per = _TOKENIZERS.setdefault(model.tokenizer, {})
        if key not in per:
            vocab = _Vocabulary(model.tokenizer, model.vocab_size, eos, model.manifest.bos_token_id)
            per[key] = llg.LLTokenizer(llg.TokenizerWrapper(vocab), n_vocab=model.vocab_size, eos_token=list(eos))
        return per[key]


# -- the router stage -------------------------------------------------------------------------------------------
class GrammarStage(Constraining):
    """One sequence's grammar: a llguidance matcher that has consumed the turn's tokens, and the step's mask.

    Per step (the mask is computed once per state) the stage is in one of two modes, decided by the mask alone,
    so that every path of the router (``sample``, ``sample_plain``, ``distribution``) routes alike:

    - *restrict* (the grammar allows fewer tokens than it forbids, counted in 32-token words of the mask): the
      candidate set starts at the allowed ids (:meth:`restriction`); the vocabulary is not touched;
    - *ban* (it forbids fewer): the forbidden ids are set to ``-inf`` (:meth:`apply`, :meth:`touched`), the way
      a logit bias bans, and the router keeps its in-place fast path.

    Both are the documented distribution: forbidden tokens have no mass either way.

    The matcher follows the sequence: :meth:`accept` commits a token, :meth:`reset` starts a turn. A step asked for
    a position past the committed tokens (speculative decoding scores proposed tokens before they are committed)
    consumes the proposed tokens of ``history`` for that step; the next call rolls them back as needed.
    """

    def __init__(self, constraint: Constraint, model: Graph) -> None:
        llg = load_llguidance()
        self.constraint = constraint
        self.param = constraint.param
        self.vocab_size = vocab_size = model.vocab_size
        self._matcher = llg.LLMatcher(grammar_tokenizer(model), constraint.grammar, log_level=0)
        if self._matcher.is_error():
            raise ConfigError(constraint.param, shorten(constraint.grammar), first_line(self._matcher.get_error()))
        self._words = np.zeros((1, (vocab_size + 31) // 32), dtype=np.int32)
        self._ptr, self._nbytes = self._words.ctypes.data, self._words.nbytes  # llguidance writes the mask there
        self._tokens: list[int] = []  # consumed: the committed tokens of the turn, then proposed ones
        self._committed = 0
        self._fresh = False  # the mask and the plan are those of the matcher's current state
        self._restrict: np.ndarray | None = None
        self._banned = _NONE

    # -- following the sequence ----------------------------------------------------------------------------
    def reset(self) -> None:
        self._matcher.reset()
        self._tokens.clear()
        self._committed = 0
        self._fresh = False

    def accept(self, token: int) -> None:
        """Commit ``token``, which the router chose from this matcher's own mask: a refusal now is the parser giving
        up on the grammar (its item limit: an endless or too ambiguous grammar), the request's ``ConfigError``."""
        self._rollback(self._committed)
        if not self._matcher.consume_token(int(token)):
            raise ConfigError(
                self.param, "at this step", f"cannot be followed further: {first_line(self._matcher.get_error())}"
            )
        self._tokens.append(int(token))
        self._fresh = False
        self._committed += 1

    def _rollback(self, keep: int) -> None:
        if len(self._tokens) > keep:
            self._matcher.rollback(len(self._tokens) - keep)
            del self._tokens[keep:]
            self._fresh = False

    def _consume(self, tokens: list[int]) -> None:
        for t in tokens:
            if not self._matcher.consume_token(t):
                raise InferenceError(
                    f"the grammar rejected token {t} that the router chose: {first_line(self._matcher.get_error())}"
                )
            self._tokens.append(t)
            self._fresh = False

    def _at(self, history: np.ndarray, index: int, plan: bool = True) -> None:
        """Bring the matcher to the turn's first ``index`` tokens (the last ``index`` of ``history``) and, with
        ``plan``, compute that state's mask and plan."""
        c = self._committed
        if index < c:
            raise InferenceError(f"the grammar was asked for turn position {index} after {c} committed tokens")
        if len(self._tokens) != index or index > c:
            proposed = history[len(history) - index + c :].tolist() if index > c else []
            same = 0
            while same < len(proposed) and c + same < len(self._tokens) and self._tokens[c + same] == proposed[same]:
                same += 1
            self._rollback(c + same)
            self._consume(proposed[same:])
        if plan and not self._fresh:
            self._plan()

    def _plan(self) -> None:
        self._matcher.unsafe_compute_mask_ptr(self._ptr, self._nbytes)
        words = self._words[0]
        some = np.flatnonzero(words)  # words with at least one allowed token
        partial = np.flatnonzero(words != -1)  # words with at least one forbidden token
        if len(some) <= len(partial):  # (nothing allowed: an empty restriction)
            self._restrict, self._banned = _bits(words, some, self.vocab_size, True), _NONE
        else:
            self._restrict, self._banned = None, _bits(words, partial, self.vocab_size, False)
        self._fresh = True

    # -- the stage -----------------------------------------------------------------------------------------
    def restriction(self, history: np.ndarray, index: int) -> np.ndarray | None:
        """The allowed ids (ascending) when this step restricts the candidates, else None (it bans)."""
        self._at(history, index)
        return self._restrict

    def apply(self, out: np.ndarray, history: np.ndarray, index: int) -> None:
        self._at(history, index)
        if len(self._banned):
            out[self._banned] = -np.inf

    def touched(self, history: np.ndarray, index: int) -> np.ndarray:
        self._at(history, index)
        return self._banned

    def keeps(self, token: int, history: np.ndarray, index: int) -> bool:
        """True when the grammar allows ``token`` at this step: one bit of the mask when it is at hand, else the
        parser's check of that one token (greedy's argmax is usually allowed: no mask is computed then)."""
        self._at(history, index, plan=False)
        if self._fresh:
            return bool((int(self._words[0, token >> 5]) >> (token & 31)) & 1)
        return self._matcher.validate_tokens([int(token)]) == 1

    def allows(self, ids: np.ndarray, history: np.ndarray, index: int) -> np.ndarray:
        """The subset of ``ids`` (ascending) the grammar allows at this step."""
        self._at(history, index)
        ids = np.asarray(ids, dtype=np.int64)
        bits = (self._words[0, ids >> 5] >> (ids & 31).astype(np.int32)) & 1
        return ids[bits.astype(bool)]

    def valid_prefix(self, history: np.ndarray, index: int, tokens: Sequence[int]) -> int:
        """How many of ``tokens`` (proposed after the turn's first ``index`` tokens) the grammar accepts in a row."""
        self._at(history, index, plan=False)
        return int(self._matcher.validate_tokens([int(t) for t in tokens])) if len(tokens) else 0


_NONE = np.zeros(0, dtype=np.int64)  # no ids (read-only use: never written into)


def _bits(words: np.ndarray, which: np.ndarray, vocab_size: int, value: bool) -> np.ndarray:
    """The token ids (ascending) whose bit is ``value`` in the 32-token ``words`` at positions ``which``."""
    bits = np.unpackbits(words[which].view(np.uint8).reshape(-1, 4), axis=1, bitorder="little").astype(bool)
    hit = bits if value else ~bits
    w, b = np.nonzero(hit)
    ids = which[w].astype(np.int64) * 32 + b
    return ids[ids < vocab_size]
