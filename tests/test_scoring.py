"""Scoring (``Model.score``, ``edgeroute.scoring``) and the server's log-likelihood contract (``echo`` with
``logprobs`` on ``/v1/completions``, as lm-evaluation-harness's ``local-completions`` reads it), on tiny models,
against a token-by-token reference computed from the full sequence's logits."""

from __future__ import annotations

from typing import Any

import edgeroute as er
import httpx
import numpy as np
import pytest
from edgeroute import scoring
from edgeroute.sampling import log_softmax
from edgeroute.serve import Settings, create_app
from serve_helpers import Running, openai_client
from tiny_model import write_tiny_model

NAME = "tiny"


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> er.Model:
    return er.Model.load(write_tiny_model(tmp_path_factory.mktemp("score") / "model", kv_layout="shared"))


@pytest.fixture(scope="module")
def older(tmp_path_factory: pytest.TempPathFactory) -> er.Model:
    """``shared``'s weights in a graph without ``query_seqlens`` (exports before it): scored by the older paths."""
    folder = tmp_path_factory.mktemp("score-older") / "model"
    return er.Model.load(write_tiny_model(folder, kv_layout="shared", query_seqlens=False))


def pick(kind: str, tiny: er.Model, shared: er.Model, older: er.Model) -> er.Model:
    return {"concat": tiny, "shared": shared, "older": older}[kind]


def reference(model: er.Model, ids: list[int]) -> np.ndarray:
    """log p(ids[i] | ids[:i]) for i >= 1 from one run over the whole sequence with every position's logits."""
    logits = model.forward_last(np.asarray([ids], dtype=np.int64), model.new_cache(1), len(ids))[0]
    return np.array([log_softmax(logits[i - 1])[ids[i]] for i in range(1, len(ids))])


@pytest.mark.parametrize("kind", ["concat", "older", "shared"])
def test_score_equals_the_full_logits_reference(tiny: er.Model, shared: er.Model, older: er.Model, kind: str) -> None:
    model = pick(kind, tiny, shared, older)
    ctx = model.tokenizer.encode("The capital of France is")
    endings = [" Paris.", " a robot that paints the sea and the sky", " Rome"]
    conts = [model.tokenizer.encode(e, add_special_tokens=False) for e in endings]
    got = model.score(ctx, conts, top_logprobs=3)
    assert len(got) == 3
    for cont, s in zip(conts, got, strict=True):
        want = reference(model, ctx + cont)[len(ctx) - 1 :]
        assert s.token_ids == cont
        np.testing.assert_allclose([t.logprob for t in s.tokens], want, atol=1e-5)
        assert s.logprob == pytest.approx(float(want.sum()), abs=1e-4)
        for t in s.tokens:
            assert len(t.top) == 3 and t.top[0][1] >= t.top[1][1] >= t.top[2][1]
            assert t.greedy == (t.top[0][0] == t.token_id) and (not t.greedy or t.top[0][1] == t.logprob)


def test_long_continuations_cross_chunks_and_the_context_is_fed_once(older: er.Model, monkeypatch) -> None:
    """Graphs without ``query_seqlens``: feeds of more than CHUNK positions are cut into chunks of kept logits; the
    context's positions are run once for all continuations."""
    shared = older
    monkeypatch.setattr(scoring, "CHUNK", 5)
    ids = shared.tokenizer.encode("Once upon a time a little robot learned to paint the sea and the sky. " * 2)
    ctx, rest = ids[:7], ids[7:]
    fed: list[int] = []
    forward = er.Model.forward_last

    def spy(self: er.Model, input_ids: np.ndarray, cache: Any, n_last: int, *a: Any, **k: Any) -> np.ndarray:
        fed.append(input_ids.shape[1])
        assert n_last <= 5
        return forward(self, input_ids, cache, n_last, *a, **k)

    monkeypatch.setattr(er.Model, "forward_last", spy)
    got = shared.score(ctx, [rest, rest[:3]])
    assert sum(fed) == (len(ctx) - 1) + len(rest) + 3  # the context once, each continuation after it
    monkeypatch.setattr(er.Model, "forward_last", forward)
    np.testing.assert_allclose([t.logprob for t in got[0].tokens], reference(shared, ids)[len(ctx) - 1 :], atol=1e-5)
    assert [t.logprob for t in got[1].tokens] == [t.logprob for t in got[0].tokens[:3]]


