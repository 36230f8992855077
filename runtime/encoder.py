"""Encoder models (issue 36, first part): sentence embeddings from an exported encoder, the pooling in NumPy.

The graph computes ``last_hidden_state`` only; :class:`EncoderModel` tokenises (the folder's ``tokenizer.json``,
special tokens added), batches, runs the graph and pools outside it: ``mean`` (over the attention mask), ``cls``
(the first position), ``max`` (over unmasked positions), ``mean_sqrt_len`` (sentence-transformers' mean times the
square root of the length: the sum over sqrt(length)), ``last`` (the last unmasked position); then the L2
normalisation the manifest records, and Matryoshka ``dimensions`` (the first d values, renormalised when the model
normalises).

**Long texts are never cut silently.** A text over the model's ``max_length`` tokens is refused (``ConfigError``
naming ``texts`` with its index and token count) unless ``truncate=True``: then it is cut at the end (special
tokens kept) and its result says so (:attr:`Embeddings.truncated`).

**Batches by a token budget.** Texts are sorted by length and batched so that each batch's padded cost (rows x the
longest row) stays within ``max_batch_tokens`` (a text longer than the budget runs alone): memory is bounded by the
budget whatever the number of texts; results come back in input order.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer as _HFTokenizer

from .errors import ConfigError, ManifestError, ModelLoadError
from .ner import AGGREGATIONS, Entity, aggregate
from .session import create_session

ENCODER_MANIFEST_VERSION = 1
ENCODER_TASKS = ("embedding", "classification", "token-classification")
PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")
FUNCTIONS = ("softmax", "sigmoid", "none")
_DEFAULT_FUNCTION = {PROBLEM_TYPES[0]: "softmax", PROBLEM_TYPES[1]: "sigmoid", PROBLEM_TYPES[2]: "none"}
POOLINGS = ("mean", "cls", "max", "mean_sqrt_len", "last")
MAX_BATCH_TOKENS = 8192  # padded positions per graph run by default (SmolLM-sized encoders: tens of MB of activations)
MAX_TEXTS = 4096  # texts per call


def is_encoder_folder(folder: str | Path) -> bool:
    """Whether ``folder/edgeroute.json`` names an encoder task."""
    try:
        data = json.loads((Path(folder) / "edgeroute.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("task") in ENCODER_TASKS


@dataclass(frozen=True)
class Label:
    """A label of a classified text and its score; ``truncated``: the text was cut to the model's length."""

    label: str
    score: float
    truncated: bool = False


