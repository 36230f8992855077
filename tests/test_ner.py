"""Token classifiers (issue 36): entities equal to transformers' token-classification pipeline (all five
aggregation strategies, long texts in overlapping windows), and what edgeroute adds beyond it: words from the
tokenizer's word ids and the text itself, BIOES/BILOU schemes, Viterbi decoding of the tag sequence, windows
merged per token; through the library and ``edgeroute run`` (one text, a JSONL file)."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path
from typing import Any

import edgeroute as er
import numpy as np
import pytest
from click.testing import CliRunner
from edgeroute.cli import cli
from edgeroute.ner import scheme_of, viterbi

pytestmark = pytest.mark.export

NER_TEXTS = [
    "Paris is the capital of France, and Rome the capital of Italy.",
    "Once upon a time a little robot learned to paint the sea and the sky.",
    "Das Mädchen läuft schnell 🤖 zum Meer!",  # sub-words, [UNK], punctuation
    "a",
]
LONG = " ".join(NER_TEXTS[:3] * 4)  # ~130 tokens: over the tiny tagger's 64
STRATEGIES = ["none", "simple", "first", "average", "max"]


@pytest.fixture(scope="module")
def tagger(tiny_tagger: tuple[Path, Path]) -> tuple[Path, Path]:
    return tiny_tagger


def pipeline(ckpt: Path, strategy: str, **kw: Any) -> Any:
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(ckpt, model_max_length=64)  # the export's max_length
    return transformers.pipeline(
        "token-classification", model=str(ckpt), tokenizer=tok, aggregation_strategy=strategy, device="cpu", **kw
    )


def same(got: list[Any], want: list[dict[str, Any]], strategy: str) -> None:
    key = "entity" if strategy == "none" else "entity_group"
    assert [(e.label, e.word, e.start, e.end) for e in got] == [(x[key], x["word"], x["start"], x["end"]) for x in want]
    np.testing.assert_allclose([e.score for e in got], [float(x["score"]) for x in want], atol=1e-5)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_entities_equal_transformers_pipeline(tagger: tuple[Path, Path], strategy: str) -> None:
    """The same entities as transformers' token-classification pipeline for each aggregation strategy: labels,
    words, offsets, scores to 1e-5 (sub-words, an unknown token, punctuation); and long texts in overlapping
    windows (``stride``) as the pipeline runs and merges them."""
    ckpt, out = tagger
    model = er.load(out)
    pipe = pipeline(ckpt, strategy)
    got = model.entities(NER_TEXTS, aggregation=strategy)
    assert sum(len(g) for g in got) > 3  # the tiny model tags something
    for g, w in zip(got, pipe(NER_TEXTS), strict=True):
        same(g, w, strategy)
        assert g.windows == 1 and not g.truncated
        if strategy == "none":
            assert [e.index for e in g] == [x["index"] for x in w]
    if strategy == "none":  # the pipeline refuses windows without aggregation
        return
    long = model.entities(LONG, aggregation=strategy, stride=16)[0]
    assert long.windows > 2 and not long.truncated and len(long) > 5
    same(long, pipeline(ckpt, strategy, stride=16)(LONG), strategy)


def test_words_from_the_tokenizer_and_the_text(tagger: tuple[Path, Path]) -> None:
    """``words="text"``: a word is what the tokenizer's word ids say and ``word`` is ``text[start:end]`` (case
    kept: the tiny tokenizer lower-cases); with WordPiece the spans and scores are the pipeline's."""
    ckpt, out = tagger
    model = er.EncoderModel.load(out)
    for strategy in ("simple", "first", "average", "max"):
        ours = model.entities(NER_TEXTS, aggregation=strategy, words="text")
        for text, g, w in zip(NER_TEXTS, ours, pipeline(ckpt, strategy)(NER_TEXTS), strict=True):
            assert all(e.word == text[e.start : e.end] for e in g)
            assert [(e.label, e.start, e.end) for e in g] == [(x["entity_group"], x["start"], x["end"]) for x in w]
            np.testing.assert_allclose([e.score for e in g], [float(x["score"]) for x in w], atol=1e-5)
    assert any(e.word != e.word.lower() for g in model.entities(NER_TEXTS, words="text") for e in g)


