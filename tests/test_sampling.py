"""The router: each function against hand-computed vectors, the whole chain statistically against an
independent float64 reference, and hypothesis properties."""

from __future__ import annotations

import math
from collections import Counter

import edgeroute as er
import numpy as np
import pytest
from edgeroute import SamplingConfig, make_chain
from edgeroute.sampling import (
    Processor,
    _weights,
    apply_logit_bias,
    apply_penalties,
    apply_temperature,
    draw,
    explore_mix,
    min_p,
    softmax,
    top_k,
    top_p,
    typical,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

P4 = np.log(np.array([0.1, 0.2, 0.3, 0.4], dtype=np.float32))


def _kept(ids, logits) -> dict[int, float]:
    ids = np.arange(len(logits)) if ids is None else ids
    return {int(i): round(float(p), 6) for i, p in zip(ids, softmax(logits), strict=False)}


# -- golden vectors (llama.cpp's test-sampling.cpp style) ----------------------------------------------------
def test_top_k_vectors() -> None:
    assert _kept(*top_k(None, P4, 1)) == {3: 1.0}
    assert _kept(*top_k(None, P4, 3)) == {1: 0.222222, 2: 0.333333, 3: 0.444444}
    assert _kept(*top_k(None, P4, 0)) == _kept(None, P4) == {0: 0.1, 1: 0.2, 2: 0.3, 3: 0.4}
    assert _kept(*top_k(None, P4, 1, min_keep=2)) == {2: 0.428571, 3: 0.571429}
    ties = np.array([1.0, 3.0, 3.0, 0.0], dtype=np.float32)
    assert sorted(top_k(None, ties, 1)[0].tolist()) == [1, 2]  # ties at the boundary are kept, as in HF


def test_top_p_vectors() -> None:
    assert _kept(*top_p(None, P4, 0.7)) == {2: 0.428571, 3: 0.571429}
    assert _kept(*top_p(None, P4, 0.3)) == {3: 1.0}
    assert _kept(*top_p(None, P4, 0.75)) == {1: 0.222222, 2: 0.333333, 3: 0.444444}
    assert _kept(*top_p(None, P4, 1.0)) == {0: 0.1, 1: 0.2, 2: 0.3, 3: 0.4}
    assert _kept(*top_p(None, P4, 0.3, min_keep=3)) == {1: 0.222222, 2: 0.333333, 3: 0.444444}
    ids = np.array([10, 20, 30, 40])
    assert _kept(*top_p(ids, P4, 0.7)) == {30: 0.428571, 40: 0.571429}


def test_top_p_exact_on_a_large_flat_tail() -> None:
    # Many tiny probabilities: the threshold pre-selection must widen until the nucleus is proven inside it.
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 0.01, 50_000).astype(np.float32)
    logits[:3] += 12.0
    for p in (0.5, 0.9, 0.999, 0.99999):
        ids, _ = top_p(None, logits, p)
        x = logits.astype(np.float64)
        probs = np.exp(x - x.max())
        probs /= probs.sum()
        order = np.argsort(-probs, kind="stable")
        excl = np.cumsum(probs[order]) - probs[order]
        assert sorted(ids.tolist()) == sorted(order[excl < p].tolist())


def test_min_p_vectors() -> None:
    assert _kept(*min_p(None, P4, 0.76)) == {3: 1.0}
    assert _kept(*min_p(None, P4, 0.74)) == {2: 0.428571, 3: 0.571429}
    assert _kept(*min_p(None, P4, 0.5)) == {2: 0.428571, 3: 0.571429}
    assert _kept(*min_p(None, P4, 0.26)) == {1: 0.222222, 2: 0.333333, 3: 0.444444}
    assert _kept(*min_p(None, P4, 0.0)) == {0: 0.1, 1: 0.2, 2: 0.3, 3: 0.4}
    assert _kept(*min_p(None, P4, 0.9, min_keep=2)) == {2: 0.428571, 3: 0.571429}


