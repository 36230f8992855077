"""The open sampler: a new truncation is one class passed to ``make_chain``; the router takes a fast path only when
every stage concerned offers its fast form, and asks the stages, not their classes; the sampler package stays
apart from the graph and text layers, in modules of a readable size."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import edgeroute as er
import numpy as np
from edgeroute import SamplingConfig, make_chain
from edgeroute.sampling import Few, Ids, Processor, TopP, Truncation, top_k
from scipy import stats
from test_imports import RUNTIME, runtime_graph

NO_HISTORY = np.zeros(0, dtype=np.int64)


class TopNSigma(Truncation):
    """top-n-sigma (Tang et al., 2024): the candidates whose logit is at least ``max - n * std`` (over the finite
    candidates), at least ``min_keep`` of them. No fast form: a chain holding it takes the plain path."""

    def __init__(self, n: float, min_keep: int = 1) -> None:
        self.n, self.min_keep = n, min_keep
        self.calls: Counter[str] = Counter()

    def threshold(self, logits: np.ndarray) -> float:
        finite = logits[np.isfinite(logits)]
        return float(finite.max() - np.float32(self.n) * finite.std())

    def __call__(self, ids: Ids, logits: np.ndarray) -> tuple[Ids, np.ndarray]:
        self.calls["plain"] += 1
        keep = np.flatnonzero(logits >= self.threshold(logits))
        if len(keep) < self.min_keep:
            return top_k(ids, logits, self.min_keep)
        return (keep if ids is None else ids[keep]), logits[keep]


class FastTopNSigma(TopNSigma):
    """The same stage with a fast form: the same threshold (NumPy's float32 std over the kept values, in order),
    the comparison on floats; it hands back to the plain stages when fewer than ``min_keep`` pass."""

    def fast(self):  # noqa: ANN201
        return self.on_floats

    def on_floats(self, few: Few) -> bool:
        self.calls["fast"] += 1
        x = few.values()
        t = self.threshold(np.array([x[j] for j in few.keep], dtype=np.float32))
        keep = [j for j in few.keep if x[j] >= t]
        if len(keep) < self.min_keep:
            return False
        few.cut(keep)
        return True


def reference(logits: np.ndarray, temperature: float, n: float) -> np.ndarray:
    """temperature then top-n-sigma then softmax, in float64 with no router."""
    x = logits.astype(np.float64) / temperature
    keep = x >= x.max() - n * x.std()
    p = np.where(keep, np.exp(x - x.max()), 0.0)
    return p / p.sum()


def _same_draw(router: er.Router, x: np.ndarray, history: np.ndarray, seed: int, index: int = 0) -> int:
    """``sample`` and ``sample_plain`` agree on the token and leave the RNG in the same state; the token."""
    r1, r2 = np.random.default_rng(seed), np.random.default_rng(seed)
    token = router.sample(x, history, r1, index)
    assert token == router.sample_plain(x, history, r2, index)
    assert r1.random() == r2.random()
    return token


# -- a new truncation is one class ----------------------------------------------------------------------------
def test_a_new_truncation_routes_as_documented() -> None:
    rng = np.random.default_rng(0)
    v = 50
    x = (rng.standard_normal(v) * 2).astype(np.float32)
    stage = TopNSigma(1.0)
    router = make_chain(SamplingConfig(temperature=0.8), v, truncations=[stage])
    assert router.truncations[-1] is stage
    want = reference(x, 0.8, 1.0)
    dist = router.distribution(x, NO_HISTORY).dense()
    assert np.allclose(dist, want, atol=1e-6) and 1 < np.count_nonzero(want) < v
    n = 6000
    counts = np.bincount([_same_draw(router, x, NO_HISTORY, seed) for seed in range(n)], minlength=v)
    assert counts[want == 0].sum() == 0  # nothing the stage cut is ever drawn
    _, pvalue = stats.chisquare(counts[want > 0], want[want > 0] * n)
    assert pvalue > 0.001
    # greedy draws the argmax: no truncation runs, the extra ones included
    assert make_chain(SamplingConfig(temperature=0), v, truncations=[stage]).truncations == ()


def test_a_new_truncation_follows_the_built_in_ones_and_the_draw_matches_the_plain_stages() -> None:
    rng = np.random.default_rng(1)
    for trial in range(300):
        v = int(rng.integers(100, 3000))
        x = (rng.standard_normal(v) * rng.uniform(0.3, 5)).astype(np.float32)
        if trial % 4 == 0:
            x = np.round(x)  # ties at every cut
        cfg = SamplingConfig(
            temperature=float(rng.choice([0.5, 1.0, 1.4])),
            top_k=int(rng.choice([0, 20, 200])),
            top_p=float(rng.choice([1.0, 0.9])),
            min_p=float(rng.choice([0.0, 0.05])),
            min_keep=int(rng.choice([1, 3])),
            repetition_penalty=float(rng.choice([1.0, 1.3])),
        )
        n = float(rng.choice([0.5, 1.0, 2.0]))
        stage = (TopNSigma if trial % 2 else FastTopNSigma)(n, cfg.min_keep)
        router = make_chain(cfg, v, truncations=[stage])
        history = rng.integers(0, v, 20)
        token = _same_draw(router, x, history, int(rng.integers(1 << 30)))
        assert router.distribution(x, history).dense()[token] > 0
        # the candidates are those of the built-in stages, then cut by the new one
        built_in = make_chain(cfg, v)
        want_ids, want = TopNSigma(n, cfg.min_keep)(*built_in.truncate(built_in.process(x, history)))
        ids, cand = router.truncate(router.process(x, history))
        assert np.array_equal(np.arange(v) if ids is None else ids, np.arange(v) if want_ids is None else want_ids)
        assert np.array_equal(cand, want) and len(cand) >= cfg.min_keep


# -- the fast path: taken only when every stage has its fast form ---------------------------------------------
def test_the_float_path_runs_only_when_every_later_truncation_has_a_fast_form() -> None:
    rng = np.random.default_rng(2)
    x = (rng.standard_normal(2000) * 3).astype(np.float32)
    cfg = SamplingConfig(temperature=0.8, top_k=40, top_p=0.95)

    fast = FastTopNSigma(1.0)  # top-k, then every stage has a fast form: the float path
    _same_draw(make_chain(cfg, 2000, truncations=[fast]), x, NO_HISTORY, 7)
    assert fast.calls == {"fast": 1, "plain": 1}  # sample on floats, sample_plain in NumPy

    fast = FastTopNSigma(1.0)  # one more stage, with no fast form: the plain path
    _same_draw(make_chain(cfg, 2000, truncations=[TopNSigma(3.0), fast]), x, NO_HISTORY, 7)
    assert fast.calls == {"plain": 2}

    fast = FastTopNSigma(1.0)  # a built-in stage with none (typical): the plain path
    _same_draw(make_chain(cfg.replace(typical_p=0.9), 2000, truncations=[fast]), x, NO_HISTORY, 7)
    assert fast.calls == {"plain": 2}

    fast = FastTopNSigma(1.0)  # no prefilter (top-k off): the candidates are the vocabulary, no float path
    _same_draw(make_chain(cfg.replace(top_k=0), 2000, truncations=[fast]), x, NO_HISTORY, 7)
    assert fast.calls == {"plain": 2}

    fast = FastTopNSigma(1.0)  # top-k leaves more than a few: no float path either
    _same_draw(make_chain(cfg.replace(top_k=1000), 2000, truncations=[fast]), x, NO_HISTORY, 7)
    assert fast.calls == {"plain": 2}

    fast = FastTopNSigma(0.01, min_keep=5)  # the fast form cannot decide: the plain stages, the same token
    _same_draw(make_chain(cfg.replace(min_keep=5), 2000, truncations=[fast]), x, NO_HISTORY, 7)
    assert fast.calls == {"fast": 1, "plain": 2}


@dataclass(frozen=True)
class PlainTopP(TopP):
    """Top-p without its fast form: a subclass the router must not mistake for the built-in stage."""

    calls: list[int] = field(default_factory=list, compare=False)

    def fast(self) -> None:
        return None

    def __call__(self, ids: Ids, logits: np.ndarray) -> tuple[Ids, np.ndarray]:
        self.calls.append(len(logits))
        return super().__call__(ids, logits)


def test_the_router_asks_the_stage_not_its_class() -> None:
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(1000) * 3).astype(np.float32)
    stage = PlainTopP(0.9)
    router = make_chain(SamplingConfig(temperature=0.7, top_k=30), 1000, truncations=[stage])
    _same_draw(router, x, NO_HISTORY, 11)
    assert stage.calls == [30, 30]  # both paths ran the stage itself, on the 30 candidates top-k left


def test_the_float_path_draws_what_the_plain_stages_draw() -> None:
    rng = np.random.default_rng(4)
    paths: Counter[tuple] = Counter()
    for trial in range(400):
        x = (rng.standard_normal(800) * rng.uniform(0.3, 8)).astype(np.float32)
        if trial % 5 == 0:
            x = np.round(x)
        cfg = SamplingConfig(
            temperature=float(rng.choice([0.3, 0.8, 1.7])),
            top_k=int(rng.choice([5, 40, 250])),
            top_p=float(rng.choice([1.0, 0.9, 0.5])),
            min_p=float(rng.choice([0.0, 0.05, 0.4])),
            min_keep=int(rng.choice([1, 2, 10])),
        )
        stage = FastTopNSigma(float(rng.choice([0.3, 1.0, 3.0])), cfg.min_keep)
        _same_draw(make_chain(cfg, 800, truncations=[stage]), x, rng.integers(0, 800, 10), int(rng.integers(1 << 30)))
        paths[tuple(sorted(stage.calls.items()))] += 1
    # the float path ran to the draw; or this stage handed back (min_keep); or an earlier one did, or ties left
    # top-k more than a few (("plain", 2),)
    assert paths[(("fast", 1), ("plain", 1))] > 150 and paths[(("fast", 1), ("plain", 2))] > 20, paths


class Record(Processor):
    """Adds ``boost`` at ``ids``; records whether it wrote into the caller's vector. ``touched`` names the ids
    only when ``in_place``; ``lowers_only`` when the boost is not positive."""

    def __init__(self, ids: list[int], boost: float, in_place: bool) -> None:
        self.ids, self.boost, self.in_place = np.array(ids), boost, in_place
        self.lowers_only = boost <= 0
        self.seen: list[np.ndarray] = []

    def apply(self, out: np.ndarray, history: np.ndarray, index: int) -> None:
        self.seen.append(out)
        out[self.ids] += self.boost

    def touched(self, history: np.ndarray, index: int) -> np.ndarray | None:
        return self.ids if self.in_place else None

    def keeps(self, token: int, history: np.ndarray, index: int) -> bool:
        return token not in self.ids


def test_the_processors_fast_forms_are_taken_only_when_every_one_offers_them() -> None:
    rng = np.random.default_rng(5)
    x = (rng.standard_normal(500) * 2).astype(np.float32)
    best, second = (int(i) for i in np.argsort(x)[::-1][:2])
    greedy = SamplingConfig(temperature=0)

    lower = Record([int(np.argmin(x))], -1.0, True)  # lowers only and keeps the argmax: nothing is applied
    assert _same_draw(make_chain(greedy, 500, processors=[lower]), x, NO_HISTORY, 0) == best
    assert len(lower.seen) == 1  # only sample_plain applied it

    raise_ = Record([second], 50.0, True)  # raises a value: greedy must apply it (no raw-argmax shortcut)
    lower = Record([int(np.argmin(x))], -1.0, True)
    assert _same_draw(make_chain(greedy, 500, processors=[lower, raise_]), x, NO_HISTORY, 0) == second
    assert len(lower.seen) == 2

    before = x.copy()
    for in_place in (True, False):  # in place only when every active processor names what it touches
        a, b = Record([1, 2], -0.5, True), Record([3], 0.5, in_place)
        _same_draw(make_chain(SamplingConfig(top_k=20), 500, processors=[a, b]), x, NO_HISTORY, 3)
        assert (a.seen[0] is x) == in_place and (b.seen[0] is x) == in_place and a.seen[1] is not x
        assert np.array_equal(x, before)  # the caller's vector is put back


# -- the package's bounds -------------------------------------------------------------------------------------
def test_the_sampler_knows_nothing_of_the_graph_or_the_text() -> None:
    graph = runtime_graph()
    assert graph["sampling"] <= {"config", "errors"}
    reach, todo = set(), ["sampling"]
    while todo:
        for m in graph[todo.pop()] - reach:
            reach.add(m)
            todo.append(m)
    assert not reach & {"model", "kv_cache", "device_cache", "session", "contract", "output", "tokenizer"}, reach


def test_no_sampler_module_is_long() -> None:
    for f in sorted((RUNTIME / "sampling").glob("*.py")):
        assert len(f.read_text(encoding="utf-8").splitlines()) <= 500, f.name
