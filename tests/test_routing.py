"""Two-level routing: speculative decoding is exact in distribution, greedy speculation equals greedy decoding,
guidance and contrast mix as documented, and the drafters and verification work alone."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import edgeroute as er
import numpy as np
import pytest
from edgeroute import routing
from scipy import stats
from tiny_model import write_tiny_model

PROMPT = "Once upon a time a little robot learned to paint the sea"
GREEDY = er.GenerationConfig(max_new_tokens=40, sampling=er.SamplingConfig(temperature=0))
FULL_CHAIN = er.SamplingConfig(
    temperature=0.9, top_k=12, top_p=0.95, min_p=0.02, repetition_penalty=1.2, presence_penalty=0.1, explore=0.05
)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[er.Model, er.Model]:
    """A tiny target and a deliberately different draft: same tokenizer, same weights' seed, flatter logits,
    so draft and target agree often but not always."""
    root = tmp_path_factory.mktemp("pair")
    target = er.Model.load(write_tiny_model(root / "target", seed=0, logit_scale=3.0))
    draft = er.Model.load(write_tiny_model(root / "draft", seed=0, logit_scale=1.5, num_layers=1))
    return target, draft


def _first_two_exact(target: er.Model, ids: list[int], sampling: er.SamplingConfig) -> dict[tuple[int, int], float]:
    """P(t1, t2) of plain sampling, from the router's exact distributions over the target's logits."""
    router = er.make_chain(sampling, target.vocab_size, target.special_ids)
    hist = np.array(ids)
    p1 = router.distribution(target.forward(hist[None], target.new_cache())[0], hist, 0).dense()
    out = {}
    for t1 in np.flatnonzero(p1):
        h2 = np.append(hist, t1)
        p2 = router.distribution(target.forward(h2[None], target.new_cache())[0], h2, 1).dense()
        for t2 in np.flatnonzero(p2):
            out[(int(t1), int(t2))] = p1[t1] * p2[t2]
    return out


def test_speculative_is_exact_in_distribution(pair) -> None:
    """The first two tokens of draft-model speculation under the full chain follow the target's routed
    distribution. (An n-gram drafter ran the same 20,000 draws until 2026-12: it shares every step but the q rows,
    which for it are one-hot, and those are pinned by test_verify_by_hand; its proposals by test_ngram_drafter,
    and its tokens under greedy by test_greedy_speculation_equals_greedy[ngram].)"""
    target, draft = pair
    ids = target.tokenizer.encode(PROMPT + " the sea")
    exact = _first_two_exact(target, ids, FULL_CHAIN)
    assert abs(sum(exact.values()) - 1) < 1e-9
    runs = 20_000
    counts: Counter[tuple[int, int]] = Counter()
    # one generator, rewound to the prompt after each sample: its RNG stream goes on, so the samples are
    # independent draws like fresh seeded generators', without a new cache and a prefill of both models per sample
    cfg = er.GenerationConfig(max_new_tokens=3, sampling=FULL_CHAIN.replace(seed=0))
    gen = target.generator(cfg, draft=draft, draft_k=2)
    gen.append(ids)
    for _ in range(runs):
        t1, t2 = gen.step().token_id, gen.step().token_id
        counts[(t1, t2)] += 1
        gen.rewind(len(gen.tokens) - len(ids))
    proposed, accepted = gen.usage.draft_proposed, gen.usage.draft_accepted
    assert set(counts) <= set(exact)  # nothing outside the target's support, ever
    assert 0 < accepted < proposed  # both branches (accept, reject -> residual) were taken
    big = sorted(k for k, p in exact.items() if p * runs >= 5)
    observed = [counts[k] for k in big] + [runs - sum(counts[k] for k in big)]
    expected = [exact[k] * runs for k in big] + [runs * (1 - sum(exact[k] for k in big))]
    if expected[-1] < 5:  # fold a tiny tail into the last big bin
        observed[-2] += observed.pop()
        expected[-2] += expected.pop()
    _, pvalue = stats.chisquare(observed, expected)
    assert pvalue > 0.001, (pvalue, proposed, accepted)


@pytest.mark.parametrize(
    "flows",
    [
        {"draft": "model", "draft_k": 3},
        {"draft": "model", "draft_k": 2, "adaptive_k": True},
        {"draft": "ngram", "draft_k": 4},
        {"draft": "self", "draft_k": 5},
    ],
    ids=["model_k3", "model_adaptive", "ngram", "self_draft"],
)
def test_greedy_speculation_equals_greedy(pair, flows: dict) -> None:
    target, draft = pair
    flows = dict(flows)
    flows["draft"] = {"model": draft, "self": target, "ngram": "ngram"}[flows["draft"]]
    cfg = GREEDY.replace(logprobs=2)
    plain = target.generate(PROMPT, cfg)
    spec = target.generate(PROMPT, cfg, **flows)
    assert spec.token_ids == plain.token_ids and spec.text == plain.text
    assert spec.finish_reason == plain.finish_reason
    assert [lp.token_id for lp in spec.logprobs] == [lp.token_id for lp in plain.logprobs]
    assert np.allclose([lp.logprob for lp in spec.logprobs], [lp.logprob for lp in plain.logprobs], atol=1e-4)
    assert spec.usage.draft_proposed > 0 and spec.usage.completion_tokens == plain.usage.completion_tokens
    if flows["draft"] is target:
        assert spec.usage.acceptance_rate == 1.0


def test_speculation_respects_stops_and_rewinds_the_cache(pair) -> None:
    target, draft = pair
    plain = target.generate(PROMPT, GREEDY)
    stop_tok = plain.token_ids[7]
    cfg = GREEDY.replace(stop_token_ids=(stop_tok,))
    want = target.generate(PROMPT, cfg)
    gen = target.generator(cfg, draft=target, draft_k=6)  # proposes past the stop token
    gen.append(target.tokenizer.encode(PROMPT))
    got = gen.run()
    assert got.token_ids == want.token_ids and got.finish_reason == "stop"
    assert gen.cache.length <= len(gen.tokens)  # nothing beyond the sequence is left in the cache
    gen.append(target.tokenizer.encode(" and"))  # the cache continues correctly after a speculative turn
    again = [s.token_id for s in gen]
    ref = target.generator(GREEDY)
    ref.append(gen.tokens[: len(gen.tokens) - len(again)])
    assert again == [s.token_id for s in ref]


def test_verify_by_hand() -> None:
    p = [np.array([0.5, 0.5, 0.0]), np.array([0.2, 0.3, 0.5])]
    q = [np.array([1.0, 0.0, 0.0])]
    counts = Counter()
    rng = np.random.default_rng(0)
    for _ in range(4000):
        counts[routing.verify(p, q, [0], rng)] += 1
    # accept token 0 with p/q = 0.5 (then a bonus from row 2); on rejection the residual max(p-q, 0) = token 1
    assert set(counts) <= {(1, 0), (1, 1), (1, 2), (0, 1)}
    assert 0.45 < counts[(0, 1)] / 4000 < 0.55
    assert routing.verify([np.array([0.0, 1.0])] * 2, [np.array([0.0, 1.0])], [1], rng)[0] == 1  # p == q


def test_verify_marginal_is_p_for_random_distributions() -> None:
    rng = np.random.default_rng(7)
    v, k, n = 6, 3, 20_000
    p_rows = [rng.dirichlet(np.ones(v)) for _ in range(k + 1)]
    q_rows = [rng.dirichlet(np.ones(v)) for _ in range(k)]
    first = Counter()
    for _ in range(n):
        draft = [int(rng.choice(v, p=q_rows[0]))] + [int(rng.choice(v, p=q)) for q in q_rows[1:]]
        accepted, token = routing.verify(p_rows, q_rows, draft, rng)
        first[draft[0] if accepted > 0 else token] += 1
    _, pvalue = stats.chisquare([first[i] for i in range(v)], p_rows[0] * n)
    assert pvalue > 0.001


def test_ngram_drafter() -> None:
    d = routing.NgramDrafter(max_ngram=3)
    seq = np.array([5, 6, 7, 8, 9, 1, 5, 6, 7])
    assert d.propose(seq, 3) == [8, 9, 1]  # the trigram 5 6 7 occurred before: what followed it
    assert d.propose(np.array([1, 2, 3, 4]), 2) == []
    assert d.propose(np.array([4, 2, 4]), 5) == [2, 4]  # unigram fallback, continuation up to the end
    with pytest.raises(er.ConfigError):
        routing.NgramDrafter(max_ngram=0)
    ak = routing.AdaptiveK(4, adaptive=True)
    ak.update(4, 4)
    assert ak.k == 6
    ak.update(6, 0)
    assert ak.k == 5
    fixed = routing.AdaptiveK(4, adaptive=False)
    fixed.update(4, 4)
    assert fixed.k == 4


def test_guidance(tiny: er.Model) -> None:
    ids = tiny.tokenizer.encode(PROMPT)
    plain = tiny.generate(ids, GREEDY)
    assert tiny.generate(ids, GREEDY, guidance=1.0, negative_prompt="Hello").token_ids == plain.token_ids
    seeded = GREEDY.replace(sampling=er.SamplingConfig(temperature=1.0, top_p=0.9, seed=3))
    assert tiny.generate(ids, seeded, guidance=1.0).token_ids == tiny.generate(ids, seeded).token_ids
    # the formula: u + w (c - u), the unconditional stream on the negative prompt + the generated tokens
    w, neg = 2.5, tiny.tokenizer.encode("Hello world!")
    out = tiny.generate(ids, GREEDY.replace(max_new_tokens=4), guidance=w, negative_prompt=neg).token_ids
    gen_so_far: list[int] = []
    for tok in out:
        c = tiny.forward(np.array([ids + gen_so_far]), tiny.new_cache())[0]
        u = tiny.forward(np.array([neg + gen_so_far]), tiny.new_cache())[0]
        assert tok == int(np.argmax(u + w * (c - u)))
        gen_so_far.append(tok)
    assert out != plain.token_ids[:4]


def test_contrast(pair) -> None:
    target, small = pair
    ids = target.tokenizer.encode(PROMPT)
    alpha = 0.7
    out = target.generate(ids, GREEDY.replace(max_new_tokens=4), contrast=small, contrast_alpha=alpha).token_ids
    seq = list(ids)
    for tok in out:
        big = target.forward(np.array([seq]), target.new_cache())[0].astype(np.float64)
        sml = small.forward(np.array([seq]), small.new_cache())[0].astype(np.float64)
        lb = big - np.log(np.exp(big - big.max()).sum()) - big.max()
        ls = sml - np.log(np.exp(sml - sml.max()).sum()) - sml.max()
        score = np.where(lb >= lb.max() + np.log(0.1), lb - alpha * ls, -np.inf)
        assert tok == int(np.argmax(score))
        seq.append(tok)
    x = routing.contrast_mix(
        np.log(np.array([0.6, 0.35, 0.05], np.float32)), np.log(np.array([0.9, 0.05, 0.05], np.float32)), 1.0, beta=0.1
    )
    assert np.isneginf(x[2]) and x[1] > x[0]  # the expert-only token wins; the implausible one is banned


def test_flow_errors(pair, make_tiny, tiny: er.Model) -> None:
    target, draft = pair
    other = er.Model.load(make_tiny(seed=3))
    with pytest.raises(er.ConfigError, match="draft"):
        target.generator(GREEDY, draft="magic")
    with pytest.raises(er.ConfigError, match="one of"):
        target.generator(GREEDY, draft=draft, guidance=2.0)
    with pytest.raises(er.ConfigError, match="negative_prompt"):
        target.generator(GREEDY, negative_prompt="x")
    with pytest.raises(er.ConfigError, match="guidance"):
        target.generator(GREEDY, guidance=float("nan"))
    with pytest.raises(er.ConfigError, match="draft_k"):
        target.generator(GREEDY, draft="ngram", draft_k=0)
    with pytest.raises(er.ConfigError, match="contrast_alpha"):
        target.generator(GREEDY, contrast=draft, contrast_alpha=-1)
    with pytest.raises(er.ConfigError, match="flows"):
        target.generate(["a", "b"], GREEDY, draft="ngram")
    assert target.generate(PROMPT, GREEDY, draft=other).token_ids == target.generate(PROMPT, GREEDY).token_ids
    foreign = er.Model.load(make_tiny(tokenizer_vocab=300))
    with pytest.raises(er.ConfigError, match="share the target's tokenizer"):
        target.generator(GREEDY, draft=foreign)
    with pytest.raises(er.ConfigError, match="share the target's tokenizer"):
        target.generator(GREEDY, contrast=foreign)


def test_cli_flows(pair, tiny_dir: Path, tmp_path: Path) -> None:
    import json

    from click.testing import CliRunner
    from edgeroute.cli import cli

    target, _ = pair
    base = ["run", str(target.path), PROMPT, "--json", "--temperature", "0", "--max-new-tokens", "20"]
    plain = json.loads(CliRunner().invoke(cli, base).stdout)
    for extra in (
        ["--draft", "ngram", "--draft-k", "3"],
        ["--draft", str(target.path), "--draft-k", "auto"],
        ["--guidance", "1.0", "--negative-prompt", "Hello"],
    ):
        res = CliRunner().invoke(cli, base + extra)
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout)["token_ids"] == plain["token_ids"], extra
    spec = json.loads(CliRunner().invoke(cli, base + ["--draft", str(target.path)]).stdout)
    assert spec["usage"]["draft_proposed"] > 0 and spec["usage"]["draft_accepted"] == spec["usage"]["draft_proposed"]
    res = CliRunner().invoke(cli, base + ["--contrast", str(tiny_dir), "--contrast-alpha", "0.5"])
    assert res.exit_code == 0, res.output
    greedy = er.GenerationConfig(max_new_tokens=20, sampling=er.SamplingConfig(temperature=0))
    want = target.generate(PROMPT, greedy, contrast=er.Model.load(tiny_dir), contrast_alpha=0.5)
    assert json.loads(res.stdout)["token_ids"] == want.token_ids  # the CLI runs the library's contrast
    bad = CliRunner().invoke(cli, base + ["--draft-k", "x", "--draft", "ngram"])
    assert bad.exit_code == 2 and "--draft-k" in bad.stderr
