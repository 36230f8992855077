"""Encoder architectures beyond BERT: DistilBERT, XLM-RoBERTa, DeBERTa-v2 (v3's relative attention) and ModernBERT
(a sliding-window layer), each as a tiny random ``*ForTokenClassification`` and ``*ForSequenceClassification``
with its own kind of tokenizer (``tests/checkpoints.py``: WordPiece; SentencePiece Unigram as transformers converts
XLM-R's and DeBERTa-v3's; ModernBERT's byte-level BPE), exported (``edgeroute.export.export_model``) and compared
with transformers' pipelines: the entities of every aggregation strategy, the labels' scores.

The pipeline's own word handling is reproduced, not corrected: on a SentencePiece tokenizer (no continuing-subword
prefix) it falls back to its space heuristic, so ``France,`` is one word, a token's ``start`` includes the space
before it (``▁is`` of "Paris is" is 5..8), and the first/average/max strategies join a group's words without
spaces (``isthecapital``): transformers issues #11887, #12593, #18111. These tests hold us to the same output.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import edgeroute as er
import numpy as np
import pytest
from checkpoints import (
    BIO_LABELS,
    TINY_MAX_LENGTH,
    build_once,
    write_sequence_classifier,
    write_token_classifier,
)

pytestmark = pytest.mark.export

ARCHS = ("bert", "distilbert", "xlm-roberta", "deberta-v2", "modernbert")
SENTENCEPIECE = ("xlm-roberta", "deberta-v2")  # Unigram tokenizers: <unk> / [UNK] has no model.unk_token
STRATEGIES = ("none", "simple", "first", "average", "max")
NER_TEXTS = [
    "Paris is the capital of France, and Rome the capital of Italy.",
    "The Parisian robots  learned   to paint the capitals!",  # sub-words, runs of spaces
    "  Hello world. Das Mädchen läuft schnell (sehr) zum Meer; edgeroute routes tokens.",  # leading spaces
    "Once upon a time a little robot learned to paint the sea and the sky. " * 2,  # 30+ tokens: far positions
    "a",
]
UNKNOWN_TEXTS = ["Das Mädchen läuft schnell 😀 zum Meer!", "  Hello   world ☃ ."]  # in no tiny vocabulary


def _export(src: Path, out: Path) -> None:
    from edgeroute.export import export_model

    export_model(src, out)


@pytest.fixture(scope="session")
def arch_model(shared_dir: Path) -> Callable[..., tuple[Path, Path]]:
    """``arch_model(arch, kind)``: (checkpoint, export) of ``kind`` ``"ner"`` (the BIO tagger) or ``"cls"`` (three
    labels) for ``arch``, each built once per run; ``save_max_length=False``: its tokenizer_config.json without
    ``model_max_length``. Shared: copy before changing."""
    pytest.importorskip("torch")
    pytest.importorskip("optimum.exporters.onnx")

    def get(arch: str, kind: str, save_max_length: bool | None = None) -> tuple[Path, Path]:
        name = f"{arch}-{kind}" + ("-nolimit" if save_max_length is False else "")
        if kind == "ner":
            src = build_once(
                shared_dir / "archs" / name,
                lambda d: write_token_classifier(d, arch=arch, save_max_length=save_max_length),
            )
        else:
            src = build_once(
                shared_dir / "archs" / name,
                lambda d: write_sequence_classifier(d, arch=arch, save_max_length=save_max_length),
            )
        out = build_once(shared_dir / "archs" / f"{name}-export", lambda d: _export(src, d), done="edgeroute.json")
        return src, out

    return get


_PIPES: dict[tuple[str, str], Any] = {}


def pipeline(task: str, src: Path) -> Any:
    """transformers' pipeline for ``task`` on ``src``, made once per module run."""
    import transformers

    key = (task, str(src))
    if key not in _PIPES:
        _PIPES[key] = transformers.pipeline(task, model=str(src), device="cpu")
    return _PIPES[key]