def test_typical_vectors() -> None:
    lg = np.log(np.array([0.97, 0.01, 0.01, 0.01]))
    logp = lg
    h = -(np.exp(logp) * logp).sum()
    dev = np.abs(-logp - h)  # 0.97 is the most typical here: its surprisal is closest to the entropy
    assert np.argmin(dev) == 0
    assert _kept(*typical(None, lg, 0.5)) == {0: 1.0}
    flat = np.log(np.array([0.2, 0.2, 0.3, 0.3]))
    # entropy 1.366; deviations .24,.24,.17,.17 -> the two .3s first; mass .6 >= .5 after both
    assert _kept(*typical(None, flat, 0.5)) == {2: 0.5, 3: 0.5}
    assert _kept(*typical(None, flat, 0.3)) == {2: 1.0}


def test_bias_penalties_temperature_vectors() -> None:
    x = np.array([1.0, -1.0, 2.0, 0.5], dtype=np.float32)
    assert apply_logit_bias(x, np.array([0, 3]), np.array([1.0, -np.inf], np.float32)).tolist() == [
        2.0,
        -1.0,
        2.0,
        -np.inf,
    ]
    assert x.tolist() == [1.0, -1.0, 2.0, 0.5]  # inputs are never changed
    window = np.array([0, 1, 1, 2])
    assert apply_penalties(x, window, repetition=2.0).tolist() == [0.5, -2.0, 1.0, 0.5]
    assert apply_penalties(x, window, presence=0.5).tolist() == [0.5, -1.5, 1.5, 0.5]
    assert apply_penalties(x, window, frequency=0.25).tolist() == [0.75, -1.5, 1.75, 0.5]
    assert apply_penalties(x, window, 2.0, 0.5, 0.25).tolist() == [-0.25, -3.0, 0.25, 0.5]
    assert apply_temperature(x, 0.5).tolist() == [2.0, -2.0, 4.0, 1.0]
    with pytest.raises(ValueError):
        apply_temperature(x, 0.0)


def test_explore_mix_and_draw_vectors() -> None:
    out = explore_mix(np.array([2, 3]), np.array([0.25, 0.75]), 0.2, np.array([0, 1, 2]), 4)
    assert np.allclose(out, [0.2 / 3, 0.2 / 3, 0.2 / 3 + 0.8 * 0.25, 0.8 * 0.75])
    rng = np.random.default_rng(0)
    counts = Counter(draw(np.array([0.0, 1.0, 0.0, 3.0]), rng) for _ in range(4000))
    assert set(counts) == {1, 3} and 0.2 < counts[1] / 4000 < 0.3
    # the two-level CDF over a vocabulary-sized vector: exact frequencies, zero weights never drawn
    w = np.zeros(10_000, dtype=np.float32)
    w[[5, 700, 701, 9_999]] = [1.0, 2.0, 3.0, 4.0]
    n = 20_000
    counts = Counter(draw(w, rng) for _ in range(n))
    assert set(counts) == {5, 700, 701, 9_999}
    _, pvalue = stats.chisquare([counts[i] for i in (5, 700, 701, 9_999)], [n * k / 10 for k in (1, 2, 3, 4)])
    assert pvalue > 0.001


# -- the whole chain, statistically --------------------------------------------------------------------------
def prefix_reaching(order: np.ndarray, p: np.ndarray, mass: float, min_keep: int) -> list[int]:
    """Walk ``order`` one token at a time until the walked probability reaches ``mass`` (and min_keep)."""
    cum, chosen = 0.0, []
    for j in order:
        if cum >= mass and len(chosen) >= min_keep:
            break
        chosen.append(int(j))
        cum += p[j]
    return chosen


