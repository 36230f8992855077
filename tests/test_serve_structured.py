"""Structured output through the server: response_format (json_object, json_schema), vLLM's guided_* fields, and
OpenAI function calling (tools, tool_choice, tool_calls whole and streamed), with the official client."""

from __future__ import annotations

import json
from pathlib import Path

import edgeroute as er
import httpx
import jsonschema
import openai
import pytest
from edgeroute.serve import Settings, create_app
from edgeroute.serve.tools import CallStream, Tools, parse_call, parse_tools
from serve_helpers import Running, stream_json

NAME = "tiny"
ANSWER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 10}, "rank": {"type": "integer", "maximum": 9}},
    "required": ["city", "rank"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
QUESTION = [{"role": "user", "content": "weather?"}]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> er.Model:
    from tiny_model import write_tiny_model

    folder = tmp_path_factory.mktemp("structured") / "model"
    return er.Model.load(write_tiny_model(folder, kv_layout="shared", context_length=1024))  # room for the tool list


@pytest.fixture(scope="module")
def server(model: er.Model):
    with Running(create_app(model, Settings(NAME, max_batch=4, max_queue=16))) as srv:
        yield srv


@pytest.fixture
def client(server: Running) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


# -- response_format ---------------------------------------------------------------------------------------------
def test_json_schema_answers_validate_and_equal_the_library(client: openai.OpenAI, model: er.Model) -> None:
    r = client.chat.completions.create(
        model=NAME, messages=QUESTION, response_format=schema_format(ANSWER), n=4, seed=11, max_tokens=80
    )
    ids = model.tokenizer.apply_chat_template(QUESTION)
    for i, choice in enumerate(r.choices):
        cfg = er.GenerationConfig(
            max_new_tokens=80, constraint=er.JsonSchema(ANSWER), sampling=er.SamplingConfig(seed=11 + i)
        )
        alone = model.generate(ids, cfg)
        assert choice.message.content == alone.text
        if choice.finish_reason == "stop":
            jsonschema.validate(json.loads(choice.message.content or ""), ANSWER)
    assert sum(c.finish_reason == "stop" for c in r.choices) >= 2


def test_a_streamed_json_schema_answer_is_the_whole_answer(client: openai.OpenAI) -> None:
    kw = {"model": NAME, "messages": QUESTION, "response_format": schema_format(ANSWER), "seed": 3, "max_tokens": 80}
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = client.chat.completions.create(**kw, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == whole


def test_json_object_answers_are_objects(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=NAME, messages=QUESTION, response_format={"type": "json_object"}, n=6, seed=5, max_tokens=60
    )
    for c in r.choices:
        text = c.message.content or ""
        assert text.startswith("{")
        if c.finish_reason == "stop":
            assert isinstance(json.loads(text), dict)


def test_guided_fields_as_extra_body(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model=NAME, prompt="year", max_tokens=10, extra_body={"guided_regex": "[0-9]{4}"}, seed=1
    )
    assert r.choices[0].text.isdigit() and len(r.choices[0].text) == 4 and r.choices[0].finish_reason == "stop"
    c = client.chat.completions.create(
        model=NAME, messages=QUESTION, max_tokens=10, extra_body={"guided_grammar": 'start: "yes" | "no"'}
    )
    assert c.choices[0].message.content in ("yes", "no")


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
            "response_format.json_schema.schema",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
            "response_format.json_schema.name",
        ),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
        ({"guided_regex": "a(b"}, "guided_regex"),
        ({"guided_json": {"type": "objectx"}}, "guided_json"),
        ({"constraint": "json"}, "constraint"),
        ({"response_format": {"type": "json_object"}, "tools": [WEATHER]}, "response_format"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
        ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objectx"}}}]},
            "tools[0].function.parameters",
        ),
        ({"tools": [{"type": "code_interpreter"}]}, "tools[0]"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
        ({"messages": [{"role": "tool", "content": "18"}]}, "messages[0].tool_call_id"),
    ],
)
def test_bad_structured_requests_are_400s_naming_the_parameter(server: Running, extra: dict, param: str) -> None:
    body = {"messages": QUESTION, "max_tokens": 4, **extra}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


# -- tools -------------------------------------------------------------------------------------------------------
def _arguments_valid(call: object, tools: list[dict]) -> None:
    fn = call.function  # type: ignore[attr-defined]
    spec = next(t["function"] for t in tools if t["function"]["name"] == fn.name)
    jsonschema.validate(json.loads(fn.arguments), {**spec["parameters"], "additionalProperties": False})


def test_a_required_tool_call_comes_back_as_tool_calls(client: openai.OpenAI) -> None:
    tools = [WEATHER, TIME]
    r = client.chat.completions.create(
        model=NAME, messages=QUESTION, tools=tools, tool_choice="required", n=4, seed=2, max_tokens=80
    )
    for choice in r.choices:
        if choice.finish_reason == "length":
            continue
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls or []
        assert call.type == "function" and call.id.startswith("call_")
        _arguments_valid(call, tools)
    assert sum(c.finish_reason == "tool_calls" for c in r.choices) >= 2


def test_a_named_tool_is_the_one_called(client: openai.OpenAI) -> None:
    for seed in range(4):
        r = client.chat.completions.create(
            model=NAME,
            messages=QUESTION,
            tools=[WEATHER, TIME],
            tool_choice={"type": "function", "function": {"name": "get_time"}},
            seed=seed,
            max_tokens=40,
        )
        (call,) = r.choices[0].message.tool_calls or []
        assert call.function.name == "get_time" and json.loads(call.function.arguments) == {}


