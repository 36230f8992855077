"""From inputs to graph runs, for :class:`~edgeroute.encoder.EncoderModel`: texts, text pairs and token-id lists
tokenised (special tokens added); long ones refused, cut, or split into windows (``overflow``); rows sorted by
length and run in batches within a token budget (padded positions); the windows' results put back together per
input (:func:`per_owner`, :func:`merged`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from .encoder_math import check_int, padded
from .errors import ConfigError

OVERFLOWS = ("refuse", "truncate", "chunk")
MAX_WINDOWS = 256  # windows one input may run in with overflow="chunk"

Row = tuple[list[int], list[int] | None]  # token ids, token type ids (None: all zero)


class EncoderRuns:
    """The input side of an encoder model (the model sets these attributes)."""

    _tok: Any
    _cut_tok: Any  # a copy of _tok for truncation (state), under _cut_lock
    _cut_lock: Any
    _specials: int
    _vocab: int
    _pad: int
    _inputs: list[str]
    session: Any
    max_length: int
    dropout_input: str | None

    def _rows(self, items: Sequence[Any], overflow: str) -> tuple[list[Row], np.ndarray, list[bool]]:
        """Each input's rows (one, or its windows with ``overflow="chunk"``), the input each row belongs to, and
        which inputs were cut (over ``max_length`` with ``overflow="truncate"``; refused with ``"refuse"``)."""
        rows = self._tokens(items)  # (overflow is checked by _over)
        cut = self._over([len(r[0]) for r in rows], overflow)
        if overflow == "chunk":
            self._bound_windows([len(r[0]) for r in rows], 0)
        out: list[Row] = []
        owners: list[int] = []
        for i, row in enumerate(rows):
            if not cut[i]:
                parts = [row]
            elif isinstance(items[i], str) or is_pair(items[i]):
                parts = [(list(w.ids), list(w.type_ids)) for w in self._windowed(items[i], 0, overflow == "chunk")]
            else:  # token ids as given: cut, or split into windows, as they are
                ids = row[0]
                step = self.max_length if overflow == "chunk" else len(ids)
                parts = [(ids[s : s + self.max_length], None) for s in range(0, len(ids), step)]
            if len(parts) > MAX_WINDOWS:
                raise ConfigError(f"texts[{i}]", f"{len(parts)} windows", f"is over {MAX_WINDOWS} windows: split it")
            out += parts
            owners += [i] * len(parts)
        return out, np.array(owners, dtype=np.int64), [c and overflow == "truncate" for c in cut]

    def _windowed(self, item: Any, stride: int, chunk: bool) -> list[Any]:
        """The tokenizer's encoding of a long text (or (text, pair): the pair is cut) cut at ``max_length``, and
        with ``chunk`` every overflowing window after it (``stride`` tokens shared). A tokenizer of its own, under
        a lock: truncation is tokenizer state, and other threads tokenise with the model's meanwhile."""
        pair = is_pair(item)
        with self._cut_lock:
            tok = self._cut_tok
            tok.enable_truncation(self.max_length, stride=stride, strategy="only_second" if pair else "longest_first")
            try:
                enc = tok.encode(*item) if pair else tok.encode(item)
            except Exception as e:  # tokenizers: the first text alone is over the length
                raise ConfigError("texts", "a text pair", f"cannot be cut to {self.max_length} tokens: {e}") from None
            finally:
                tok.no_truncation()
        return [enc, *enc.overflowing] if chunk else [enc]

    def windows_needed(self, tokens: int, stride: int = 0) -> int:
        """How many windows an input of ``tokens`` tokens (special tokens included) runs in with
        ``overflow="chunk"`` and ``stride`` shared tokens (1 when it fits)."""
        room = self.max_length - self._specials
        content = tokens - self._specials
        if tokens <= self.max_length:
            return 1
        return 1 + -(-(content - room) // max(room - stride, 1))

    def _bound_windows(self, counts: Sequence[int], stride: int) -> None:
        """A ``ConfigError`` naming the first input that would run in more than :data:`MAX_WINDOWS` windows."""
        for i, n in enumerate(counts):
            if self.windows_needed(n, stride) > MAX_WINDOWS:
                raise ConfigError(f"texts[{i}]", f"{n} tokens", f"needs more than {MAX_WINDOWS} windows: split it")

    def _tokens(self, items: Sequence[Any]) -> list[Row]:
        """Texts (and (text, pair) tuples) tokenised, special tokens added; token-id lists as given, checked
        against the vocabulary."""
        texts = [t for t in items if isinstance(t, str) or is_pair(t)]
        encoded = iter(self._tok.encode_batch(list(texts)) if texts else [])
        out: list[Row] = []
        for i, t in enumerate(items):
            if isinstance(t, str) or is_pair(t):
                e = next(encoded)
                out.append((list(e.ids), list(e.type_ids) if is_pair(t) else None))
                continue
            ids = [int(x) for x in t]
            bad = [x for x in ids if not 0 <= x < self._vocab]
            if bad:
                raise ConfigError(
                    f"texts[{i}]", bad[0], f"is not a token id of this model's vocabulary ({self._vocab})"
                )
            out.append((ids, None))
        return out

    def _over(self, lengths: list[int], overflow: str) -> list[bool]:
        """Which inputs are over ``max_length`` tokens: a ``ConfigError`` naming the first when refused."""
        if overflow not in OVERFLOWS:
            raise ConfigError("overflow", overflow, f"must be one of {', '.join(OVERFLOWS)}")
        cut = [n > self.max_length for n in lengths]
        if any(cut) and overflow == "refuse":
            i = cut.index(True)
            raise ConfigError(
                f"texts[{i}]",
                f"{lengths[i]} tokens",
                f"is over the model's {self.max_length}: shorten it, cut it at the end (overflow='truncate'), or"
                " run it in windows (overflow='chunk')",
            )
        return cut

    def _runs(
        self, rows: list[Row], max_batch_tokens: int, dropout: bool = False
    ) -> Iterator[tuple[list[int], np.ndarray, np.ndarray]]:
        """``(indices, output, mask)`` per graph run: the rows sorted by length, batched within ``max_batch_tokens``
        padded positions (a longer row runs alone)."""
        check_int("max_batch_tokens", max_batch_tokens, 1)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
        start = 0
        while start < len(order):
            end = start + 1
            while end < len(order) and (end - start + 1) * len(rows[order[end]][0]) <= max_batch_tokens:
                end += 1
            index = order[start:end]
            ids, mask = padded([rows[i][0] for i in index], self._pad)
            types = np.zeros_like(ids)
            for r, i in enumerate(index):
                given = rows[i][1]
                if given is not None:
                    types[r, : len(given)] = given
            yield index, self._run(ids, mask, types, dropout), mask
            start = end

    def _run(
        self, ids: np.ndarray, mask: np.ndarray, types: np.ndarray | None = None, dropout: bool = False
    ) -> np.ndarray:
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._inputs:
            feeds["token_type_ids"] = np.zeros_like(ids) if types is None else types
        feeds = {k: v for k, v in feeds.items() if k in self._inputs}
        if dropout and self.dropout_input is not None:  # (an overridable initializer: not among get_inputs())
            feeds[self.dropout_input] = np.array(True)
        return self.session.run(None, feeds)[0]


def is_pair(item: Any) -> bool:
    return isinstance(item, tuple) and len(item) == 2 and all(isinstance(x, str) for x in item)


def per_owner(values: np.ndarray, owners: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The ``weights``-weighted mean of ``values``' rows per owner (rows of one owner are adjacent)."""
    count = int(owners.max()) + 1 if len(owners) else 0
    if count == len(owners):  # a row each (no windows): the rows themselves
        return values
    total = np.zeros((count, values.shape[1]), dtype=np.float64)
    np.add.at(total, owners, values.astype(np.float64) * weights[:, None])
    norm = np.zeros(count, dtype=np.float64)
    np.add.at(norm, owners, weights)
    return (total / norm[:, None]).astype(values.dtype)


def windows_of(owners: np.ndarray, count: int) -> list[int]:
    return [int(x) for x in np.bincount(owners, minlength=count)]


def merged(full: Any, windows: list[Any], logits: list[np.ndarray]) -> np.ndarray:
    """One text's logits over its whole (uncut) encoding from its overlapping windows' logits: each token's from
    the window where it sits farthest from a cut edge (a window's edge that is not the text's)."""
    positions = [i for i, s in enumerate(full.special_tokens_mask) if not s]
    offsets = [tuple(full.offsets[i]) for i in positions]
    out = np.zeros((len(full.ids), logits[0].shape[-1]), dtype=np.float32)
    margin = np.full(len(full.ids), -1)
    at = 0
    for k, (w, lg) in enumerate(zip(windows, logits, strict=True)):
        inner = [i for i, s in enumerate(w.special_tokens_mask) if not s]
        first = tuple(w.offsets[inner[0]])
        while at < len(offsets) and (offsets[at] != first or full.ids[positions[at]] != w.ids[inner[0]]):
            at += 1
        for j, i in enumerate(inner):
            left = j if k > 0 else len(inner)
            right = len(inner) - 1 - j if k < len(windows) - 1 else len(inner)
            p = positions[at + j]
            if min(left, right) > margin[p]:
                margin[p] = min(left, right)
                out[p] = lg[i]
    return out
