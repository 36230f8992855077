"""`edgeroute serve`: a real server (uvicorn on 127.0.0.1, a free port) on tiny models, driven by the official
`openai` client and by raw httpx for the SSE framing. What the server answers is checked against what the
library generates alone for the same prompt and config."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import edgeroute as er
import httpx
import openai
import pytest
from edgeroute.serve import Settings, create_app
from serve_helpers import Running, cli_server, free_port, run_cli, sse_events, stream_json, wait_until
from session_spy import spied

NAME = "tiny"
QUESTION = [{"role": "user", "content": "Tell me a story about a robot"}]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> er.Model:
    from tiny_model import write_tiny_model

    return er.Model.load(write_tiny_model(tmp_path_factory.mktemp("serve") / "model", kv_layout="shared"))


@pytest.fixture(scope="module")
def server(model: er.Model):
    with Running(create_app(model, Settings(NAME, max_batch=4, max_queue=8))) as srv:
        yield srv


def slowed(model: er.Model) -> er.Model:
    """The model with 10 ms more per graph run (a stream that outlives a shutdown's grace)."""
    return spied(model, lambda: time.sleep(0.01))


@pytest.fixture(scope="module")
def slow_server(model: er.Model):
    """A server whose graph runs take 10 ms more: a long request is certain to be running when its client goes."""
    slow = slowed(model)
    with Running(create_app(slow, Settings(NAME, max_batch=4, max_queue=8))) as srv:
        yield srv


@pytest.fixture
def client(server: Running) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def http(server: Running):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def chat_ids(model: er.Model, messages=QUESTION) -> list[int]:  # noqa: ANN001
    return model.tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def cfg(max_new: int = 20, **sampling) -> er.GenerationConfig:  # noqa: ANN003
    return er.GenerationConfig(max_new_tokens=max_new, sampling=er.SamplingConfig(**sampling))


# -- answers ----------------------------------------------------------------------------------------------------
def test_chat_completion_is_what_the_library_generates(model: er.Model, client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=20, temperature=0)
    alone = model.generate(chat_ids(model), cfg(20, temperature=0))
    assert r.object == "chat.completion" and r.model == NAME and r.id.startswith("chatcmpl-")
    assert r.system_fingerprint and r.created > 0
    (choice,) = r.choices
    assert choice.message.role == "assistant" and choice.message.content == alone.text
    assert choice.finish_reason == ("length" if alone.finish_reason == "length" else "stop")
    assert r.usage.prompt_tokens == len(chat_ids(model))
    assert r.usage.completion_tokens == alone.usage.completion_tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # max_completion_tokens is max_tokens' newer name
    again = client.chat.completions.create(model=NAME, messages=QUESTION, max_completion_tokens=20, temperature=0)
    assert again.choices[0].message.content == alone.text


def test_streamed_chat_arrives_in_the_order_the_client_expects(
    model: er.Model, client: openai.OpenAI, http: httpx.Client
) -> None:
    alone = model.generate(chat_ids(model), cfg(30, temperature=0))
    chunks = list(
        client.chat.completions.create(
            model=NAME,
            messages=QUESTION,
            max_tokens=30,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    *body, finish, last = chunks
    assert finish.choices[0].finish_reason in ("stop", "length") and finish.choices[0].delta.content is None
    assert all(c.choices[0].finish_reason is None for c in body)
    assert last.choices == [] and last.usage.completion_tokens == alone.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in body) == alone.text
    # the raw framing: data lines, blank lines, [DONE] last; no usage chunk unless asked for
    events = stream_json(
        http, "/v1/chat/completions", {"messages": QUESTION, "max_tokens": 30, "temperature": 0, "stream": True}
    )
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all("usage" not in e for e in events[:-1])


def test_completions_every_prompt_shape_and_echo(model: er.Model, client: openai.OpenAI) -> None:
    text = "Once upon a time"
    ids = model.encode_prompt(text)
    alone = model.generate(text, cfg(12, temperature=0))
    r = client.completions.create(model=NAME, prompt=text, max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text == alone.text
    assert r.usage.prompt_tokens == len(ids)
    by_ids = client.completions.create(model=NAME, prompt=ids, max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == alone.text
    two = client.completions.create(model=NAME, prompt=[text, "hello"], max_tokens=12, temperature=0)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[0].text == alone.text
    assert two.choices[1].text == model.generate("hello", cfg(12, temperature=0)).text
    lists = client.completions.create(model=NAME, prompt=[ids, ids[:2]], max_tokens=12, temperature=0)
    assert lists.choices[0].text == alone.text and len(lists.choices) == 2
    echo = client.completions.create(model=NAME, prompt=text, max_tokens=12, temperature=0, echo=True)
    assert echo.choices[0].text == text + alone.text
    streamed = list(client.completions.create(model=NAME, prompt=text, max_tokens=12, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == alone.text
    assert streamed[-1].choices[0].finish_reason in ("stop", "length")


def test_n_choices_and_seeds(model: er.Model, client: openai.OpenAI) -> None:
    """Choice i of a request with seed s is what seed s + i gives alone; the same seed gives the same text."""
    ids = chat_ids(model)
    r = client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=16, temperature=0.9, seed=5, n=2)
    assert [c.index for c in r.choices] == [0, 1]
    for i, c in enumerate(r.choices):
        assert c.message.content == model.generate(ids, cfg(16, temperature=0.9, seed=5 + i)).text
    assert r.choices[0].message.content != r.choices[1].message.content
    assert r.usage.prompt_tokens == len(ids)  # the prompt is counted once for n choices
    streamed = list(
        client.chat.completions.create(
            model=NAME, messages=QUESTION, max_tokens=16, temperature=0.9, seed=5, n=2, stream=True
        )
    )
    for i in range(2):
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices and c.choices[0].index == i)
        assert text == r.choices[i].message.content


def test_same_seed_same_text_while_other_requests_run(model: er.Model, client: openai.OpenAI, server: Running) -> None:
    base = dict(model=NAME, messages=QUESTION, max_tokens=24, temperature=1.0, seed=1234)
    quiet = client.chat.completions.create(**base).choices[0].message.content

    def noise(i: int) -> str:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
        out = c.completions.create(model=NAME, prompt=f"noise {i} " * 3, max_tokens=60, temperature=1.0)
        return out.choices[0].text

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(noise, i) for i in range(3)]
        busy = client.chat.completions.create(**base).choices[0].message.content
        for f in futures:
            f.result(timeout=60)
    assert busy == quiet == model.generate(chat_ids(model), cfg(24, temperature=1.0, seed=1234)).text


def test_logprobs(model: er.Model, client: openai.OpenAI) -> None:
    ids = chat_ids(model)
    alone = model.generate(
        ids, er.GenerationConfig(max_new_tokens=10, logprobs=3, sampling=er.SamplingConfig(temperature=0))
    )
    r = client.chat.completions.create(
        model=NAME, messages=QUESTION, max_tokens=10, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == len(alone.token_ids)
    for entry, lp in zip(content, alone.logprobs or [], strict=False):
        assert entry.logprob == pytest.approx(lp.logprob, abs=1e-5)
        assert bytes(entry.bytes) == model.tokenizer.token_bytes(lp.token_id)
        assert [a.logprob for a in entry.top_logprobs] == pytest.approx([v for _, v in lp.top], abs=1e-5)
        assert len(entry.top_logprobs) == 3
    plain = client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=10, temperature=0)
    assert plain.choices[0].logprobs is None
    streamed = list(
        client.chat.completions.create(
            model=NAME, messages=QUESTION, max_tokens=10, temperature=0, logprobs=True, stream=True
        )
    )
    got = [e.logprob for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert got == pytest.approx([lp.logprob for lp in alone.logprobs or []][: len(alone.token_ids)], abs=1e-5)
    comp = client.completions.create(model=NAME, prompt="Once upon", max_tokens=6, temperature=0, logprobs=2)
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    ids = model.generate("Once upon", cfg(6, temperature=0)).token_ids
    assert lp.tokens == [model.tokenizer.token_bytes(t).decode("utf-8", "replace") for t in ids]
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(ids))]
    assert all(len(t) <= 2 for t in lp.top_logprobs)


def test_stop_strings(model: er.Model, client: openai.OpenAI) -> None:
    text = model.generate("Once upon a time", cfg(30, temperature=0)).text
    assert len(text) > 6
    stop = text[3:6]
    r = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=30, temperature=0, stop=stop)
    assert r.choices[0].text == text[: text.find(stop)] and r.choices[0].finish_reason == "stop"
    listed = client.completions.create(
        model=NAME, prompt="Once upon a time", max_tokens=30, temperature=0, stop=["\u2603never", stop]
    )
    assert listed.choices[0].text == r.choices[0].text


def test_router_settings_as_extra_body_fields(model: er.Model, client: openai.OpenAI) -> None:
    extra = {
        "top_k": 5,
        "min_p": 0.05,
        "repetition_penalty": 1.3,
        "explore": 0.2,
        "explore_end": 0.0,
        "explore_steps": 8,
        "explore_schedule": "linear",
    }
    r = client.chat.completions.create(
        model=NAME, messages=QUESTION, max_tokens=16, temperature=0.8, seed=3, extra_body=extra
    )
    want = model.generate(
        chat_ids(model), er.from_params({"max_tokens": 16, "temperature": 0.8, "seed": 3, **extra})[0]
    )
    assert r.choices[0].message.content == want.text
    bias = client.completions.create(model=NAME, prompt="Once", max_tokens=5, temperature=0, logit_bias={"7": 100})
    assert bias.choices[0].text == model.generate("Once", cfg(5, temperature=0, logit_bias={7: 100})).text


def test_gated_guidance_through_the_server(model: er.Model, client: openai.OpenAI) -> None:
    """Guidance and its gate as extra body fields ("inf" as a string: JSON has no infinity): θ = inf is the plain
    answer, a middle θ is what the library's gated guidance generates."""

    def ask(**extra: object) -> str | None:
        r = client.chat.completions.create(
            model=NAME, messages=QUESTION, max_tokens=16, temperature=0.8, seed=3, extra_body=extra
        )
        return r.choices[0].message.content

    assert ask(guidance=2.0, gate_threshold="inf") == ask()
    gated = ask(guidance=2.0, gate_threshold=0.5)
    want = model.generate(chat_ids(model), cfg(16, temperature=0.8, seed=3), guidance=2.0, gate_threshold=0.5)
    assert gated == want.text
    assert 0 < want.usage.flow_skipped < want.usage.flow_steps  # θ = 0.5 gates some steps of this answer, not all


def test_models_endpoint(client: openai.OpenAI, model: er.Model) -> None:
    (entry,) = client.models.list().data
    assert entry.id == NAME and entry.object == "model"


# -- errors -----------------------------------------------------------------------------------------------------
def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text[:500]
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"messages": QUESTION, "temperature": 5000}, "temperature", "invalid_value"),
        ({"messages": QUESTION, "max_tokens": "x"}, "max_tokens", "invalid_value"),
        ({"messages": QUESTION, "max_tokens": 0}, "max_tokens", "invalid_value"),
        ({"messages": QUESTION, "top_p": 2}, "top_p", "invalid_value"),
        ({"messages": QUESTION, "n": 0}, "n", "invalid_value"),
        ({"messages": QUESTION, "n": "2"}, "n", "invalid_type"),
        ({"messages": QUESTION, "stream": "yes"}, "stream", "invalid_type"),
        ({"messages": QUESTION, "stop": 5}, "stop", "invalid_value"),
        ({"messages": QUESTION, "logit_bias": {"3": 500}}, "logit_bias", "invalid_value"),
        ({"messages": QUESTION, "logit_bias": {"99999": 1}}, "logit_bias", "invalid_value"),
        ({"messages": QUESTION, "top_logprobs": 3}, "top_logprobs", "invalid_value"),
        ({"messages": QUESTION, "frobnicate": 1}, "frobnicate", "unknown_parameter"),
        ({"messages": QUESTION, "stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
        ({"messages": QUESTION, "response_format": {"type": "xml"}}, "response_format.type", "invalid_value"),
        ({"messages": []}, "messages", "invalid_type"),
        ({}, "messages", "missing_required_parameter"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role", "invalid_value"),
        ({"messages": [{"role": "user", "content": 7}]}, "messages[0].content", "invalid_type"),
        ({"messages": QUESTION, "draft": "other-model"}, "draft", "invalid_value"),
        ({"messages": QUESTION, "gate_threshold": 1.0}, "gate_threshold", "invalid_value"),
        ({"messages": QUESTION, "guidance": 2, "gate_threshold": "high"}, "gate_threshold", "invalid_value"),
        ({"messages": QUESTION, "guidance": 2, "gate_width": 1}, "gate_width", "invalid_value"),
    ],
)
def test_bad_chat_values_are_400s_naming_the_parameter(http: httpx.Client, body: dict, param: str, code: str) -> None:
    err = error_of(http.post("/v1/chat/completions", json=body), 400)
    assert err["param"] == param and err["code"] == code and err["type"] == "invalid_request_error"


def test_other_errors(http: httpx.Client, model: er.Model, server: Running) -> None:
    err = error_of(http.post("/v1/chat/completions", content=b'{"messages": [', headers={"content-type": "x"}), 400)
    assert err["code"] == "invalid_json"
    assert error_of(http.post("/v1/chat/completions", content=b"[1, 2]"), 400)["code"] == "invalid_type"
    assert error_of(http.post("/v1/chat/completions", content=b""), 400)["code"] == "invalid_json"
    err = error_of(http.post("/v1/chat/completions", json={"model": "gpt-9", "messages": QUESTION}), 404)
    assert err["code"] == "model_not_found" and err["param"] == "model"
    assert error_of(http.get("/v1/nothing"), 404)["code"] == "not_found"
    assert error_of(http.get("/v1/chat/completions"), 405)["code"] == "method_not_allowed"
    long = "word " * (model.context_length + 10)
    err = error_of(http.post("/v1/completions", json={"prompt": long, "max_tokens": 5}), 400)
    assert err["code"] == "context_length_exceeded" and err["param"] == "prompt"
    err = error_of(
        http.post("/v1/chat/completions", json={"messages": QUESTION, "max_tokens": model.context_length}), 400
    )
    assert err["code"] == "context_length_exceeded" and err["param"] == "messages"
    err = error_of(http.post("/v1/completions", json={"prompt": [model.vocab_size + 3]}), 400)
    assert err["param"] == "prompt"
    err = error_of(http.post("/v1/completions", json={"prompt": "x", "logprobs": True}), 400)
    assert err["param"] == "logprobs"
    # no refused request is still announced to the engine (an idle engine would wait for it: Engine.gather)
    assert server.server.config.app.state.edgeroute.stats().incoming == 0


def test_api_key_body_limit_and_full_queue(model: er.Model) -> None:
    app = create_app(model, Settings(NAME, api_key="sekrit", max_batch=1, max_queue=0, max_body_bytes=2000))
    with Running(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        assert http.get("/health").status_code == 200  # public
        err = error_of(http.post("/v1/completions", json={"prompt": "x"}), 401)
        assert err["code"] == "invalid_api_key"
        wrong = http.post("/v1/completions", json={"prompt": "x"}, headers={"Authorization": "Bearer sekrix"})
        error_of(wrong, 401)
        assert error_of(http.get("/metrics"), 401)["code"] == "invalid_api_key"
        key = {"Authorization": "Bearer sekrit"}
        ok = openai.OpenAI(base_url=srv.url + "/v1", api_key="sekrit", max_retries=0, timeout=60)
        assert ok.completions.create(model=NAME, prompt="x", max_tokens=3).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="nope", max_retries=0).models.list()
        big = {"prompt": "y" * 5000}
        assert error_of(http.post("/v1/completions", json=big, headers=key), 413)["code"] == "request_too_large"

        def chunked() -> bytes:  # no Content-Length: counted as it arrives
            yield b'{"prompt": "'
            for _ in range(10):
                yield b"z" * 500
            yield b'"}'

        assert error_of(http.post("/v1/completions", content=chunked(), headers=key), 413)
        # one slot, no queue: a second request while one runs is a 429 with Retry-After
        body = {"prompt": "a long one", "max_tokens": 400, "min_tokens": 400, "stream": True}
        with http.stream("POST", "/v1/completions", json=body, headers=key) as running:
            lines = running.iter_lines()
            next(lines)
            busy = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers=key)
            assert error_of(busy, 429)["code"] == "queue_full" and busy.headers["retry-after"] == "1"
        wait_until(lambda: srv.server.config.app.state.edgeroute.stats().active == 0, 10)
        assert srv.server.config.app.state.edgeroute.stats().incoming == 0  # 401, 413 and 429 left incoming()


