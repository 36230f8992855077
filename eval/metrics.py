"""The figures measured on texts alone: distinct-n, repetition within a sample, Self-BLEU-4 (sacrebleu), and
validity under a constraint (``jsonschema`` for a JSON Schema, llguidance for a regex or grammar).

Words are whitespace-separated tokens. sacrebleu and jsonschema are the ``eval`` extra, imported when used.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from edgeroute.constraint import JsonSchema
from edgeroute.errors import MissingExtraError

from .extra import INSTALL_HINT

if TYPE_CHECKING:
    from edgeroute.graph import Graph


def words(text: str) -> list[str]:
    """The word tokens the diversity figures count: whitespace-separated."""
    return text.split()


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct(texts: Sequence[str], n: int) -> tuple[int, int]:
    """(unique, total) word n-grams over ``texts`` pooled (distinct-n = unique / total)."""
    grams = [g for t in texts for g in ngrams(words(t), n)]
    return len(set(grams)), len(grams)


def repetition(text: str, n: int = 4) -> float | None:
    """The share of a text's word n-grams that repeat an earlier one (``1 - unique/total``); None without any."""
    grams = ngrams(words(text), n)
    return 1.0 - len(set(grams)) / len(grams) if grams else None


def self_bleu(texts: Sequence[str]) -> float | None:
    """Self-BLEU-4 on 0-1: sacrebleu's corpus BLEU of every text against all the others as its references;
    None for fewer than two texts."""
    k = len(texts)
    if k < 2:
        return None
    try:
        from sacrebleu.metrics import BLEU
    except ImportError:
        raise MissingExtraError(INSTALL_HINT) from None
    refs = [[texts[(i + j) % k] for i in range(k)] for j in range(1, k)]
    return float(BLEU(max_ngram_order=4).corpus_score(list(texts), refs).score) / 100.0


def is_valid(constraint: Any, text: str, model: Graph) -> bool:
    """Whether ``text`` is in the constraint's language: a JSON Schema is checked by ``jsonschema`` on the parsed
    text, a regex or grammar by a fresh llguidance matcher that consumes the text's tokens and must accept."""
    if isinstance(constraint, JsonSchema):
        try:
            import jsonschema
        except ImportError:
            raise MissingExtraError(INSTALL_HINT) from None
        try:
            jsonschema.validate(json.loads(text), constraint.schema_dict)
        except (json.JSONDecodeError, jsonschema.ValidationError):
            return False
        return True
    from edgeroute.constraint import load_llguidance
    from edgeroute.grammar import grammar_tokenizer

    llg = load_llguidance()
    matcher = llg.LLMatcher(grammar_tokenizer(model), constraint.grammar, log_level=0)
    for t in model.tokenizer.encode(text, add_special_tokens=False):
        if not matcher.consume_token(t):
            return False
    return bool(matcher.is_accepting())
