"""LoRA adapters through the server, in vLLM's conventions: a request's ``model`` names the served model or a loaded
adapter (chat, completions, responses, streams, echoed logprobs), ``/v1/models`` lists both, and
``POST /v1/load_lora_adapter`` / ``/v1/unload_lora_adapter`` change them while the server runs (403 unless the
server has an API key or allows them, 401 without the key). What an adapter answers is checked against what the
library generates alone on it. One tiny LoRA model folder (two PEFT adapters exported with ``loras=``) per module,
one server on it."""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import edgeroute as er
import httpx
import openai
import pytest
from edgeroute.scoring import prompt_scores
from edgeroute.serve import Settings, create_app
from edgeroute.serve.protocol import from_config_error
from serve_helpers import Running, cli_server, free_port, openai_client, run_cli

NAME = "base"
USER = [{"role": "user", "content": "Tell me a story about a robot"}]
LOAD, UNLOAD = "/v1/load_lora_adapter", "/v1/unload_lora_adapter"


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory, lora: Callable[..., Path], lora_dir: Path) -> dict[str, Path]:
    """The model folder (adapters a1: r=4 on q/v, a2: r=8 on every projection; the graph's rank is 8: the shared
    ``lora_dir`` with its adapters renamed) and three PEFT folders to load later: a3 (fits), big (r=16: above the
    graph's rank)."""
    from edgeroute.adapter_folder import add_to_folder, remove_from_folder

    out = {"a1": lora("qv4"), "a2": lora("all8"), "a3": lora("qv4b"), "big": lora("rs16")}
    model = tmp_path_factory.mktemp("serve-adapters") / "model"
    shutil.copytree(lora_dir, model)
    for old, new in (("qv4", "a1"), ("all8", "a2")):
        remove_from_folder(model, old)
        add_to_folder(model, new, out[new])
    out["model"] = model
    return out


@pytest.fixture(scope="module")
def model(folders: dict[str, Path]) -> er.Model:
    return er.Model.load(folders["model"], max_adapters=4)


@pytest.fixture(scope="module")
def server(model: er.Model) -> Iterator[Running]:
    settings = Settings(NAME, max_batch=4, max_queue=8, allow_adapter_loading=True)
    with Running(create_app(model, settings)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: Running) -> openai.OpenAI:
    return openai_client(server)


@pytest.fixture
def http(server: Running) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def greedy(model: er.Model, adapter: str | None, tokens: int = 8, messages: Any = USER, **kw: Any) -> er.Completion:
    """What the library generates alone on ``adapter`` (None: the base) for ``messages``, greedy."""
    ids = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    config = er.GenerationConfig(
        max_new_tokens=tokens, sampling=er.SamplingConfig(temperature=0), adapter=adapter, **kw
    )
    return model.generate(ids, config)