def reference(logits: np.ndarray, history: np.ndarray, cfg: SamplingConfig, step: int, special: set[int]) -> np.ndarray:
    """The routed distribution, computed independently: float64, full sorts, probability-space min-p."""
    v = len(logits)
    x = logits.astype(np.float64).copy()
    for i, b in cfg.logit_bias.items():
        x[i] += b
    n = cfg.penalty_last_n
    window = list(history) if n == -1 else (list(history[-n:]) if n > 0 else [])
    for tok, c in Counter(window).items():
        if cfg.repetition_penalty != 1:
            x[tok] = x[tok] / cfg.repetition_penalty if x[tok] > 0 else x[tok] * cfg.repetition_penalty
        x[tok] -= cfg.presence_penalty + cfg.frequency_penalty * c
    if cfg.greedy:
        p = np.zeros(v)
        p[int(np.argmax(x))] = 1.0
    else:
        x = x / cfg.temperature
        keep = np.isfinite(x)

        def probs() -> np.ndarray:
            e = np.where(keep, np.exp(x - x[keep].max()), 0.0)
            return e / e.sum()

        if cfg.top_k:
            kth = np.sort(x)[::-1][max(cfg.top_k, cfg.min_keep) - 1]
            keep &= x >= kth
        if cfg.top_p < 1:
            p = probs()
            keep &= np.isin(np.arange(v), prefix_reaching(np.argsort(-p, kind="stable"), p, cfg.top_p, cfg.min_keep))
        if cfg.min_p > 0:
            p = probs()
            sel = keep & (p >= cfg.min_p * p.max())
            if sel.sum() < cfg.min_keep:
                sel = keep & (x >= np.sort(np.where(keep, x, -np.inf))[::-1][cfg.min_keep - 1])
            keep = sel
        if cfg.typical_p < 1:
            p = probs()
            ent = -sum(p[j] * math.log(p[j]) for j in range(v) if p[j] > 0)
            dev = np.where(keep, np.abs(-np.log(np.where(p > 0, p, 1)) - ent), np.inf)
            order = np.argsort(dev, kind="stable")
            keep &= np.isin(np.arange(v), prefix_reaching(order, p, cfg.typical_p, cfg.min_keep))
        p = probs()
    q = cfg.explore_at(step)
    allowed = np.array([i not in special and cfg.logit_bias.get(i, 0.0) != -np.inf for i in range(v)])
    return q * allowed / allowed.sum() + (1 - q) * p


V = 24
RNG = np.random.default_rng(1234)
LOGITS = (RNG.normal(0, 2.0, V)).astype(np.float32)
HISTORY = np.array([3, 5, 5, 7, 11, 11, 11, 2], dtype=np.int64)
SPECIAL = {0, 1}

CHAINS = {
    "plain": SamplingConfig(),
    "temperature": SamplingConfig(temperature=0.6),
    "top_k": SamplingConfig(temperature=1.3, top_k=5),
    "top_p": SamplingConfig(temperature=0.9, top_p=0.8),
    "min_p": SamplingConfig(min_p=0.08),
    "typical": SamplingConfig(typical_p=0.7),
    "penalties": SamplingConfig(repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.3, penalty_last_n=6),
    "bias_ban": SamplingConfig(logit_bias={4: 2.0, 9: -math.inf, 12: -1.5}),
    "explore": SamplingConfig(explore=0.3, top_k=4),
    "explore_greedy": SamplingConfig(temperature=0, explore=0.25, logit_bias={6: -math.inf}),
    "full_chain": SamplingConfig(
        temperature=0.7,
        top_k=12,
        top_p=0.9,
        min_p=0.05,
        repetition_penalty=1.1,
        presence_penalty=0.2,
        frequency_penalty=0.1,
        logit_bias={8: -math.inf, 3: 1.0},
        explore=0.2,
        explore_end=0.05,
        explore_steps=10,
        explore_schedule="linear",
    ),
}


@pytest.mark.parametrize("name", list(CHAINS))
def test_chain_matches_exact_distribution(name: str) -> None:
    cfg = CHAINS[name]
    step = 4
    router = make_chain(cfg, V, SPECIAL)
    expected = reference(LOGITS, HISTORY, cfg, step, SPECIAL)
    dist = router.distribution(LOGITS, HISTORY, step).dense()
    assert np.allclose(dist, expected, atol=1e-6), (dist, expected)
    rng = np.random.default_rng(99)
    n = 20_000
    counts = np.bincount([router.sample(LOGITS, HISTORY, rng, step) for _ in range(n)], minlength=V)
    assert counts[expected == 0].sum() == 0  # nothing outside the support, ever
    support = expected > 0
    exp_counts = expected[support] * n
    if support.sum() == 1:
        assert counts[support][0] == n
        return
    _, pvalue = stats.chisquare(counts[support], exp_counts)
    assert pvalue > 0.001, (name, counts, exp_counts)


