"""``/v1/responses`` (issue 35, point 5) through the official client's ``responses`` API, on a tiny model: text,
instructions, input items, JSON-schema output, function tools and their outputs, streaming events, usage, and the
400s naming the field (``previous_response_id`` included: the endpoint is stateless)."""

from __future__ import annotations

import json
from typing import Any

import edgeroute as er
import httpx
import openai
import pytest
from edgeroute.serve import Settings, create_app
from serve_helpers import Running, alone, openai_client
from tiny_model import write_tiny_model

NAME = "tiny"
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
        "required": ["city"],
    },
}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> er.Model:
    folder = write_tiny_model(tmp_path_factory.mktemp("responses") / "model", kv_layout="shared", context_length=1024)
    return er.Model.load(folder)


@pytest.fixture(scope="module")
def server(model: er.Model):
    with Running(create_app(model, Settings(NAME, max_batch=4, max_queue=8))) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: Running) -> openai.OpenAI:
    return openai_client(server)


def test_a_text_response_is_the_chat_answer(model: er.Model, client: openai.OpenAI) -> None:
    r = client.responses.create(
        model=NAME, input="Tell me a story", instructions="Be brief.", max_output_tokens=12, temperature=0
    )
    want = alone(model, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story"}])
    assert r.object == "response" and r.id.startswith("resp_") and r.model == NAME
    assert r.output_text == want.text and r.output[0].type == "message"
    assert r.status == ("incomplete" if want.finish_reason == "length" else "completed")
    assert r.usage is not None and r.usage.output_tokens == want.usage.completion_tokens
    assert r.usage.input_tokens == want.usage.prompt_tokens and r.instructions == "Be brief."


def test_input_items_carry_a_conversation_and_tool_results(model: er.Model, client: openai.OpenAI) -> None:
    items: list[Any] = [
        {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
        {"role": "assistant", "content": [{"type": "output_text", "text": "It is sunny."}]},
        {"role": "user", "content": "And tomorrow?"},
    ]
    r = client.responses.create(model=NAME, input=items, max_output_tokens=8, temperature=0)
    chat = openai.OpenAI(base_url=client.base_url, api_key="unused", max_retries=0).chat.completions.create(
        model=NAME,
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            {"role": "assistant", "content": "It is sunny."},
            {"role": "user", "content": "And tomorrow?"},
        ],
        max_tokens=8,
        temperature=0,
    )
    assert r.output_text == chat.choices[0].message.content


def test_json_schema_output_and_a_function_call(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}},
        "required": ["n"],
        "additionalProperties": False,
    }
    r = client.responses.create(
        model=NAME,
        input="A number as JSON",
        max_output_tokens=40,
        temperature=0,
        text={"format": {"type": "json_schema", "name": "num", "schema": schema, "strict": True}},
    )
    assert isinstance(json.loads(r.output_text)["n"], int)
    call = client.responses.create(
        model=NAME,
        input="Weather in Paris?",
        tools=[WEATHER],
        tool_choice="required",
        max_output_tokens=60,
        temperature=0,
    )
    (item,) = [o for o in call.output if o.type == "function_call"]
    assert item.name == "get_weather" and "city" in json.loads(item.arguments) and item.call_id


def test_a_streamed_response_is_openais_event_sequence(model: er.Model, client: openai.OpenAI) -> None:
    events = list(
        client.responses.create(model=NAME, input="Tell me a story", max_output_tokens=12, temperature=0, stream=True)
    )
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] in (
        "response.completed",
        "response.incomplete",
    )
    assert kinds.index("response.output_item.added") < kinds.index("response.output_text.delta")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    want = alone(model, [{"role": "user", "content": "Tell me a story"}])
    assert text == want.text == events[-1].response.output_text
    assert events[-1].response.usage.output_tokens == want.usage.completion_tokens
    done = [e for e in events if e.type == "response.output_text.done"]
    assert len(done) == 1 and done[0].text == want.text
    tool_events = list(
        client.responses.create(
            model=NAME, input="Weather?", tools=[WEATHER], tool_choice="required", max_output_tokens=60, stream=True
        )
    )
    args = [e for e in tool_events if e.type == "response.function_call_arguments.done"]
    assert len(args) == 1 and "city" in json.loads(args[0].arguments)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
        ({"input": "x", "n": 2}, "n"),
        ({"input": []}, "input"),
        ({"input": [{"type": "input_image", "image_url": "x"}]}, "input[0].type"),
        ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}, "input[0].content[0]"),
        ({"input": [{"role": "wizard", "content": "x"}]}, "input[0].role"),
        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"input": "x", "text": {"format": {"type": "yaml"}}}, "text.format.type"),
        ({"input": "x", "truncation": "auto"}, "truncation"),
        ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"input": "x", "include": ["file_search_call.results"]}, "include[0]"),
        ({"input": "x", "include": "message.output_text.logprobs"}, "include"),
        ({"input": "x", "top_logprobs": 21}, "top_logprobs"),
        ({"input": "x", "text": {"verbosity": "loud"}}, "text.verbosity"),
        ({"input": "x", "text": {"colour": "red"}}, "text.colour"),
    ],
)
def test_mistakes_are_400s_naming_the_field(server: Running, body: dict[str, Any], param: str) -> None:
    r = httpx.post(server.url + "/v1/responses", json={"model": NAME, **body}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_logprobs_through_include_whole_and_streamed(model: er.Model, client: openai.OpenAI) -> None:
    """``include: ["message.output_text.logprobs"]`` with ``top_logprobs`` (what OpenAI's agents SDK sends; it sends
    ``include: []`` by default): the output text's logprobs are the model's own, an entry per counted token, as
    chat gives them; streamed, each text delta carries its tokens' entries. ``reasoning.encrypted_content`` and
    the Responses fields clients send that change nothing (``text.verbosity``, ``prompt_cache_retention``) are
    accepted."""
    common: dict[str, Any] = dict(model=NAME, input="Tell me a story", max_output_tokens=12, temperature=0)
    r = client.responses.create(
        include=["message.output_text.logprobs", "reasoning.encrypted_content"],
        top_logprobs=2,
        text={"verbosity": "low"},
        prompt_cache_retention="in-memory",
        **common,
    )
    want = model.generate(
        model.tokenizer.apply_chat_template(
            [{"role": "user", "content": "Tell me a story"}], add_generation_prompt=True
        ),
        er.GenerationConfig(max_new_tokens=12, logprobs=2, sampling=er.SamplingConfig(temperature=0)),
    )
    part = r.output[0].content[0]
    assert part.text == want.text and len(part.logprobs) == r.usage.output_tokens == want.usage.completion_tokens
    assert [e.logprob for e in part.logprobs] == pytest.approx([lp.logprob for lp in want.logprobs], abs=1e-4)
    assert all(len(e.top_logprobs) == 2 for e in part.logprobs)
    bare = client.responses.create(include=[], tools=[], **common)  # the agents SDK's defaults: no tools, no include
    assert bare.output[0].content[0].logprobs == [] and bare.output_text == want.text
    events = list(client.responses.create(include=["message.output_text.logprobs"], stream=True, **common))
    streamed = [e for ev in events if ev.type == "response.output_text.delta" for e in ev.logprobs]
    done = [ev for ev in events if ev.type == "response.output_text.done"][0]
    assert [e.logprob for e in done.logprobs] == pytest.approx([lp.logprob for lp in want.logprobs], abs=1e-4)
    assert [e.token for e in streamed] == [e.token for e in done.logprobs][: len(streamed)]
    assert "".join(e.token for e in streamed) == want.text
