"""The gate of the two-level router: per step, the first flow's entropy decides whether guidance/contrast mixes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import edgeroute as er
import numpy as np
import pytest
from edgeroute import routing
from tiny_model import write_tiny_model

PROMPT = "Once upon a time a little robot learned to paint the sea"
SAMPLED = er.GenerationConfig(max_new_tokens=24, sampling=er.SamplingConfig(temperature=1.0, top_p=0.95, seed=11))
GREEDY = er.GenerationConfig(max_new_tokens=24, sampling=er.SamplingConfig(temperature=0))
LONG = GREEDY.replace(min_new_tokens=24)  # no early end of sequence: every step counts


def _argmax(model: er.Model, logits: np.ndarray) -> int:
    x = logits.copy()
    x[list(model.manifest.eos_token_ids)] = -np.inf  # suppressed until min_new_tokens, as the router does
    return int(np.argmax(x))


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[er.Model, er.Model]:
    root = tmp_path_factory.mktemp("gate")
    big = er.Model.load(write_tiny_model(root / "big", seed=0, logit_scale=3.0))
    small = er.Model.load(write_tiny_model(root / "small", seed=0, logit_scale=1.5, num_layers=1))
    return big, small


def _signals(model: er.Model, ids: list[int], out: list[int], kind: str = "entropy") -> list[float]:
    """The first flow's gate signal at each step of ``out`` (generated after ``ids``)."""
    logits = model.forward_last(np.array([ids + out]), model.new_cache(), len(out) + 1)[0]
    return [_by_hand(row, kind) for row in logits[: len(out)]]


def _by_hand(logits: np.ndarray, kind: str) -> float:
    """The signal in float64, from its definition."""
    x = logits.astype(np.float64)
    p = np.exp(x - x.max())
    p /= p.sum()
    if kind == "entropy":
        return float(-(p[p > 0] * np.log(p[p > 0])).sum())
    top = np.sort(p)[-2:]
    return float(1 - (top[1] - top[0]))


def _flows(kind: str, small: er.Model) -> dict:
    return {"guidance": 2.0, "negative_prompt": "Hello"} if kind == "guidance" else {"contrast": small}


@pytest.mark.parametrize("kind", ["guidance", "contrast"])
@pytest.mark.parametrize("config", [SAMPLED, GREEDY], ids=["sampled", "greedy"])
def test_extreme_thresholds(pair, kind: str, config: er.GenerationConfig) -> None:
    big, small = pair
    flows = _flows(kind, small)
    ungated = big.generate(PROMPT, config, **flows)
    always = big.generate(PROMPT, config, **flows, gate_threshold=-math.inf)
    assert always.token_ids == ungated.token_ids
    assert always.usage.flow_skipped == 0 and always.usage.flow_steps == len(always.token_ids) + (
        always.finish_reason == "stop"
    )
    alone = big.generate(PROMPT, config)
    never = big.generate(PROMPT, config, **flows, gate_threshold=math.inf)
    assert never.token_ids == alone.token_ids
    assert ungated.token_ids != alone.token_ids  # the second flow matters here, so the gate is what changed it
    assert never.usage.flow_runs == 0 and never.usage.gated_share == 1.0
    assert always.usage.flow_runs >= always.usage.flow_steps  # one run per step (+ the prompt's prefill chunks)


@pytest.mark.parametrize("kind", ["margin", "entropy"])
def test_middle_threshold_by_hand(pair, kind: str) -> None:
    """θ between the entropies seen: at each step the tokens follow 'mix if H > θ else the model alone',
    recomputed here with full forward passes; every mixed step costs exactly one second-flow run (the stream
    catches up on the skipped tokens in the same run)."""
    big, _ = pair
    ids = big.tokenizer.encode(PROMPT)
    neg = big.tokenizer.encode("Hello world!")
    plain = big.generate(ids, LONG).token_ids
    theta = float(np.median(_signals(big, ids, plain, kind)))
    w = 2.5
    got = big.generate(ids, LONG, guidance=w, negative_prompt=neg, gate_threshold=theta, gate_signal=kind)
    seq: list[int] = []
    mixed = 0
    for tok in got.token_ids:
        c = big.forward(np.array([ids + seq]), big.new_cache())[0]
        if _by_hand(c, kind) > theta:
            u = big.forward(np.array([neg + seq]), big.new_cache())[0]
            c, mixed = u + w * (c - u), mixed + 1
        assert tok == _argmax(big, c)
        seq.append(tok)
    usage = got.usage
    assert 0 < usage.flow_skipped < usage.flow_steps
    assert usage.flow_steps == len(got.token_ids) == 24 and usage.flow_steps - usage.flow_skipped == mixed
    assert usage.flow_runs == usage.flow_steps - usage.flow_skipped  # skipped steps cost no run at all
    assert usage.gated_share == pytest.approx(usage.flow_skipped / usage.flow_steps)


def test_stream_catch_up_equals_every_step(pair) -> None:
    big, _ = pair
    ids = big.tokenizer.encode(PROMPT)
    every, skipping = routing.Stream(big), routing.Stream(big)
    seq = list(ids[:3])
    every.sync(seq)
    skipping.sync(seq)
    for tok in ids[3:]:
        seq.append(tok)
        fed = every.sync(seq)
    assert every.runs == 1 + len(ids) - 3
    caught = skipping.sync(seq)  # all the skipped tokens in one chunk
    assert skipping.runs == 2
    np.testing.assert_allclose(caught, fed, atol=1e-5)
    np.testing.assert_allclose(caught, big.forward(np.array([seq]), big.new_cache())[0], atol=1e-5)


