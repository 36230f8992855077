"""The endpoints' encoders without a server: request bodies -> the engine's submissions (or the 400 naming the
parameter), and real ``Step`` s and ``Completion`` s (from a tiny model's generator, or built by hand) -> the whole
answer and the stream events, as JSON objects. No uvicorn, no HTTP client, no event loop."""

from __future__ import annotations

import json
from typing import Any

import edgeroute as er
import pytest
from edgeroute.serve.chat import ChatEncoder, ChatRequest
from edgeroute.serve.completions import CompletionRequest, CompletionsEncoder
from edgeroute.serve.encoder import Encoder, Reply
from edgeroute.serve.protocol import APIError, TokenText, fingerprint

NAME = "tiny"
QUESTION = [{"role": "user", "content": "Tell me a story about a robot"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
HEAD = ["id", "object", "created", "model", "system_fingerprint"]


@pytest.fixture(scope="module")
def roomy(make_tiny) -> er.Model:  # noqa: ANN001
    """A tiny model whose context holds a tool list."""
    return er.Model.load(make_tiny(context_length=1024))


def reply_for(model: er.Model, encoder: Encoder[Any], parsed: Any) -> Reply[Any]:
    eos = frozenset(model.manifest.eos_token_ids)
    return Reply(encoder, parsed, TokenText(model.tokenizer), eos, fingerprint(model), id="x-1", created=7)


def generate(model: er.Model, parsed: Any) -> tuple[list[list[er.Step]], list[er.Completion]]:
    """Each choice's steps and completion, generated alone (what the engine gives each of them)."""
    steps, done = [], []
    for ids, cfg in parsed.choices():
        gen = model.generator(cfg, parsed.flows)
        gen.append(ids)
        steps.append(list(gen))
        done.append(gen.completion())
    return steps, done


def stream(reply: Reply[Any], steps: list[list[er.Step]], done: list[er.Completion]) -> list[dict[str, Any]]:
    """Every event of a stream whose choices run one after the other (their order across choices is free)."""
    out = reply.opening()
    for i, choice in enumerate(steps):
        for step in choice:
            out += reply.step(i, step)
    last = reply.usage_event(done)
    return out + ([last] if last is not None else [])


def by_choice(events: list[dict[str, Any]], i: int) -> list[dict[str, Any]]:
    return [e["choices"][0] for e in events if e["choices"] and e["choices"][0]["index"] == i]


def reason(c: er.Completion) -> str:
    return "length" if c.finish_reason == "length" else "stop"


# -- chat -------------------------------------------------------------------------------------------------------
def test_a_whole_chat_answer_holds_every_choice_and_the_usage(tiny: er.Model) -> None:
    enc = ChatEncoder()
    body = {"messages": QUESTION, "max_tokens": 9, "temperature": 0.9, "seed": 3, "n": 2}
    parsed = enc.parse(body, tiny, NAME)
    assert isinstance(parsed, ChatRequest) and parsed.tools is None and not parsed.stream
    assert [c.sampling.seed for _, c in parsed.choices()] == [3, 4]  # choice i: seed + i
    assert parsed.prompts == [tiny.tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)]
    _, done = generate(tiny, parsed)
    whole = reply_for(tiny, enc, parsed).whole(done)
    assert list(whole) == [*HEAD, "choices", "usage"]
    assert whole["id"] == "x-1" and whole["object"] == "chat.completion" and whole["created"] == 7
    assert whole["model"] == NAME and whole["system_fingerprint"] == fingerprint(tiny)
    assert whole["choices"] == [
        {
            "index": i,
            "message": {"role": "assistant", "content": c.text, "refusal": None},
            "logprobs": None,
            "finish_reason": reason(c),
        }
        for i, c in enumerate(done)
    ]
    made = sum(c.usage.completion_tokens for c in done)
    prompt = len(parsed.prompts[0])  # counted once for its n choices
    details = {"cached_tokens": done[0].usage.cached_tokens}
    totals = {"prompt_tokens": prompt, "completion_tokens": made, "total_tokens": prompt + made}
    assert whole["usage"] == {**totals, "prompt_tokens_details": details}
    json.dumps(whole, allow_nan=False)  # plain JSON


def test_chat_stream_events_are_the_whole_answer_in_pieces(tiny: er.Model) -> None:
    enc = ChatEncoder()
    body = {
        "messages": QUESTION,
        "max_tokens": 8,
        "temperature": 0.8,
        "seed": 5,
        "n": 2,
        "logprobs": True,
        "top_logprobs": 2,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    parsed = enc.parse(body, tiny, NAME)
    steps, done = generate(tiny, parsed)
    events = stream(reply_for(tiny, enc, parsed), steps, done)
    whole = reply_for(tiny, enc, parsed).whole(done)
    for e in events:
        assert list(e) == [*HEAD, "choices", "usage"] and e["object"] == "chat.completion.chunk"
        assert e["id"] == "x-1" and len(e["choices"]) <= 1
    assert [e["usage"] for e in events[:-1]] == [None] * (len(events) - 1)
    assert events[-1]["choices"] == [] and events[-1]["usage"] == whole["usage"]
    assert [e["choices"][0]["delta"] for e in events[:2]] == [{"role": "assistant", "content": ""}] * 2
    for i, c in enumerate(done):
        mine = by_choice(events, i)
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert mine[-1] == {"index": i, "delta": {}, "logprobs": None, "finish_reason": reason(c)}
        middle = mine[1:-1]
        assert "".join(m["delta"]["content"] for m in middle) == c.text == whole["choices"][i]["message"]["content"]
        streamed = [entry for m in middle for entry in m["logprobs"]["content"]]
        assert streamed == whole["choices"][i]["logprobs"]["content"]
        assert all(len(entry["top_logprobs"]) == 2 for entry in streamed)


def test_a_stop_token_is_no_content_and_its_logprob_entry_has_no_text(tiny: er.Model) -> None:
    """The token that ends an answer is counted in the usage, so it has a logprob entry (as many entries as
    completion tokens), with an empty token: it is not part of the content."""
    enc = ChatEncoder()
    parsed = enc.parse({"messages": QUESTION, "logprobs": True, "stream": True}, tiny, NAME)
    reply = reply_for(tiny, enc, parsed)
    eos = tiny.manifest.eos_token_ids[0]
    token = tiny.tokenizer.encode("a")[0]
    text = tiny.tokenizer.token_bytes(token).decode()
    assert "usage" not in reply.opening()[0] and reply.usage_event([]) is None  # not asked for
    assert [e["choices"] for e in reply.step(0, er.Step(token, text, -0.5, None, ((token, -0.5),)))] == [
        [
            {
                "index": 0,
                "delta": {"content": text},
                "logprobs": {
                    "content": [
                        {
                            "token": text,
                            "logprob": -0.5,
                            "bytes": list(text.encode()),
                            "top_logprobs": [{"token": text, "logprob": -0.5, "bytes": list(text.encode())}],
                        }
                    ],
                    "refusal": None,
                },
                "finish_reason": None,
            }
        ]
    ]
    assert [e["choices"] for e in reply.step(0, er.Step(eos, "", -0.1, "stop"))] == [
        [
            {
                "index": 0,
                "delta": {"content": ""},
                "logprobs": {
                    "content": [{"token": "", "logprob": -0.1, "bytes": [], "top_logprobs": []}],
                    "refusal": None,
                },
                "finish_reason": None,
            }
        ],
        [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}],
    ]


def test_a_tool_call_streams_as_tool_call_deltas_and_ends_whole(roomy: er.Model) -> None:
    enc = ChatEncoder()
    body = {
        "messages": [{"role": "user", "content": "weather in Paris?"}],
        "tools": [WEATHER],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "stream": True,
    }
    parsed = enc.parse(body, roomy, NAME)
    assert parsed.tools is not None and parsed.tools.choice == "get_weather"
    assert isinstance(parsed.configs[0][0].constraint, er.JsonSchema)  # the answer is the call's schema
    pieces = ['{"name": "get_weather", ', '"arguments": {"city": ', '"Paris"', "}", "}"]
    steps = [er.Step(100 + k, p, None, "stop" if k == len(pieces) - 1 else None) for k, p in enumerate(pieces)]
    reply = reply_for(roomy, enc, parsed)
    events = reply.opening() + [e for s in steps for e in reply.step(0, s)]
    deltas = [e["choices"][0]["delta"] for e in events]
    assert deltas[0] == {"role": "assistant", "content": ""} and deltas[-1] == {}
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"
    calls = [d["tool_calls"][0] for d in deltas[1:-1]]
    assert all("content" not in d for d in deltas[1:-1])
    first = calls[0]
    assert first["index"] == 0 and first["type"] == "function" and first["id"].startswith("call_")
    assert first["function"] == {"name": "get_weather", "arguments": ""}
    assert "".join(c["function"]["arguments"] for c in calls[1:]) == '{"city": "Paris"}'

    text = "".join(pieces)
    done = er.Completion(text, [100 + k for k in range(5)], "stop", er.Usage(completion_tokens=5))
    (choice,) = reply.whole([done])["choices"]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    cut = er.Completion(text[:-3], [100, 101, 102], "length", er.Usage(completion_tokens=3))  # not a whole call
    (choice,) = reply.whole([cut])["choices"]
    assert choice["finish_reason"] == "length" and choice["message"]["content"] == text[:-3]


# -- completions ------------------------------------------------------------------------------------------------
def test_whole_completions_echo_each_prompt_for_its_choices(tiny: er.Model) -> None:
    enc = CompletionsEncoder()
    body = {"prompt": ["Hello there", "Once upon"], "max_tokens": 6, "temperature": 0.7, "seed": 1, "n": 2}
    body["echo"] = True
    parsed = enc.parse(body, tiny, NAME)
    assert isinstance(parsed, CompletionRequest) and parsed.prompt_texts == ["Hello there", "Once upon"]
    _, done = generate(tiny, parsed)
    whole = reply_for(tiny, enc, parsed).whole(done)
    assert whole["object"] == "text_completion" and list(whole) == [*HEAD, "choices", "usage"]
    prompts = ["Hello there", "Hello there", "Once upon", "Once upon"]
    assert whole["choices"] == [
        {"index": i, "text": prompts[i] + c.text, "logprobs": None, "finish_reason": reason(c)}
        for i, c in enumerate(done)
    ]
    assert whole["usage"]["prompt_tokens"] == sum(len(ids) for ids in parsed.prompts)


def test_streamed_completions_count_text_offsets_from_the_start(tiny: er.Model) -> None:
    enc = CompletionsEncoder()
    body = {"prompt": "Once upon a time", "max_tokens": 7, "temperature": 0, "logprobs": 2, "stream": True}
    parsed = enc.parse(body, tiny, NAME)
    steps, done = generate(tiny, parsed)
    events = stream(reply_for(tiny, enc, parsed), steps, done)
    (c,) = done
    assert all(list(e) == [*HEAD, "choices"] and e["object"] == "text_completion" for e in events)
    pieces = by_choice(events, 0)
    assert pieces[-1] == {"index": 0, "text": "", "logprobs": None, "finish_reason": reason(c)}
    assert "".join(p["text"] for p in pieces) == c.text
    offset = 0
    for p in pieces[:-1]:  # each piece's offset: the text sent before it
        assert p["logprobs"]["text_offset"] == [offset] and len(p["logprobs"]["top_logprobs"][0]) == 2
        offset += len(p["text"])
    whole = reply_for(tiny, enc, parsed).whole(done)["choices"][0]["logprobs"]
    assert [t for p in pieces[:-1] for t in p["logprobs"]["tokens"]] == whole["tokens"]
    assert [x for p in pieces[:-1] for x in p["logprobs"]["token_logprobs"]] == whole["token_logprobs"]


def test_a_streamed_echo_opens_with_the_prompt(tiny: er.Model) -> None:
    enc = CompletionsEncoder()
    body = {"prompt": ["ab", "cd"], "max_tokens": 2, "echo": True, "stream": True}
    reply = reply_for(tiny, enc, enc.parse(body, tiny, NAME))
    assert [e["choices"] for e in reply.opening()] == [
        [{"index": 0, "text": "ab", "logprobs": None, "finish_reason": None}],
        [{"index": 1, "text": "cd", "logprobs": None, "finish_reason": None}],
    ]
    (e,) = reply.step(1, er.Step(7, "x", None, None))
    assert e["choices"] == [{"index": 1, "text": "x", "logprobs": None, "finish_reason": None}]
    assert reply_for(tiny, CompletionsEncoder(), enc.parse({"prompt": "ab"}, tiny, NAME)).opening() == []


# -- the request's errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("encoder", "body", "param", "code"),
    [
        (ChatEncoder(), {"messages": QUESTION, "temperature": -1}, "temperature", "invalid_value"),
        (ChatEncoder(), {"messages": QUESTION, "colour": "red"}, "colour", "unknown_parameter"),
        (ChatEncoder(), {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "invalid_value"),
        (ChatEncoder(), {"messages": QUESTION, "top_logprobs": 2}, "top_logprobs", "invalid_value"),
        (ChatEncoder(), {"messages": QUESTION, "tool_choice": "auto"}, "tool_choice", "invalid_value"),
        (CompletionsEncoder(), {"prompt": "x", "echo": "yes", "logprobs": 1}, "echo", "invalid_type"),
        (CompletionsEncoder(), {"prompt": "x", "n": 17}, "n", "invalid_value"),
        (CompletionsEncoder(), {"prompt": [1, 99999]}, "prompt", "invalid_value"),
        (CompletionsEncoder(), {"prompt": "x", "messages": QUESTION}, "messages", "unknown_parameter"),
        (CompletionsEncoder(), {}, "prompt", "missing_required_parameter"),
    ],
)
def test_a_bad_parameter_is_a_400_naming_it(
    tiny: er.Model, encoder: Encoder[Any], body: dict[str, Any], param: str, code: str
) -> None:
    with pytest.raises(APIError) as err:
        encoder.parse(body, tiny, NAME)
    e = err.value
    assert e.status == 400 and e.body()["error"]["param"] == param and e.body()["error"]["code"] == code
    assert e.body()["error"]["type"] == "invalid_request_error" and param.split("[")[0] in e.message


def test_another_model_name_is_a_404() -> None:
    with pytest.raises(APIError) as err:
        ChatEncoder().parse({"model": "gpt-4", "messages": QUESTION}, None, NAME)  # type: ignore[arg-type]
    assert err.value.status == 404 and err.value.body()["error"] == {
        "message": "The model 'gpt-4' does not exist (this server serves 'tiny')",
        "type": "not_found_error",
        "param": "model",
        "code": "model_not_found",
    }


def test_each_encoder_names_its_route_objects_and_prompt_parameter() -> None:
    chat, comp = ChatEncoder(), CompletionsEncoder()
    assert (chat.path, chat.object, chat.chunk_object, chat.id_prefix, chat.prompt_param) == (
        "/v1/chat/completions",
        "chat.completion",
        "chat.completion.chunk",
        "chatcmpl-",
        "messages",
    )
    assert (comp.path, comp.object, comp.chunk_object, comp.id_prefix, comp.prompt_param) == (
        "/v1/completions",
        "text_completion",
        "text_completion",
        "cmpl-",
        "prompt",
    )


def test_a_reply_makes_its_own_id_from_the_encoders_prefix(tiny: er.Model) -> None:
    enc = CompletionsEncoder()
    parsed = enc.parse({"prompt": "ab", "max_tokens": 2}, tiny, NAME)
    a = enc.reply(parsed, TokenText(tiny.tokenizer), frozenset(), "fp")
    b = enc.reply(parsed, TokenText(tiny.tokenizer), frozenset(), "fp")
    assert a.id.startswith("cmpl-") and len(a.id) == len("cmpl-") + 24 and a.id != b.id
    assert isinstance(a.created, int) and a.created > 1_700_000_000