def assert_same_entities(got: list[Any], want: list[Any], strategy: str) -> int:
    """Our entities equal the pipeline's, text by text; returns how many there are."""
    key = "entity" if strategy == "none" else "entity_group"
    for g, w in zip(got, want, strict=True):
        assert [(e.label, e.word, e.start, e.end) for e in g] == [(x[key], x["word"], x["start"], x["end"]) for x in w]
        np.testing.assert_allclose([e.score for e in g], [float(x["score"]) for x in w], atol=1e-5)
        if strategy == "none":
            assert [e.index for e in g] == [x["index"] for x in w]
    return sum(len(g) for g in got)


@pytest.mark.filterwarnings("ignore:Tokenizer does not support real words")
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("arch", ARCHS)
def test_entities_equal_transformers_pipeline(arch_model: Callable[..., Any], arch: str, strategy: str) -> None:
    """Labels, words, offsets, scores (1e-5) and, with ``none``, token indices as the token-classification pipeline
    gives them, on sub-words, punctuation, runs of spaces and a text of 30+ tokens (run batched and padded here,
    one by one there)."""
    src, out = arch_model(arch, "ner")
    model = er.load(out)
    assert model.labels == list(BIO_LABELS) and model.max_length == TINY_MAX_LENGTH
    got = model.entities(NER_TEXTS, aggregation=strategy)
    want = pipeline("token-classification", src)(NER_TEXTS, aggregation_strategy=strategy)
    assert assert_same_entities(got, want, strategy) > 3  # the tiny model tags something


@pytest.mark.filterwarnings("ignore:Tokenizer does not support real words")
@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "modernbert"])  # (byte-level: no unknown)
def test_an_unknown_character_is_its_text(arch_model: Callable[..., Any], arch: str) -> None:
    """A character in no vocabulary is the unknown token; the pipeline's word for it is the text it covers (and it
    never continues a word)."""
    src, out = arch_model(arch, "ner")
    model = er.load(out)
    pipe = pipeline("token-classification", src)
    unk = pipe.tokenizer.unk_token_id
    assert all(unk in pipe.tokenizer(t)["input_ids"] for t in UNKNOWN_TEXTS)
    for strategy in STRATEGIES:
        want = pipe(UNKNOWN_TEXTS, aggregation_strategy=strategy)
        assert_same_entities(model.entities(UNKNOWN_TEXTS, aggregation=strategy), want, strategy)


