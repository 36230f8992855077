"""The continuous-batching engine: every request yields what it yields alone, whatever else runs, joins or leaves;
cancellation, admission control, bad input at submission, failing graph runs, threads, asyncio, prefix reuse, the
solo path (flows, concatenated-KV graphs)."""

from __future__ import annotations

import asyncio
import resource
import threading
import time
from pathlib import Path

import edgeroute as er
import numpy as np
import pytest
from session_spy import spied

TEXTS = [
    "Once upon a time",
    "The robot painted a picture of the sea and the sky",
    "a b c d e f g h i j k l m n o p",
    "hello",
    "Water evaporates, rises and cools",
    "one two three",
    "In the beginning the little robot could not paint at all, but every day it tried again",
    "x",
]


def configs() -> list[er.GenerationConfig]:
    out = []
    for i in range(len(TEXTS)):
        sampling = er.SamplingConfig(temperature=0) if i % 2 == 0 else er.SamplingConfig(temperature=0.9, seed=i)
        out.append(er.GenerationConfig(max_new_tokens=6 + 5 * i, sampling=sampling))
    return out


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> er.Model:
    from tiny_model import write_tiny_model

    return er.Model.load(write_tiny_model(tmp_path_factory.mktemp("engine") / "model", kv_layout="shared"))


def wait_until(cond, seconds: float = 10.0) -> None:  # noqa: ANN001
    end = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.001)


@pytest.mark.parametrize(("max_batch", "budget"), [(8, 64), (3, 5), (1, 2)])
def test_every_request_yields_what_it_yields_alone(shared: er.Model, max_batch: int, budget: int) -> None:
    """Mixed greedy and seeded sampling, prompts of different lengths, limits that end them at different steps,
    fewer slots than requests (joins as others leave), prefill chunks interleaved with decoding."""
    cfgs = configs()
    alone = [shared.generate(t, c) for t, c in zip(TEXTS, cfgs, strict=True)]
    with er.Engine(shared, max_batch=max_batch, prefill_budget=budget) as engine:
        assert engine.mode == "batched"
        requests = [engine.submit(t, c) for t, c in zip(TEXTS, cfgs, strict=True)]
        got = [r.result(timeout=60) for r in requests]
        streamed = [list(r) for r in requests]  # every step, also after the end
    for a, g, steps in zip(alone, got, streamed, strict=True):
        assert g.token_ids == a.token_ids and g.text == a.text and g.finish_reason == a.finish_reason
        assert "".join(s.text for s in steps) == g.text and steps[-1].finish_reason == g.finish_reason
        assert g.usage.completion_tokens == a.usage.completion_tokens and g.usage.prompt_tokens == a.usage.prompt_tokens
        assert g.usage.time_to_first_token is not None and g.usage.time_to_first_token > 0


def test_stops_logprobs_and_min_tokens_as_alone(shared: er.Model) -> None:
    prompt = "Once upon a time"
    text = shared.generate(prompt, er.GenerationConfig(max_new_tokens=12, sampling=er.SamplingConfig(temperature=0)))
    stop = text.text[3:6]
    assert stop.strip()
    cfgs = [
        er.GenerationConfig(max_new_tokens=12, stop=(stop,), sampling=er.SamplingConfig(temperature=0)),
        er.GenerationConfig(max_new_tokens=10, logprobs=3, sampling=er.SamplingConfig(seed=4)),
        er.GenerationConfig(max_new_tokens=9, min_new_tokens=9, sampling=er.SamplingConfig(temperature=0.7, seed=5)),
    ]
    with er.Engine(shared, max_batch=2) as engine:
        got = [engine.submit(prompt, c).result(timeout=30) for c in cfgs]
    for c, g in zip(cfgs, got, strict=True):
        a = shared.generate(prompt, c)
        assert (g.token_ids, g.text, g.finish_reason) == (a.token_ids, a.text, a.finish_reason)
        if c.logprobs:
            assert [x.token_id for x in g.logprobs] == [x.token_id for x in a.logprobs]
            assert np.allclose([x.logprob for x in g.logprobs], [x.logprob for x in a.logprobs], atol=1e-5)
    assert got[0].finish_reason == "stop" and stop not in got[0].text
    assert len(got[2].token_ids) == 9


