"""What the server answers a fixed set of requests, as text: run before and after a change to ``serve/`` and
byte-compare the files.

    python bench/serve_transcript.py models/smollm2-135m-int4 --out a.txt
    ... change the code ...
    python bench/serve_transcript.py models/smollm2-135m-int4 --out b.txt && cmp a.txt b.txt

The app runs in-process (Starlette's TestClient: no socket, no uvicorn). Every request is greedy or seeded, so the
answers are the same from run to run; what is not (ids, ``created``, tool-call ids, timings) is masked. Each answer
is recorded with its status, its headers (but ``date``) and its body: the JSON, or the stream event by event. The
events of a stream with several choices are listed choice by choice (the choices' steps interleave as the engine's
thread hands them over, which varies from run to run; the order within a choice does not). The metrics page's
counters (requests by endpoint and status, tokens, observations) come last.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import edgeroute as er
from edgeroute.serve import Settings, create_app
from starlette.testclient import TestClient

NAME = "smollm2"
USER = [{"role": "user", "content": "Name three colours."}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}},
}
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"

# (label, method, path, body, stream); a body given as str is sent as raw bytes (not JSON-encoded)
REQUESTS: list[tuple[str, str, str, Any, bool]] = [
    ("chat greedy", "POST", CHAT, {"messages": USER, "max_tokens": 16, "temperature": 0}, False),
    (
        "chat greedy stream usage",
        "POST",
        CHAT,
        {
            "messages": USER,
            "max_tokens": 16,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        True,
    ),
    (
        "chat n=2 seeded",
        "POST",
        CHAT,
        {"messages": USER, "max_tokens": 12, "temperature": 0.9, "seed": 7, "n": 2},
        False,
    ),
    (
        "chat n=2 seeded stream",
        "POST",
        CHAT,
        {"messages": USER, "max_tokens": 12, "temperature": 0.9, "seed": 7, "n": 2, "stream": True},
        True,
    ),
    (
        "chat logprobs",
        "POST",
        CHAT,
        {"messages": USER, "max_tokens": 6, "temperature": 0, "logprobs": True, "top_logprobs": 2},
        False,
    ),
    (
        "chat logprobs stream",
        "POST",
        CHAT,
        {"messages": USER, "max_tokens": 6, "temperature": 0, "logprobs": True, "top_logprobs": 2, "stream": True},
        True,
    ),
    ("chat stop", "POST", CHAT, {"messages": USER, "max_tokens": 24, "temperature": 0, "stop": [","]}, False),
    (
        "chat stop stream",
        "POST",
        CHAT,
        {"messages": USER, "max_tokens": 24, "temperature": 0, "stop": [","], "stream": True},
        True,
    ),
    (
        "chat named tool",
        "POST",
        CHAT,
        {
            "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
            "tools": [WEATHER, TIME],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "max_tokens": 40,
            "temperature": 0,
        },
        False,
    ),
    (
        "chat named tool stream",
        "POST",
        CHAT,
        {
            "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
            "tools": [WEATHER, TIME],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "max_tokens": 40,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        True,
    ),
    (
        "chat auto tools logprobs stream",
        "POST",
        CHAT,
        {
            "messages": [{"role": "user", "content": "Say hello."}],
            "tools": [WEATHER],
            "max_tokens": 12,
            "temperature": 0,
            "logprobs": True,
            "stream": True,
        },
        True,
    ),
    (
        "chat json_schema",
        "POST",
        CHAT,
        {
            "messages": [{"role": "user", "content": "Describe a person."}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
            "max_tokens": 40,
            "temperature": 0,
        },
        False,
    ),
    (
        "chat json_schema stream",
        "POST",
        CHAT,
        {
            "messages": [{"role": "user", "content": "Describe a person."}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
            "max_tokens": 40,
            "temperature": 0,
            "stream": True,
        },
        True,
    ),
    (
        "completion greedy",
        "POST",
        COMPLETIONS,
        {"prompt": "The capital of France is", "max_tokens": 12, "temperature": 0},
        False,
    ),
    (
        "completion greedy stream usage",
        "POST",
        COMPLETIONS,
        {
            "prompt": "The capital of France is",
            "max_tokens": 12,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        True,
    ),
    (
        "completion two prompts echo",
        "POST",
        COMPLETIONS,
        {"prompt": ["def add(a, b):", "Once upon a time"], "max_tokens": 8, "temperature": 0, "echo": True},
        False,
    ),
    (
        "completion two prompts echo stream",
        "POST",
        COMPLETIONS,
        {
            "prompt": ["def add(a, b):", "Once upon a time"],
            "max_tokens": 8,
            "temperature": 0,
            "echo": True,
            "stream": True,
        },
        True,
    ),
    (
        "completion two prompts n=2 echo seeded stream",
        "POST",
        COMPLETIONS,
        {
            "prompt": ["Hello", "The sea"],
            "max_tokens": 5,
            "temperature": 0.7,
            "seed": 11,
            "n": 2,
            "echo": True,
            "stream": True,
        },
        True,
    ),
    (
        "completion n=2 seeded",
        "POST",
        COMPLETIONS,
        {"prompt": "Once upon a time", "max_tokens": 10, "temperature": 0.8, "seed": 3, "n": 2},
        False,
    ),
    (
        "completion n=2 seeded stream usage",
        "POST",
        COMPLETIONS,
        {
            "prompt": "Once upon a time",
            "max_tokens": 10,
            "temperature": 0.8,
            "seed": 3,
            "n": 2,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        True,
    ),
    (
        "completion logprobs",
        "POST",
        COMPLETIONS,
        {"prompt": "The capital of France is", "max_tokens": 5, "temperature": 0, "logprobs": 2},
        False,
    ),
    (
        "completion logprobs stream",
        "POST",
        COMPLETIONS,
        {"prompt": "The capital of France is", "max_tokens": 5, "temperature": 0, "logprobs": 0, "stream": True},
        True,
    ),
    (
        "completion stop",
        "POST",
        COMPLETIONS,
        {"prompt": "List three colours:", "max_tokens": 24, "temperature": 0, "stop": ["\n"]},
        False,
    ),
    (
        "completion stop stream",
        "POST",
        COMPLETIONS,
        {"prompt": "List three colours:", "max_tokens": 24, "temperature": 0, "stop": ["\n"], "stream": True},
        True,
    ),
    ("400 unknown parameter", "POST", CHAT, {"messages": USER, "colour": "red"}, False),
    ("400 n out of range", "POST", COMPLETIONS, {"prompt": "x", "n": 0}, False),
    (
        "echo with logprobs (lm-eval's log-likelihood contract)",
        "POST",
        COMPLETIONS,
        {"prompt": "The capital of France is Paris.", "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0},
        False,
    ),
    ("400 bad temperature", "POST", CHAT, {"messages": USER, "temperature": -1}, False),
    ("400 not JSON", "POST", CHAT, "{not json", False),
    ("400 empty body", "POST", COMPLETIONS, "", False),
    ("400 context exceeded", "POST", COMPLETIONS, {"prompt": "hi " * 9000, "max_tokens": 4}, False),
    (
        "400 stream_options without stream",
        "POST",
        CHAT,
        {"messages": USER, "stream_options": {"include_usage": True}},
        False,
    ),
    ("404 model", "POST", CHAT, {"model": "gpt-4", "messages": USER}, False),
    ("404 route", "GET", "/v1/nothing", None, False),
    ("405 method", "GET", CHAT, None, False),
    ("models", "GET", "/v1/models", None, False),
    ("health", "GET", "/health", None, False),
]

_MASKS = [
    (re.compile(r'"(chatcmpl-|cmpl-|call_)[0-9a-f]{24}"'), r'"\1<id>"'),
    (re.compile(r'"created": ?\d+'), '"created": <t>'),
]


def mask(text: str) -> str:
    for pattern, repl in _MASKS:
        text = pattern.sub(repl, text)
    return text


def _headers(r: Any) -> str:
    return json.dumps(sorted((k, v) for k, v in r.headers.items() if k != "date"))


def _event_choice(data: str) -> int:
    """The choice an event belongs to (one past the last for the usage chunk, ``[DONE]`` and error events)."""
    try:
        choices = json.loads(data).get("choices")
    except ValueError:
        return 1 << 30
    return choices[0]["index"] if choices else 1 << 30


def _stream(r: Any) -> list[str]:
    raw = b"".join(r.iter_bytes()).decode("utf-8")
    assert raw.endswith("\n\n"), raw[-200:]
    events = raw[:-2].split("\n\n")
    for e in events:
        assert e.startswith("data: ") and "\n" not in e, e
    return sorted(events, key=lambda e: _event_choice(e[len("data: ") :]))  # stable: each choice's order kept


def transcript(model: er.Model) -> str:
    out: list[str] = []
    app = create_app(model, Settings(NAME, max_batch=4, max_queue=8))
    with TestClient(app, raise_server_exceptions=False) as client:
        for label, method, path, body, stream in REQUESTS:
            out.append(f"## {label}: {method} {path}")
            kw: dict[str, Any] = {}
            if isinstance(body, str):
                kw = {"content": body.encode(), "headers": {"content-type": "application/json"}}
            elif body is not None:
                kw = {"json": body}
            if stream:
                with client.stream(method, path, **kw) as r:
                    out.append(f"status {r.status_code}")
                    out.append(_headers(r))
                    out += _stream(r)
            else:
                r = client.request(method, path, **kw)
                out.append(f"status {r.status_code}")
                out.append(_headers(r))
                out.append(r.text)
        out.append("## metrics")
        out += _counters(client.get("/metrics").text)
        # a key: a request without it is a 401, /health is public
        keyed = create_app(model, Settings(NAME, api_key="secret"))
    with TestClient(keyed, raise_server_exceptions=False) as k:
        for label, headers in [("401 no key", {}), ("401 wrong key", {"authorization": "Bearer nope"})]:
            r = k.post(CHAT, json={"messages": USER, "max_tokens": 2}, headers=headers)
            out += [f"## {label}", f"status {r.status_code}", _headers(r), r.text]
        r = k.post(
            COMPLETIONS,
            json={"prompt": "Hi", "max_tokens": 3, "temperature": 0},
            headers={"authorization": "Bearer secret"},
        )
        out += ["## keyed completion", f"status {r.status_code}", _headers(r), r.text]
        r = k.get("/health")
        out += ["## keyed health", f"status {r.status_code}", _headers(r), r.text]
        out.append("## keyed metrics")
        out += _counters(k.get("/metrics", headers={"authorization": "Bearer secret"}).text)
    return mask("\n".join(out)) + "\n"


def _counters(page: str) -> list[str]:
    """The metrics page's counters and observation counts (not its timings, nor the time a series was created)."""
    keep = []
    for line in page.splitlines():
        if line.startswith("#") or "_created" in line or "_bucket" in line or "_sum" in line:
            continue
        keep.append(line)
    return keep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path, help="a model folder (edgeroute export's)")
    ap.add_argument("--out", type=Path, help="write here (default: stdout)")
    args = ap.parse_args()
    text = transcript(er.Model.load(args.model))
    if args.out is not None:
        args.out.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