# -- cancellation and concurrency -------------------------------------------------------------------------------
def test_a_client_that_disconnects_frees_its_slot_and_leaves_the_others_alone(
    model: er.Model, slow_server: Running
) -> None:
    server = slow_server
    http = httpx.Client(base_url=server.url, timeout=60)
    state = server.server.config.app.state.edgeroute
    before = state.stats().cancelled
    prompts = ["Once upon a time", "hello there", "a b c"]
    want = [model.generate(p, cfg(60, temperature=0)).text for p in prompts]
    results: dict[int, str] = {}

    def other(i: int) -> None:
        events = stream_json(
            http, "/v1/completions", {"prompt": prompts[i], "max_tokens": 60, "temperature": 0, "stream": True}
        )
        results[i] = "".join(e["choices"][0]["text"] for e in events if e != "[DONE]" and e["choices"])

    threads = [threading.Thread(target=other, args=(i,)) for i in range(3)]
    doomed = {"prompt": "never ending", "max_tokens": 480, "min_tokens": 480, "temperature": 0, "stream": True}
    with httpx.Client(base_url=server.url, timeout=60) as own, own.stream("POST", "/v1/completions", json=doomed) as r:
        for t in threads:
            t.start()
        got = 0
        for _ in sse_events(r.iter_lines(), limit=20):
            got += 1
            if got == 5:
                break
    # the connection is closed: the request is cancelled within a step, its slot freed
    wait_until(lambda: state.stats().cancelled == before + 1, 10)
    for t in threads:
        t.join(60)
    assert [results[i] for i in range(3)] == want
    wait_until(lambda: state.stats().active == 0, 10)
    metrics = http.get("/metrics").text
    http.close()
    assert f"edgeroute_cancelled_requests_total {before + 1}.0" in metrics