def test_cancel_frees_the_slot_and_leaves_the_others_unchanged(shared: er.Model) -> None:
    cfgs = configs()
    long = er.GenerationConfig(max_new_tokens=200, min_new_tokens=200, sampling=er.SamplingConfig(temperature=0))
    with er.Engine(shared, max_batch=4) as engine:
        doomed = engine.submit("a long story", long)
        others = [engine.submit(t, c) for t, c in zip(TEXTS[:3], cfgs, strict=False)]
        seen = []
        for step in doomed.stream(timeout=30):
            seen.append(step)
            if len(seen) == 3:
                doomed.cancel()
        result = doomed.result(timeout=30)
        assert result.finish_reason == "cancelled" and 3 <= len(result.token_ids) < 200
        wait_until(lambda: engine.stats().active == 0)
        assert engine.stats().cancelled == 1
        for r, t, c in zip(others, TEXTS, cfgs, strict=False):
            assert r.result(timeout=30).token_ids == shared.generate(t, c).token_ids


def test_a_full_queue_raises_at_once(shared: er.Model) -> None:
    long = er.GenerationConfig(max_new_tokens=400, min_new_tokens=400, sampling=er.SamplingConfig(temperature=0))
    with er.Engine(shared, max_batch=1, max_queue=2) as engine:
        first = engine.submit("x", long)
        wait_until(lambda: engine.stats().active == 1)
        queued = [engine.submit("y", long), engine.submit("z", long)]
        t0 = time.monotonic()
        with pytest.raises(er.QueueFullError, match="max_queue 2"):
            engine.submit("w", long)
        assert time.monotonic() - t0 < 1.0
        assert engine.stats().queued == 2
        for r in (first, *queued):
            r.cancel()
        assert [r.result(timeout=30).finish_reason for r in (first, *queued)] == ["cancelled"] * 3


def test_bad_requests_are_refused_at_submission(shared: er.Model) -> None:
    with er.Engine(shared, max_batch=2) as engine:
        with pytest.raises(er.ContextOverflowError):
            engine.submit("hello", er.GenerationConfig(max_new_tokens=shared.context_length))
        with pytest.raises(er.ConfigError) as e:
            engine.submit("hello", er.GenerationConfig(sampling=er.SamplingConfig(logit_bias={10**6: 1.0})))
        assert e.value.field == "logit_bias"
        with pytest.raises(er.ConfigError, match="prompt"):
            engine.submit(b"bytes")
        with pytest.raises(er.ConfigError, match="prompt"):
            engine.submit([shared.vocab_size + 5])
        with pytest.raises(er.ConfigError, match="not a flow setting"):
            engine.submit("hello", draftt="ngram")
        with pytest.raises(er.ConfigError, match="config"):
            engine.submit("hello", {"max_new_tokens": 3})  # type: ignore[arg-type]
        assert engine.stats().submitted == 0
        ok = engine.submit("hello", er.GenerationConfig(max_new_tokens=3)).result(timeout=30)
        assert ok.usage.completion_tokens >= 1
    with pytest.raises(er.EngineClosedError):
        engine.submit("hello")
    with pytest.raises(er.ConfigError, match="max_batch"):
        er.Engine(shared, max_batch=0)