def test_windows_merged_per_token(tagger: tuple[Path, Path], tmp_path: Path) -> None:
    """``words="text"`` with windows: one tag per token of the whole text (none lost, none twice), each from the
    window where the token sits farthest from a cut; the tokens only the first window holds tagged as that
    window alone tags them."""
    _, out = tagger
    small = tmp_path / "small"
    shutil.copytree(out, small)
    manifest = json.loads((small / "edgeroute.json").read_text())
    manifest["max_length"] = 20
    (small / "edgeroute.json").write_text(json.dumps(manifest))
    model = er.EncoderModel.load(small)
    text = NER_TEXTS[0] + " " + NER_TEXTS[1]
    full = model.encodings([text])[0]
    tokens = model.entities(text, aggregation="none", words="text", stride=6, ignore_labels=())[0]
    assert tokens.windows >= 3 and not tokens.truncated
    inner = [i for i, s in enumerate(full.special_tokens_mask) if not s]
    assert [e.index for e in tokens] == inner and [e.start for e in tokens] == [full.offsets[i][0] for i in inner]
    first = model.entities(text, aggregation="none", words="text", overflow="truncate", ignore_labels=())[0]
    assert first.truncated and first.windows == 1
    alone = 18 - 6  # the first window's tokens no other window holds
    assert [(e.label, round(e.score, 5)) for e in tokens[:alone]] == [
        (e.label, round(e.score, 5)) for e in first[:alone]
    ]
    grouped = model.entities(text, words="text", stride=6)[0]
    assert all(e.word == text[e.start : e.end] for e in grouped)
    assert all(a.end <= b.start for a, b in itertools.pairwise(grouped))


def test_long_texts_are_refused_cut_or_windowed(tagger: tuple[Path, Path]) -> None:
    _, out = tagger
    model = er.EncoderModel.load(out)
    with pytest.raises(er.ConfigError) as e:
        model.entities(["a", LONG])
    assert e.value.field == "texts[1]" and "over the model's 64" in e.value.reason
    cut = model.entities(LONG, overflow="truncate")[0]
    assert cut.truncated and cut.windows == 1 and max(e.end for e in cut) < len(LONG) // 2
    windows = model.entities(LONG, overflow="chunk")[0]  # a quarter of a window shared by default
    assert windows.windows > 2 and not windows.truncated and max(e.end for e in windows) > len(LONG) // 2


def bio_valid(tags: list[str], scheme: str) -> bool:
    """Whether a tag sequence is valid in ``scheme`` (written here independently of the library)."""
    inside: str | None = None  # the type of the open entity
    for t in tags:
        prefix, kind = (t.split("-", 1) + [""])[:2] if "-" in t else ("O", "")
        if scheme == "BIO":
            if prefix == "I" and inside != kind:
                return False
            inside = kind if prefix in ("B", "I") else None
        else:  # BIOES
            if prefix in ("I", "E"):
                if inside != kind:
                    return False
                inside = kind if prefix == "I" else None
            else:
                if inside is not None:
                    return False
                inside = kind if prefix == "B" else None
    return inside is None if scheme == "BIOES" else True


@pytest.mark.parametrize(
    "labels", [("O", "B-PER", "I-PER", "B-LOC", "I-LOC"), ("O", "B-PER", "I-PER", "E-PER", "S-PER", "S-LOC")]
)
def test_viterbi_is_the_best_valid_tag_sequence(labels: tuple[str, ...]) -> None:
    """Against every sequence of 5 tags: Viterbi's is valid and no valid one scores higher."""
    scheme = scheme_of(labels)
    rng = np.random.default_rng(7)
    for _ in range(12):
        logits = rng.normal(size=(5, len(labels))) * 3
        p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        path = viterbi(p, labels, scheme)
        assert bio_valid([labels[i] for i in path], scheme)
        score = sum(np.log(p[t, i]) for t, i in enumerate(path))
        best = max(
            sum(np.log(p[t, i]) for t, i in enumerate(seq))
            for seq in itertools.product(range(len(labels)), repeat=5)
            if bio_valid([labels[i] for i in seq], scheme)
        )
        assert score == pytest.approx(best, abs=1e-9)


def test_schemes_are_read_from_the_labels() -> None:
    assert scheme_of(["O", "B-PER", "I-PER"]) == "BIO"
    assert scheme_of(["O", "B-PER", "I-PER", "E-PER", "S-PER"]) == "BIOES"
    assert scheme_of(["O", "B-PER", "I-PER", "L-PER", "U-PER"]) == "BILOU"
    assert scheme_of(["O", "PER", "LOC"]) == "IO"