def test_a_non_streamed_request_is_cancelled_when_its_client_goes(slow_server: Running) -> None:
    server = slow_server
    state = server.server.config.app.state.edgeroute
    before = state.stats().cancelled
    # 12 choices of 480 tokens on 4 slots (and a queue of 8): 15 s of work; the client gives up after 0.3 s
    body = {"prompt": "never ending", "max_tokens": 480, "min_tokens": 480, "temperature": 0, "n": 12}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(5, read=0.3))
    wait_until(lambda: state.stats().cancelled > before, 10, state.stats)
    wait_until(lambda: state.stats().active == 0 and state.stats().queued == 0, 10, state.stats)
    assert state.stats().finished + state.stats().cancelled == state.stats().submitted


def test_eight_concurrent_streams_equal_their_sequential_outputs(model: er.Model) -> None:
    prompts = [f"request number {i} says" + " more" * i for i in range(8)]
    configs = [dict(max_tokens=10 + 3 * i, temperature=0 if i % 2 else 0.9, seed=i) for i in range(8)]
    want = [
        model.generate(p, cfg(c["max_tokens"], temperature=c["temperature"], seed=c["seed"])).text
        for p, c in zip(prompts, configs, strict=True)
    ]
    with Running(create_app(model, Settings(NAME, max_batch=8))) as srv:
        barrier = threading.Barrier(8)

        def one(i: int) -> str:
            c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
            barrier.wait(30)
            chunks = c.completions.create(model=NAME, prompt=prompts[i], stream=True, **configs[i])
            return "".join(ch.choices[0].text for ch in chunks if ch.choices)

        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(one, range(8), timeout=120))
    assert got == want


