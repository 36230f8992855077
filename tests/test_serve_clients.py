"""The calls today's clients make every day (issue 35, point 3), through the official `openai` client where it
sends them: its own assistant message passed back, fields that do not change an answer, vLLM's extras
(`ignore_eos`, `skip_special_tokens`, `chat_template_kwargs`), `reasoning_effort` on a template with a thinking
switch, and `models.retrieve`. Each either works (checked against what the library generates alone) or is a 400
naming the field."""

from __future__ import annotations

from typing import Any

import edgeroute as er
import httpx
import openai
import pytest
from edgeroute.serve import Settings, create_app
from serve_helpers import Running, alone, openai_client
from tiny_model import CHATML, write_tiny_model

NAME = "org/tiny"  # a served name with a slash, as Hugging Face ids have
USER = {"role": "user", "content": "Tell me a story about a robot"}
THINKING = CHATML + "{% if add_generation_prompt and enable_thinking is defined and not enable_thinking %}"
THINKING += "{{ '<think>\n\n</think>\n' }}{% endif %}"


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> er.Model:
    return er.Model.load(write_tiny_model(tmp_path_factory.mktemp("clients") / "model", kv_layout="shared"))


@pytest.fixture(scope="module")
def thinker(tmp_path_factory: pytest.TempPathFactory) -> er.Model:
    folder = write_tiny_model(tmp_path_factory.mktemp("thinker") / "model", kv_layout="shared", chat_template=THINKING)
    return er.Model.load(folder)


@pytest.fixture(scope="module")
def server(model: er.Model):
    with Running(create_app(model, Settings(NAME, max_batch=4, max_queue=8))) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: Running) -> openai.OpenAI:
    return openai_client(server)


def refused(server: Running, body: dict[str, Any], path: str = "/v1/chat/completions") -> dict[str, Any]:
    r = httpx.post(server.url + path, json={"model": NAME, "max_tokens": 4, **body}, timeout=60)
    assert r.status_code == 400, r.text
    return r.json()["error"]


# -- the SDK's own assistant message, passed back ----------------------------------------------------------------
def test_the_sdks_assistant_message_goes_back_as_it_came(model: er.Model, client: openai.OpenAI) -> None:
    """OpenAI's tool-calling loop: ``messages.append(response.choices[0].message)``. The SDK sends back what the
    answer held (``refusal: null`` included), and the next turn renders the assistant's content."""
    first = client.chat.completions.create(model=NAME, messages=[USER], max_tokens=12, temperature=0)
    message = first.choices[0].message
    assert message.refusal is None
    follow = {"role": "user", "content": "And then?"}
    second = client.chat.completions.create(
        model=NAME,
        messages=[USER, message, follow],
        max_tokens=12,
        temperature=0,  # type: ignore[list-item]
    )
    want = alone(model, [USER, {"role": "assistant", "content": message.content}, follow])
    assert second.choices[0].message.content == want.text
    assert second.usage is not None and second.usage.prompt_tokens > first.usage.prompt_tokens  # type: ignore[union-attr]


