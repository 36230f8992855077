"""edgeroute eval: the metrics against hand-computed values, the sweeps, the report, the pictures, the CLI."""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from pathlib import Path

import edgeroute as er
import numpy as np
import pytest
from click.testing import CliRunner
from edgeroute import eval as ev
from edgeroute.cli import cli
from edgeroute.sampling import log_softmax

# -- metrics ----------------------------------------------------------------------------------------------------


def test_distinct_and_repetition_by_hand() -> None:
    assert ev.distinct(["a b a b", "a c"], 1) == (3, 6)
    assert ev.distinct(["a b a b", "a c"], 2) == (3, 4)  # ab ba ab | ac
    assert ev.distinct(["a b a b", "a c"], 3) == (2, 2)
    assert ev.distinct(["", "x"], 2) == (0, 0)
    # 4-grams: abcd bcda cdab dabc abcd bcda -> 6, 4 unique
    assert ev.repetition("a b c d a b c d a") == pytest.approx(1 / 3)
    assert ev.repetition("one two three four five") == 0.0
    assert ev.repetition("too short") is None


def _bleu_by_hand(hyps: list[str], refs: list[list[str]]) -> float:
    """Corpus BLEU-4 as Papineni et al. define it: clipped n-gram counts against every reference summed over the
    corpus, the brevity penalty against the closest reference length (the shorter on a tie)."""
    match, total = [0] * 4, [0] * 4
    hyp_len = ref_len = 0
    for h, rs in zip(hyps, refs, strict=True):
        hw, rws = h.split(), [r.split() for r in rs]
        hyp_len += len(hw)
        ref_len += min((abs(len(r) - len(hw)), len(r)) for r in rws)[1]
        for n in range(1, 5):
            hc = Counter(tuple(hw[i : i + n]) for i in range(len(hw) - n + 1))
            most: Counter = Counter()
            for r in rws:
                for g, c in Counter(tuple(r[i : i + n]) for i in range(len(r) - n + 1)).items():
                    most[g] = max(most[g], c)
            match[n - 1] += sum(min(c, most[g]) for g, c in hc.items())
            total[n - 1] += sum(hc.values())
    bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return bp * math.exp(sum(math.log(m / t) for m, t in zip(match, total, strict=True)) / 4)


def test_self_bleu_is_corpus_bleu_against_the_other_samples() -> None:
    texts = [
        "the cat sat on the mat today",
        "the cat sat on a mat today and slept",
        "a dog sat on the mat today",
    ]
    k = len(texts)
    refs = [[texts[j] for j in range(k) if j != i] for i in range(k)]
    want = _bleu_by_hand(texts, refs)
    assert 0.1 < want < 0.9
    assert ev.self_bleu(texts) == pytest.approx(want, abs=1e-9)
    assert ev.self_bleu(["same words here now", "same words here now"]) == pytest.approx(1.0)
    assert ev.self_bleu(["only one"]) is None


def test_figures_and_intervals() -> None:
    groups = [["a b c d", "a b c e"], ["x y z w", "x y z w"], ["p q r s t", "u v w x y"]]
    nll = [(4.0, 8), (2.0, 8), (6.0, 10)]
    lengths = [[4, 4], [4, 4], [5, 5]]
    figs = ev.figures(groups, nll, lengths, [[True, False], [True, True], [False, False]], resamples=500)
    d2 = [4 / 6, 3 / 6, 8 / 8]
    assert figs["distinct_2"].value == pytest.approx(np.mean(d2))
    assert figs["perplexity"].value == pytest.approx(math.exp(12 / 26))
    assert figs["mean_length"].value == pytest.approx(26 / 6)
    assert figs["validity"].value == pytest.approx(3 / 6)
    for f in figs.values():
        assert f.low <= f.value <= f.high
    assert figs["distinct_2"].low >= min(d2) - 1e-12 and figs["distinct_2"].high <= max(d2) + 1e-12
    assert figs["distinct_2"].high > figs["distinct_2"].low  # the prompts differ: the interval has a width
    same = ev.figures([["a b", "c d"]] * 4, [(1.0, 2)] * 4, [[2, 2]] * 4, resamples=100)
    assert same["distinct_1"].low == same["distinct_1"].value == same["distinct_1"].high == 1.0