# -- health, metrics ---------------------------------------------------------------------------------------------
def test_health_is_503_until_the_model_is_loaded(model: er.Model) -> None:
    release = threading.Event()

    def load() -> er.Model:
        assert release.wait(30)
        return model

    with Running(create_app(load, Settings(NAME)), ready=False) as srv:
        loading = httpx.get(srv.url + "/health", timeout=5)
        assert loading.status_code == 503 and loading.json()["status"] == "loading"
        err = error_of(httpx.post(srv.url + "/v1/completions", json={"prompt": "x"}, timeout=5), 503)
        assert err["code"] == "model_loading"
        release.set()
        wait_until(lambda: httpx.get(srv.url + "/health", timeout=5).status_code == 200, 20)
        assert httpx.get(srv.url + "/health", timeout=5).json()["status"] == "ok"

    failures: list[BaseException] = []

    def broken() -> er.Model:
        raise er.ModelLoadError("the folder is broken")

    with Running(create_app(broken, Settings(NAME), failures.append), ready=False) as srv:
        wait_until(lambda: bool(failures), 10)
        bad = httpx.get(srv.url + "/health", timeout=5)
        assert bad.status_code == 503 and "broken" in bad.json()["error"]


def test_metrics(model: er.Model) -> None:
    with Running(create_app(model, Settings(NAME))) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
        r = c.completions.create(model=NAME, prompt="Once upon", max_tokens=7, extra_body={"min_tokens": 7})
        list(
            c.chat.completions.create(
                model=NAME, messages=QUESTION, max_tokens=5, stream=True, extra_body={"min_tokens": 5}
            )
        )
        httpx.post(srv.url + "/v1/completions", json={"prompt": "x", "top_p": 9}, timeout=5)
        text = httpx.get(srv.url + "/metrics", timeout=5).text
    assert 'edgeroute_requests_total{endpoint="/v1/completions",status="200"} 1.0' in text
    assert 'edgeroute_requests_total{endpoint="/v1/chat/completions",status="200"} 1.0' in text
    assert 'edgeroute_requests_total{endpoint="/v1/completions",status="400"} 1.0' in text
    assert f"edgeroute_prompt_tokens_total {r.usage.prompt_tokens + len(chat_ids(model))}.0" in text
    assert "edgeroute_completion_tokens_total 12.0" in text
    assert "edgeroute_time_to_first_token_seconds_count 2.0" in text
    assert "edgeroute_inter_token_latency_seconds_count 10.0" in text  # 6 + 4 gaps
    assert "edgeroute_queue_depth 0.0" in text and "edgeroute_active_requests 0.0" in text
    assert "edgeroute_incoming_requests 0.0" in text  # the 400 left the engine's incoming() block too