def test_a_streamed_tool_call_assembles_to_the_whole_one(client: openai.OpenAI) -> None:
    kw = {
        "model": NAME,
        "messages": QUESTION,
        "tools": [WEATHER],
        "tool_choice": "required",
        "seed": 8,
        "max_tokens": 80,
    }
    whole = client.chat.completions.create(**kw).choices[0]
    assert whole.finish_reason == "tool_calls"
    chunks = list(client.chat.completions.create(**kw, stream=True))
    deltas = [d for ch in chunks if ch.choices for d in ch.choices[0].delta.tool_calls or []]
    assert deltas[0].id.startswith("call_") and deltas[0].function.name == "get_weather"
    assert all(d.index == 0 and d.id is None and d.function.name is None for d in deltas[1:])
    assert len(deltas) > 2  # the arguments came in pieces
    assert "".join(d.function.arguments or "" for d in deltas) == whole.message.tool_calls[0].function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert all(not (ch.choices and ch.choices[0].delta.content) for ch in chunks)


def test_auto_answers_in_text_or_with_a_valid_call(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=NAME, messages=QUESTION, tools=[WEATHER], n=8, seed=4, max_tokens=60)
    for c in r.choices:
        if c.finish_reason == "tool_calls":
            _arguments_valid(c.message.tool_calls[0], [WEATHER])
        else:
            assert c.message.tool_calls is None and (c.message.content or " ")[0] not in "{<"


def test_tool_choice_none_leaves_the_tools_out(client: openai.OpenAI, model: er.Model) -> None:
    r = client.chat.completions.create(
        model=NAME, messages=QUESTION, tools=[WEATHER], tool_choice="none", seed=1, max_tokens=12
    )
    plain = model.generate(
        model.tokenizer.apply_chat_template(QUESTION), er.GenerationConfig(12, sampling=er.SamplingConfig(seed=1))
    )
    assert r.choices[0].message.content == plain.text and r.choices[0].message.tool_calls is None


def test_a_conversation_goes_on_after_a_tool_result(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(
        model=NAME, messages=QUESTION, tools=[WEATHER], tool_choice="required", seed=2, max_tokens=80
    )
    call = first.choices[0].message.tool_calls[0]
    history = [
        *QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "18 degrees"},
    ]
    r = client.chat.completions.create(model=NAME, messages=history, tools=[WEATHER], max_tokens=8, seed=1)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_the_prompt_lists_the_tools_when_the_template_ignores_them(model: er.Model) -> None:
    from edgeroute.serve.tools import render_messages

    tools = parse_tools({"tools": [WEATHER]})
    assert tools is not None
    text = model.tokenizer.decode(render_messages(QUESTION, tools, model.tokenizer), skip_special_tokens=False)
    assert "get_weather" in text and "The weather of a city" in text and text.endswith("assistant\n")


# -- the call stream, piece by piece ---------------------------------------------------------------------------
def test_the_call_stream_holds_back_what_closes_the_call() -> None:
    tools = Tools(parse_tools({"tools": [WEATHER]}).functions, "auto")  # type: ignore[union-attr]
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}\n</tool_call>'
    assert parse_call(text, tools) == {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "c"}'}
    stream = CallStream(tools)
    deltas = [d for i in range(0, len(text), 3) for d in stream.push(text[i : i + 3])]
    last, reason = stream.finish("stop")
    calls = [d["tool_calls"][0] for d in deltas + last]
    assert calls[0]["function"] == {"name": "get_weather", "arguments": ""}
    assert "".join(c["function"]["arguments"] for c in calls) == '{"city": "Oslo", "unit": "c"}'
    assert reason == "tool_calls"
    cut = CallStream(tools)  # the length limit inside the call: its arguments so far, finish "length"
    for piece in ('{"name": "get_weather", ', '"arguments": {"ci'):
        cut.push(piece)
    last, reason = cut.finish("length")
    assert reason == "length"
    text_stream = CallStream(tools)
    assert text_stream.push("Hello") == [{"content": "Hello"}] and text_stream.finish("stop") == ([], "stop")
    assert parse_call('{"name": "nope", "arguments": {}}', tools) is None


# -- the real model ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_calls_a_tool_through_the_server(smollm2_dir: Path) -> None:
    real = er.Model.load(smollm2_dir)
    with Running(create_app(real, Settings("smollm2", max_batch=2))) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=120)
        messages = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]
        r = c.chat.completions.create(
            model="smollm2", messages=messages, tools=[WEATHER], tool_choice="required", temperature=0
        )
        (call,) = r.choices[0].message.tool_calls or []
        assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
        args = json.loads(call.function.arguments)
        _arguments_valid(call, [WEATHER])
        assert args["city"] == "Paris"
        answer = c.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": "The capital of France, as JSON."}],
            response_format=schema_format(
                {
                    "type": "object",
                    "properties": {"capital": {"type": "string"}},
                    "required": ["capital"],
                    "additionalProperties": False,
                }
            ),
            temperature=0,
        )
        assert json.loads(answer.choices[0].message.content or "") == {"capital": "Paris"}
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            events = stream_json(
                http,
                "/v1/chat/completions",
                {"messages": messages, "tools": [WEATHER], "tool_choice": "required", "temperature": 0, "stream": True},
            )
        assert events[-1] == "[DONE]"
        args_streamed = "".join(
            d["function"].get("arguments", "")
            for e in events[:-1]
            for ch in e["choices"]
            for d in ch["delta"].get("tool_calls", [])
        )
        assert args_streamed == call.function.arguments