def crafted(model: er.EncoderModel, monkeypatch: pytest.MonkeyPatch, text: str, tags: list[str], probs: Any) -> None:
    """Make the model's graph answer ``text`` with each word-piece tagged ``tags[i]`` (probability ``probs[i]``,
    the rest spread over the other labels; a dict gives several labels' probabilities)."""
    enc = model.encodings([text])[0]
    inner = [i for i, s in enumerate(enc.special_tokens_mask) if not s]
    assert len(inner) == len(tags), enc.tokens
    logits = np.full((1, len(enc.ids), len(model.labels)), -9.0, dtype=np.float32)
    for i, tag, p in zip(inner, tags, probs, strict=True):
        spread = p if isinstance(p, dict) else {tag: p}
        rest = (1 - sum(spread.values())) / (len(model.labels) - len(spread))
        logits[0, i] = np.log(rest)
        for label, q in spread.items():
            logits[0, i, model.labels.index(label)] = np.log(q)
    monkeypatch.setattr(model.session, "run", lambda names, feeds: [logits[:, : feeds["input_ids"].shape[1]]])


def test_bioes_groups_and_viterbi_decoding(tagger: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """BIOES: ``E-`` closes an entity, ``S-`` is one alone (the pipeline's BIO reading makes them types of their
    own); Viterbi mends an invalid sequence the argmax would split."""
    _, out = tagger
    model = er.EncoderModel.load(out)
    assert model.scheme == "BIO" and json.loads((out / "edgeroute.json").read_text())["scheme"] == "BIO"
    model.labels = ["O", "B-PER", "I-PER", "E-PER", "S-PER"]
    model.scheme = "BIOES"
    text = "Little Robot paints the sea in Paris"
    tags = tokens_tagged(model, text, ["B-PER", "E-PER", "O", "O", "S-PER", "O", "S-PER"])
    crafted(model, monkeypatch, text, tags, [0.9] * len(tags))
    got = model.entities(text, words="text")[0]
    assert [(e.label, e.word) for e in got] == [("PER", "Little Robot"), ("PER", "sea"), ("PER", "Paris")]
    bio = model.entities(text, scheme="BIO")[0]  # read as BIO: E-PER and S-PER are not understood
    assert [e.label for e in bio] != ["PER", "PER", "PER"]
    # the second token's best tag is S-PER (0.5; invalid inside an entity), its own tag close (0.4)
    probs: list[Any] = [0.9, {"S-PER": 0.5, tags[1]: 0.4}] + [0.9] * (len(tags) - 2)
    crafted(model, monkeypatch, text, tags, probs)
    argmax = model.entities(text, words="text")[0]
    assert argmax[0].word != "Little Robot" and len(argmax) > 3  # split at the invalid tag
    best = model.entities(text, words="text", decode="viterbi")[0]
    assert [e.word for e in best] == ["Little Robot", "sea", "Paris"]
    n = tags.index("E-PER") + 1  # the tokens of "Little Robot"
    assert best[0].score == pytest.approx((0.9 * (n - 1) + 0.4) / n, abs=1e-5)


def tokens_tagged(model: er.EncoderModel, text: str, word_tags: list[str]) -> list[str]:
    """BIOES tags of ``text``'s word pieces from its words' tags (the tiny tokenizer's pieces vary by build)."""
    enc = model.encodings([text])[0]
    words = [w for w, s in zip(enc.word_ids, enc.special_tokens_mask, strict=True) if not s]
    out = []
    for k, w in enumerate(words):
        first, last = k == 0 or words[k - 1] != w, k == len(words) - 1 or words[k + 1] != w
        prefix, _, kind = word_tags[w].partition("-")
        if prefix == "O":
            out.append("O")
        elif prefix == "S":
            out.append(f"S-{kind}" if first and last else f"{'B' if first else 'E' if last else 'I'}-{kind}")
        elif prefix == "B":
            out.append(f"{'B' if first else 'I'}-{kind}")
        else:  # E
            out.append(f"{'E' if last else 'I'}-{kind}")
    return out


def test_mistakes_are_config_errors(tagger: tuple[Path, Path]) -> None:
    _, out = tagger
    model = er.EncoderModel.load(out)
    for kw, field in (
        ({"aggregation": "mean"}, "aggregation"),
        ({"max_batch_tokens": 0}, "max_batch_tokens"),
        ({"words": "spaces"}, "words"),
        ({"decode": "beam"}, "decode"),
        ({"scheme": "BIOX"}, "scheme"),
        ({"overflow": "drop"}, "overflow"),
        ({"stride": 62}, "stride"),  # a window holds 62 tokens
        ({"stride": -1}, "stride"),
        ({"stride": 8, "aggregation": "none"}, "stride"),  # the pipeline's windows need aggregation
    ):
        with pytest.raises(er.ConfigError) as e:
            model.entities(NER_TEXTS, **kw)
        assert e.value.field == field, kw
    for bad in ([], [""], [[1, 2]]):
        with pytest.raises(er.ConfigError) as e:
            model.entities(bad)  # type: ignore[arg-type]
        assert e.value.field == "texts"
    with pytest.raises(er.ConfigError) as e:
        model.classify(NER_TEXTS)
    assert e.value.field == "task"


def test_the_command_line(tagger: tuple[Path, Path], tmp_path: Path) -> None:
    """``edgeroute run`` on a tagger: one text (a table, ``--json``), a JSONL file (one line per input, in order,
    ``--output`` written whole), and the mistakes (one line each, nothing written)."""
    _, out = tagger
    model = er.EncoderModel.load(out)
    run = CliRunner().invoke
    res = run(cli, ["run", str(out), NER_TEXTS[0], "--json"])
    want = model.entities(NER_TEXTS[0])[0]
    data = json.loads(res.output)
    assert [x["word"] for x in data["entities"]] == [e.word for e in want] and data["windows"] == 1
    res = run(cli, ["run", str(out), NER_TEXTS[0], "--aggregation", "first", "--words", "text", "--decode", "viterbi"])
    rows = [line.split("\t") for line in res.output.splitlines()]
    want = model.entities(NER_TEXTS[0], aggregation="first", words="text", decode="viterbi")[0]
    assert [(r[0], r[2]) for r in rows] == [(e.label, e.word) for e in want], res.output
    inputs = tmp_path / "in.jsonl"
    lines = [json.dumps(NER_TEXTS[0]), "", json.dumps({"text": LONG}), json.dumps({"text": NER_TEXTS[2]})]
    inputs.write_text("\n".join(lines) + "\n")
    target = tmp_path / "out.jsonl"
    res = run(cli, ["run", str(out), "--input", str(inputs), "--output", str(target), "--stride", "16"])
    assert res.exit_code == 0, res.output
    got = [json.loads(line) for line in target.read_text().splitlines()]
    want_all = model.entities([NER_TEXTS[0], LONG, NER_TEXTS[2]], stride=16)
    assert [[x["word"] for x in g["entities"]] for g in got] == [[e.word for e in w] for w in want_all]
    assert [g["windows"] for g in got] == [1, want_all[1].windows, 1] and "inputs" in res.output  # progress
    res = run(cli, ["run", str(out), "--input", "-"], input=json.dumps(NER_TEXTS[3]) + "\n")
    assert res.exit_code == 0 and json.loads(res.output.splitlines()[-1])["truncated"] is False
    target.unlink()
    for body, needle in (
        ('"ok"\n{"text": 3}\n', "line 2"),
        ('"ok"\nnot json\n', "line 2"),
        ('"ok"\n\n' + json.dumps(LONG) + "\n", "line 3="),  # over the length, refused: no line written
        ("\n\n", "holds no inputs"),
    ):
        inputs.write_text(body)
        res = run(cli, ["run", str(out), "--input", str(inputs), "--output", str(target)])
        assert res.exit_code == 1 and needle in res.output and "Traceback" not in res.output, res.output
        assert not target.exists() and not list(tmp_path.glob(".out.jsonl*"))
    for args, needle in (
        ([NER_TEXTS[0], "--pair", "x"], "--pair is for classifiers"),
        ([NER_TEXTS[0], "--temperature", "0.5"], "--temperature is a generation option"),
        ([NER_TEXTS[0], "--input", str(inputs)], "not both"),
        ([NER_TEXTS[0], "--output", str(target)], "--output needs --input"),
    ):
        res = run(cli, ["run", str(out), *args])
        assert res.exit_code == 2 and needle in res.output, res.output
    info = run(cli, ["info", str(out)]).output
    assert "task          token-classification" in info and "B-PER" in info


def test_entities_highlighted_on_a_terminal() -> None:
    from edgeroute.cli.encoder_run import _highlighted
    from edgeroute.ner import Entity

    text = "Ada met Bob in Paris"
    shown = _highlighted(text, [Entity("PER", 0.9, "Ada", 0, 3), Entity("LOC", 0.8, "Paris", 15, 20)])
    assert "\x1b[" in shown and "[PER]" in shown and "[LOC]" in shown
    import click

    assert click.unstyle(shown) == "Ada[PER] met Bob in Paris[LOC]"


def test_bench_has_an_encoder_mode(tagger: tuple[Path, Path]) -> None:
    _, out = tagger
    res = CliRunner().invoke(cli, ["bench", str(out), "--runs", "1", "--warmup", "0", "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.output[res.output.index("{") :])
    assert r["task"] == "token-classification" and r["precision"] == "fp32"
    assert all(r[k] > 0 for k in ("short_b1_texts_s", "short_b32_tokens_s", "long_b8_texts_s", "latency_p50_ms"))
    assert r["latency_p95_ms"] >= r["latency_p50_ms"] and r["peak_rss_mb"] > 0
    res = CliRunner().invoke(cli, ["bench", str(out), "--new-tokens", "8"])
    assert res.exit_code == 2 and "--new-tokens is a generation option" in res.output


def bioes_groups(tokens: list[Any]) -> list[tuple[str, int, int]]:
    """Entities from per-token BIOES tags, written here independently: B- opens, I-/E- continue an open entity of
    their type (E- closes it), S- stands alone, anything else starts anew; O dropped."""
    groups: list[dict[str, Any]] = []
    for t in tokens:
        prefix, _, kind = t.label.partition("-") if t.label != "O" else ("O", "", "O")
        last = groups[-1] if groups else None
        if last and kind == last["kind"] and prefix in ("I", "E") and not last["closed"]:
            last["end"], last["closed"] = t.end, prefix == "E"
            continue
        groups.append({"kind": kind, "start": t.start, "end": t.end, "closed": prefix in ("E", "S")})
    return [(g["kind"], g["start"], g["end"]) for g in groups if g["kind"] != "O"]


def test_a_bioes_tagger_groups_by_its_scheme(tmp_path: Path) -> None:
    """A tagger trained on BIOES tags: the export records the scheme and entities group by it (against the rule
    applied to its own per-token tags); read as BIO the same tags group otherwise."""
    from checkpoints import write_token_classifier
    from edgeroute.export import export_model

    labels = ("O", "B-PER", "I-PER", "E-PER", "S-PER", "B-LOC", "I-LOC", "E-LOC", "S-LOC")
    out = export_model(write_token_classifier(tmp_path / "ckpt", labels), tmp_path / "model")
    model = er.EncoderModel.load(out)
    assert model.scheme == "BIOES" and json.loads((out / "edgeroute.json").read_text())["scheme"] == "BIOES"
    tokens = model.entities(NER_TEXTS, aggregation="none", ignore_labels=(), words="text")
    grouped = model.entities(NER_TEXTS, words="text")
    assert sum(len(g) for g in grouped) > 3
    for text, t, g in zip(NER_TEXTS, tokens, grouped, strict=True):
        assert [(e.label, e.start, e.end) for e in g] == bioes_groups(t)
        assert all(e.word == text[e.start : e.end] for e in g)
    as_bio = model.entities(NER_TEXTS, words="text", scheme="BIO")
    assert [[(e.label, e.start) for e in g] for g in as_bio] != [[(e.label, e.start) for e in g] for g in grouped]


def test_windows_are_bounded_and_the_tokenizer_shared_safely(tagger: tuple[Path, Path]) -> None:
    """An input needing more than MAX_WINDOWS windows is refused before any is made; chunking (which sets
    truncation on a tokenizer) beside other threads' tokenising never trips the tokenizer; a scheme the tags
    cannot be read as is refused."""
    import threading

    from edgeroute.encoder_runs import MAX_WINDOWS

    _, out = tagger
    model = er.EncoderModel.load(out)
    text = " ".join(["Paris is nice."] * 400)
    assert model.windows_needed(model.count_tokens([text])[0], 61) > MAX_WINDOWS
    with pytest.raises(er.ConfigError) as e:
        model.entities(["a", text], stride=61)
    assert e.value.field == "texts[1]" and "windows" in e.value.reason
    errors: list[BaseException] = []

    def chunk() -> None:
        try:
            for _ in range(40):
                model.entities([LONG], overflow="chunk")
        except BaseException as x:  # noqa: BLE001 - the test reports it
            errors.append(x)

    thread = threading.Thread(target=chunk)
    thread.start()
    while thread.is_alive():
        model.count_tokens([LONG, "a"])
        model.encodings([LONG])
    assert not errors, errors
    assert len(model.encodings([LONG])[0].ids) > 64  # no truncation left behind
    with pytest.raises(er.ConfigError) as e:
        model.entities(NER_TEXTS, scheme="BIOES")
    assert e.value.field == "scheme"