def test_shutdown_cancels_streams_that_outlive_the_grace_period(model: er.Model) -> None:
    slow = slowed(model)
    srv = Running(create_app(slow, Settings(NAME, max_batch=2)))
    with srv:
        state = srv.server.config.app.state.edgeroute
        body = {"prompt": "go", "max_tokens": 480, "min_tokens": 480, "stream": True}  # ~5 s of steps
        with httpx.Client(base_url=srv.url, timeout=30) as http, http.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            next(lines)
            t0 = time.monotonic()
            srv.server.should_exit = True  # what SIGINT/SIGTERM do (uvicorn's handle_exit)
            srv.thread.join(15)
            took = time.monotonic() - t0
            assert not srv.thread.is_alive()
            with pytest.raises(httpx.HTTPError):  # the stream was cut, not finished
                for _ in range(1000):
                    next(lines)
        assert 1.5 < took < 6  # the grace period (2 s here), then the stream's task was cancelled
        assert state.engine._closed and state.stats().active == 0
        assert state.stats().cancelled + state.stats().failed == 1


# -- the command ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_the_command_serves_and_stops_cleanly_on_a_signal(model: er.Model, sig: signal.Signals) -> None:
    env = {**os.environ, "EDGEROUTE_API_KEY": "from-env"}
    args = [str(model.path), "--max-batch", "2", "--model-name", "m", "--log-level", "warning"]
    with cli_server(*args, env=env) as (proc, url):
        assert httpx.get(url + "/v1/models", timeout=5).status_code == 401  # the key came from the environment
        c = openai.OpenAI(base_url=url + "/v1", api_key="from-env", max_retries=0, timeout=30)
        assert c.models.list().data[0].id == "m"
        stream = c.completions.create(
            model="m", prompt="go", max_tokens=480, stream=True, extra_body={"min_tokens": 480}
        )
        next(iter(stream))
        t0 = time.monotonic()
        proc.send_signal(sig)
        code = proc.wait(timeout=20)
        took = time.monotonic() - t0
        _, err = proc.communicate(timeout=5)
        assert code == 0, err
        assert took < 15  # the stream was cancelled after the grace period, not waited for
        assert "Traceback" not in err