@pytest.mark.parametrize("kind", ["concat", "older"])
def test_score_items_equals_score_item_by_item_in_fewer_runs(
    tiny: er.Model, older: er.Model, kind: str, monkeypatch
) -> None:
    """Graphs without ``query_seqlens``, many items at once (``Model.score_items``): the scores of ``Model.score``
    item by item, with short items' continuations as rows of batched runs (bounded by ROW_POSITIONS) and a long
    item scored with its context shared; progress counts every item once."""
    model = tiny if kind == "concat" else older
    monkeypatch.setattr(scoring, "ROW_POSITIONS", 60)  # several batches
    text = "Once upon a time a little robot learned to paint the sea and the sky. "
    items: list[tuple[Any, list[Any]]] = [
        ("The capital of France is", [" Paris.", " a robot", " Rome, the capital of Italy"]),
        ("Hello world!", [" edgeroute routes tokens", " El niño"]),
        ("", ["Paris", "Das Mädchen läuft schnell."]),  # an empty context: the model's BOS or EOS first
        (text * 12, [" Paris", " the sea"]),  # a context longer than SHORT_CONTEXT: the context once, shared
        (model.tokenizer.encode("The capital of"), [model.tokenizer.encode(" Italy is Rome")[:3], [5]]),  # ids
    ]
    runs: list[tuple[int, int]] = []
    forward = er.Model.forward_last

    def spy(self: er.Model, input_ids: np.ndarray, *a: Any, **k: Any) -> np.ndarray:
        runs.append(input_ids.shape)
        return forward(self, input_ids, *a, **k)

    monkeypatch.setattr(er.Model, "forward_last", spy)
    told: list[int] = []
    got = model.score_items(items, top_logprobs=2, progress=told.append)
    batched = [shape for shape in runs if shape[0] > 1]
    monkeypatch.setattr(er.Model, "forward_last", forward)
    assert sum(told) == len(items) and len(got) == len(items)
    assert len(batched) >= 2 and all(rows * width <= 60 for rows, width in batched)
    for (ctx, conts), scores in zip(items, got, strict=True):
        want = model.score(ctx, conts, top_logprobs=2)
        assert [s.token_ids for s in scores] == [w.token_ids for w in want]
        for s, w in zip(scores, want, strict=True):
            np.testing.assert_allclose([t.logprob for t in s.tokens], [t.logprob for t in w.tokens], atol=1e-5)
            assert [t.greedy for t in s.tokens] == [t.greedy for t in w.tokens]
            assert [[i for i, _ in t.top] for t in s.tokens] == [[i for i, _ in t.top] for t in w.tokens]
    with pytest.raises(er.ConfigError, match="continuations"):
        model.score_items([("The capital", [])])


