"""Named entities from a token classifier's logits (``EncoderModel.entities``).

**As transformers' pipeline** (``words="pipeline"``, the default): ``TokenClassificationPipeline.postprocess``, its
algorithm step by step, in NumPy. Per text: the per-token softmax (max-shifted, float32); the special tokens
dropped; each token's word (the vocabulary entry, or the text itself for the unknown token) and whether it
continues a word (where the tokenizer has a continuing-subword prefix, ``##``: the entry's length differs from its
text's; else the pipeline's space heuristic); then by ``aggregation``: ``"none"`` (every token with its best tag),
``"simple"`` (tokens grouped), ``"first"`` / ``"average"`` / ``"max"`` (each word's tag from its first token, the
mean of its tokens' scores, or its most confident token, then words grouped). A group is a run of tokens or words
of one type that no ``B-`` restarts; its score is the mean of its members'. Labels in ``ignore`` are dropped. Long
texts in overlapping windows (``stride``): each window's entities, then among overlapping ones the longer (ties:
the higher score), as the pipeline merges them.

**Beyond it** (``words="text"``): a token continues a word when the tokenizer's word ids say so (the
pre-tokenizer's words: right for SentencePiece / byte-level tokenizers, where the pipeline's space heuristic
guesses), a span starts at its first non-space character (a SentencePiece piece's offsets cover the space before
it), and ``word`` is ``text[start:end]`` (not the decoded tokens, which the pipeline joins without spaces for
SentencePiece: ``isthecapital``; case and spacing as written). Windows
are merged per token before aggregation: each token takes its scores from the window where it sits farthest from
an edge, so an entity is never cut at a window's border.

**Tag schemes** (``scheme``): ``BIO`` and ``IO`` group as the pipeline does; ``BIOES`` / ``BILOU`` are understood
(``S-``/``U-`` is a one-unit entity, ``E-``/``L-`` closes one; the pipeline reads them as types of their own).
**Decoding** (``decode``): ``"argmax"`` (each unit's best tag, the pipeline's) or ``"viterbi"``: the most likely
tag sequence among the valid ones (no ``I-X`` after ``O`` or after another type, no unfinished ``B-`` in BIOES),
the router's best-path idea applied to tags; a unit's score is then its chosen tag's probability.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

AGGREGATIONS = ("none", "simple", "first", "average", "max")  # transformers' token-classification strategies
SCHEMES = ("BIO", "BIOES", "BILOU", "IO")
WORDS = ("pipeline", "text")
DECODES = ("argmax", "viterbi")
_ENDS = {"BIOES": ("E", "S"), "BILOU": ("L", "U")}  # (closes an entity, a one-unit entity)


@dataclass(frozen=True)
class Entity:
    """A token (aggregation ``"none"``: ``index`` is its position) or a group of tokens with one label: ``label``
    (the tag, or with aggregation the entity type: ``B-PER`` tokens make a ``PER`` group), ``score``, ``word``,
    and ``start``/``end`` character offsets into the text. With ``samples=N`` (stochastic passes) the scores are
    the passes' mean, and ``entropy`` / ``mutual_information`` the mean over the entity's tokens of their
    predictive entropy and of the part the passes disagree on (nats)."""

    label: str
    score: float
    word: str
    start: int
    end: int
    index: int | None = None
    entropy: float | None = None
    mutual_information: float | None = None


class Entities(list[Entity]):
    """One text's entities (a list), and how the text ran: ``truncated`` (cut at the model's length) and
    ``windows`` (the overlapping windows it ran in; 1 for a text within the length)."""

    def __init__(self, items: Sequence[Entity] = (), truncated: bool = False, windows: int = 1) -> None:
        super().__init__(items)
        self.truncated = truncated
        self.windows = windows


def scheme_of(labels: Sequence[str]) -> str:
    """The tag scheme a label set uses: ``BIOES`` (``S-``/``E-`` tags), ``BILOU`` (``U-``/``L-``), ``BIO`` (``B-``)
    or ``IO``."""
    prefixes = {x.split("-", 1)[0] for x in labels if "-" in x}
    if prefixes & {"S", "E"}:
        return "BIOES"
    if prefixes & {"U", "L"}:
        return "BILOU"
    return "BIO" if "B" in prefixes else "IO"


def softmax(logits: np.ndarray) -> np.ndarray:
    """The pipeline's per-token softmax (max-shifted, float32)."""
    x = logits.astype(np.float32)
    shifted = np.exp(x - x.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def aggregate(
    text: str,
    enc: Any,
    logits: np.ndarray,
    strategy: str,
    ignore: set[str],
    tokenizer: Any,
    labels: Sequence[str],
    words: str = "pipeline",
    scheme: str = "BIO",
    decode: str = "argmax",
    probabilities: bool = False,
    unk_id: int | None = None,
) -> list[Entity]:
    """The entities of one text (or window) from its encoding (``tokenizers.Encoding``: ids, offsets, word ids,
    special-token mask) and every position's ``logits`` (``probabilities``: already the tag probabilities, e.g.
    the mean of stochastic passes; ``unk_id``: the unknown token's id, :func:`unk_token_id`) (module docstring)."""
    scores = logits.astype(np.float32) if probabilities else softmax(logits)
    pre = _pre_entities(text, enc, scores, tokenizer, words == "text", unk_id)
    if strategy in ("none", "simple"):  # (with words="text" a piece that is only a space is no unit)
        units = [{k: p[k] for k in ("word", "start", "end", "index", "scores")} for p in pre if p["start"] < p["end"]]
    else:
        units = []
        group: list[dict[str, Any]] = []
        for p in pre:
            if group and not p["sub"]:
                units.append(_word(group, strategy, tokenizer, text if words == "text" else None))
                group = []
            group.append(p)
        if group:
            units.append(_word(group, strategy, tokenizer, text if words == "text" else None))
    if decode == "viterbi" and units:
        path = viterbi(np.stack([u["scores"] for u in units]), labels, scheme)
    else:
        path = [int(u["scores"].argmax()) for u in units]
    tokens = [
        {"entity": labels[i], "score": float(u["scores"][i]), **{k: u[k] for k in ("word", "start", "end")}}
        | {"index": u.get("index")}
        for u, i in zip(units, path, strict=True)
    ]
    if strategy == "none":
        found = [Entity(t["entity"], t["score"], t["word"], t["start"], t["end"], t["index"]) for t in tokens]
    else:
        join = (lambda g: text[g[0]["start"] : g[-1]["end"]]) if words == "text" else None
        found = _groups(tokens, tokenizer, scheme, join)
    return [e for e in found if e.label not in ignore]


def unk_token_id(tokenizer: Any) -> int | None:
    """transformers' ``unk_token_id``: the model's ``unk_token`` (WordPiece, BPE), else a Unigram model's
    ``unk_id`` (only in its serialised state: ask once, it serialises the vocabulary)."""
    unk = getattr(tokenizer.model, "unk_token", None)
    if unk:
        return tokenizer.token_to_id(unk)
    try:
        unk_id = json.loads(tokenizer.model.__getstate__()).get("unk_id")
    except (AttributeError, TypeError, ValueError):
        return None
    return unk_id if isinstance(unk_id, int) else None


def _pre_entities(
    text: str, enc: Any, scores: np.ndarray, tokenizer: Any, by_words: bool, unk_id: int | None
) -> list[dict[str, Any]]:
    """The pipeline's ``gather_pre_entities``: the non-special tokens with their word, scores, offsets and whether
    each continues a word (``by_words``: the tokenizer's word ids decide, and ``word`` is the text's own)."""
    prefix = getattr(tokenizer.model, "continuing_subword_prefix", None)
    pre = []
    last_word: int | None = None
    for idx, (token_id, (start, end), special, word_id) in enumerate(
        zip(enc.ids, enc.offsets, enc.special_tokens_mask, enc.word_ids, strict=True)
    ):
        if special:
            continue
        ref = text[start:end]
        if by_words:  # (a SentencePiece piece's offsets may cover the space before it: not part of the word)
            while start < end and text[start].isspace():
                start += 1
            word, sub = text[start:end], word_id is not None and word_id == last_word
            last_word = word_id
        else:
            word = tokenizer.id_to_token(token_id) or ""
            sub = len(word) != len(ref) if prefix else start > 0 and " " not in text[start - 1 : start + 1]
            if token_id == unk_id:
                word, sub = ref, False
        pre.append({"word": word, "scores": scores[idx], "start": start, "end": end, "index": idx, "sub": sub})
    return pre


def _word(group: list[dict[str, Any]], strategy: str, tokenizer: Any, text: str | None) -> dict[str, Any]:
    """One word from its tokens: its score vector by ``strategy`` (``text``: the word is the text's own)."""
    if strategy == "first":
        scores = group[0]["scores"]
    elif strategy == "max":
        scores = max(group, key=lambda p: p["scores"].max())["scores"]
    else:  # average
        scores = np.nanmean(np.stack([p["scores"] for p in group]), axis=0)
    start, end = group[0]["start"], group[-1]["end"]
    if text is not None:  # from the word's first character that is not a space
        start = next((p["start"] for p in group if p["start"] < p["end"]), end)
    word = text[start:end] if text is not None else _join([p["word"] for p in group], tokenizer)
    return {"scores": scores, "word": word, "start": start, "end": end}


def _groups(tokens: list[dict[str, Any]], tokenizer: Any, scheme: str, join: Any) -> list[Entity]:
    """Units -> entities: the pipeline's ``group_entities`` for BIO and IO; for BIOES/BILOU a ``B-`` opens a group,
    ``E-``/``L-`` closes it, ``S-``/``U-`` stands alone."""
    ends = _ENDS.get(scheme)
    out: list[Entity] = []
    group: list[dict[str, Any]] = []

    def close() -> None:
        if group:
            out.append(_group(group, tokenizer, join))
            group.clear()

    for t in tokens:
        prefix, tag = _tag(t["entity"], ends)
        if group:
            same = tag == _tag(group[-1]["entity"], ends)[1]
            if ends is None:
                if not (same and prefix != "B"):
                    close()
            elif not same or prefix not in ("I", ends[0]) or _tag(group[-1]["entity"], ends)[0] in ends:
                close()
        group.append(t)
    close()
    return out


def _group(group: list[dict[str, Any]], tokenizer: Any, join: Any) -> Entity:
    label = group[0]["entity"].split("-", 1)[-1]
    score = float(np.nanmean([t["score"] for t in group]))
    word = join(group) if join is not None else _join([t["word"] for t in group], tokenizer)
    return Entity(label, score, word, group[0]["start"], group[-1]["end"])


def _join(tokens: list[str], tokenizer: Any) -> str:
    """transformers' ``convert_tokens_to_string``: the tokenizer's decoder over the tokens."""
    decoder = tokenizer.decoder
    return str(decoder.decode(tokens)) if decoder is not None else " ".join(tokens)


def _tag(name: str, ends: tuple[str, str] | None = None) -> tuple[str, str]:
    """transformers' ``get_tag``: (B or I, the type); a label without a prefix continues (I). With a BIOES/BILOU
    scheme (``ends``) its E/S (L/U) prefixes too."""
    prefixes = ("B-", "I-", *(f"{p}-" for p in ends or ()))
    if name.startswith(prefixes):
        return name[0], name[2:]
    return "I", name


def viterbi(scores: np.ndarray, labels: Sequence[str], scheme: str) -> list[int]:
    """The most likely label sequence (sum of log probabilities of ``scores`` ``[units, labels]``) among those the
    ``scheme`` allows: ``I-X`` only after ``B-X`` or ``I-X`` (BIO); in BIOES/BILOU also ``E-X`` (``L-X``) only
    there, nothing but ``I-X``/``E-X`` after ``B-X``/``I-X``, and no sequence ending inside an entity. IO and
    unprefixed labels are unconstrained. Ties go to the lower label index."""
    n = len(labels)
    ends = _ENDS.get(scheme)
    parts = [(x[0], x[2:]) if len(x) > 2 and x[1] == "-" else ("", x) for x in labels]
    opens = {"B", "I"} if ends else set()  # inside an entity after this prefix (BIOES/BILOU)
    allowed = np.ones((n, n), dtype=bool)  # allowed[prev, cur]
    start_ok = np.ones(n, dtype=bool)
    end_ok = np.ones(n, dtype=bool)
    if scheme != "IO":
        for c, (cp, ct) in enumerate(parts):
            inside = {"I"} | ({ends[0]} if ends else set())
            if cp in inside:  # continues an entity of its type
                start_ok[c] = False
                for p, (pp, pt) in enumerate(parts):
                    allowed[p, c] = pp in ({"B", "I"}) and pt == ct
            elif ends:  # opens or stands alone: only outside an entity
                for p, (pp, _) in enumerate(parts):
                    allowed[p, c] = pp not in opens
            if ends and cp in opens:
                end_ok[c] = False
    logp = np.log(np.maximum(scores.astype(np.float64), 1e-300))
    best = np.where(start_ok, logp[0], -np.inf)
    back = np.zeros((len(scores), n), dtype=np.int64)
    penalty = np.where(allowed, 0.0, -np.inf)
    for t in range(1, len(scores)):
        total = best[:, None] + penalty  # [prev, cur]
        back[t] = total.argmax(axis=0)
        best = total.max(axis=0) + logp[t]
    last = int(np.argmax(np.where(end_ok, best, -np.inf)))
    if not np.isfinite(best[last]):  # no valid sequence (a label set the scheme cannot finish): the best tags
        return [int(s.argmax()) for s in scores]
    path = [last]
    for t in range(len(scores) - 1, 0, -1):
        path.append(int(back[t, path[-1]]))
    return path[::-1]


def merge_overlapping(entities: list[Entity]) -> list[Entity]:
    """The pipeline's ``aggregate_overlapping_entities``: by start; among overlapping entities the longer (ties:
    the higher score)."""
    if not entities:
        return entities
    ordered = sorted(entities, key=lambda e: e.start)
    out = []
    previous = ordered[0]
    for e in ordered:
        if previous.start <= e.start < previous.end:
            longer = e.end - e.start > previous.end - previous.start
            if longer or (e.end - e.start == previous.end - previous.start and e.score > previous.score):
                previous = e
        else:
            out.append(previous)
            previous = e
    out.append(previous)
    return out


def with_uncertainty(entities: list[Entity], enc: Any, entropy: np.ndarray, information: np.ndarray) -> list[Entity]:
    """``entities`` of one encoding with the mean ``entropy`` and mutual ``information`` of their tokens (per
    position arrays; the non-special tokens inside each entity's span)."""
    spans = [(a, b) for (a, b), s in zip(enc.offsets, enc.special_tokens_mask, strict=True)]
    inner = [i for i, s in enumerate(enc.special_tokens_mask) if not s]
    out = []
    for e in entities:
        members = (
            [i for i in inner if spans[i][0] >= e.start and spans[i][1] <= e.end] if e.index is None else [e.index]
        )
        if not members:
            out.append(e)
            continue
        h, mi = float(np.mean(entropy[members])), float(np.mean(information[members]))
        out.append(replace(e, entropy=h, mutual_information=mi))
    return out