def test_an_answers_other_fields_are_read_or_refused(model: er.Model, server: Running) -> None:
    said = {"role": "assistant", "content": None, "refusal": "I cannot help with that.", "annotations": []}
    r = httpx.post(
        server.url + "/v1/chat/completions",
        json={"model": NAME, "messages": [USER, said, USER], "max_tokens": 12, "temperature": 0},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    want = alone(model, [USER, {"role": "assistant", "content": "I cannot help with that."}, USER])
    assert r.json()["choices"][0]["message"]["content"] == want.text  # the refusal's text was what it said
    bad = [
        ({"audio": {"id": "a1"}}, "messages[1].audio"),
        ({"function_call": {"name": "f", "arguments": "{}"}}, "messages[1].function_call"),
        ({"annotations": "none"}, "messages[1].annotations"),
        ({"refusal": 3}, "messages[1].refusal"),
    ]
    for extra, param in bad:
        error = refused(server, {"messages": [USER, {"role": "assistant", "content": "ok", **extra}, USER]})
        assert error["param"] == param, error
    assert refused(server, {"messages": [{**USER, "refusal": None}]})["param"] == "messages[0].refusal"  # users' no


# -- fields that do not change the answer -------------------------------------------------------------------------
def test_fields_that_do_not_change_the_answer_are_accepted(model: er.Model, client: openai.OpenAI) -> None:
    inert = {
        "metadata": {"run": "7"},
        "store": False,
        "service_tier": "auto",
        "prompt_cache_key": "story",
        "prompt_cache_retention": "24h",
        "safety_identifier": "user-1",
        "modalities": ["text"],
        "verbosity": "low",
        "user": "u1",
    }
    plain = client.chat.completions.create(model=NAME, messages=[USER], max_tokens=12, temperature=0)
    dressed = client.chat.completions.create(
        model=NAME, messages=[USER], max_tokens=12, temperature=0, extra_body=inert
    )
    assert dressed.choices[0].message.content == plain.choices[0].message.content == alone(model, [USER]).text


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"metadata": "run 7"}, "metadata"),
        ({"store": "yes"}, "store"),
        ({"prompt_cache_key": 3}, "prompt_cache_key"),
    ],
)
def test_those_fields_are_still_checked(server: Running, body: dict[str, Any], param: str) -> None:
    assert refused(server, {"messages": [USER], **body})["param"] == param


def test_completions_take_none_of_the_chat_only_fields(server: Running) -> None:
    error = refused(server, {"prompt": "Once upon", "metadata": {"a": "b"}}, "/v1/completions")
    assert error["param"] == "metadata" and error["code"] == "unknown_parameter"


# -- vLLM's extras -------------------------------------------------------------------------------------------------
def test_ignore_eos_generates_max_tokens(model: er.Model, client: openai.OpenAI) -> None:
    """Every serving benchmark sends ignore_eos: the answer runs to max_tokens even where the model would end (here
    made certain by a bias towards the end-of-sequence token); stop strings still end it."""
    eos = sorted(model.manifest.eos_token_ids)[0]
    push = {str(eos): 100}
    ended = client.completions.create(model=NAME, prompt="Once upon", max_tokens=8, temperature=0, logit_bias=push)
    assert ended.choices[0].finish_reason == "stop" and ended.usage.completion_tokens == 1  # type: ignore[union-attr]
    for create in (
        lambda **kw: client.completions.create(prompt="Once upon", **kw),
        lambda **kw: client.chat.completions.create(messages=[USER], **kw),
    ):
        r = create(model=NAME, max_tokens=8, temperature=0, logit_bias=push, extra_body={"ignore_eos": True})
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 8  # type: ignore[union-attr]
    ids = model.tokenizer.encode("Once upon")
    want = model.generate(
        ids,
        er.GenerationConfig(
            max_new_tokens=8, min_new_tokens=8, sampling=er.SamplingConfig(temperature=0, logit_bias={eos: 100.0})
        ),
    )
    r = client.completions.create(
        model=NAME, prompt="Once upon", max_tokens=8, temperature=0, logit_bias=push, extra_body={"ignore_eos": True}
    )
    assert r.choices[0].text == want.text


def test_vllm_extras_are_refused_where_they_cannot_be_honoured(server: Running) -> None:
    r = httpx.post(
        server.url + "/v1/chat/completions",
        json={"model": NAME, "messages": [USER], "max_tokens": 4, "skip_special_tokens": True},
        timeout=60,
    )
    assert r.status_code == 200, r.text  # true is what the server always does
    assert refused(server, {"messages": [USER], "skip_special_tokens": False})["param"] == "skip_special_tokens"
    both = {"prompt": "Once", "ignore_eos": True, "stop_token_ids": [3]}
    assert refused(server, both, "/v1/completions")["param"] == "ignore_eos"
    assert refused(server, {"prompt": "Once", "ignore_eos": "yes"}, "/v1/completions")["param"] == "ignore_eos"