def test_parse_sweep() -> None:
    t = ev.parse_sweep("temperature=0.3,0.7,1")
    assert [s.params for s in t] == [{"temperature": 0.3}, {"temperature": 0.7}, {"temperature": 1}]
    assert {s.family for s in t} == {"temperature"} and t[0].label == "temperature=0.3"
    e = ev.parse_sweep("explore=0.02,0.05 explore_schedule=exponential explore_end=0.001 explore_steps=32")
    assert e[1].params == {
        "explore": 0.05,
        "explore_schedule": "exponential",
        "explore_end": 0.001,
        "explore_steps": 32,
    }
    assert e[1].swept == {"explore": 0.05} and e[0].family == "explore"
    g = ev.parse_sweep("gate: guidance=1.5 gate_threshold=-inf,2,inf")
    assert g[0].family == "gate" and g[0].params["gate_threshold"] == -math.inf
    assert len(ev.parse_sweep("top_p=0.8,0.9 min_p=0,0.1")) == 4
    for bad, why in (("temperature", "key=value"), ("seed=1,2", "seeds"), ("a=1 a=2", "twice"), ("", "empty")):
        with pytest.raises(er.ConfigError, match=why):
            ev.parse_sweep(bad)
    with pytest.raises(er.ConfigError, match="twice"):
        ev.parse_sweeps(["temperature=1", "temperature=1"])


def test_is_valid(tiny: er.Model) -> None:
    schema = er.JsonSchema({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]})
    assert ev.is_valid(schema, '{"n": 3}', tiny)
    assert not ev.is_valid(schema, '{"n": "x"}', tiny) and not ev.is_valid(schema, '{"n": 3', tiny)
    rx = er.Regex("(yes|no)")
    assert ev.is_valid(rx, "yes", tiny) and not ev.is_valid(rx, "ye", tiny) and not ev.is_valid(rx, "yess", tiny)


def test_require_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name))
    ev.require()
    with pytest.raises(er.MissingExtraError, match=r"edgeroute\[eval\]"):
        ev.require(plots=True)


# -- a run --------------------------------------------------------------------------------------------------------
PROMPTS = ["Once upon a time", "The capital of France is", "A little robot"]


def test_evaluate_samples_are_the_seeded_generations(tiny: er.Model) -> None:
    settings = ev.parse_sweeps(["temperature=0,1.0", "gate: guidance=2 gate_threshold=-inf,inf"])
    report = ev.evaluate(tiny, settings, PROMPTS, samples=3, max_new_tokens=10, seed=5, chat=False, resamples=200)
    by = {(r.setting.family, r.setting.label): r for r in report.results}
    hot = by[("temperature", "temperature=1")]
    for i, prompt in enumerate(PROMPTS):
        for j in range(3):
            cfg = er.GenerationConfig(
                max_new_tokens=10, sampling=er.SamplingConfig(temperature=1.0, seed=5 + i * 3 + j)
            )
            assert hot.samples[i][j] == tiny.generate(prompt, cfg).text
    cold = by[("temperature", "temperature=0")]
    assert all(len(set(g)) == 1 for g in cold.samples)  # greedy: every seed gives the same text
    # identical samples: BLEU-4 is 1 where a text has a 4-gram (of sacrebleu's 13a tokens), 0 for shorter ones
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    per = [1.0 if len(Tokenizer13a()(g[0]).split()) >= 4 else 0.0 for g in cold.samples]
    assert 0 < sum(per) < len(per)  # both cases occur here
    assert cold.figures["self_bleu4"].value == pytest.approx(np.mean(per))
    # the perplexity under the judge (the model itself), by hand from full forward passes
    nll = count = 0.0
    for prompt in PROMPTS:
        ids = tiny.encode_prompt(prompt)
        cont = tiny.generate(ids, er.GenerationConfig(max_new_tokens=10, sampling=er.SamplingConfig(temperature=0)))
        n_cont = len(cont.token_ids)
        if not n_cont:
            continue
        logits = tiny.forward_last(np.array([ids + cont.token_ids]), tiny.new_cache(), n_cont + 1)[0]
        for n, tok in enumerate(cont.token_ids):
            nll -= 3 * log_softmax(logits[n].astype(np.float64))[tok]
        count += 3 * len(cont.token_ids)
    assert cold.figures["perplexity"].value == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert by[("gate", "gate_threshold=inf")].gated_share == 1.0
    assert by[("gate", "gate_threshold=-inf")].gated_share == 0.0
    assert by[("gate", "gate_threshold=inf")].samples == by[("temperature", "temperature=1")].samples
    data = report.as_dict()
    assert data["seeds"] == {"first": 5, "last": 13, "rule": "seed + prompt_index * samples + sample"}
    assert data["settings"][0]["params"] == {"temperature": 0}
    assert data["settings"][-1]["swept"] == {"gate_threshold": "inf"}  # JSON has no infinity
    json.dumps(data, allow_nan=False)