def test_eight_threads_submitting_at_once(shared: er.Model) -> None:
    cfgs = configs()
    alone = [shared.generate(t, c).token_ids for t, c in zip(TEXTS, cfgs, strict=True)]
    got: dict[int, list[int]] = {}
    barrier = threading.Barrier(len(TEXTS))
    with er.Engine(shared, max_batch=4, prefill_budget=8) as engine:

        def work(i: int) -> None:
            barrier.wait(timeout=10)
            got[i] = engine.submit(TEXTS[i], cfgs[i]).result(timeout=60).token_ids

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(TEXTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert [got[i] for i in range(len(TEXTS))] == alone


def test_the_async_iterator(shared: er.Model) -> None:
    cfgs = configs()

    async def main(engine: er.Engine) -> list[list[int]]:
        async def collect(text: str, cfg: er.GenerationConfig) -> list[int]:
            return [s.token_id async for s in engine.submit(text, cfg)]

        return await asyncio.wait_for(asyncio.gather(*(collect(t, c) for t, c in zip(TEXTS, cfgs, strict=True))), 60)

    with er.Engine(shared, max_batch=3) as engine:
        streamed = asyncio.run(main(engine))
    for ids, t, c in zip(streamed, TEXTS, cfgs, strict=True):
        alone = shared.generate(t, c)
        assert ids[: len(alone.token_ids)] == alone.token_ids  # a stop token ends the stream but not token_ids


def test_prefix_reuse_gives_the_tokens_of_a_cold_prefill(shared: er.Model) -> None:
    system = "You are a careful assistant who paints robots, " * 6
    cfg = er.GenerationConfig(max_new_tokens=8, sampling=er.SamplingConfig(temperature=0.8, seed=1))
    with er.Engine(shared, max_batch=2) as engine:
        first = engine.submit(system + "first question", cfg).result(timeout=30)
        second = engine.submit(system + "second one", cfg).result(timeout=30)
        again = engine.submit(system + "first question", cfg).result(timeout=30)
        stats = engine.stats()
    n_system = len(shared.tokenizer.encode(system))
    assert stats.reused_prompt_tokens >= 2 * (n_system - 2)
    assert second.token_ids == shared.generate(system + "second one", cfg).token_ids
    assert first.token_ids == again.token_ids == shared.generate(system + "first question", cfg).token_ids
    with er.Engine(shared, max_batch=2, prefix_reuse=False) as engine:
        engine.submit(system + "first question", cfg).result(timeout=30)
        engine.submit(system + "second one", cfg).result(timeout=30)
        assert engine.stats().reused_prompt_tokens == 0


def test_a_first_token_is_handed_over_before_the_next_prefill_chunk(shared: er.Model) -> None:
    """The token a graph run lets a request choose reaches it right after that run, not after the next iteration's
    prefill chunk of another prompt (which would add a chunk's time to its time to first token). A prompt's last
    token is fed by the decode step (never a prefill chunk: tests/test_hostile.py, the same tokens cached or not)."""

    seen: list[int] = []  # at the start of every graph run: how many steps the short request has
    watch: list[er.Request] = []
    model = spied(shared, lambda: seen.append(len(watch[0]._steps) if watch else -1))
    cfg = er.GenerationConfig(max_new_tokens=4, sampling=er.SamplingConfig(temperature=0))
    with er.Engine(model, max_batch=2, prefill_budget=8, prefix_reuse=False) as engine:
        with engine._lock:  # both are queued before the engine's first iteration
            short = engine.submit([5, 6, 7], cfg)
            long = engine.submit(list(range(10, 70)), cfg)
            watch.append(short)
        assert short.result(timeout=30).token_ids == shared.generate([5, 6, 7], cfg).token_ids
        assert long.result(timeout=30).token_ids == shared.generate(list(range(10, 70)), cfg).token_ids
    # runs: the short prompt's first 2 tokens with the long one's first chunk (6) (ragged rows, one run), the decode
    # step that feeds the short prompt's last token; at the start of the 3rd (the long prompt's 2nd chunk) the short
    # request has its token
    assert seen[:3] == [0, 0, 1]


def test_a_burst_is_prefilled_in_shared_runs_each_request_as_alone(shared: er.Model) -> None:
    """On a graph that takes query_seqlens, prompts that start together are prefilled in a few graph runs (rows
    of different lengths, right-padded), scored and unscored apart; every request yields what it yields alone,
    prompt scores included."""
    from edgeroute import scoring

    cfgs = configs()[:6]
    alone = [shared.generate(t, c) for t, c in zip(TEXTS[:6], cfgs, strict=True)]
    scored_cfg = er.GenerationConfig(max_new_tokens=2, prompt_logprobs=2, sampling=er.SamplingConfig(temperature=0))
    prompts = [shared.tokenizer.encode(t) for t in TEXTS[4:8]]
    with er.Engine(shared, max_batch=8, prefix_reuse=False) as engine:
        assert engine._executor is not None and engine._executor.cache.ragged
        calls: list[int] = []
        inner = engine._executor.prefill
        engine._executor.prefill = lambda chunks, keep: calls.append(len(chunks)) or inner(chunks, keep)  # type: ignore[method-assign]
        with engine._lock:  # all queued before the loop's next iteration
            requests = [engine.submit(t, c) for t, c in zip(TEXTS[:6], cfgs, strict=True)]
        got = [r.result(timeout=30) for r in requests]
        assert sum(calls) == 6 and len(calls) < 6 and max(calls) > 1, calls
        calls.clear()
        with engine._lock:
            requests = [engine.submit(ids, scored_cfg) for ids in prompts]
        scored = [r.result(timeout=30) for r in requests]
        assert sum(calls) == 4 and len(calls) < 4, calls
    for a, g in zip(alone, got, strict=True):
        assert g.token_ids == a.token_ids and g.finish_reason == a.finish_reason
    for ids, g in zip(prompts, scored, strict=True):
        assert g.token_ids == shared.generate(ids, scored_cfg).token_ids and g.prompt_logprobs is not None
        want = scoring.prompt_scores(shared, ids, 2)
        assert [t.token_id for t in g.prompt_logprobs] == ids[1:]
        np.testing.assert_allclose([t.logprob for t in g.prompt_logprobs], [t.logprob for t in want], atol=1e-5)
        assert [[i for i, _ in t.top] for t in g.prompt_logprobs] == [[i for i, _ in t.top] for t in want]


def test_a_ragged_prefill_leaves_the_rows_between_as_they_were(shared: er.Model) -> None:
    """``Executor.prefill`` of rows 0 and 2: row 1, holding nothing, gets a placeholder whose position is given
    back; later, holding positions, it appends nothing while rows 0 and 2 go on; every row's logits equal its
    own runs alone, and row 1's cache stays intact."""
    from edgeroute.executor import Executor

    ids = [np.array(shared.tokenizer.encode(t), dtype=np.int64) for t in TEXTS[:3]]
    more = np.array([5, 6, 7], dtype=np.int64)
    ref = Executor(shared, 1)

    def alone(*parts: np.ndarray) -> list[np.ndarray]:
        ref.hold(0, 0)
        out, start = [], 0
        for part in parts:
            out.append(ref.prefill([(0, part, start)], keep=True)[0].copy())
            start += len(part)
        return out

    ex = Executor(shared, 3)
    n = [len(x) for x in ids]
    first = ex.prefill([(0, ids[0], 0), (2, ids[2], 0)], keep=True)
    assert ex.cache.lengths.tolist() == [n[0], 0, n[2]]
    np.testing.assert_allclose(first[0], alone(ids[0])[0], rtol=0, atol=1e-5)
    np.testing.assert_allclose(first[1], alone(ids[2])[0], rtol=0, atol=1e-5)
    ex.prefill([(1, ids[1], 0)], keep=False)
    going = ex.prefill([(0, more, n[0]), (2, more[:2], n[2])], keep=True)
    assert ex.cache.lengths.tolist() == [n[0] + 3, n[1], n[2] + 2] and [len(g) for g in going] == [3, 2]
    np.testing.assert_allclose(going[0], alone(ids[0], more)[1], rtol=0, atol=1e-5)
    np.testing.assert_allclose(going[1], alone(ids[2], more[:2])[1], rtol=0, atol=1e-5)
    (after,) = ex.prefill([(1, more, n[1])], keep=True)
    np.testing.assert_allclose(after, alone(ids[1], more)[1], rtol=0, atol=1e-5)
    # a row whose padded span would pass the buffer's end: the chunks run one by one
    cap = ex.cache.capacity
    ex.hold(0, cap - 2)
    ex.hold(1, 0)
    near = [x.copy() for x in ex.prefill([(0, more[:2], cap - 2), (1, ids[1], 0)], keep=True)]
    assert ex.cache.lengths.tolist()[:2] == [cap, n[1]]
    np.testing.assert_allclose(near[1], alone(ids[1])[0], rtol=0, atol=1e-5)
    ex.hold(0, cap - 2)  # row 0's chunk again, alone, over the same cached positions
    (again,) = ex.prefill([(0, more[:2], cap - 2)], keep=True)
    np.testing.assert_array_equal(near[0], again)  # each chunk's own logits, not the next chunk's
    with pytest.raises(er.ContextOverflowError):  # the cache itself refuses such a run
        ex.cache.rows(0, 2).run(ex.session, np.ones((2, 3), np.int64), 1, counts=np.array([0, 3], np.int32))


def test_an_idle_engine_gathers_the_requests_announced_as_incoming(shared: er.Model) -> None:
    """A burst starts in one step: an idle engine waits for requests announced with incoming() (a server reading
    them), at most ``gather`` seconds; it never waits while requests run; bad values of gather are refused."""
    cfg = er.GenerationConfig(max_new_tokens=3, sampling=er.SamplingConfig(temperature=0))
    with er.Engine(shared, max_batch=4, gather=1.0) as engine:
        with engine.incoming():
            first = engine.submit("one", cfg)
            time.sleep(0.3)
            assert not first._steps and engine.stats().incoming == 1  # held while the other is on its way
            second = engine.submit("two", cfg)
        assert first.result(timeout=30).token_ids == shared.generate("one", cfg).token_ids
        assert second.result(timeout=30).token_ids == shared.generate("two", cfg).token_ids
        assert engine.stats().incoming == 0
    with er.Engine(shared, max_batch=4, gather=0.05) as engine:
        with engine.incoming():  # announced, never submitted: the wait ends after gather
            lone = engine.submit("one", cfg)
            assert lone.result(timeout=30).token_ids == shared.generate("one", cfg).token_ids
    long = er.GenerationConfig(max_new_tokens=400, min_new_tokens=400, sampling=er.SamplingConfig(temperature=0))
    with er.Engine(shared, max_batch=4, gather=1.0) as engine:
        running = engine.submit("one", long)
        wait_until(lambda: len(running._steps) >= 1)
        with engine.incoming():  # requests run: a newcomer joins at the next step, announced or not
            joining = engine.submit("two", cfg)
            assert joining.result(timeout=30).token_ids == shared.generate("two", cfg).token_ids
        running.cancel()
    for bad in (-0.1, 2, "0.1", True):
        with pytest.raises(er.ConfigError, match="gather"):
            er.Engine(shared, gather=bad)  # type: ignore[arg-type]


def test_a_failing_graph_run_fails_its_requests_and_the_engine_goes_on(shared: er.Model) -> None:
    failing = threading.Event()  # graph runs raise while it is set

    def before() -> None:
        if failing.is_set():
            raise RuntimeError("injected failure")

    model = spied(shared, before)
    long = er.GenerationConfig(max_new_tokens=300, min_new_tokens=300, sampling=er.SamplingConfig(temperature=0))
    with er.Engine(model, max_batch=2) as engine:
        doomed = [engine.submit("one", long), engine.submit("two", long)]
        wait_until(lambda: all(len(r._steps) >= 2 for r in doomed))
        failing.set()
        for r in doomed:
            with pytest.raises(er.InferenceError, match="injected"):
                r.result(timeout=30)
        failing.clear()
        cfg = configs()[1]
        assert engine.submit(TEXTS[1], cfg).result(timeout=30).token_ids == shared.generate(TEXTS[1], cfg).token_ids
        assert engine.stats().failed == 2
        failing.set()  # a prefill run of two prompts (ragged rows) fails both, and nothing else
        with engine._lock:
            pair = [engine.submit(TEXTS[2], cfg), engine.submit(TEXTS[6], cfg)]
        for r in pair:
            with pytest.raises(er.InferenceError, match="injected"):
                r.result(timeout=30)
        failing.clear()
        assert engine.submit(TEXTS[6], cfg).result(timeout=30).token_ids == shared.generate(TEXTS[6], cfg).token_ids
        assert engine.stats().failed == 4


def test_flows_run_solo_and_keep_their_flow(shared: er.Model) -> None:
    cfg = er.GenerationConfig(max_new_tokens=12, sampling=er.SamplingConfig(temperature=0.8, seed=3))
    with er.Engine(shared, max_batch=2) as engine:
        drafted = engine.submit("a b c a b c a b", cfg, draft="ngram")
        guided = engine.submit("Once upon", cfg, guidance=2.0, negative_prompt="no")
        plain = engine.submit("Once upon", cfg)
        wait_until(lambda: engine.stats().solo > 0 or drafted.done)
        got = [r.result(timeout=30) for r in (drafted, guided, plain)]
    assert got[0].token_ids == shared.generate("a b c a b c a b", cfg, draft="ngram").token_ids
    assert got[0].usage.draft_proposed > 0  # it really ran with its draft
    assert got[1].token_ids == shared.generate("Once upon", cfg, guidance=2.0, negative_prompt="no").token_ids
    assert got[2].token_ids == shared.generate("Once upon", cfg).token_ids
    assert got[1].token_ids != got[2].token_ids  # guidance changed the tokens: the flow was not dropped


def test_graphs_with_a_concatenated_cache_are_served_solo(tiny: er.Model) -> None:
    cfgs = configs()[:4]
    with er.Engine(tiny, max_batch=4) as engine:
        assert engine.mode == "solo"
        requests = [engine.submit(t, c) for t, c in zip(TEXTS, cfgs, strict=False)]
        got = [r.result(timeout=60).token_ids for r in requests]
    assert got == [tiny.generate(t, c).token_ids for t, c in zip(TEXTS, cfgs, strict=False)]


def test_memory_stays_flat_over_500_requests(shared: er.Model) -> None:
    cfg = er.GenerationConfig(max_new_tokens=4, sampling=er.SamplingConfig(temperature=0.8, seed=0))

    def rss_mb() -> float:
        return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20

    with er.Engine(shared, max_batch=4) as engine:
        for r in [engine.submit(f"warm {i}", cfg) for i in range(40)]:
            r.result(timeout=30)
        before = rss_mb()
        for start in range(0, 500, 50):
            batch = [engine.submit(f"request {start + i} says", cfg) for i in range(50)]
            for r in batch:
                r.result(timeout=60)
        after = rss_mb()
        assert engine.stats().finished == 540
    assert after - before < 40, (before, after)


def test_idle_rows_below_a_decoding_row_do_not_grow(shared: er.Model) -> None:
    """Rows below the highest decoding slot run in every step with a placeholder token: their length is given
    back, so a long request in slot 1 never pushes slot 0's cached tokens past the context."""
    ctx = shared.context_length
    cfg = er.GenerationConfig(
        max_new_tokens=ctx - 20, min_new_tokens=ctx - 20, sampling=er.SamplingConfig(temperature=0)
    )
    with er.Engine(shared, max_batch=2, prefix_reuse=False) as engine:
        with engine._lock:  # both queued before the loop admits either: short takes slot 0, long slot 1
            short = engine.submit("a b c d e f g h i j", er.GenerationConfig(max_new_tokens=3))
            long = engine.submit("x y", cfg)
        short.result(timeout=30)
        done = long.result(timeout=120)
        assert len(done.token_ids) == ctx - 20
        held = engine._executor.cache.lengths.tolist()
    assert held[0] <= len(short.prompt) + 3 and held[1] == len(long.prompt) + ctx - 20 - 1, held