# -- the chat template's variables and reasoning_effort -----------------------------------------------------------
def test_chat_template_kwargs_and_reasoning_effort_set_the_thinking_switch(thinker: er.Model) -> None:
    off = thinker.tokenizer.apply_chat_template([USER], add_generation_prompt=True, enable_thinking=False)
    on = thinker.tokenizer.apply_chat_template([USER], add_generation_prompt=True)
    assert len(off) > len(on)  # the template writes an empty thinking block when thinking is off
    with Running(create_app(thinker, Settings(NAME))) as srv:
        client = openai_client(srv)

        def ask(**extra: Any) -> Any:
            return client.chat.completions.create(
                model=NAME, messages=[USER], max_tokens=12, temperature=0, extra_body=extra
            )

        for extra, prompt in [
            ({}, on),
            ({"chat_template_kwargs": {"enable_thinking": False}}, off),
            ({"reasoning_effort": "none"}, off),
            ({"reasoning_effort": "minimal"}, off),
            ({"reasoning_effort": "high"}, on),
            ({"reasoning_effort": "none", "chat_template_kwargs": {"enable_thinking": True}}, on),  # kwargs win
        ]:
            r = ask(**extra)
            assert r.usage is not None and r.usage.prompt_tokens == len(prompt), extra
            want = thinker.generate(
                prompt, er.GenerationConfig(max_new_tokens=12, sampling=er.SamplingConfig(temperature=0))
            )
            assert r.choices[0].message.content == want.text, extra
        assert refused(srv, {"messages": [USER], "reasoning_effort": "max"})["param"] == "reasoning_effort"


def test_reasoning_effort_without_a_thinking_switch_and_reserved_names_are_refused(server: Running) -> None:
    error = refused(server, {"messages": [USER], "reasoning_effort": "low"})
    assert error["param"] == "reasoning_effort" and "thinking switch" in error["message"]
    for key, shown in [(k, k) for k in ("messages", "add_generation_prompt", "tools", "bos_token")] + [
        ("not a name", "'not a name'")
    ]:
        error = refused(server, {"messages": [USER], "chat_template_kwargs": {key: 1}})
        assert error["param"] == f"chat_template_kwargs.{shown}", error
    assert refused(server, {"messages": [USER], "chat_template_kwargs": [1]})["param"] == "chat_template_kwargs"


# -- logprobs and usage agree --------------------------------------------------------------------------------------
def test_logprobs_have_one_entry_per_completion_token(model: er.Model, client: openai.OpenAI) -> None:
    """An answer that ends on the end-of-sequence token counts it in ``usage.completion_tokens`` and lists it in
    the logprobs, with an empty token text: the entries' texts still join to the content."""
    eos = sorted(model.manifest.eos_token_ids)[0]
    alone_ids = model.tokenizer.apply_chat_template([USER], add_generation_prompt=True)
    want = model.generate(alone_ids, er.GenerationConfig(max_new_tokens=8, sampling=er.SamplingConfig(temperature=0)))
    third = want.token_ids[2]  # bias the end in after two tokens of the greedy answer: it ends by EOS
    bias = {str(eos): 30, str(third): -100}
    for stream in (False, True):
        r = client.chat.completions.create(
            model=NAME,
            messages=[USER],
            max_tokens=8,
            temperature=0,
            logprobs=True,
            top_logprobs=2,
            logit_bias=bias,
            stream=stream,
            stream_options={"include_usage": True} if stream else None,
        )
        if stream:
            chunks = list(r)  # type: ignore[arg-type]
            entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
            content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            used = chunks[-1].usage.completion_tokens  # type: ignore[union-attr]
        else:
            entries = r.choices[0].logprobs.content  # type: ignore[union-attr]
            content, finish, used = (
                r.choices[0].message.content,
                [r.choices[0].finish_reason],
                r.usage.completion_tokens,
            )
        assert finish == ["stop"] and len(entries) == used >= 1, (stream, len(entries), used)
        assert entries[-1].token == "" and entries[-1].bytes == [] and entries[-1].logprob < 0
        assert "".join(e.token for e in entries) == content
    comp = client.completions.create(
        model=NAME, prompt="Once upon", max_tokens=8, temperature=0, logprobs=1, logit_bias={str(eos): 100}
    )
    lp = comp.choices[0].logprobs
    assert comp.usage.completion_tokens == len(lp.tokens) == 1 and lp.tokens == [""]  # type: ignore[union-attr]