def _apply(function: str, logits: np.ndarray) -> np.ndarray:
    """transformers' text-classification pipeline's functions, in float64 (its softmax shifts by the max)."""
    x = logits.astype(np.float64)
    if function == "softmax":
        e = np.exp(x - x.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    if function == "sigmoid":
        return 1.0 / (1.0 + np.exp(-x))
    return x


@dataclass(frozen=True)
class Embeddings:
    """``vectors[i]`` is text i's embedding (input order); ``tokens[i]`` the tokens it ran with (special tokens
    included); ``truncated[i]`` whether it was cut to the model's ``max_length`` (only with ``truncate=True``)."""

    vectors: np.ndarray
    tokens: list[int]
    truncated: list[bool]


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
    return _normalized(out) if normalize else out


def _normalized(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class EncoderModel:
    """An exported encoder (``edgeroute export`` of a sentence-transformers folder): :meth:`embed`."""

    def __init__(self, folder: Path, manifest: dict[str, Any], session: Any, tokenizer: _HFTokenizer) -> None:
        self.path = folder
        self.manifest = manifest
        self.session = session
        self.task: str = manifest["task"]
        self.max_length: int = manifest["max_length"]
        self.dimension: int = manifest["hidden_size"]
        # embedding models
        self.pooling: str = manifest.get("pooling", "")
        self.normalize: bool = bool(manifest.get("normalize", False))
        # classification models
        self.labels: list[str] = list(manifest.get("labels", []))
        self.problem_type: str = manifest.get("problem_type", "")
        self._tok = tokenizer
        self._tok.no_truncation()
        self._tok.no_padding()
        self._vocab = int(tokenizer.get_vocab_size(with_added_tokens=True))  # (milliseconds to ask: once)
        self._inputs = [i.name for i in session.get_inputs()]
        self._pad = int(tokenizer.token_to_id("[PAD]") or tokenizer.token_to_id("<pad>") or 0)

    @classmethod
    def load(cls, path: str | Path, provider: str = "cpu", threads: int | None = None) -> EncoderModel:
        folder = Path(path)
        source = folder / "edgeroute.json"
        if not source.is_file():
            raise ModelLoadError(f"{source} is missing: not an edgeroute model folder (run `edgeroute export`)")
        try:
            manifest = json.loads(source.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ManifestError(f"{source} is not valid JSON: {e}") from e
        _check_manifest(manifest, str(source))
        graph = folder / manifest["graph"]
        if not graph.resolve().is_relative_to(folder.resolve()) or not graph.is_file():
            raise ModelLoadError(f"{graph} is missing or outside the model folder")
        try:
            tokenizer = _HFTokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # tokenizers raises a bare Exception
            raise ModelLoadError(f"{folder / 'tokenizer.json'} is not a valid tokenizer file: {e}") from e
        return cls(folder, manifest, create_session(graph, provider, threads), tokenizer)

    def tokenize(self, texts: Sequence[str | Sequence[int]], truncate: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Padded ``(input_ids, attention_mask)`` of ``texts`` in order (one batch: for checks and references)."""
        encoded, _ = self._encode(texts, truncate)
        return _padded(encoded, self._pad)

    def embed(
        self,
        texts: str | Sequence[str | Sequence[int]],
        normalize: bool | None = None,
        dimensions: int | None = None,
        truncate: bool = False,
        max_batch_tokens: int = MAX_BATCH_TOKENS,
    ) -> Embeddings:
        """The embeddings of ``texts`` (one text or a list), in input order.

        Args:
            normalize: L2-normalise (default: as the model's sentence-transformers folder said).
            dimensions: keep the first ``dimensions`` values (Matryoshka models), renormalised when normalising.
            truncate: cut texts over ``max_length`` tokens at the end (and say so in the result); by default such a
                text is a ``ConfigError`` naming it.
            max_batch_tokens: the padded positions one graph run may hold.
        """
        self._need("embedding", "embed")
        if dimensions is not None and (
            isinstance(dimensions, bool) or not isinstance(dimensions, int) or not 1 <= dimensions <= self.dimension
        ):
            raise ConfigError("dimensions", dimensions, f"must be an integer in [1, {self.dimension}]")
        norm = self.normalize if normalize is None else bool(normalize)

        def reduce(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
            return pool(hidden, mask, self.pooling, norm and dimensions is None)

        out, tokens, cut = self._batched(texts, truncate, max_batch_tokens, self.dimension, reduce)
        if dimensions is not None:
            out = out[:, :dimensions]
            out = _normalized(out) if norm else out
        return Embeddings(out, tokens, cut)

    def classify(
        self,
        texts: str | Sequence[str | Sequence[int]],
        top_k: int | None = 1,
        function: str | None = None,
        truncate: bool = False,
        max_batch_tokens: int = MAX_BATCH_TOKENS,
    ) -> list[list[Label]]:
        """Each text's labels, most likely first, as transformers' ``text-classification`` pipeline scores them:
        ``function`` ``None`` follows the model's ``problem_type`` (single-label: softmax; multi-label: sigmoid;
        regression: the raw value), or ``"softmax"``, ``"sigmoid"``, ``"none"``; ``top_k`` labels per text
        (``None``: all). ``truncate`` and ``max_batch_tokens`` as in :meth:`embed`."""
        self._need("classification", "classify")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ConfigError("top_k", top_k, "must be None (all labels) or an integer >= 1")
        if function not in (None, *FUNCTIONS):
            raise ConfigError("function", function, f"must be None (the model's problem type) or one of {FUNCTIONS}")
        fn = function or _DEFAULT_FUNCTION[self.problem_type]
        logits, _, cut = self._batched(texts, truncate, max_batch_tokens, len(self.labels), lambda x, m: x)
        scores = _apply(fn, logits)
        out = []
        for i, row in enumerate(scores):
            order = np.argsort(-row, kind="stable")[: top_k or len(row)]
            out.append([Label(self.labels[j], float(row[j]), cut[i]) for j in order])
        return out

    def entities(
        self,
        texts: str | Sequence[str],
        aggregation: str = "simple",
        ignore_labels: Sequence[str] = ("O",),
        truncate: bool = False,
        max_batch_tokens: int = MAX_BATCH_TOKENS,
    ) -> list[list[Entity]]:
        """Each text's entities, as transformers' ``token-classification`` pipeline gives them for
        ``aggregation_strategy`` ``"none"``, ``"simple"``, ``"first"``, ``"average"`` or ``"max"`` (per-token
        softmax; sub-words by the tokenizer's continuing-subword prefix where it has one, else the pipeline's
        space heuristic; groups of adjacent tokens of one type; ``ignore_labels`` dropped)."""
        self._need("token-classification", "entities")
        if aggregation not in AGGREGATIONS:
            raise ConfigError("aggregation", aggregation, f"must be one of {', '.join(AGGREGATIONS)}")
        items = _inputs([texts] if isinstance(texts, str) else texts, text_only=True)
        encodings = self._encodings(items, truncate)
        encoded = [list(e.ids) for e in encodings]
        logits: list[np.ndarray] = [np.zeros(0)] * len(items)
        for rows, output, _mask in self._runs(encoded, max_batch_tokens):
            for r, i in enumerate(rows):
                logits[i] = output[r, : len(encoded[i])]
        ignore = set(ignore_labels)
        return [
            aggregate(t, e, lg, aggregation, ignore, self._tok, self.labels)
            for t, e, lg in zip(items, encodings, logits, strict=True)
        ]

    def _encodings(self, texts: Sequence[str], truncate: bool) -> list[Any]:
        """The tokenizer's encodings (ids, offsets, special-token mask) of ``texts``, those over ``max_length``
        refused or cut as :meth:`_encode` does."""
        encodings = list(self._tok.encode_batch(list(texts)))
        cut = self._over([len(e.ids) for e in encodings], truncate)
        if any(cut):
            self._tok.enable_truncation(self.max_length)
            try:
                for i in (i for i, c in enumerate(cut) if c):
                    encodings[i] = self._tok.encode(texts[i])
            finally:
                self._tok.no_truncation()
        return encodings

    def _need(self, task: str, call: str) -> None:
        if self.task != task:
            raise ConfigError("task", self.task, f"this {self.task} model has no {call}(): it is a {task} call")

    def _batched(
        self,
        texts: Any,
        truncate: bool,
        max_batch_tokens: int,
        width: int,
        reduce: Callable[[np.ndarray, np.ndarray], np.ndarray],
    ) -> tuple[np.ndarray, list[int], list[bool]]:
        """The graph over ``texts`` in input order (:meth:`_runs`); ``reduce(output, mask)`` -> rows of ``width``
        values."""
        encoded, cut = self._encode(_inputs([texts] if isinstance(texts, str) else texts), truncate)
        out = np.zeros((len(encoded), width), dtype=np.float32)
        for rows, output, mask in self._runs(encoded, max_batch_tokens):
            out[rows] = reduce(output, mask)
        return out, [len(e) for e in encoded], cut

    def _runs(
        self, encoded: list[list[int]], max_batch_tokens: int
    ) -> Iterator[tuple[list[int], np.ndarray, np.ndarray]]:
        """``(rows, output, mask)`` per graph run: the texts sorted by length, batched within ``max_batch_tokens``
        padded positions (a longer text runs alone)."""
        if isinstance(max_batch_tokens, bool) or not isinstance(max_batch_tokens, int) or max_batch_tokens < 1:
            raise ConfigError("max_batch_tokens", max_batch_tokens, "must be an integer >= 1")
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        start = 0
        while start < len(order):
            end = start + 1
            while end < len(order) and (end - start + 1) * len(encoded[order[end]]) <= max_batch_tokens:
                end += 1
            rows = order[start:end]
            ids, mask = _padded([encoded[i] for i in rows], self._pad)
            yield rows, self._run(ids, mask), mask
            start = end

    def count_tokens(self, texts: Sequence[str | Sequence[int]]) -> list[int]:
        """Each input's token count as :meth:`embed` would run it uncut (special tokens included; token-id lists
        as given)."""
        return [len(e) for e in self._tokens(texts)]

    def _tokens(self, texts: Sequence[str | Sequence[int]]) -> list[list[int]]:
        """Texts tokenised (special tokens added); token-id lists as given, checked against the vocabulary."""
        strings = [t for t in texts if isinstance(t, str)]
        encoded = iter([list(e.ids) for e in self._tok.encode_batch(strings)] if strings else [])
        out = []
        vocab = self._vocab
        for i, t in enumerate(texts):
            if isinstance(t, str):
                out.append(next(encoded))
                continue
            ids = [int(x) for x in t]
            bad = [x for x in ids if not 0 <= x < vocab]
            if bad:
                raise ConfigError(f"texts[{i}]", bad[0], f"is not a token id of this model's vocabulary ({vocab})")
            out.append(ids)
        return out

    def _encode(self, texts: Sequence[str | Sequence[int]], truncate: bool) -> tuple[list[list[int]], list[bool]]:
        """Each input's tokens, those over ``max_length`` refused or cut (:meth:`_over`), and which were cut."""
        encoded = self._tokens(texts)
        cut = self._over([len(e) for e in encoded], truncate)
        if any(cut):
            self._tok.enable_truncation(self.max_length)
            try:
                for i in (i for i, c in enumerate(cut) if c):
                    text = texts[i]
                    encoded[i] = (
                        list(self._tok.encode(text).ids) if isinstance(text, str) else encoded[i][: self.max_length]
                    )
            finally:
                self._tok.no_truncation()
        return encoded, cut

    def _over(self, lengths: list[int], truncate: bool) -> list[bool]:
        """Which inputs are over ``max_length`` tokens: a ``ConfigError`` naming the first unless ``truncate``."""
        cut = [n > self.max_length for n in lengths]
        if any(cut) and not truncate:
            i = cut.index(True)
            raise ConfigError(
                f"texts[{i}]",
                f"{lengths[i]} tokens",
                f"is over the model's {self.max_length}: shorten it, or cut it at the end (truncate=True;"
                " edgeroute run --truncate)",
            )
        return cut

    def _run(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._inputs:
            feeds["token_type_ids"] = np.zeros_like(ids)
        return self.session.run(None, {k: v for k, v in feeds.items() if k in self._inputs})[0]

    def __repr__(self) -> str:
        what = f"pooling={self.pooling!r}" if self.task == "embedding" else f"labels={len(self.labels)}"
        return f"EncoderModel({str(self.path)!r}, task={self.task!r}, {what}, dim={self.dimension})"


def _inputs(texts: Any, text_only: bool = False) -> Sequence[Any]:
    """``texts`` checked: a non-empty list (at most :data:`MAX_TEXTS`) of strings, or of token-id lists unless
    ``text_only``."""
    ok = (lambda t: isinstance(t, str) and t != "") if text_only else _is_input
    if not isinstance(texts, Sequence) or not texts or not all(ok(t) for t in texts):
        what = "non-empty strings" if text_only else "strings (or token-id lists)"
        raise ConfigError(
            "texts", texts if not isinstance(texts, Sequence) else len(texts), f"must be a list of {what}"
        )
    if len(texts) > MAX_TEXTS:
        raise ConfigError("texts", len(texts), f"holds more than {MAX_TEXTS} texts: split the call")
    return texts


def _is_input(t: Any) -> bool:
    """A text, or a non-empty list of token ids."""
    if isinstance(t, str):
        return True
    return (
        isinstance(t, (list, tuple))
        and len(t) > 0
        and all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in t)
    )


def _padded(encoded: Sequence[Sequence[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(e) for e in encoded)
    ids = np.full((len(encoded), width), pad, dtype=np.int64)
    mask = np.zeros((len(encoded), width), dtype=np.int64)
    for r, e in enumerate(encoded):
        ids[r, : len(e)] = e
        mask[r, : len(e)] = 1
    return ids, mask


def _check_manifest(m: Any, source: str) -> None:
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
    elif m["task"] == "token-classification":
        labels = m.get("labels")
        if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
            raise bad("labels", "must be a non-empty list of strings")
    else:
        labels = m.get("labels")
        if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
            raise bad("labels", "must be a non-empty list of strings")
        if m.get("problem_type") not in PROBLEM_TYPES:
            raise bad("problem_type", f"must be one of {', '.join(PROBLEM_TYPES)}")
    for field in ("hidden_size", "max_length"):
        v = m.get(field)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise bad(field, "must be an integer >= 1")
    if not isinstance(m.get("graph"), str):
        raise bad("graph", "must be a file name")
