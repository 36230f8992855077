"""What an encoder's answers are made of, without a model: the result types, pooling and normalisation, the
classification functions, input and manifest checks (``edgeroute.encoder`` runs the model).

Pooling (sentence-transformers' modes): ``mean`` (over the attention mask), ``cls`` (the first position), ``max``
(over unmasked positions), ``mean_sqrt_len`` (the sum over the square root of the length), ``last`` (the last
unmasked position).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ConfigError, ManifestError

ENCODER_MANIFEST_VERSION = 1
ENCODER_TASKS = ("embedding", "classification", "token-classification")
POOLINGS = ("mean", "cls", "max", "mean_sqrt_len", "last")
MAX_TEXTS = 4096  # inputs per call


@dataclass(frozen=True)
class Label:
    """A label of a classified text and its score; ``truncated``: the text was cut to the model's length;
    ``windows``: the windows it ran in (``overflow="chunk"``; 1 otherwise). With ``samples=N`` (stochastic
    passes): ``score`` is the mean over the passes, ``std`` its standard deviation, ``entropy`` the predictive
    entropy and ``mutual_information`` the part of it the passes disagree on (nats; a softmax model's are the
    text's, the same on each of its labels; a sigmoid model's are each label's own)."""

    label: str
    score: float
    truncated: bool = False
    windows: int = 1
    std: float | None = None
    entropy: float | None = None
    mutual_information: float | None = None


@dataclass(frozen=True)
class Ranked:
    """A reranked document: its ``index`` in the documents given, its ``score``, whether it was ``truncated`` and
    the ``windows`` it ran in."""

    index: int
    score: float
    truncated: bool = False
    windows: int = 1


@dataclass(frozen=True)
class Embeddings:
    """``vectors[i]`` is input i's embedding (input order); ``tokens[i]`` the tokens it ran with (special tokens
    included, every window's); ``truncated[i]`` whether it was cut to the model's ``max_length``; ``windows[i]``
    the windows it ran in (``overflow="chunk"``; 1 otherwise)."""

    vectors: np.ndarray
    tokens: list[int]
    truncated: list[bool]
    windows: list[int]


def pool(hidden: np.ndarray, mask: np.ndarray, pooling: str, normalize: bool) -> np.ndarray:
    """Pool ``hidden`` ``[batch, positions, dim]`` under ``mask`` ``[batch, positions]`` (1 = a real token)."""
    h = np.asarray(hidden, dtype=np.float32)
    m = np.asarray(mask, dtype=np.float32)[:, :, None]
    lengths = m.sum(1)
    if pooling == "cls":
        out = h[:, 0]
    elif pooling == "mean":
        out = (h * m).sum(1) / np.maximum(lengths, 1e-9)
    elif pooling == "mean_sqrt_len":
        out = (h * m).sum(1) / np.sqrt(np.maximum(lengths, 1e-9))
    elif pooling == "max":
        out = np.where(m > 0, h, -1e9).max(1)
    elif pooling == "last":
        last = np.asarray(mask).sum(1).astype(np.int64) - 1
        out = h[np.arange(len(h)), last]
    else:
        raise ConfigError("pooling", pooling, f"must be one of {', '.join(POOLINGS)}")
    return normalized(out) if normalize else out


def normalized(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def apply_function(function: str, logits: np.ndarray) -> np.ndarray:
    """transformers' text-classification pipeline's functions, in float64 (its softmax shifts by the max)."""
    x = logits.astype(np.float64)
    if function == "softmax":
        e = np.exp(x - x.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    if function == "sigmoid":
        return 1.0 / (1.0 + np.exp(-x))
    return x


def uncertainty(probs: np.ndarray, function: str) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Monte-Carlo passes ``probs`` ``[..., samples, labels]`` (each pass's probabilities under ``function``) ->
    the mean ``[..., labels]``, the predictive entropy and the mutual information (BALD: the entropy of the mean
    minus the mean of the passes' entropies), in nats: ``[...]`` for softmax (one distribution), ``[..., labels]``
    for sigmoid (a Bernoulli per label), None for raw values."""
    mean = probs.mean(-2)
    if function == "none":
        return mean, None, None
    p = np.clip(probs.astype(np.float64), 1e-12, 1.0)
    m = np.clip(mean.astype(np.float64), 1e-12, 1.0)
    if function == "softmax":
        total = -(m * np.log(m)).sum(-1)
        expected = -(p * np.log(p)).sum(-1).mean(-1)
    else:
        q, mq = np.clip(1 - p, 1e-12, 1.0), np.clip(1 - m, 1e-12, 1.0)
        total = -(m * np.log(m) + mq * np.log(mq))
        expected = -(p * np.log(p) + q * np.log(q)).mean(-2)
    return mean, total, np.maximum(total - expected, 0.0)


def spread(result: Any) -> dict[str, float]:
    """A label's or entity's figures over stochastic passes (``std``, ``entropy``, ``mutual_information``: those
    it has; none without ``samples``), for JSON answers."""
    names = ("std", "entropy", "mutual_information")
    return {n: getattr(result, n) for n in names if getattr(result, n, None) is not None}


def check_int(name: str, value: Any, low: int, high: int | None = None, why: str | None = None) -> None:
    """A ``ConfigError`` naming ``name`` unless ``value`` is an integer (not a boolean) in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ConfigError(name, value, why or f"must be an integer {bounds}")


def check_inputs(texts: Any, text_only: bool = False, name: str = "texts") -> Sequence[Any]:
    """``texts`` checked: one string, or a non-empty list (at most :data:`MAX_TEXTS`) of strings, or of token-id
    lists unless ``text_only`` -> a list."""
    if isinstance(texts, str):
        texts = [texts]
    ok = (lambda t: isinstance(t, str) and t != "") if text_only else _is_input
    if not isinstance(texts, Sequence) or not texts or not all(ok(t) for t in texts):
        what = "non-empty strings" if text_only else "strings (or token-id lists)"
        raise ConfigError(name, texts if not isinstance(texts, Sequence) else len(texts), f"must be a list of {what}")
    if len(texts) > MAX_TEXTS:
        raise ConfigError(name, len(texts), f"holds more than {MAX_TEXTS} inputs: split the call")
    return texts


def _is_input(t: Any) -> bool:
    """A text, a (text, pair) tuple, or a non-empty list of token ids."""
    if isinstance(t, str):
        return True
    if isinstance(t, tuple) and len(t) == 2 and all(isinstance(x, str) and x for x in t):
        return True
    return (
        isinstance(t, (list, tuple))
        and len(t) > 0
        and all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in t)
    )


def padded(encoded: Sequence[Sequence[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(e) for e in encoded)
    ids = np.full((len(encoded), width), pad, dtype=np.int64)
    mask = np.zeros((len(encoded), width), dtype=np.int64)
    for r, e in enumerate(encoded):
        ids[r, : len(e)] = e
        mask[r, : len(e)] = 1
    return ids, mask


def check_manifest(m: Any, source: str, problem_types: Sequence[str]) -> None:
    def bad(field: str, why: str) -> ManifestError:
        return ManifestError(f"{source}: {field} {why}")

    if not isinstance(m, dict):
        raise ManifestError(f"{source} must hold a JSON object")
    if m.get("schema_version") != ENCODER_MANIFEST_VERSION:
        raise bad("schema_version", f"must be {ENCODER_MANIFEST_VERSION}")
    if m.get("task") not in ENCODER_TASKS:
        raise bad("task", f"must be one of {', '.join(ENCODER_TASKS)}")
    if m["task"] == "embedding":
        if m.get("pooling") not in POOLINGS:
            raise bad("pooling", f"must be one of {', '.join(POOLINGS)}")
        if not isinstance(m.get("normalize"), bool):
            raise bad("normalize", "must be true or false")
    else:
        labels = m.get("labels")
        if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
            raise bad("labels", "must be a non-empty list of strings")
        if m["task"] == "classification" and m.get("problem_type") not in problem_types:
            raise bad("problem_type", f"must be one of {', '.join(problem_types)}")
    for field in ("hidden_size", "max_length"):
        v = m.get(field)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise bad(field, "must be an integer >= 1")
    if not isinstance(m.get("graph"), str):
        raise bad("graph", "must be a file name")