def test_ragged_scoring_runs_each_context_once_in_few_batched_runs(
    shared: er.Model, older: er.Model, monkeypatch
) -> None:
    """Graphs with ``query_seqlens`` (``edgeroute.scoring_rows``): every item's context is computed once, its
    continuations as rows after it, rows of different lengths in the same runs (right-padded, counted per row),
    over several batches and staircase runs; the scores, greedy flags and alternatives equal the older graph's
    (the same weights) and the full-logits reference; the budgets are kept; progress counts every item once."""
    from edgeroute import scoring_rows
    from edgeroute.kv_cache import SharedKVCache

    monkeypatch.setattr(scoring_rows, "MAX_ROWS", 5)  # several batches
    monkeypatch.setattr(scoring_rows, "LOGIT_VALUES", 7 * shared.vocab_size)  # runs cut to 7 kept logit rows
    text = "Once upon a time a little robot learned to paint the sea and the sky. "
    tok = shared.tokenizer
    items: list[tuple[Any, list[Any]]] = [
        ("The capital of France is", [" Paris.", " a robot", " Rome, the capital of Italy"]),
        ("Hello world!", [" edgeroute routes tokens", " El niño"]),
        ("", ["Paris", "Das Mädchen läuft schnell."]),  # an empty context: the model's BOS or EOS first
        (text * 6, [" Paris", " the sea and the sky"]),
        (tok.encode("The capital of"), [tok.encode(" Italy is Rome")[:3], [5]]),  # ids; a one-token continuation
        ([7], [[9, 10, 11], [12]]),  # a one-token context: no prefix to prefill
        ("The sea", [" a", " b is", " c", " d was", " e", " f", " g and"]),  # more than MAX_ROWS: split
    ]
    runs: list[tuple[int, int, int, int]] = []  # rows, width, positions counted, logits kept
    real = SharedKVCache.run

    def spy(self: SharedKVCache, session: Any, ids: np.ndarray, n_last: int, *a: Any, **k: Any) -> np.ndarray:
        counts = k.get("counts")
        assert counts is not None  # every run of this path counts its rows
        runs.append((ids.shape[0], ids.shape[1], int(counts.sum()), ids.shape[0] * n_last))
        return real(self, session, ids, n_last, *a, **k)

    monkeypatch.setattr(SharedKVCache, "run", spy)
    told: list[int] = []
    got = shared.score_items(items, top_logprobs=2, progress=told.append)
    monkeypatch.setattr(SharedKVCache, "run", real)
    assert sum(told) == len(items) and len(got) == len(items)
    want = older.score_items(items, top_logprobs=2)
    fed = 0
    for (ctx, conts), scores, w in zip(items, got, want, strict=True):
        pairs = [scoring._pair(shared, ctx, c) for c in conts]
        parts = -(-len(pairs) // 5)  # the context once per part of at most MAX_ROWS continuations
        fed += (len(pairs[0][0]) - 1) * parts + sum(len(c) for _, c in pairs)  # then each continuation
        assert [s.token_ids for s in scores] == [x.token_ids for x in w]
        for (c, cont), sc, x in zip(pairs, scores, w, strict=True):
            np.testing.assert_allclose([t.logprob for t in sc.tokens], [t.logprob for t in x.tokens], atol=1e-5)
            np.testing.assert_allclose([t.logprob for t in sc.tokens], reference(shared, c + cont)[len(c) - 1 :],
                                       atol=1e-5)  # fmt: skip
            assert [t.greedy for t in sc.tokens] == [t.greedy for t in x.tokens]
            assert [[i for i, _ in t.top] for t in sc.tokens] == [[i for i, _ in t.top] for t in x.tokens]
            top_got, top_want = [v for t in sc.tokens for _, v in t.top], [v for t in x.tokens for _, v in t.top]
            np.testing.assert_allclose(top_got, top_want, atol=1e-5)
    assert sum(counted for _, _, counted, _ in runs) == fed
    assert any(rows > 1 and counted < rows * width for rows, width, counted, _ in runs)  # ragged rows in one run
    assert all(rows <= 5 and kept <= 7 for rows, _, _, kept in runs if kept > rows)
    # the same through Model.score (one item) and with the default budgets: one batch, few runs
    runs.clear()
    monkeypatch.undo()
    monkeypatch.setattr(SharedKVCache, "run", spy)
    one = shared.score(*items[0], top_logprobs=0)
    monkeypatch.setattr(SharedKVCache, "run", real)
    assert [s.logprob for s in one] == pytest.approx([s.logprob for s in got[0]], abs=1e-5)
    assert len(runs) <= 3
    monkeypatch.undo()
    for bad, field in (
        (lambda: shared.score_items([([1, 2], [[]])]), "continuations"),  # an empty continuation
        (lambda: shared.score([], [[1]]), "context"),  # an empty id context
        (lambda: shared.score([1], [[2] * (shared.context_length + 1)]), "continuations"),  # past the context
    ):
        with pytest.raises(er.ConfigError, match=field):
            bad()


def test_staircase_picks_spans_that_save_positions() -> None:
    """Rows sorted longest first run in spans: one span when padding costs less than a run, more when a long row
    would pad many short ones."""
    from edgeroute.scoring_rows import staircase

    assert staircase([5, 5, 4, 4]) == [5]  # 2 padded positions cost less than a run
    assert staircase([60, 3, 3, 3, 3, 3, 3, 3], run_cost=16) == [3, 60]  # 7 x 57 padded positions avoided
    assert staircase([]) == [] and staircase([1]) == [1]


@pytest.mark.parametrize("kind", ["concat", "shared"])
def test_prompt_logprobs_come_from_the_prefill_of_generation(tiny: er.Model, shared: er.Model, kind: str) -> None:
    """``GenerationConfig(prompt_logprobs=N)``: the Generator (in chunks) and the engine (beside another request,
    and a second time with the same prompt, which a free slot holds: nothing is reused for it) score each prompt
    token after the first as ``Model.score`` does, and generate the same tokens as without it."""
    model = tiny if kind == "concat" else shared
    ids = model.tokenizer.encode("Once upon a time a little robot learned to paint the sea and the sky.")
    want = scoring.prompt_scores(model, ids, 2)
    greedy = er.SamplingConfig(temperature=0)
    config = er.GenerationConfig(max_new_tokens=6, prompt_logprobs=2, prefill_chunk=5, sampling=greedy)
    plain = model.generate(ids, er.GenerationConfig(max_new_tokens=6, sampling=greedy))
    assert plain.prompt_logprobs is None

    def same(got: er.Completion) -> None:
        assert got.token_ids == plain.token_ids and got.prompt_logprobs is not None
        assert [t.token_id for t in got.prompt_logprobs] == ids[1:]
        np.testing.assert_allclose([t.logprob for t in got.prompt_logprobs], [t.logprob for t in want], atol=1e-5)
        assert [[i for i, _ in t.top] for t in got.prompt_logprobs] == [[i for i, _ in t.top] for t in want]

    same(model.generate(ids, config))
    if kind == "shared":  # the engine runs shared-KV graphs
        with er.Engine(model, max_batch=2) as engine:
            other = engine.submit(model.tokenizer.encode("Hello world!"), er.GenerationConfig(max_new_tokens=12))
            same(engine.submit(ids, config).result())
            other.result()
            same(engine.submit(ids, config).result())
            assert engine.stats().reused_prompt_tokens == 0
    for bad, field in (
        (dict(prompt_logprobs=21), "prompt_logprobs"),
        (dict(prompt_logprobs=1, num_beams=2), "prompt_logprobs"),
    ):
        with pytest.raises(er.ConfigError) as e:
            er.GenerationConfig(**bad)  # type: ignore[arg-type]
        assert e.value.field == field
    with pytest.raises(er.ConfigError, match="prompt_logprobs"):
        model.generate(["Hello", "world"], er.GenerationConfig(prompt_logprobs=0))


def test_text_pairs_are_split_as_lm_eval_splits_them(tiny: er.Model) -> None:
    tok = tiny.tokenizer
    (s,) = tiny.score("The capital of France is ", ["Paris"])  # the trailing space moves to the continuation
    whole, ctx = tok.encode("The capital of France is Paris"), tok.encode("The capital of France is")
    assert s.token_ids == whole[len(ctx) :]
    bos = tiny.manifest.bos_token_id
    bos = bos if bos is not None else tiny.manifest.eos_token_ids[0]
    (empty,) = tiny.score("", ["Hello world"])  # an empty context: BOS (else EOS) stands for it, as in lm-eval
    np.testing.assert_allclose(
        [t.logprob for t in empty.tokens], reference(tiny, [bos, *tok.encode("Hello world", False)]), atol=1e-5
    )


def test_scoring_mistakes_are_config_errors(tiny: er.Model) -> None:
    cases: list[tuple[Any, Any, int, str]] = [
        ([1, 2], [[3]], 21, "top"),
        ([1, 2], [], 0, "continuations"),
        ([1, 2], "abc", 0, "continuations"),
        ([1, 2], [[]], 0, "continuations"),
        ([], [[3]], 0, "context"),
        ("text", [[3]], 0, "continuations"),
        ([1, 2], [[10**6]], 0, "continuations"),
        ([1, 2], [[5, 10**6, 3]], 0, "continuations"),  # an id that would be fed to the graph
        ([1, -4], [[3]], 0, "context"),
        ([1] * 400, [[2] * 200], 0, "continuations"),  # more positions than the context holds
    ]
    for context, conts, top, field in cases:
        with pytest.raises(er.ConfigError) as e:
            tiny.score(context, conts, top_logprobs=top)
        assert e.value.field == field, (context, conts, top)
        with pytest.raises(er.ConfigError) as e:
            tiny.score_items([(context, conts)], top)
        assert e.value.field == field, (context, conts, top)


# -- the server: echo with logprobs (lm-eval's local-completions) ----------------------------------------------------
@pytest.fixture(scope="module")
def server(shared: er.Model):
    with Running(create_app(shared, Settings(NAME, max_batch=4, max_queue=8))) as srv:
        yield srv


def test_echo_logprobs_follow_lm_evals_contract(shared: er.Model, server: Running) -> None:
    """What lm-eval sends (token-id prompts in a list, echo, logprobs 1, max_tokens 1) and reads: one choice per
    prompt by index; token_logprobs null first then one per prompt token (raw logits, whatever the sampling), then
    the generated token; a non-empty top_logprobs dict whose best value is the same float as a greedy token's."""
    tok = shared.tokenizer
    prompts = [tok.encode("The capital of France is Paris."), tok.encode("Once upon a time a little robot")]
    body = {"model": NAME, "prompt": prompts, "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0}
    body |= {"seed": 1234, "repetition_penalty": 1.5, "top_k": 3}  # the router must not touch the prompt's scores
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    assert [c["index"] for c in choices] == [0, 1]
    for ids, choice in zip(prompts, choices, strict=True):
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(ids) + 1 == len(lp["tokens"]) == len(lp["text_offset"])
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        np.testing.assert_allclose(lp["token_logprobs"][1 : len(ids)], reference(shared, ids), atol=1e-5)
        ctxlen = 2
        for value, top in zip(lp["token_logprobs"][ctxlen:-1], lp["top_logprobs"][ctxlen:-1], strict=True):
            assert isinstance(top, dict) and len(top) == 1
            assert (value == max(top.values())) == (value >= max(top.values()) - 1e-12)  # greedy: the same float
        assert choice["text"].startswith(tok.decode(ids))
        assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])