def test_evaluate_errors(tiny: er.Model) -> None:
    with pytest.raises(
        er.ConfigError, match=r"tempreature=1: is not a generation parameter \(in the setting tempreature=1\)$"
    ):
        ev.evaluate(tiny, ev.parse_sweeps(["tempreature=1"]), PROMPTS)
    with pytest.raises(er.ConfigError, match=r"top_p.*in the setting top_p: top_p=2"):
        ev.evaluate(tiny, ev.parse_sweeps(["top_p=0.5,2"]), PROMPTS)
    with pytest.raises(er.ConfigError, match="samples"):
        ev.evaluate(tiny, ev.parse_sweeps(["temperature=1"]), PROMPTS, samples=0)
    with pytest.raises(er.ConfigError, match="reference"):
        ev.evaluate(tiny, ev.parse_sweeps(["temperature=1"]), PROMPTS, samples=3, reference=["one text"])


def _png(path: Path) -> tuple[int, ...]:
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return matplotlib.image.imread(path).shape


def test_cli_eval_end_to_end(tiny_dir: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n", encoding="utf-8")
    reference = tmp_path / "human.jsonl"
    reference.write_text(
        "\n".join(json.dumps({"text": t}) for t in ["the sea was calm", "a robot painted", "birds sang loudly"] * 2),
        encoding="utf-8",
    )
    out = tmp_path / "out"
    args = ["eval", str(tiny_dir), "--sweep", "temperature=0.5,1.0", "--sweep", "mp: min_p=0.05,0.2"]
    args += ["--prompts", str(prompts), "--samples", "3", "--max-new-tokens", "24", "--reference", str(reference)]
    res = CliRunner().invoke(cli, [*args, "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert [s["label"] for s in data["settings"]] == ["temperature=0.5", "temperature=1", "min_p=0.05", "min_p=0.2"]
    for s in data["settings"]:
        assert set(s["figures"]) == {*ev.METRICS} - {"validity"}
        assert s["tokens"] > 0 and s["seconds"] > 0
    assert set(data["reference"]) == set(data["settings"][0]["figures"])
    assert data["prompts"] == 3 and data["samples"] == 3 and data["chat"] is True
    rows = list(csv.DictReader((out / "eval.csv").open(encoding="utf-8")))
    assert [r["setting"] for r in rows] == [s["label"] for s in data["settings"]]
    assert float(rows[0]["distinct_1"]) == pytest.approx(data["settings"][0]["figures"]["distinct_1"]["value"])
    saved = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    assert len(saved["settings"][0]["samples"]) == 3 and len(saved["settings"][0]["samples"][0]) == 3
    for name in ("quality_diversity.png", "diversity_by_value.png"):
        shape = _png(out / name)
        assert shape[0] > 200 and shape[1] > 200
    table = CliRunner().invoke(cli, [*args, "--num-prompts", "2"])
    assert table.exit_code == 0, table.output
    assert "dist-2" in table.stdout and "reference" in table.stdout and "min_p=0.2" in table.stdout


def test_cli_eval_constraint_and_errors(tiny_dir: Path, tmp_path: Path) -> None:
    base = ["eval", str(tiny_dir), "--num-prompts", "2", "--samples", "2", "--max-new-tokens", "6", "--json"]
    res = CliRunner().invoke(cli, [*base, "--regex", "(yes|no)", "--sweep", "temperature=1.0"])
    assert res.exit_code == 0, res.output
    fig = json.loads(res.stdout)["settings"][0]["figures"]["validity"]
    assert fig["value"] == 1.0  # every sample ended where the regex accepts
    cut = CliRunner().invoke(cli, [*base, "--regex", "[a-z]{20}", "--sweep", "temperature=1.0"])
    assert json.loads(cut.stdout)["settings"][0]["figures"]["validity"]["value"] == 0.0  # 6 tokens cannot get there
    for extra, want in (
        (["--sweep", "temperature=2000"], "temperature"),
        (["--sweep", "oops"], "sweep"),
        (["--sweep", "temperature=1", "--prompts", str(tmp_path / "none.txt")], "none.txt"),
        (["--sweep", "temperature=1", "--judge", str(tmp_path / "nowhere")], "nowhere"),
    ):
        bad = CliRunner().invoke(cli, [*base, *extra])
        assert bad.exit_code == 1, (extra, bad.output)
        assert want in bad.stderr and "Traceback" not in bad.output and len(bad.stderr.strip().splitlines()) == 1