def test_a_model_that_fails_to_load_stops_the_command_with_one_line(model: er.Model, tmp_path: Path) -> None:
    """The manifest is fine (checked before the server starts) but the graph is not: the background load fails,
    the server stops, and the command prints one line and exits 1."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(model.path, broken)
    graph = broken / model.manifest.graph
    graph.write_bytes(b"\0" * graph.stat().st_size)  # the recorded size, not a graph
    out = run_cli("serve", str(broken), "--port", str(free_port()), "--log-level", "error")
    assert out.returncode == 1, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgeroute: error:"), out.stderr


def test_command_errors_are_one_line(tmp_path: Path) -> None:
    missing = run_cli("serve", str(tmp_path / "nowhere"), "--host", "0.0.0.0", "--port", str(free_port()))
    assert missing.returncode == 1
    lines = missing.stderr.strip().splitlines()
    assert lines[0].startswith("edgeroute: warning: serving on 0.0.0.0 without an API key")
    assert lines[1].startswith("edgeroute: error:") and len(lines) == 2
    bad = run_cli("serve", str(tmp_path), "--port", "99999")
    assert bad.returncode == 2 and "--port" in bad.stderr and "Traceback" not in bad.stderr
    # without the serve extra (a one-line install hint): tests/test_imports.py's import-hygiene table


def test_the_response_objects_are_plain_json(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(model=NAME, messages=QUESTION, max_tokens=3)
    body = json.loads(raw.http_response.text)
    assert set(body) == {"id", "object", "created", "model", "choices", "usage", "system_fingerprint"}


# -- the real model ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_through_the_server(smollm2_dir: Path) -> None:
    """SmolLM2 fp32 through the official client: a chat answer, its stream, four concurrent streams equal to their
    sequential answers, and a stream cut by its client that gives its slot back."""
    real = er.Model.load(smollm2_dir)
    questions = ["What is the capital of France?", "Name a colour.", "What is 2 + 2?", "Say hello."]
    with Running(create_app(real, Settings("smollm2", max_batch=4))) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=120)

        def ask(q: str, stream: bool = False) -> str:
            messages = [{"role": "user", "content": q}]
            if not stream:
                r = c.chat.completions.create(model="smollm2", messages=messages, max_tokens=24, temperature=0)
                return r.choices[0].message.content or ""
            chunks = c.chat.completions.create(
                model="smollm2", messages=messages, max_tokens=24, temperature=0, stream=True
            )
            return "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)

        sequential = [ask(q) for q in questions]
        assert "Paris" in sequential[0]
        assert ask(questions[0], stream=True) == sequential[0]
        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(lambda q: ask(q, True), questions, timeout=300)) == sequential
        state = srv.server.config.app.state.edgeroute
        # greedy with every EOS banned: the stream cannot end by itself before its client cuts it (sampled, a story
        # can end by EOS within the few tokens read, and the request then finishes instead of being cancelled)
        ban = {str(i): -100 for i in real.manifest.eos_token_ids}
        body = {"prompt": "Write a long story.", "max_tokens": 400, "stream": True, "temperature": 0, "logit_bias": ban}
        with httpx.Client(base_url=srv.url, timeout=60) as http, http.stream("POST", "/v1/completions", json=body) as r:
            for i, _ in enumerate(sse_events(r.iter_lines(), limit=10)):
                if i == 3:
                    break
        wait_until(lambda: state.stats().cancelled == 1 and state.stats().active == 0, 10, state.stats)