@pytest.mark.parametrize("arch", ARCHS)
def test_classify_equals_transformers_pipeline(arch_model: Callable[..., Any], arch: str) -> None:
    """Every label's score in the text-classification pipeline's order (softmax, and sigmoid forced), on texts
    batched together (padding: XLM-R's positions count from its pad id 1, ModernBERT mean-pools under the mask),
    the longest as long as the model takes."""
    src, out = arch_model(arch, "cls")
    model = er.load(out)
    pipe = pipeline("text-classification", src)
    words = ("the sea and the sky " * TINY_MAX_LENGTH).split()
    n = max(
        k for k in range(1, len(words)) if len(pipe.tokenizer(" ".join(words[:k]))["input_ids"]) <= model.max_length
    )
    texts = [*NER_TEXTS, *UNKNOWN_TEXTS, " ".join(words[:n])]
    assert len(pipe.tokenizer(texts[-1])["input_ids"]) > TINY_MAX_LENGTH - 4  # (a word is 1-3 tokens)
    for function in (None, "sigmoid"):
        kw = {} if function is None else {"function_to_apply": function}
        want = pipe(texts, top_k=None, **kw)
        got = model.classify(texts, top_k=None, function=function)
        for g, w in zip(got, want, strict=True):
            assert [x.label for x in g] == [x["label"] for x in w]
            np.testing.assert_allclose([x.score for x in g], [x["score"] for x in w], atol=1e-5)
    with pytest.raises(er.ConfigError):  # one word more: over the model's length
        model.classify([" ".join(words[: n + 2])])


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_tokenizers_load_as_their_models_do(arch_model: Callable[..., Any], arch: str) -> None:
    """transformers' AutoTokenizer loads each tiny folder as a fast tokenizer of the architecture's kind, with the
    special tokens where the real vocabularies have them; the export records the architecture."""
    import json

    import transformers

    src, out = arch_model(arch, "ner")
    tok = transformers.AutoTokenizer.from_pretrained(src)
    expected = {"xlm-roberta": "XLMRobertaTokenizerFast", "deberta-v2": "DebertaV2TokenizerFast"}
    assert tok.is_fast and type(tok).__name__ == expected.get(arch, "PreTrainedTokenizerFast")
    ids = tok("Paris is the Parisian capital")["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    if arch == "xlm-roberta":
        assert [tok.convert_tokens_to_ids(t) for t in ("<s>", "<pad>", "</s>", "<unk>")] == [0, 1, 2, 3]
        assert tok.mask_token_id == len(tok) - 1 and pieces[0] == "<s>" and pieces[-1] == "</s>"
    elif arch == "deberta-v2":
        assert [tok.convert_tokens_to_ids(t) for t in ("[PAD]", "[CLS]", "[SEP]", "[UNK]")] == [0, 1, 2, 3]
        assert tok.mask_token_id == len(tok) - 1 and pieces[0] == "[CLS]" and pieces[-1] == "[SEP]"
    else:
        assert pieces[0] == "[CLS]" and pieces[-1] == "[SEP]"
    if arch in SENTENCEPIECE:  # SentencePiece: ▁ starts a word, an unseen word splits into pieces
        assert pieces[1:-1] == ["▁Paris", "▁is", "▁the", "▁Paris", "ian", "▁capital"]
        offsets = tok("Paris is", return_offsets_mapping=True)["offset_mapping"]
        assert offsets[1:3] == [(0, 5), (5, 8)]  # ▁is covers the space before it
    manifest = json.loads((out / "edgeroute.json").read_text())
    assert manifest["architecture"] == arch and manifest["task"] == "token-classification"


def test_roberta_positions_bound_the_length_without_a_tokenizer_limit(arch_model: Callable[..., Any]) -> None:
    """An XLM-R checkpoint whose tokenizer_config.json has no ``model_max_length``: the export's length is the
    positions less pad_token_id + 1, so a text the model cannot take is refused (a ConfigError), never run."""
    _, out = arch_model("xlm-roberta", "cls", save_max_length=False)
    model = er.load(out)
    text = " ".join(["a"] * (TINY_MAX_LENGTH - 2))  # <s> + 64 tokens + </s>
    assert model.max_length == TINY_MAX_LENGTH
    assert len(model.classify([text])[0]) == 1
    with pytest.raises(er.ConfigError):
        model.classify([text + " a"])


@pytest.mark.filterwarnings("ignore:Tokenizer does not support real words")
@pytest.mark.parametrize("arch", SENTENCEPIECE)
def test_words_from_the_text_mend_sentencepiece_words(arch_model: Callable[..., Any], arch: str) -> None:
    """Where the pipeline's SentencePiece words go wrong (``isthecapital``; spans that start on a space), the
    ``words="text"`` entities are the text's own words, spaces between them, spans from the first letter."""
    _, out = arch_model(arch, "ner")
    model = er.load(out)
    pipeline_words = model.entities(NER_TEXTS, aggregation="first")
    assert any(e.word != t[e.start : e.end] for t, g in zip(NER_TEXTS, pipeline_words, strict=True) for e in g)
    for strategy in ("simple", "first", "average", "max"):
        for text, g in zip(NER_TEXTS, model.entities(NER_TEXTS, aggregation=strategy, words="text"), strict=True):
            assert all(e.word == text[e.start : e.end] and not e.word[0].isspace() for e in g)
    groups = [e.word for g in model.entities(NER_TEXTS, aggregation="first", words="text") for e in g]
    assert any(" " in w for w in groups)  # several words in one entity keep their spaces