def test_suppression_applies_before_everything() -> None:
    router = make_chain(SamplingConfig(temperature=0), V, SPECIAL)
    best = int(np.argmax(LOGITS))
    assert router.sample(LOGITS, HISTORY, np.random.default_rng(0)) == best
    suppressing = make_chain(SamplingConfig(temperature=0), V, SPECIAL, suppress_ids=[best], suppress_until=2)
    assert suppressing.sample(LOGITS, HISTORY, np.random.default_rng(0), 1) == int(np.argsort(LOGITS)[-2])
    assert suppressing.sample(LOGITS, HISTORY, np.random.default_rng(0), 2) == best  # index 2: no longer
    # greedy's shortcut (argmax, then a look at the suppressed ids) agrees with argmax over processed logits,
    # ties included: the first maximum wins unless it is suppressed
    tied = np.array([0.0, 3.0, 1.0, 3.0, 3.0], dtype=np.float32)
    for sup in ([], [1], [3], [1, 3], [1, 3, 4], [0, 2]):
        plain = make_chain(SamplingConfig(temperature=0), 5, suppress_ids=sup, suppress_until=1)
        want = int(np.argmax(plain.process(tied, np.zeros(0, np.int64))))
        assert plain.sample(tied, np.zeros(0, np.int64), np.random.default_rng(0)) == want, sup
        assert want == plain.sample_plain(tied, np.zeros(0, np.int64), np.random.default_rng(0)), sup


# -- properties ----------------------------------------------------------------------------------------------
logit_vectors = st.lists(st.floats(-30, 30, allow_nan=False, width=32), min_size=2, max_size=64).map(
    lambda xs: np.array(xs, dtype=np.float32)
)
configs = st.builds(
    SamplingConfig,
    temperature=st.sampled_from([0.0, 0.3, 1.0, 2.5]),
    top_k=st.integers(0, 10),
    top_p=st.sampled_from([1.0, 0.95, 0.5, 0.1]),
    min_p=st.sampled_from([0.0, 0.05, 0.5]),
    typical_p=st.sampled_from([1.0, 0.9, 0.3]),
    min_keep=st.integers(1, 4),
    repetition_penalty=st.sampled_from([1.0, 1.2, 0.8]),
    presence_penalty=st.sampled_from([0.0, 1.0, -1.0]),
    explore=st.sampled_from([0.0, 0.1, 1.0]),
)


@settings(max_examples=300, deadline=None)
@given(logits=logit_vectors, cfg=configs, seed=st.integers(0, 2**32))
def test_router_properties(logits: np.ndarray, cfg: SamplingConfig, seed: int) -> None:
    v = len(logits)
    history = np.arange(min(v, 5), dtype=np.int64)
    router = make_chain(cfg, v, special_ids=[0])
    dist = router.distribution(logits, history)
    dense = dist.dense()
    assert np.all(np.isfinite(dense)) and abs(dense.sum() - 1) < 1e-9 and np.all(dense >= 0)
    if not cfg.greedy:
        ids, cand = router.truncate(router.process(logits, history))
        assert len(cand) >= min(cfg.min_keep, v) and np.all(np.isfinite(cand))
    a = [router.sample(logits, history, np.random.default_rng(seed), s) for s in range(3)]
    b = [router.sample(logits, history, np.random.default_rng(seed), s) for s in range(3)]
    assert a == b  # same seed, same tokens
    assert all(dense[t] > 0 for t in a)
    if cfg.greedy and cfg.explore == 0:
        assert a[0] == int(np.argmax(router.process(logits, history)))
        if cfg.repetition_penalty == 1.0 and cfg.presence_penalty == 0.0:
            assert a[0] == int(np.argmax(logits))


