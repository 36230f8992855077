"""Beam search: the same sequences and scores as transformers' generate(num_beams=B, do_sample=False), on both
cache kinds (the fused graph's shared KV buffer and optimum's concatenated cache)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import edgeroute as er
import numpy as np
import pytest

pytestmark = pytest.mark.export
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("optimum.exporters.onnx")

PROMPTS = ["The capital of France is", "Once upon a time a little robot", "Hello"]
EOS = 0


@pytest.fixture(scope="module")
def ckpt(checkpoint: Callable[..., Path]) -> Path:
    return checkpoint("llama", seed=1)


@pytest.fixture(scope="module")
def hf(ckpt: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(ckpt).eval()


@pytest.fixture(scope="module", params=["fused", "optimum"])
def model(request: pytest.FixtureRequest, exported: Callable[..., Path]) -> er.Model:
    return er.Model.load(exported("llama", seed=1, backend=request.param))


def _hf_beams(hf, ids: list[int], eos: list[int] | None = None, **kw) -> tuple[list[list[int]], list[float]]:  # noqa: ANN001, ANN003
    """transformers' beams for ``ids``: each returned sequence's generated ids up to its stop token, and scores."""
    bias = kw.pop("bias", None)
    eos = eos or [EOS]
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            temperature=None,
            top_p=None,
            eos_token_id=eos,
            pad_token_id=eos[0],
            return_dict_in_generate=True,
            output_scores=True,
            sequence_bias={(t,): b for t, b in (bias or {}).items()} or None,
            **kw,
        )
    seqs = []
    for row in out.sequences[:, len(ids) :].tolist():
        seqs.append(row[: next((i for i, t in enumerate(row) if t in eos), len(row))])
    return seqs, out.sequences_scores.tolist()


CASES = [
    dict(num_beams=2, max_new_tokens=12),
    dict(num_beams=4, max_new_tokens=12, num_return_sequences=4),
    dict(num_beams=4, max_new_tokens=10, length_penalty=0.0, early_stopping=True, num_return_sequences=2),
    dict(num_beams=4, max_new_tokens=10, length_penalty=2.0, early_stopping="never", num_return_sequences=3),
    dict(num_beams=3, max_new_tokens=10, length_penalty=-0.5, num_return_sequences=3),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: json.dumps(c, separators=(",", ":")))
@pytest.mark.parametrize("eos_bias", [0.0, 4.0], ids=["free", "ends-by-eos"])
def test_same_sequences_and_scores_as_transformers(model: er.Model, hf, case: dict, eos_bias: float) -> None:  # noqa: ANN001
    kw = dict(case)
    sampling = er.SamplingConfig(temperature=0, logit_bias={EOS: eos_bias} if eos_bias else {})
    cfg = er.GenerationConfig(sampling=sampling, **kw)
    stopped = 0
    for prompt in PROMPTS:
        ids = model.tokenizer.encode(prompt)
        want, want_scores = _hf_beams(hf, ids, bias={EOS: eos_bias} if eos_bias else None, **kw)
        got = model.generate(ids, cfg)
        assert got.sequences is not None and len(got.sequences) == kw.get("num_return_sequences", 1)
        assert [h.token_ids for h in got.sequences] == want, prompt
        np.testing.assert_allclose([h.score for h in got.sequences], want_scores, rtol=1e-4, atol=1e-5)
        assert got.token_ids == want[0] and got.score == got.sequences[0].score
        # the text as a Generator gives it: an incomplete character at the very end is left out
        assert got.text == model.tokenizer.decode(want[0]).rstrip("\ufffd")
        stopped += sum(h.finish_reason == "stop" for h in got.sequences)
    if eos_bias:
        assert stopped  # some hypotheses ended by EOS (the case the test is for)


def test_min_new_tokens_and_penalties_per_hypothesis(model: er.Model, hf) -> None:  # noqa: ANN001
    ids = model.tokenizer.encode(PROMPTS[1])
    kw = dict(num_beams=3, max_new_tokens=10, min_new_tokens=6, num_return_sequences=3)
    cfg = er.GenerationConfig(
        sampling=er.SamplingConfig(temperature=0, logit_bias={EOS: 5.0}, repetition_penalty=1.5, penalty_last_n=-1),
        **kw,
    )
    want, scores = _hf_beams(hf, ids, bias={EOS: 5.0}, repetition_penalty=1.5, **kw)
    got = model.generate(ids, cfg)
    assert [h.token_ids for h in got.sequences] == want
    np.testing.assert_allclose([h.score for h in got.sequences], scores, rtol=1e-4, atol=1e-5)
    assert all(len(h.token_ids) >= 6 for h in got.sequences)


def test_one_beam_is_greedy_and_beams_do_not_stream(model: er.Model) -> None:
    ids = model.tokenizer.encode(PROMPTS[0])
    greedy = er.GenerationConfig(max_new_tokens=10, sampling=er.SamplingConfig(temperature=0))
    assert model.generate(ids, greedy).token_ids == model.generate(ids, greedy.replace(num_beams=1)).token_ids
    beams = greedy.replace(num_beams=2)
    with pytest.raises(er.ConfigError, match="num_beams.*Model.generate"):
        model.generator(beams)
    with pytest.raises(er.ConfigError, match="num_beams"):
        with er.Engine(model) as engine:
            engine.submit(ids, beams)
    with pytest.raises(er.ConfigError, match="num_beams"):
        model.generate(ids, beams, guidance=2.0)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"num_beams": 0}, "num_beams"),
        ({"num_beams": 2, "num_return_sequences": 3}, "num_return_sequences"),
        ({"num_return_sequences": 2}, "num_return_sequences"),
        ({"num_beams": 2, "early_stopping": "sometimes"}, "early_stopping"),
        ({"num_beams": 2, "length_penalty": float("nan")}, "length_penalty"),
        ({"num_beams": 2, "sampling": er.SamplingConfig(top_p=0.9)}, "top_p"),
        ({"num_beams": 2, "sampling": er.SamplingConfig(temperature=0.7)}, "temperature"),
        ({"num_beams": 2, "sampling": er.SamplingConfig(top_k=5)}, "top_k"),
        ({"num_beams": 2, "sampling": er.SamplingConfig(explore=0.1)}, "explore"),
        ({"num_beams": 2, "logprobs": True}, "logprobs"),
    ],
)
def test_bad_beam_settings_name_the_field(changes: dict, field: str) -> None:
    with pytest.raises(er.ConfigError) as e:
        er.GenerationConfig(**changes)
    assert e.value.field == field


def test_reordering_copies_only_rows_whose_parent_changed(model: er.Model) -> None:
    cache = model.new_cache(3)
    ids = np.array([model.tokenizer.encode("abc")[:2]] * 3)
    model.forward(ids, cache)
    before = [np.array(x) for x in (cache.buffers if hasattr(cache, "buffers") else [k for k, _ in cache._layers])]
    assert cache.reorder(np.array([0, 1, 2])) == 0
    assert cache.reorder(np.array([0, 0, 1])) == 2
    after = cache.buffers if hasattr(cache, "buffers") else [k for k, _ in cache._layers]
    for b, a in zip(before, after, strict=True):
        np.testing.assert_array_equal(a[:, :, :2][[0, 1, 2]], b[:, :, :2][[0, 0, 1]])


def test_cli_beams_json(model: er.Model) -> None:
    from click.testing import CliRunner
    from edgeroute.cli import cli

    args = ["run", str(model.path), PROMPTS[0], "--temperature", "0", "--max-new-tokens", "8", "--beams", "3"]
    res = CliRunner().invoke(cli, [*args, "-n", "2", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    cfg = er.GenerationConfig(
        max_new_tokens=8, sampling=er.SamplingConfig(temperature=0), num_beams=3, num_return_sequences=2
    )
    want = model.generate(PROMPTS[0], cfg)
    assert [s["token_ids"] for s in out["sequences"]] == [h.token_ids for h in want.sequences]
    assert [s["score"] for s in out["sequences"]] == pytest.approx([h.score for h in want.sequences])
    assert out["token_ids"] == want.token_ids
    plain = CliRunner().invoke(cli, args)
    assert plain.exit_code == 0 and plain.stdout.strip() == want.text.strip()
    bad = CliRunner().invoke(cli, [*args, "-n", "4", "--json"])
    assert bad.exit_code == 1 and "num_return_sequences" in bad.stderr and "Traceback" not in bad.output
    bad = CliRunner().invoke(cli, [*args[:-2], "--beams", "2", "--top-p", "0.5"])
    assert bad.exit_code == 1 and "top_p" in bad.stderr


@pytest.mark.slow
def test_smollm2_beams_equal_transformers(smollm2_dir: Path) -> None:
    """SmolLM2-135M-Instruct fp32 against transformers on the same GGUF weights: B = 2 and 4, with and without
    length penalty and early stopping, on chat prompts whose best answers end by <|im_end|>."""
    from conftest import smollm2_gguf

    gguf = smollm2_gguf()
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    model = er.Model.load(smollm2_dir)
    eos = sorted(set(model.manifest.eos_token_ids))
    questions = ["What is the capital of France?", "Name three colours.", "Write a haiku about rain."]
    cases = [
        dict(num_beams=2, max_new_tokens=24),
        dict(num_beams=4, max_new_tokens=24, num_return_sequences=2),
        dict(num_beams=4, max_new_tokens=20, length_penalty=0.0, early_stopping=True, num_return_sequences=4),
    ]
    stopped = 0
    for q in questions:
        ids = model.tokenizer.apply_chat_template([{"role": "user", "content": q}])
        for case in cases:
            want, scores = _hf_beams(hf_model, ids, eos, **case)
            got = model.generate(ids, er.GenerationConfig(sampling=er.SamplingConfig(temperature=0), **case))
            assert [h.token_ids for h in got.sequences] == want, (q, case)
            np.testing.assert_allclose([h.score for h in got.sequences], scores, rtol=1e-3)
            stopped += sum(h.finish_reason == "stop" for h in got.sequences)
    assert stopped


def test_stop_strings_finish_hypotheses(model: er.Model) -> None:
    ids = model.tokenizer.encode(PROMPTS[0])
    cfg = er.GenerationConfig(sampling=er.SamplingConfig(temperature=0), num_beams=3, num_return_sequences=3)
    cfg = cfg.replace(max_new_tokens=12, length_penalty=0.0)  # raw sums: a hypothesis that ends early ranks high
    free = model.generate(ids, cfg)
    stop = model.tokenizer.decode(free.token_ids[3:5])  # text the best path reaches after a few tokens
    assert stop.strip()
    got = model.generate(ids, cfg.replace(stop=(stop,)))
    ended = [h for h in got.sequences if h.finish_reason == "stop"]
    assert ended, "a hypothesis ends on the stop string"
    for h in got.sequences:
        assert stop not in h.text  # never in the output
    for h in ended:
        assert stop in model.tokenizer.decode(h.token_ids)  # ... and it is what ended the hypothesis:
        n = len(h.token_ids)  # its score is the sum of log p of exactly these tokens (length_penalty 0)
        logits = model.forward_last(np.array([ids + h.token_ids]), model.new_cache(), n + 1)[0][:n]
        from edgeroute.sampling import log_softmax

        total = sum(float(log_softmax(row.astype(np.float64))[t]) for row, t in zip(logits, h.token_ids, strict=True))
        assert h.score == pytest.approx(total, rel=1e-4)