def error_of(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text[:500]
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


# -- routing by model -------------------------------------------------------------------------------------------
def test_model_names_the_base_or_an_adapter(model: er.Model, client: openai.OpenAI) -> None:
    texts = {}
    for name, adapter in ((NAME, None), ("a1", "a1"), ("a2", "a2")):
        want = greedy(model, adapter)
        got = client.chat.completions.create(model=name, messages=USER, max_tokens=8, temperature=0)
        assert got.model == name and got.choices[0].message.content == want.text, name
        texts[name] = want.text
        prompt = "Once upon a time"
        lib = model.generate(
            prompt, er.GenerationConfig(max_new_tokens=6, sampling=er.SamplingConfig(temperature=0), adapter=adapter)
        )
        done = client.completions.create(model=name, prompt=prompt, max_tokens=6, temperature=0)
        assert done.model == name and done.choices[0].text == lib.text, name
    assert len(set(texts.values())) == 3  # the adapters change the answer: the routing is seen
    resp = client.responses.create(model="a2", input=USER, max_output_tokens=8, temperature=0)
    assert resp.model == "a2" and resp.output_text == texts["a2"]


def test_a_stream_on_an_adapter(model: er.Model, client: openai.OpenAI) -> None:
    want = greedy(model, "a2", 12)
    stream = client.chat.completions.create(
        model="a2",
        messages=USER,
        max_tokens=12,
        temperature=0,
        stream=True,
    )
    chunks = list(stream)
    assert {c.model for c in chunks} == {"a2"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text


def test_echoed_logprobs_are_scored_on_the_adapter(model: er.Model, client: openai.OpenAI) -> None:
    prompt = "The robot walked into the room"
    ids = model.encode_prompt(prompt)
    want = [s.logprob for s in prompt_scores(model, ids, 1, "a1")]
    base = [s.logprob for s in prompt_scores(model, ids, 1)]
    assert max(abs(a - b) for a, b in zip(want, base, strict=True)) > 1e-3
    got = client.completions.create(model="a1", prompt=prompt, max_tokens=1, echo=True, logprobs=1, temperature=0)
    lps = got.choices[0].logprobs.token_logprobs  # type: ignore[union-attr]
    assert lps is not None and lps[0] is None
    assert lps[1 : len(ids)] == pytest.approx(want, abs=1e-4)  # the engine's prefill on the adapter
    streamed = client.completions.create(
        model="a1", prompt=prompt, max_tokens=1, echo=True, logprobs=1, temperature=0, stream=True
    )
    first = next(iter(streamed)).choices[0].logprobs.token_logprobs  # type: ignore[union-attr]
    assert first is not None and first[1:] == pytest.approx(want, abs=1e-4)  # scored before the stream opens


def test_the_models_list_has_the_base_and_its_adapters(client: openai.OpenAI) -> None:
    data = [m.model_dump() for m in client.models.list().data]
    assert [m["id"] for m in data] == [NAME, "a1", "a2"]
    assert data[0]["parent"] is None and data[0]["root"] == NAME
    for m in data[1:]:
        assert m["parent"] == NAME and m["root"] == f"adapters/{m['id']}.safetensors" and m["object"] == "model"
    got = client.models.retrieve("a1").model_dump()
    assert got["id"] == "a1" and got["parent"] == NAME
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("nope")
    assert e.value.body["code"] == "model_not_found" and "'a1', 'a2'" in e.value.body["message"]  # type: ignore[index]


def test_an_unknown_model_is_a_404_listing_the_adapters(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json={"model": "a9", "messages": USER, "max_tokens": 2})
    err = error_of(r, 404)
    assert err["code"] == "model_not_found" and err["param"] == "model"
    assert err["message"] == "The model 'a9' does not exist (this server serves 'base' and its adapters 'a1', 'a2')"
    # the adapter is named by model, as vLLM does: no second way
    err = error_of(http.post("/v1/completions", json={"prompt": "x", "adapter": "a1"}), 400)
    assert err["param"] == "adapter" and "model" in err["message"]
    # an adapter unloaded between the request's parse and its submission: the same 404
    late = from_config_error(er.ConfigError("adapter", "a9", "is not loaded (loaded: a1)"))
    assert late.status == 404 and late.code == "model_not_found" and late.param == "model"
    assert http.post("/tokenize", json={"model": "a1", "prompt": "hi"}).status_code == 200  # the same tokenizer


# -- loading and unloading at run time ----------------------------------------------------------------------------
def test_load_use_and_unload_an_adapter_while_serving(
    model: er.Model, folders: dict[str, Path], client: openai.OpenAI, http: httpx.Client
) -> None:
    r = http.post(LOAD, json={"lora_name": "a3", "lora_path": str(folders["a3"])})
    try:
        assert r.status_code == 200 and r.text == "Success: LoRA adapter 'a3' added successfully.", r.text
        entry = client.models.retrieve("a3").model_dump()
        assert entry["parent"] == NAME and entry["root"] == str(folders["a3"])
        assert [m.id for m in client.models.list().data] == [NAME, "a1", "a2", "a3"]
        want = greedy(model, "a3")
        got = client.chat.completions.create(model="a3", messages=USER, max_tokens=8, temperature=0)
        assert got.choices[0].message.content == want.text != greedy(model, None).text
        assert '"adapters": 3' in json.dumps(http.get("/health").json())
        assert "edgeroute_loaded_adapters 3.0" in http.get("/metrics").text
        # a stream running on it when it is unloaded finishes on it
        long = greedy(model, "a3", 120, min_new_tokens=120)
        body = {"model": "a3", "messages": USER, "max_tokens": 120, "temperature": 0, "ignore_eos": True}
        with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
            lines = s.iter_lines()
            assert next(lines).startswith("data: ")
            r = http.post(UNLOAD, json={"lora_name": "a3"})
            assert r.status_code == 200 and r.text == "Success: LoRA adapter 'a3' removed successfully."
            events = [json.loads(x[6:]) for x in [*lines] if x.startswith("data: {")]
        assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]) == long.text
        err = error_of(http.post("/v1/chat/completions", json={"model": "a3", "messages": USER}), 404)
        assert err["code"] == "model_not_found"
        assert [m.id for m in client.models.list().data] == [NAME, "a1", "a2"]
    finally:
        if "a3" in model.adapters:
            model.unload_adapter("a3")


