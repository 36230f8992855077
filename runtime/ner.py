"""Named entities from a token classifier's logits (``EncoderModel.entities``): transformers'
``TokenClassificationPipeline.postprocess``, its algorithm step by step, in NumPy.

Per text: the per-token softmax (max-shifted, float32); the special tokens dropped; each token's word (the
vocabulary entry, or the text itself for the unknown token) and whether it continues a word (where the tokenizer
has a continuing-subword prefix, ``##``: the entry's length differs from its text's; else the pipeline's space
heuristic); then by ``aggregation``: ``"none"`` (every token with its best tag), ``"simple"`` (tokens grouped),
``"first"`` / ``"average"`` / ``"max"`` (each word's tag from its first token, the mean of its tokens' scores, or
its most confident token, then words grouped). A group is a run of tokens or words of one type that no ``B-``
restarts; its score is the mean of its members'. Labels in ``ignore`` are dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

AGGREGATIONS = ("none", "simple", "first", "average", "max")  # transformers' token-classification strategies


@dataclass(frozen=True)
class Entity:
    """A token (aggregation ``"none"``: ``index`` is its position) or a group of tokens with one label: ``label``
    (the tag, or with aggregation the entity type: ``B-PER`` tokens make a ``PER`` group), ``score``, ``word``,
    and ``start``/``end`` character offsets into the text."""

    label: str
    score: float
    word: str
    start: int
    end: int
    index: int | None = None


def aggregate(
    text: str, enc: Any, logits: np.ndarray, strategy: str, ignore: set[str], tokenizer: Any, labels: Sequence[str]
) -> list[Entity]:
    """The entities of one text from its encoding (``tokenizers.Encoding``: ids, offsets, special-token mask) and
    every position's ``logits`` (module docstring)."""
    x = logits.astype(np.float32)
    shifted = np.exp(x - x.max(axis=-1, keepdims=True))
    scores = shifted / shifted.sum(axis=-1, keepdims=True)
    prefix = getattr(tokenizer.model, "continuing_subword_prefix", None)
    unk = getattr(tokenizer.model, "unk_token", None)
    unk_id = tokenizer.token_to_id(unk) if unk else None
    pre = []
    for idx, (token_id, (start, end), special) in enumerate(
        zip(enc.ids, enc.offsets, enc.special_tokens_mask, strict=True)
    ):
        if special:
            continue
        word = tokenizer.id_to_token(token_id) or ""
        ref = text[start:end]
        sub = len(word) != len(ref) if prefix else start > 0 and " " not in text[start - 1 : start + 1]
        if token_id == unk_id:
            word, sub = ref, False
        pre.append({"word": word, "scores": scores[idx], "start": start, "end": end, "index": idx, "sub": sub})
    tokens: list[dict[str, Any]] = []
    if strategy in ("none", "simple"):
        for p in pre:
            i = int(p["scores"].argmax())
            keep = {k: p[k] for k in ("word", "start", "end", "index")}
            tokens.append({"entity": labels[i], "score": float(p["scores"][i]), **keep})
    else:
        group: list[dict[str, Any]] = []
        for p in pre:
            if group and not p["sub"]:
                tokens.append(_word(group, strategy, tokenizer, labels))
                group = []
            group.append(p)
        if group:
            tokens.append(_word(group, strategy, tokenizer, labels))
    if strategy == "none":
        found = [Entity(t["entity"], t["score"], t["word"], t["start"], t["end"], t["index"]) for t in tokens]
    else:
        found = _groups(tokens, tokenizer)
    return [e for e in found if e.label not in ignore]


def _word(group: list[dict[str, Any]], strategy: str, tokenizer: Any, labels: Sequence[str]) -> dict[str, Any]:
    """One word from its tokens: its tag and score by ``strategy``."""
    if strategy == "first":
        scores = group[0]["scores"]
    elif strategy == "max":
        scores = max(group, key=lambda p: p["scores"].max())["scores"]
    else:  # average
        scores = np.nanmean(np.stack([p["scores"] for p in group]), axis=0)
    i = int(scores.argmax())
    word = _join([p["word"] for p in group], tokenizer)
    return {
        "entity": labels[i],
        "score": float(scores[i]),
        "word": word,
        "start": group[0]["start"],
        "end": group[-1]["end"],
    }


def _groups(tokens: list[dict[str, Any]], tokenizer: Any) -> list[Entity]:
    out: list[Entity] = []
    group: list[dict[str, Any]] = []
    for t in tokens:
        if group:
            bi, tag = _tag(t["entity"])
            if not (tag == _tag(group[-1]["entity"])[1] and bi != "B"):
                out.append(_group(group, tokenizer))
                group = []
        group.append(t)
    if group:
        out.append(_group(group, tokenizer))
    return out


def _group(group: list[dict[str, Any]], tokenizer: Any) -> Entity:
    label = group[0]["entity"].split("-", 1)[-1]
    score = float(np.nanmean([t["score"] for t in group]))
    return Entity(label, score, _join([t["word"] for t in group], tokenizer), group[0]["start"], group[-1]["end"])


def _join(tokens: list[str], tokenizer: Any) -> str:
    """transformers' ``convert_tokens_to_string``: the tokenizer's decoder over the tokens."""
    decoder = tokenizer.decoder
    return str(decoder.decode(tokens)) if decoder is not None else " ".join(tokens)


def _tag(name: str) -> tuple[str, str]:
    """transformers' ``get_tag``: (B or I, the type); a label without a prefix continues (I)."""
    if name.startswith(("B-", "I-")):
        return name[0], name[2:]
    return "I", name
