"""Encoder models (issue 36): embeddings, labels, entities and rerank scores from an exported encoder, everything
after the graph in NumPy.

The graph computes ``last_hidden_state`` (embedding models) or logits (classifiers, token classifiers) only;
:class:`EncoderModel` tokenises (the folder's ``tokenizer.json``, special tokens added, text pairs where the model
takes them), batches, runs the graph and turns its output into the answer: pooling (``encoder_math.pool``) and
normalisation, the classification functions, entity aggregation (``edgeroute.ner``), rerank scores.

**Long texts are never cut silently** (``overflow``): a text over the model's ``max_length`` tokens is refused
(``ConfigError`` naming ``texts`` with its index and token count) by default; ``"truncate"`` cuts it at the end
(special tokens kept); ``"chunk"`` runs it in windows of ``max_length`` tokens (embeddings: the token-weighted mean
of the windows' embeddings; labels: the mean of the windows' scores; rerank: the best window; entities:
overlapping windows, ``stride`` tokens shared, merged). Every result says what happened (``truncated``,
``windows``).

**Batches by a token budget.** Inputs (or their windows) are sorted by length and batched so that each batch's
padded cost (rows x the longest row) stays within ``max_batch_tokens`` (a longer input runs alone): memory is
bounded by the budget whatever the number of inputs; results come back in input order.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer as _HFTokenizer

from .encoder_math import (
    ENCODER_MANIFEST_VERSION,
    ENCODER_TASKS,
    MAX_TEXTS,
    POOLINGS,
    Embeddings,
    Label,
    Ranked,
    apply_function,
    check_inputs,
    check_int,
    check_manifest,
    normalized,
    padded,
    pool,
    uncertainty,
)
from .encoder_runs import OVERFLOWS, EncoderRuns, Row, is_pair, merged, per_owner, windows_of
from .errors import ConfigError, ManifestError, ModelLoadError
from .ner import (
    AGGREGATIONS,
    DECODES,
    SCHEMES,
    WORDS,
    Entities,
    aggregate,
    merge_overlapping,
    scheme_of,
    softmax,
    unk_token_id,
    with_uncertainty,
)
from .session import create_session

__all__ = [
    "ENCODER_MANIFEST_VERSION",
    "ENCODER_TASKS",
    "MAX_TEXTS",
    "POOLINGS",
    "Embeddings",
    "EncoderModel",
    "Label",
    "Ranked",
    "is_encoder_folder",
    "pool",
]

PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")
FUNCTIONS = ("softmax", "sigmoid", "none")
# padded positions per graph run by default, measured on MiniLM on 2 cores (bench/results/encoders-ner-int8-*.md):
# a mixed-length corpus runs 1.3x faster at 2,048 than at 8,192 (smaller runs stay in cache), fixed batches as fast
MAX_BATCH_TOKENS = 2048
MAX_SAMPLES = 64  # stochastic passes per call


def is_encoder_folder(folder: str | Path) -> bool:
    """Whether ``folder/edgeroute.json`` names an encoder task."""
    try:
        data = json.loads((Path(folder) / "edgeroute.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("task") in ENCODER_TASKS


class EncoderModel(EncoderRuns):
    """An exported encoder: :meth:`embed` (embedding models), :meth:`classify` and :meth:`rerank` (classifiers;
    rerank for one-score models such as cross-encoders), :meth:`entities` (token classifiers)."""

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
        # classifiers and token classifiers
        self.labels: list[str] = list(manifest.get("labels", []))
        self.problem_type: str = manifest.get("problem_type", "")
        self.scheme: str = manifest.get("scheme") or scheme_of(self.labels)
        # the graph input that turns the fine-tune's dropout on (stochastic passes), where the export has one
        self.dropout_input: str | None = manifest.get("dropout_input")
        self._tok = tokenizer
        self._tok.no_truncation()
        self._tok.no_padding()
        self._cut_tok = _HFTokenizer.from_str(tokenizer.to_str())  # (truncation is state: a copy, under a lock)
        self._cut_lock = threading.Lock()
        self._vocab = int(tokenizer.get_vocab_size(with_added_tokens=True))  # (milliseconds to ask: once)
        self._inputs = [i.name for i in session.get_inputs()]
        self._pad = int(tokenizer.token_to_id("[PAD]") or tokenizer.token_to_id("<pad>") or 0)
        self._specials = int(tokenizer.num_special_tokens_to_add(False))
        self._unk = unk_token_id(tokenizer)  # (a Unigram model's from its serialised state: once)

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
        check_manifest(manifest, str(source), PROBLEM_TYPES)
        graph = folder / manifest["graph"]
        if not graph.resolve().is_relative_to(folder.resolve()) or not graph.is_file():
            raise ModelLoadError(f"{graph} is missing or outside the model folder")
        try:
            tokenizer = _HFTokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # tokenizers raises a bare Exception
            raise ModelLoadError(f"{folder / 'tokenizer.json'} is not a valid tokenizer file: {e}") from e
        return cls(folder, manifest, create_session(graph, provider, threads), tokenizer)

    # -- the calls ------------------------------------------------------------------------------------------------
    def embed(
        self,
        texts: str | Sequence[str | Sequence[int]],
        normalize: bool | None = None,
        dimensions: int | None = None,
        overflow: str = "refuse",
        max_batch_tokens: int = MAX_BATCH_TOKENS,
    ) -> Embeddings:
        """The embeddings of ``texts`` (one text, a list of texts, or of token-id lists), in input order.

        Args:
            normalize: L2-normalise (default: as the model's sentence-transformers folder said).
            dimensions: keep the first ``dimensions`` values (Matryoshka models), renormalised when normalising.
            overflow: a text over ``max_length`` tokens is ``"refuse"`` d (a ``ConfigError`` naming it),
                ``"truncate"`` d at the end, or ``"chunk"`` ed: the token-weighted mean of its windows' embeddings.
            max_batch_tokens: the padded positions one graph run may hold.
        """
        self._need("embedding", "embed")
        if dimensions is not None:
            check_int("dimensions", dimensions, 1, self.dimension)
        norm = self.normalize if normalize is None else bool(normalize)
        rows, owners, cut = self._rows(check_inputs(texts), overflow)
        pooled = np.zeros((len(rows), self.dimension), dtype=np.float32)
        for index, output, mask in self._runs(rows, max_batch_tokens):
            pooled[index] = pool(output, mask, self.pooling, False)
        weights = np.array([len(r[0]) for r in rows], dtype=np.float32)
        out = per_owner(pooled, owners, weights)
        if dimensions is not None:
            out = out[:, :dimensions]
        out = normalized(out) if norm else out
        tokens = [int(n) for n in np.bincount(owners, weights, minlength=len(cut))]
        return Embeddings(out, tokens, cut, windows_of(owners, len(cut)))

    def classify(
        self,
        texts: str | Sequence[str | Sequence[int]],
        top_k: int | None = 1,
        function: str | None = None,
        pairs: Sequence[str] | None = None,
        overflow: str = "refuse",
        max_batch_tokens: int = MAX_BATCH_TOKENS,
        samples: int = 1,
    ) -> list[list[Label]]:
        """Each text's labels, most likely first, as transformers' ``text-classification`` pipeline scores them:
        ``function`` ``None`` follows the model's ``problem_type`` (single-label: softmax; multi-label: sigmoid;
        regression: the raw value), or ``"softmax"``, ``"sigmoid"``, ``"none"``; ``top_k`` labels per text
        (``None``: all); ``pairs``: a second text for each (the pipeline's ``text_pair``). ``overflow``
        (``"chunk"``: the mean of the windows' scores) and ``max_batch_tokens`` as in :meth:`embed`. ``samples``
        N > 1: N stochastic passes with the fine-tune's dropout on (one graph run, N rows per text): each score is
        the passes' mean, with its spread and uncertainty (:class:`Label`)."""
        self._need("classification", "classify")
        if top_k is not None:
            check_int("top_k", top_k, 1, why="must be None (all labels) or an integer >= 1")
        if function not in (None, *FUNCTIONS):
            raise ConfigError("function", function, f"must be None (the model's problem type) or one of {FUNCTIONS}")
        fn = function or self.default_function
        self._check_samples(samples)
        items = self._paired(texts, pairs)
        scores, cut, windows, spread = self._scores(items, overflow, max_batch_tokens, fn, "mean", samples)
        out = []
        for i, row in enumerate(scores):
            order = np.argsort(-row, kind="stable")[: top_k or len(row)]
            labels = []
            for j in order:
                extra = {}
                if spread is not None:
                    std, entropy, information = spread
                    extra["std"] = float(std[i, j])
                    if entropy is not None and information is not None:
                        h, mi = (entropy[i], information[i]) if fn == "softmax" else (entropy[i, j], information[i, j])
                        extra |= {"entropy": float(h), "mutual_information": float(mi)}
                labels.append(Label(self.labels[j], float(row[j]), cut[i], windows[i], **extra))
            out.append(labels)
        return out

    def rerank(
        self,
        query: str,
        documents: Sequence[str],
        raw_scores: bool = False,
        top_n: int | None = None,
        overflow: str = "refuse",
        max_batch_tokens: int = MAX_BATCH_TOKENS,
    ) -> list[Ranked]:
        """The ``documents`` ranked for ``query`` by a one-score classifier (a cross-encoder): each (query,
        document) pair's sigmoid score (``raw_scores``: the logit), best first, ``top_n`` of them (``None``: all).
        ``overflow="chunk"`` runs a long document in windows (the query in each) and keeps its best window."""
        self._need("classification", "rerank")
        if not isinstance(query, str) or not query:
            raise ConfigError("query", query, "must be a non-empty string")
        docs = check_inputs(documents, text_only=True, name="documents")
        if top_n is not None:
            check_int("top_n", top_n, 1, why="must be None (all documents) or an integer >= 1")
        scored = self.score_pairs([(query, d) for d in docs], raw_scores, overflow, max_batch_tokens)
        return sorted(scored, key=lambda r: -r.score)[: top_n or len(docs)]

    def score_pairs(
        self,
        pairs: Sequence[tuple[str, str]],
        raw_scores: bool = False,
        overflow: str = "refuse",
        max_batch_tokens: int = MAX_BATCH_TOKENS,
    ) -> list[Ranked]:
        """Each (query, document) pair's rerank score in input order (``index``: the pair's); :meth:`rerank`."""
        self._need("classification", "score_pairs")
        if len(self.labels) != 1:
            raise ConfigError(
                "task", self.task, f"rerank needs a one-score model (a cross-encoder), not {len(self.labels)} labels"
            )
        if not pairs or not all(is_pair(p) and p[0] and p[1] for p in pairs):
            raise ConfigError("pairs", len(pairs), "must be a list of (query, document) pairs of non-empty strings")
        fn = "none" if raw_scores else "sigmoid"
        scores, cut, windows, _ = self._scores(check_inputs(list(pairs)), overflow, max_batch_tokens, fn, "max")
        return [Ranked(i, float(scores[i, 0]), cut[i], windows[i]) for i in range(len(pairs))]

    def entities(
        self,
        texts: str | Sequence[str],
        aggregation: str = "simple",
        ignore_labels: Sequence[str] = ("O",),
        words: str = "pipeline",
        scheme: str | None = None,
        decode: str = "argmax",
        stride: int | None = None,
        overflow: str = "refuse",
        max_batch_tokens: int = MAX_BATCH_TOKENS,
        samples: int = 1,
    ) -> list[Entities]:
        """Each text's entities (``edgeroute.ner``): by default as transformers' ``token-classification`` pipeline
        gives them for ``aggregation`` (its ``aggregation_strategy``: none, simple, first, average, max).

        Args:
            words: ``"pipeline"`` (its sub-word test and decoded words) or ``"text"`` (the tokenizer's word ids,
                ``word`` = ``text[start:end]``, windows merged per token).
            scheme: the tag scheme (BIO, BIOES, BILOU, IO; default: the model's).
            decode: ``"argmax"`` or ``"viterbi"`` (the best valid tag sequence).
            stride: run a long text in overlapping windows sharing ``stride`` tokens (implies
                ``overflow="chunk"``; with ``"chunk"`` alone a quarter of a window).
            overflow: ``"refuse"``, ``"truncate"`` or ``"chunk"`` a text over ``max_length`` tokens.
            samples: N > 1: N stochastic passes with the fine-tune's dropout on: the tags' mean probabilities, and
                each entity's uncertainty (:class:`~edgeroute.ner.Entity`).
        """
        self._need("token-classification", "entities")
        for name, value, allowed in (
            ("aggregation", aggregation, AGGREGATIONS),
            ("words", words, WORDS),
            ("decode", decode, DECODES),
            ("overflow", overflow, OVERFLOWS),
        ):
            if value not in allowed:
                raise ConfigError(name, value, f"must be one of {', '.join(allowed)}")
        if scheme is not None and scheme not in SCHEMES:
            raise ConfigError("scheme", scheme, f"must be one of {', '.join(SCHEMES)}")
        self._check_samples(samples)
        if scheme is not None and scheme not in ("BIO", "IO", self.scheme):
            raise ConfigError("scheme", scheme, f"the model's tags are {self.scheme}: read them as that, BIO or IO")
        if stride is not None or overflow == "chunk":
            overflow = "chunk"
            room = self.max_length - self._specials
            stride = self.default_stride if stride is None else stride
            check_int("stride", stride, 0, room - 1, f"must be an integer in [0, {room}) (a window holds {room})")
            if aggregation == "none" and words == "pipeline":
                raise ConfigError(
                    "stride", stride, 'with aggregation "none" windows are merged per token: use words="text"'
                )
        items = check_inputs([texts] if isinstance(texts, str) else texts, text_only=True)
        full = list(self._tok.encode_batch(list(items)))
        cut = self._over([len(e.ids) for e in full], overflow)
        if overflow == "chunk":
            self._bound_windows([len(e.ids) for e in full], stride or 0)
        windows: list[list[Any]] = []
        for i, enc in enumerate(full):
            windows.append(self._windowed(items[i], stride or 0, overflow == "chunk") if cut[i] else [enc])
        rows: list[Row] = [(list(w.ids), None) for ws in windows for w in ws for _ in range(samples)]
        logits: list[np.ndarray] = [np.zeros(0)] * len(rows)
        for index, output, _mask in self._runs(rows, max_batch_tokens, dropout=samples > 1):
            for r, i in enumerate(index):
                logits[i] = output[r, : len(rows[i][0])]
        if samples > 1:  # per window: the passes' mean probabilities, then each token's entropy and information
            passes = [softmax(np.stack(logits[k : k + samples])) for k in range(0, len(logits), samples)]
            logits = [np.concatenate([m, h[:, None], mi[:, None]], 1) for m, h, mi in map(_token_uncertainty, passes)]
        labels = len(self.labels)
        chosen = self.scheme if scheme is None else scheme
        options: dict[str, Any] = dict(
            words=words, scheme=chosen, decode=decode, probabilities=samples > 1, unk_id=self._unk
        )
        ignore = set(ignore_labels)
        out = []
        at = 0
        for i, text in enumerate(items):
            ws, lg = windows[i], logits[at : at + len(windows[i])]
            at += len(ws)
            chunked = overflow == "chunk" and cut[i]
            if chunked and words == "text":  # one sequence: each token's scores from its most central window
                ws, lg = [full[i]], [merged(full[i], ws, lg)]
            found = []
            for w, g in zip(ws, lg, strict=True):
                got = aggregate(text, w, g[:, :labels], aggregation, ignore, self._tok, self.labels, **options)
                found += with_uncertainty(got, w, g[:, labels], g[:, labels + 1]) if samples > 1 else got
            found = merge_overlapping(found) if len(ws) > 1 else found
            out.append(Entities(found, truncated=cut[i] and not chunked, windows=len(windows[i])))
        return out

    def tokenize(self, texts: Sequence[str | Sequence[int]], overflow: str = "refuse") -> tuple[np.ndarray, np.ndarray]:
        """Padded ``(input_ids, attention_mask)`` of ``texts`` in order (one batch: for checks and references)."""
        rows, _, _ = self._rows(check_inputs(texts), overflow)
        return padded([r[0] for r in rows], self._pad)

    def encodings(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[Any]:
        """The tokenizer's encodings of ``texts`` (``tokenizers.Encoding``: ids, tokens, character offsets,
        special-token mask, word ids), uncut."""
        items = list(check_inputs(texts, text_only=True))
        return list(self._tok.encode_batch(items, add_special_tokens=add_special_tokens))

    def count_tokens(self, texts: Sequence[Any]) -> list[int]:
        """Each input's token count as it would run uncut (special tokens included; token-id lists as given;
        (text, pair) tuples as one sequence)."""
        return [len(e[0]) for e in self._tokens(texts)]

    # -- inputs, windows, runs ------------------------------------------------------------------------------------
    def _need(self, task: str, call: str) -> None:
        if self.task != task:
            raise ConfigError("task", self.task, f"this {self.task} model has no {call}(): it is a {task} call")

    def _paired(self, texts: Any, pairs: Sequence[str] | None) -> Sequence[Any]:
        items = check_inputs([texts] if isinstance(texts, str) else texts)
        if pairs is None:
            return items
        if isinstance(pairs, str) or not isinstance(pairs, Sequence) or len(pairs) != len(items):
            raise ConfigError("pairs", pairs, f"must be a list of {len(items)} texts, one for each text")
        if not all(isinstance(t, str) for t in items) or not all(isinstance(p, str) and p for p in pairs):
            raise ConfigError("pairs", pairs, "pairs are texts (non-empty strings) beside texts")
        return list(zip(items, pairs, strict=True))

    def _scores(
        self, items: Sequence[Any], overflow: str, max_batch_tokens: int, function: str, combine: str, samples: int = 1
    ) -> tuple[np.ndarray, list[bool], list[int], tuple[np.ndarray, Any, Any] | None]:
        """Each input's scores under ``function`` (windows combined by ``combine``: mean or max), whether it was
        cut, its windows, and with ``samples`` > 1 the passes' (std, entropy, mutual information)."""
        rows, owners, cut = self._rows(items, overflow)
        count, labels = len(cut), len(self.labels)
        runs = [r for r in rows for _ in range(samples)]  # each row ``samples`` times (stochastic passes)
        logits = np.zeros((len(runs), labels), dtype=np.float32)
        for index, output, _mask in self._runs(runs, max_batch_tokens, dropout=samples > 1):
            logits[index] = output
        passes = apply_function(function, logits).reshape(len(rows), samples * labels)
        if combine == "max":
            per = np.full((count, samples * labels), -np.inf)
            np.maximum.at(per, owners, passes)
        else:
            per = per_owner(passes, owners, np.ones(len(rows)))
        each = per.reshape(count, samples, labels)
        windows = windows_of(owners, count)
        if samples == 1:
            return each[:, 0], cut, windows, None
        mean, entropy, information = uncertainty(each, function)
        return mean, cut, windows, (each.std(1), entropy, information)

    @property
    def default_stride(self) -> int:
        """The tokens ``entities`` windows share unless told: a quarter of a window."""
        return (self.max_length - self._specials) // 4

    @property
    def default_function(self) -> str:
        """The function ``classify`` applies by default, as transformers' pipeline picks it: none for regression,
        sigmoid for multi-label or one-label models, softmax otherwise."""
        if self.problem_type == "regression":
            return "none"
        if self.problem_type == "multi_label_classification" or len(self.labels) == 1:
            return "sigmoid"
        return "softmax"

    def _check_samples(self, samples: int) -> None:
        check_int("samples", samples, 1, MAX_SAMPLES)
        if samples > 1 and self.dropout_input is None:
            raise ConfigError(
                "samples",
                samples,
                "needs an export with the fine-tune's dropout in the graph: re-export the checkpoint with this version",
            )

    def __repr__(self) -> str:
        what = f"pooling={self.pooling!r}" if self.task == "embedding" else f"labels={len(self.labels)}"
        return f"EncoderModel({str(self.path)!r}, task={self.task!r}, {what}, dim={self.dimension})"


def _token_uncertainty(passes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One window's passes ``[samples, tokens, labels]`` -> each token's mean probabilities, entropy, information."""
    mean, entropy, information = uncertainty(np.moveaxis(passes, 0, 1), "softmax")
    assert entropy is not None and information is not None
    return mean, entropy, information