def test_adapter_route_mistakes(model: er.Model, folders: dict[str, Path], http: httpx.Client) -> None:
    a3 = str(folders["a3"])
    cases: list[tuple[str, Any, int, str | None, str]] = [
        (LOAD, {"lora_name": "x", "lora_path": str(folders["model"] / "nowhere")}, 400, "lora_path", "neither"),
        (LOAD, {"lora_name": "big", "lora_path": str(folders["big"])}, 400, "lora_path", "rank 16 is above"),
        (LOAD, {"lora_name": "a1", "lora_path": a3}, 400, "lora_name", "already been loaded"),
        (LOAD, {"lora_name": NAME, "lora_path": a3}, 400, "lora_name", "served model's name"),
        (LOAD, {"lora_name": "bad name", "lora_path": a3}, 400, "lora_name", "letters, digits"),
        (LOAD, {"lora_path": a3}, 400, "lora_name", "required"),
        (LOAD, {"lora_name": "x"}, 400, "lora_path", "required"),
        (LOAD, {"lora_name": "x", "lora_path": 3}, 400, "lora_path", "a string"),
        (LOAD, {"lora_name": "x", "lora_path": a3, "extra": 1}, 400, "extra", "not a parameter"),
        (LOAD, [1], 400, None, "JSON object"),
        (UNLOAD, {"lora_name": "nope"}, 404, "lora_name", "cannot be found"),
        (UNLOAD, {"lora_name": NAME}, 400, "lora_name", "served model's name"),
    ]
    for path, body, status, param, fragment in cases:
        err = error_of(http.post(path, json=body), status)
        assert err["param"] == param and fragment in err["message"], (body, err)
    assert "x" not in model.adapters and model.adapters.names() == ["a1", "a2"]
    r = http.post(LOAD, content=b"{", headers={"content-type": "application/json"})
    assert error_of(r, 400)["code"] == "invalid_json"
    # at most max_adapters (4 here): the fifth is refused, naming the way out
    try:
        for name in ("a3", "a4"):
            assert http.post(LOAD, json={"lora_name": name, "lora_path": a3}).status_code == 200
        err = error_of(http.post(LOAD, json={"lora_name": "a5", "lora_path": a3}), 400)
        assert err["code"] == "too_many_adapters" and "unload" in err["message"]
    finally:
        for name in ("a3", "a4"):
            if name in model.adapters:
                model.unload_adapter(name)