def test_echo_through_the_official_client_with_max_tokens_zero_and_text(shared: er.Model, server: Running) -> None:
    client = openai_client(server)
    text = "The capital of France is Paris."
    ids = shared.tokenizer.encode(text)
    for max_tokens in (0, 1):  # older clients sent 0: one token is generated, as vLLM does
        r = client.completions.create(
            model=NAME, prompt=text, echo=True, logprobs=2, max_tokens=max_tokens, temperature=0
        )
        lp = r.choices[0].logprobs
        assert lp is not None and len(lp.token_logprobs) == len(ids) + 1  # type: ignore[arg-type]
        np.testing.assert_allclose(lp.token_logprobs[1 : len(ids)], reference(shared, ids), atol=1e-5)  # type: ignore[index]
        # two alternatives each (fewer where two tokens have one text, as byte pieces of the tiny vocabulary do)
        assert all(0 < len(t) <= 2 for t in lp.top_logprobs[1:]) and lp.top_logprobs[0] is None  # type: ignore[union-attr,index]
    streamed = list(
        client.completions.create(model=NAME, prompt=[ids], echo=True, logprobs=0, max_tokens=2, stream=True)
    )
    first = streamed[0].choices[0]
    assert first.text == shared.tokenizer.decode(ids) and first.logprobs is not None
    assert first.logprobs.token_logprobs[0] is None and len(first.logprobs.token_logprobs) == len(ids)  # type: ignore[index,arg-type]
    assert first.logprobs.top_logprobs is None  # logprobs 0: no alternatives


