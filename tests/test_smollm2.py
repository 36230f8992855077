"""End to end on the real SmolLM2-135M-Instruct (slow: exported once into models/ and reused)."""

from __future__ import annotations

import json
from pathlib import Path

import edgeroute as er
import pytest

pytestmark = pytest.mark.slow

STORY = "Write a short story about a robot who learns to paint."


def test_speculative_greedy_equals_greedy_for_256_tokens(smollm2_dir: Path, smollm2_int4_dir: Path) -> None:
    target = er.Model.load(smollm2_dir)
    draft = er.Model.load(smollm2_int4_dir)
    ids = target.tokenizer.apply_chat_template([{"role": "user", "content": STORY}])
    cfg = er.GenerationConfig(max_new_tokens=256, min_new_tokens=256, sampling=er.SamplingConfig(temperature=0))
    plain = target.generate(ids, cfg)
    assert len(plain.token_ids) == 256
    rates = []
    for flows in ({"draft": draft, "draft_k": 4}, {"draft": "ngram", "draft_k": 4, "adaptive_k": True}):
        spec = target.generate(ids, cfg, **flows)
        assert spec.token_ids == plain.token_ids, flows
        assert spec.usage.draft_proposed > 0
        rates.append(spec.usage.acceptance_rate)
    assert rates[0] > 0.3  # the int4 draft agrees with its fp32 target most of the time


def test_chat_session_on_smollm2(smollm2_dir: Path) -> None:
    model = er.Model.load(smollm2_dir)
    chat = er.ChatSession(model, er.GenerationConfig(max_new_tokens=48, sampling=er.SamplingConfig(temperature=0)))
    first = "".join(s.text for s in chat.send("What is the capital of France?"))
    assert first == "The capital of France is Paris."
    fed = chat.generator.usage.prompt_tokens
    second = "".join(s.text for s in chat.send("And of Italy?"))
    assert "Rome" in second
    assert chat.generator.usage.prompt_tokens - fed < 20  # only the new turn was prefilled


def test_engine_batch_of_8_is_exact_on_smollm2_fp32(smollm2_dir: Path) -> None:
    """Eight requests (greedy and seeded, different prompts and lengths) in one engine with fewer slots than
    requests: each yields exactly its tokens alone on the fp32 graph."""
    model = er.Model.load(smollm2_dir)
    questions = ["What is the capital of France?", "Write a haiku about rain.", "List three colours.", "Why?",
                 "Explain a bicycle in two sentences.", "Say hi.", "Name a planet.", "Count to five."]  # fmt: skip
    prompts = [model.tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in questions]
    cfgs = [
        er.GenerationConfig(
            max_new_tokens=12 + 4 * i,
            sampling=er.SamplingConfig(temperature=0) if i % 2 else er.SamplingConfig(temperature=0.8, seed=i),
        )
        for i in range(8)
    ]
    alone = [model.generate(p, c).token_ids for p, c in zip(prompts, cfgs, strict=True)]
    with er.Engine(model, max_batch=6, prefill_budget=16) as engine:
        got = [
            r.result(timeout=300).token_ids for r in [engine.submit(p, c) for p, c in zip(prompts, cfgs, strict=True)]
        ]
    assert got == alone


def test_eval_on_smollm2(smollm2_dir: Path, tmp_path: Path) -> None:
    """edgeroute eval end to end on the real model: greedy samples of a prompt are one text (Self-BLEU 1, the
    lowest distinct-n), sampling at temperature 1.3 is more diverse and scores a higher perplexity under the
    judge; the gate at θ = inf is guidance switched off (the samples of plain sampling at the same seeds)."""
    from click.testing import CliRunner
    from edgeroute.cli import cli

    out = tmp_path / "eval"
    args = ["eval", str(smollm2_dir), "--num-prompts", "4", "--samples", "3", "--max-new-tokens", "24"]
    args += ["--sweep", "temperature=0,1.3", "--sweep", "gate: temperature=1.3 guidance=1.5 gate_threshold=inf"]
    res = CliRunner().invoke(cli, [*args, "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    greedy, hot, gate = data["settings"]
    fig = lambda s, m: s["figures"][m]["value"]  # noqa: E731
    assert fig(greedy, "self_bleu4") == pytest.approx(1.0)
    assert fig(hot, "self_bleu4") < 0.5 and fig(hot, "distinct_2") > fig(greedy, "distinct_2")
    assert fig(hot, "perplexity") > 2 * fig(greedy, "perplexity")
    saved = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    assert gate["gated_share"] == 1.0
    # guidance gated off is plain sampling: each sample equals the model's own at its seed (both run alone on a
    # Generator; the plain setting runs batched in the engine, whose rows may round differently)
    model = er.Model.load(smollm2_dir)
    from edgeroute.eval import PROMPTS

    prompts = [p for _, p in PROMPTS[:2]]
    for i, text in enumerate(prompts):
        ids = model.tokenizer.apply_chat_template([{"role": "user", "content": text}])
        for j in range(3):
            cfg = er.GenerationConfig(max_new_tokens=24, sampling=er.SamplingConfig(temperature=1.3, seed=i * 3 + j))
            assert saved["settings"][2]["samples"][i][j] == model.generate(ids, cfg).text
    assert (out / "quality_diversity.png").stat().st_size > 10_000