# -- models.retrieve ------------------------------------------------------------------------------------------------
def test_models_retrieve(client: openai.OpenAI, model: er.Model) -> None:
    got = client.models.retrieve(NAME)
    assert got.id == NAME and got.object == "model" and got.owned_by == "edgeroute"
    assert [m.id for m in client.models.list().data] == [NAME]
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("other-model")
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"  # type: ignore[index]


# -- vLLM's tokenizer routes at the root (lm-eval's local-completions probes them) ---------------------------------
def test_the_tokenizer_routes_answer_in_vllms_shape(model: er.Model, server: Running) -> None:
    tok = model.tokenizer
    with httpx.Client(base_url=server.url, timeout=60) as http:
        info = http.get("/tokenizer_info").json()
        assert info["eos_token"] == tok.special_tokens["eos_token"] and info["bos_token"] == tok.special_tokens.get(
            "bos_token"
        )
        assert info["chat_template"] == tok.chat_template and info["model_max_length"] == model.context_length
        text = "Hello world! The capital of France is Paris."
        got = http.post("/tokenize", json={"model": NAME, "prompt": text, "add_special_tokens": False}).json()
        assert got["tokens"] == tok.encode(text, add_special_tokens=False) and got["count"] == len(got["tokens"])
        assert got["max_model_len"] == model.context_length and got["token_strs"] is None
        plain = http.post("/tokenize", json={"prompt": text, "return_token_strs": True}).json()
        assert plain["tokens"] == tok.encode(text) and len(plain["token_strs"]) == plain["count"]
        assert "".join(plain["token_strs"]).endswith("Paris.")
        chat = http.post("/tokenize", json={"messages": [USER]}).json()
        assert chat["tokens"] == tok.apply_chat_template([USER], add_generation_prompt=True)
        back = http.post("/detokenize", json={"tokens": chat["tokens"]}).json()
        assert back == {"prompt": tok.decode(chat["tokens"], skip_special_tokens=False)}
        assert "<|im_start|>" in back["prompt"] and USER["content"] in back["prompt"]
        assert http.post("/detokenize", json={"tokens": got["tokens"]}).json()["prompt"] == text


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/tokenize", {"prompt": "x", "temperature": 0}, 400, "temperature"),
        ("/tokenize", {}, 400, "prompt"),
        ("/tokenize", {"prompt": 3}, 400, "prompt"),
        ("/tokenize", {"prompt": "x", "add_special_tokens": "no"}, 400, "add_special_tokens"),
        ("/tokenize", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
        ("/tokenize", {"prompt": "x", "model": "other"}, 404, "model"),
        ("/detokenize", {"tokens": [1, True]}, 400, "tokens"),
        ("/detokenize", {"tokens": [10**9]}, 400, "tokens"),
        ("/detokenize", {"tokens": "1 2"}, 400, "tokens"),
        ("/detokenize", {"tokens": [1], "skip": 1}, 400, "skip"),
    ],
)
def test_the_tokenizer_routes_name_what_is_wrong(
    server: Running, path: str, body: dict[str, Any], status: int, param: str
) -> None:
    r = httpx.post(server.url + path, json=body, timeout=60)
    assert r.status_code == status and r.json()["error"]["param"] == param, r.text


def test_the_tokenizer_routes_need_the_key_when_the_server_has_one(model: er.Model) -> None:
    with Running(create_app(model, Settings(NAME, api_key="s3cret"))) as srv:
        assert httpx.post(srv.url + "/tokenize", json={"prompt": "x"}, timeout=60).status_code == 401
        assert httpx.get(srv.url + "/tokenizer_info", timeout=60).status_code == 401
        auth = {"Authorization": "Bearer s3cret"}
        assert httpx.post(srv.url + "/tokenize", json={"prompt": "x"}, headers=auth, timeout=60).status_code == 200