def test_top_k_prefilter_is_exact() -> None:
    """top-k over a large vector takes a threshold from a strided sample; it must equal a full partition,
    including ties at the boundary and banned (-inf) entries."""
    from edgeroute.sampling import _top_k_positions

    rng = np.random.default_rng(0)
    for trial in range(600):
        n, k = int(rng.integers(2_000, 60_000)), int(rng.integers(1, 400))
        x = (rng.standard_normal(n) * rng.uniform(0.1, 10)).astype(np.float32)
        if trial % 3 == 0:
            x[rng.integers(0, n, n // 2)] = -np.inf
        if trial % 5 == 0:
            x = np.round(x)
        kth = np.partition(x, n - k)[n - k]
        pos, values = _top_k_positions(x, k)
        assert values.min() == kth and np.array_equal(values, x[pos]) and np.all(np.diff(pos) > 0)
        ids, kept = top_k(None, x, k)
        assert len(kept) >= k and set(ids) == set(np.flatnonzero(x >= kth))


def test_few_candidates_path_draws_what_the_general_chain_draws() -> None:
    """After top-k, the router takes a shortcut through top-p, min-p and the draw; for the same RNG state it must
    pick the token that the general chain (truncate, then draw) picks, for every setting, ties and min_keep."""
    rng = np.random.default_rng(3)
    shortcut = 0
    for trial in range(400):
        v = int(rng.integers(300, 5000))
        x = (rng.standard_normal(v) * rng.uniform(0.3, 6)).astype(np.float32)
        if trial % 4 == 0:
            x = np.round(x)  # ties at every cut
        cfg = SamplingConfig(
            temperature=float(rng.uniform(0.2, 1.5)),
            top_k=int(rng.integers(1, 300)),
            top_p=float(rng.choice([1.0, 0.5, 0.9, 0.99])),
            min_p=float(rng.choice([0.0, 0.05, 0.3])),
            min_keep=int(rng.choice([1, 1, 3, 20])),
        )
        router = make_chain(cfg, v)
        seed = int(rng.integers(1 << 30))
        ids, cand = router.truncate(x)
        want = int(ids[draw(_weights(cand), np.random.default_rng(seed))])
        assert router.sample(x, np.zeros(0, dtype=np.int64), np.random.default_rng(seed)) == want, (trial, cfg)
        k_ids, k_vals = top_k(None, x, cfg.top_k, cfg.min_keep)
        shortcut += router._pick_few(k_ids, k_vals, np.random.default_rng(seed)) is not None
    assert shortcut > 300  # the shortcut was taken, not the fallback


def test_repetition_penalty_is_float32_arithmetic() -> None:
    """The repetition penalty runs on Python floats: bit for bit what float32 NumPy computes (HF's formula), for
    positive, negative, zero, tiny, huge and infinite logits and repeated ids."""
    rng = np.random.default_rng(3)
    for trial in range(200):
        x = (rng.standard_normal(5000) * 10.0 ** rng.integers(-30, 30)).astype(np.float32)
        x[rng.integers(0, 5000, 20)] = rng.choice(np.array([0.0, -np.inf, 1e-45, -1e-45, 3e38], dtype=np.float32))
        window = rng.integers(0, 5000, int(rng.integers(1, 200)))
        rep = float(rng.choice([1.1, 1.3, 0.7, 2.0, 1.0000001]))
        sel = x[window]
        want = x.copy()
        with np.errstate(over="ignore"):  # huge logits overflow to inf, in both
            want[window] = np.where(sel > 0, sel / np.float32(rep), sel * np.float32(rep))
            got = apply_penalties(x, window, repetition=rep)
        assert got.dtype == np.float32 and np.array_equal(got.view(np.uint32), want.view(np.uint32)), trial


def test_penalties_are_applied_in_place_and_undone() -> None:
    """The router writes bias, suppression and penalties into the logits it is given and puts the old values
    back: the draw equals the plain stage-by-stage draw from a processed copy, and the caller's array is
    unchanged afterwards."""
    rng = np.random.default_rng(4)
    for trial in range(60):
        x = (rng.standard_normal(3000) * 2).astype(np.float32)
        before = x.copy()
        hist = rng.integers(0, 3000, 50)
        cfg = SamplingConfig(
            temperature=0.0 if trial % 3 == 0 else 0.8,
            top_k=40,
            top_p=0.9,
            repetition_penalty=1.3,
            presence_penalty=0.2 if trial % 2 else 0.0,
            logit_bias={int(hist[0]): 5.0, 7: -np.inf},
        )
        router = make_chain(cfg, 3000, suppress_ids=[int(np.argmax(x))], suppress_until=1)
        seed = int(rng.integers(1 << 30))
        want = router.sample_plain(x, hist, np.random.default_rng(seed))
        assert router.sample(x, hist, np.random.default_rng(seed)) == want
        assert np.array_equal(x, before)
        ro = x.copy()
        ro.flags.writeable = False  # a read-only vector takes the copying path
        assert router.sample(ro, hist, np.random.default_rng(seed)) == want


# -- the stages and the fast paths ---------------------------------------------------------------------------
class Ban(Processor):
    """A test stage: bans ``ids`` (everywhere: ``touched`` None makes the router copy), remembers what it was
    told."""

    lowers_only = True
    stateful = True

    def __init__(self, ids: set[int]) -> None:
        self.ids = sorted(ids)
        self.accepted: list[int] = []
        self.resets = 0

    def apply(self, out: np.ndarray, history: np.ndarray, index: int) -> None:
        out[self.ids] = -np.inf

    def keeps(self, token: int, history: np.ndarray, index: int) -> bool:
        return token not in self.ids

    def accept(self, token: int) -> None:
        self.accepted.append(token)

    def reset(self) -> None:
        self.resets += 1
        self.accepted.clear()


def test_make_chain_builds_the_documented_stage_order() -> None:
    from edgeroute.sampling import LogitBias, MinP, Penalties, Suppress, Temperature, TopK, TopP, Typical

    cfg = SamplingConfig(
        temperature=0.7, top_k=5, top_p=0.9, min_p=0.1, typical_p=0.8, repetition_penalty=1.2, logit_bias={1: 2.0}
    )
    extra = Ban({3})
    router = make_chain(cfg, 10, suppress_ids=[0], suppress_until=2, processors=[extra])
    assert [type(p) for p in router.processors] == [LogitBias, Suppress, Penalties, Ban]
    assert [type(t) for t in router.truncations] == [TopK, Temperature, TopP, MinP, Typical]
    plain = make_chain(SamplingConfig(), 10)  # stages that change nothing are left out
    assert plain.processors == () and plain.truncations == ()
    greedy = make_chain(SamplingConfig(temperature=0, top_k=3, top_p=0.5), 10)
    assert greedy.greedy and greedy.truncations == ()


def test_an_added_stage_changes_sampling_and_the_distribution_alike() -> None:
    rng = np.random.default_rng(5)
    for trial in range(80):
        x = (rng.standard_normal(600) * 3).astype(np.float32)
        top = np.argsort(x)[-3:].tolist()
        cfg = SamplingConfig(temperature=[0.0, 0.8, 1.0][trial % 3], top_k=[0, 20][trial % 2], logit_bias={5: 1.0})
        router = make_chain(cfg, 600, processors=[Ban(set(top))])
        hist = rng.integers(0, 600, 10)
        dist = router.distribution(x, hist, 0).dense()
        assert dist[top].sum() == 0
        seed = int(rng.integers(1 << 30))
        got = router.sample(x, hist, np.random.default_rng(seed))
        assert got not in top and dist[got] > 0
        assert got == router.sample_plain(x, hist, np.random.default_rng(seed))


def _sample_settings(rng: np.random.Generator, trial: int) -> tuple[SamplingConfig, list[int], int]:
    greedy = trial % 3 == 0
    lowering = trial % 2 == 0
    bias = {int(rng.integers(0, 800)): float(rng.choice([-np.inf, -2.0, -0.5])) for _ in range(int(rng.integers(0, 4)))}
    if not lowering:
        bias[int(rng.integers(0, 800))] = float(rng.choice([0.5, 3.0, 50.0]))
    cfg = SamplingConfig(
        temperature=0.0 if greedy else float(rng.choice([0.3, 0.8, 1.0, 1.7])),
        top_k=int(rng.choice([0, 0, 5, 40, 300, 600])),
        top_p=float(rng.choice([1.0, 0.9, 0.5])),
        min_p=float(rng.choice([0.0, 0.05, 0.4])),
        typical_p=float(rng.choice([1.0, 1.0, 1.0, 0.8])),
        min_keep=int(rng.choice([1, 1, 2, 10])),
        repetition_penalty=float(rng.choice([1.0, 1.0, 1.3])),
        presence_penalty=float(rng.choice([0.0, 0.0, 0.5])),
        frequency_penalty=float(rng.choice([0.0, 0.2])),
        penalty_last_n=int(rng.choice([-1, 8, 64])),
        logit_bias=bias,
        explore=float(rng.choice([0.0, 0.0, 0.3])),
    )
    sup = rng.integers(0, 800, int(rng.integers(0, 3))).tolist()
    return cfg, sup, int(rng.integers(0, 4))


def test_every_fast_path_draws_what_the_plain_stages_draw() -> None:
    """``sample`` (greedy shortcut, in-place edits, the few-candidates path) against ``sample_plain`` (the
    stages one by one) for random chains, ties and peaked logits: the same token and the same RNG state after."""
    rng = np.random.default_rng(11)
    shortcuts = Counter()
    for trial in range(1500):
        x = (rng.standard_normal(800) * rng.uniform(0.3, 8)).astype(np.float32)
        if trial % 5 == 0:
            x = np.round(x)  # ties
        cfg, sup, index = _sample_settings(rng, trial)
        hist = rng.integers(0, 800, 30)
        router = make_chain(cfg, 800, special_ids=[0, 1], suppress_ids=sup, suppress_until=2)
        seed = int(rng.integers(1 << 30))
        r1, r2 = np.random.default_rng(seed), np.random.default_rng(seed)
        try:
            want = router.sample_plain(x, hist, r1, index)
        except er.ConfigError:
            with pytest.raises(er.ConfigError):
                router.sample(x, hist, r2, index)
            continue
        calls = {"pick": 0}
        pick = router._pick

        def counting(*a, _pick=pick, _calls=calls, **k):  # noqa: ANN002, ANN003
            _calls["pick"] += 1
            return _pick(*a, **k)

        router._pick = counting  # type: ignore[method-assign]
        before = x.copy()
        assert router.sample(x, hist, r2, index) == want, (trial, cfg, sup, index)
        assert r1.random() == r2.random() and np.array_equal(x, before)
        if cfg.greedy and not calls["pick"]:
            shortcuts["greedy"] += 1
        if (
            router._few is not None
            and router._pick_few(
                *top_k(None, router.process(x, hist, index), cfg.top_k, cfg.min_keep), np.random.default_rng(seed)
            )
            is not None
        ):
            shortcuts["few"] += 1
        if router._active(index) and not cfg.greedy:
            shortcuts["in place"] += 1
    assert shortcuts["greedy"] > 50 and shortcuts["few"] > 150 and shortcuts["in place"] > 400, shortcuts


def test_the_generator_tells_stateful_stages_what_it_commits_to(tiny: er.Model) -> None:
    m = tiny
    gen = m.generator(er.GenerationConfig(max_new_tokens=6, sampling=SamplingConfig(temperature=0.9, seed=3)))
    stage = Ban({2, 3})
    gen._seq.chooser.router = make_chain(gen.config.sampling, m.vocab_size, m.special_ids, processors=[stage])
    gen.append([5, 6, 7])
    assert stage.resets == 1 and stage.accepted == []
    first = gen.run()
    assert stage.accepted == gen.tokens[3:] and not {2, 3} & set(first.token_ids)
    gen.rewind(2)
    assert stage.resets == 2 and stage.accepted == gen.tokens[3:]
    gen.run()
    assert stage.accepted == gen.tokens[3:]
    gen.append([8])
    assert stage.resets == 3 and stage.accepted == []