def test_id_prompts_get_no_bos_and_max_tokens_zero_needs_echo(shared: er.Model, server: Running) -> None:
    ids = shared.tokenizer.encode("capital of France", add_special_tokens=False)
    body = {"model": NAME, "prompt": [ids], "echo": True, "logprobs": 0, "max_tokens": 1, "temperature": 0}
    lp = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 1  # no BOS added in front of an id prompt
    r = httpx.post(server.url + "/v1/completions", json={**body, "echo": False, "max_tokens": 0}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] in ("max_tokens", "max_new_tokens"), r.text


# -- edgeroute eval --choices: lm-eval's acc and acc_norm from a local file ---------------------------------------
ITEMS = [
    {"context": "The capital of France is", "choices": ["Paris.", "a robot.", "Rome and the sea"], "answer": 0},
    {"context": "Once upon a time a little robot", "choices": ["learned to paint", "the"], "answer": 1},
    {"query": "Hello world!", "choices": ["edgeroute routes tokens", "sky"], "gold": 0},
]


def test_eval_choices_reports_lm_evals_accuracies(tiny: er.Model, tiny_dir, tmp_path) -> None:  # noqa: ANN001
    import json as _json

    from click.testing import CliRunner
    from edgeroute.cli import cli
    from edgeroute.eval.choices import evaluate_choices, read_items

    path = tmp_path / "items.jsonl"
    path.write_text("\n".join(_json.dumps(i) for i in ITEMS) + "\n\n", encoding="utf-8")
    items = read_items(path)
    report = evaluate_choices(tiny, items).as_dict()
    acc = acc_norm = 0
    for item, sample in zip(items, report["samples"], strict=True):
        lls = [s.logprob for s in tiny.score(item.context, [" " + c for c in item.choices])]
        assert sample["loglikelihoods"] == pytest.approx(lls, abs=1e-5)  # batched runs: float noise only
        acc += int(np.argmax(lls)) == item.answer
        acc_norm += int(np.argmax([ll / len(c) for ll, c in zip(lls, item.choices, strict=True)])) == item.answer
    assert report["acc"]["value"] == acc / 3 and report["acc_norm"]["value"] == acc_norm / 3
    res = CliRunner().invoke(cli, ["eval", str(tiny_dir), "--choices", str(path), "--json", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    data = _json.loads(res.stdout)
    assert data["acc"] == report["acc"] and data["items"] == 3
    assert _json.loads((tmp_path / "choices.json").read_text(encoding="utf-8"))["samples"] == report["samples"]
    table = CliRunner().invoke(cli, ["eval", str(tiny_dir), "--choices", str(path)])
    assert table.exit_code == 0 and table.stdout.startswith("acc ") and "items/s" in table.stdout


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ('{"context": "x", "choices": ["a"], "answer": 0}', "2 to 26"),
        ('{"context": "x", "choices": ["a", "b"], "answer": 2}', "0 to 1"),
        ('{"choices": ["a", "b"], "answer": 0}', '"context"'),
        ("not json", "not valid JSON"),
    ],
)
def test_eval_choices_names_the_bad_line(tiny_dir, tmp_path, line: str, needle: str) -> None:  # noqa: ANN001
    import subprocess
    import sys

    path = tmp_path / "items.jsonl"
    path.write_text(line + "\n", encoding="utf-8")
    out = subprocess.run(
        [sys.executable, "-m", "edgeroute.cli", "eval", str(tiny_dir), "--choices", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1 and needle in out.stderr and "line 1" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


# -- exact against PyTorch ---------------------------------------------------------------------------------------
@pytest.mark.export
def test_score_equals_pytorch_on_an_exported_checkpoint(checkpoint, exported) -> None:  # noqa: ANN001
    """fp32 scores of an exported Llama-family checkpoint equal transformers' log-softmax of the same tokens to
    1e-4 (what lm-eval's --model hf computes)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    folder = exported("llama")
    model = er.Model.load(folder)
    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoint("llama")).eval()
    rng = np.random.default_rng(0)
    ctx = rng.integers(3, model.vocab_size, 90).tolist()  # more than a chunk of context
    conts = [rng.integers(3, model.vocab_size, n).tolist() for n in (1, 5, 70)]
    got = model.score(ctx, conts, top_logprobs=1)
    for cont, s in zip(conts, got, strict=True):
        with torch.no_grad():
            logits = hf(torch.tensor([ctx + cont])).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        want = [float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont)]
        np.testing.assert_allclose([t.logprob for t in s.tokens], want, atol=1e-4)
        greedy = [int(logp[len(ctx) - 1 + i].argmax()) == t for i, t in enumerate(cont)]
        assert [t.greedy for t in s.tokens] == greedy