def test_soft_gate(pair) -> None:
    vocab = 64
    flat = np.zeros(vocab, np.float32)  # H = ln 64 = 4.159
    assert routing.entropy(flat) == pytest.approx(math.log(vocab))
    assert routing.margin_signal(flat) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    for _ in range(5):
        x = rng.normal(0, 3, 1000).astype(np.float32)
        assert routing.entropy(x) == pytest.approx(_by_hand(x, "entropy"), abs=1e-4)
        assert routing.margin_signal(x) == pytest.approx(_by_hand(x, "margin"), abs=1e-5)
    x[:10] = -np.inf  # banned tokens have no mass and break neither signal
    assert routing.entropy(x) == pytest.approx(_by_hand(x, "entropy"), abs=1e-4)
    peaked = np.full(vocab, -1e4, np.float32)
    peaked[3] = 0
    assert routing.entropy(peaked) == pytest.approx(0.0, abs=1e-6) and routing.margin_signal(peaked) == 0.0
    h = math.log(vocab)
    gate = lambda t, w=0.0: routing.Gate(t, w, "entropy")  # noqa: E731
    assert gate(h - 1).weight(flat) == 1.0 and gate(h + 1).weight(flat) == 0.0
    assert gate(h, 2.0).weight(flat) == pytest.approx(0.5)
    assert gate(h - 0.5, 2.0).weight(flat) == pytest.approx(0.75)
    assert gate(h - 3, 2.0).weight(flat) == 1.0 and gate(h + 3, 2.0).weight(flat) == 0.0
    assert routing.Gate(0.5).weight(flat) == 1.0 and routing.Gate(0.5).weight(peaked) == 0.0  # margin: the default
    # a soft gate on guidance: the weight w_eff = 1 + (w - 1) * ramp(H), by hand
    big, _ = pair
    ids = big.tokenizer.encode(PROMPT)
    neg = big.tokenizer.encode("Hello world!")
    plain = big.generate(ids, LONG).token_ids
    hs = _signals(big, ids, plain)
    theta, width, w = float(np.median(hs)), float(np.ptp(hs)), 3.0
    got = big.generate(
        ids, LONG, guidance=w, negative_prompt=neg, gate_threshold=theta, gate_width=width, gate_signal="entropy"
    )
    seq: list[int] = []
    for tok in got.token_ids:
        c = big.forward(np.array([ids + seq]), big.new_cache())[0]
        share = min(max((_by_hand(c, "entropy") - theta) / width + 0.5, 0.0), 1.0)
        if share > 0:
            u = big.forward(np.array([neg + seq]), big.new_cache())[0]
            c = u + (1 + (w - 1) * share) * (c - u)
        assert tok == _argmax(big, c)
        seq.append(tok)


def test_gate_errors(pair) -> None:
    big, small = pair
    with pytest.raises(er.ConfigError, match="gate_threshold.*needs guidance or contrast"):
        big.generator(GREEDY, gate_threshold=1.0)
    with pytest.raises(er.ConfigError, match="gate_threshold"):
        big.generator(GREEDY, guidance=2.0, gate_threshold=float("nan"))
    with pytest.raises(er.ConfigError, match="gate_width"):
        big.generator(GREEDY, contrast=small, gate_threshold=1.0, gate_width=-1)
    with pytest.raises(er.ConfigError, match="gate_width.*needs gate_threshold"):
        big.generator(GREEDY, guidance=2.0, gate_width=1.0)
    _, flows = er.from_params({"guidance": 2.0, "gate_threshold": "-inf"})
    assert flows.gate_threshold == -math.inf
    with pytest.raises(er.ConfigError, match="gate_threshold"):
        er.from_params({"guidance": 2.0, "gate_threshold": "high"})
    with pytest.raises(er.ConfigError, match="gate_signal"):
        big.generator(GREEDY, guidance=2.0, gate_threshold=0.5, gate_signal="vibes")


def test_engine_serves_gated_requests(pair) -> None:
    big, _ = pair
    ids = big.tokenizer.encode(PROMPT)
    theta = float(np.median(_signals(big, ids, big.generate(ids, GREEDY).token_ids, "margin")))
    want = big.generate(ids, SAMPLED, guidance=2.0, gate_threshold=theta)
    with er.Engine(big) as engine:
        got = engine.submit(ids, SAMPLED, guidance=2.0, gate_threshold=theta).result(timeout=60)
    assert got.token_ids == want.token_ids
    assert (got.usage.flow_steps, got.usage.flow_skipped) == (want.usage.flow_steps, want.usage.flow_skipped)


def test_cli_gate(pair, tmp_path: Path) -> None:
    from click.testing import CliRunner
    from edgeroute.cli import cli

    big, _ = pair
    base = ["run", str(big.path), PROMPT, "--json", "--temperature", "0", "--max-new-tokens", "16"]
    plain = json.loads(CliRunner().invoke(cli, base).stdout)
    res = CliRunner().invoke(cli, base + ["--guidance", "2", "--gate", "inf"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["token_ids"] == plain["token_ids"]
    assert out["usage"]["flow_skipped"] == out["usage"]["flow_steps"] > 0 and out["usage"]["flow_runs"] == 0
    soft = CliRunner().invoke(
        cli, base + ["--guidance", "2", "--gate", "1.0", "--gate-width", "0.5", "--gate-signal", "entropy"]
    )
    assert soft.exit_code == 0, soft.output
    bad = CliRunner().invoke(cli, base + ["--gate", "1.0"])
    assert bad.exit_code == 1 and "gate_threshold" in bad.stderr and "Traceback" not in bad.output
    assert len(bad.stderr.strip().splitlines()) == 1