def test_the_adapter_routes_need_a_key_or_the_flag(model: er.Model, folders: dict[str, Path]) -> None:
    body = {"lora_name": "a3", "lora_path": str(folders["a3"])}
    with Running(create_app(model, Settings(NAME))) as srv:  # no key, not allowed: anyone could read files
        for path in (LOAD, UNLOAD):
            err = error_of(httpx.post(srv.url + path, json=body, timeout=30), 403)
            assert err["code"] == "adapter_loading_disabled" and "--allow-adapter-loading" in err["message"]
            assert "--api-key" in err["message"] and err["type"] == "permission_error"
        assert httpx.get(srv.url + "/v1/models", timeout=30).status_code == 200  # the rest is as before
    with Running(create_app(model, Settings(NAME, api_key="k"))) as srv:  # a key: on, behind it
        assert error_of(httpx.post(srv.url + LOAD, json=body, timeout=30), 401)["code"] == "invalid_api_key"
        auth = {"Authorization": "Bearer k"}
        try:
            assert httpx.post(srv.url + LOAD, json=body, headers=auth, timeout=30).status_code == 200
            assert httpx.post(srv.url + UNLOAD, json=body, headers=auth, timeout=30).status_code == 400  # lora_path
            r = httpx.post(srv.url + UNLOAD, json={"lora_name": "a3"}, headers=auth, timeout=30)
            assert r.status_code == 200 and "a3" not in model.adapters
        finally:
            if "a3" in model.adapters:
                model.unload_adapter("a3")
    with Running(create_app(model, Settings(NAME, api_key="k", allow_adapter_loading=False))) as srv:
        r = httpx.post(srv.url + LOAD, json=body, headers={"Authorization": "Bearer k"}, timeout=30)
        assert "does not load" in error_of(r, 403)["message"]


# -- the command ------------------------------------------------------------------------------------------------
def test_the_command_loads_lora_flags_at_start(model: er.Model, folders: dict[str, Path]) -> None:
    """--lora NAME=PATH is served from the start, --max-loras bounds the loaded adapters, --allow-adapter-loading
    opens the routes without a key."""
    args = [str(folders["model"]), "--model-name", NAME, "--log-level", "warning"]
    args += ["--lora", f"a3={folders['a3']}", "--max-loras", "3", "--allow-adapter-loading"]
    env = {k: v for k, v in os.environ.items() if k != "EDGEROUTE_API_KEY"}
    with cli_server(*args, env=env) as (proc, url):
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        listed = {m.id: m.model_dump() for m in c.models.list().data}
        assert list(listed) == [NAME, "a1", "a2", "a3"] and listed["a3"]["root"] == str(folders["a3"])
        got = c.chat.completions.create(model="a3", messages=USER, max_tokens=8, temperature=0)
        model.load_adapter("a3", folders["a3"])
        try:
            assert got.choices[0].message.content == greedy(model, "a3").text
        finally:
            model.unload_adapter("a3")
        r = httpx.post(url + LOAD, json={"lora_name": "a4", "lora_path": str(folders["a3"])}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_adapters"  # --max-loras 3
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=20)
        _, err = proc.communicate(timeout=5)
        assert code == 0 and "Traceback" not in err, err


def test_bad_lora_flags_are_one_line(folders: dict[str, Path]) -> None:
    folder = str(folders["model"])
    cases = [
        (["--lora", "nope"], 2, "NAME=PATH"),
        (["--lora", f"x={folder}/nowhere"], 2, "no such file or folder"),
        (["--lora", f"a={folders['a3']}", "--lora", f"a={folders['a3']}"], 2, "given twice"),
        (["--lora", f"a={folders['a3']}", "--ray"], 2, "not with --ray"),
        (["--lora", f"big={folders['big']}", "--log-level", "error"], 1, "rank 16 is above the graph's 8"),
        (["--max-loras", "1", "--log-level", "error"], 1, "max_adapters 1"),
    ]
    for extra, code, fragment in cases:
        out = run_cli("serve", folder, "--port", str(free_port()), *extra)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == code and len(lines) == 1, (extra, out.stderr)
        assert lines[0].startswith("edgeroute: error:") and fragment in lines[0], (extra, lines)
