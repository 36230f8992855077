"""The Ray deployment's pure-ASGI middlewares (``edgeroute.serve.asgi``), called as plain ASGI apps around fake
inner apps: no Ray, no cluster, no server (the cluster tests in tests/test_ray.py see them installed)."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import pytest

pytest.importorskip("starlette", reason="the serve extra is not installed")

from edgeroute.serve.asgi import ProxyErrors, ReplicaHeaders  # noqa: E402


def call(inner: Any, middleware: Any = ProxyErrors) -> tuple[list[dict[str, Any]], BaseException | None]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def go() -> BaseException | None:
        try:
            await middleware(inner)({"type": "http", "path": "/v1/completions", "headers": []}, receive, send)
        except Exception as e:  # noqa: BLE001 - returned for the test to check
            return e
        return None

    return sent, asyncio.run(go())


def start(status: int, ctype: bytes, extra: list[tuple[bytes, bytes]] | None = None) -> dict[str, Any]:
    return {"type": "http.response.start", "status": status, "headers": [(b"content-type", ctype), *(extra or [])]}


def body(data: bytes, more: bool = False) -> dict[str, Any]:
    return {"type": "http.response.body", "body": data, "more_body": more}


def test_a_replica_that_died_before_answering_is_a_503_with_openai_body() -> None:
    async def died(scope: Any, receive: Any, send: Any) -> None:
        return None  # what Ray's proxy does when the replica's actor died: nothing sent

    sent, error = call(died)
    assert error is None
    assert sent[0]["status"] == 503
    headers = dict(sent[0]["headers"])
    assert headers[b"retry-after"] == b"1" and headers[b"content-type"] == b"application/json"
    err = json.loads(sent[1]["body"])["error"]
    assert err["code"] == "replica_failed" and err["type"] == "server_error" and "retry" in err["message"]


def test_a_stream_cut_mid_way_ends_with_an_error_event_and_done() -> None:
    async def cut(scope: Any, receive: Any, send: Any) -> None:
        await send(start(200, b"text/event-stream"))
        await send(body(b'data: {"choices": []}\n\n', more=True))
        raise RuntimeError("the actor died")

    sent, error = call(cut)
    assert error is None
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body", "http.response.body"]
    tail = sent[2]["body"].decode()
    assert sent[2].get("more_body", False) is False
    event, done = [e for e in tail.split("\n\n") if e]
    assert json.loads(event.removeprefix("data: "))["error"]["code"] == "replica_failed"
    assert done == "data: [DONE]"


def test_rays_plain_text_errors_become_openai_errors_with_their_status() -> None:
    async def busy(scope: Any, receive: Any, send: Any) -> None:
        await send(start(503, b"text/plain; charset=utf-8", [(b"retry-after", b"2")]))
        await send(body(b"Request dropped due to backpressure ", more=True))
        await send(body(b"(num_queued_requests=3, max_queued_requests=2)."))

    sent, error = call(busy)
    assert error is None and sent[0]["status"] == 503 and dict(sent[0]["headers"])[b"retry-after"] == b"2"
    err = json.loads(sent[1]["body"])["error"]
    assert err["code"] == "overloaded" and "backpressure" in err["message"] and err["type"] == "server_error"

    async def missing(scope: Any, receive: Any, send: Any) -> None:
        await send(start(404, b"text/plain"))
        await send(body(b"Path '/v1/x' not found."))

    sent, _ = call(missing)
    assert sent[0]["status"] == 404 and json.loads(sent[1]["body"])["error"]["code"] == "not_found"


def test_answers_of_the_replicas_pass_untouched() -> None:
    messages = [start(400, b"application/json"), body(b'{"error": {"message": "bad"}}')]

    async def answer(scope: Any, receive: Any, send: Any) -> None:
        for m in messages:
            await send(m)

    sent, error = call(answer)
    assert error is None and sent == messages

    async def half(scope: Any, receive: Any, send: Any) -> None:
        await send(start(200, b"application/json"))
        await send(body(b'{"id": ', more=True))
        raise RuntimeError("the actor died")

    sent, error = call(half)  # half a JSON body: only dropping the connection tells the client
    assert isinstance(error, RuntimeError) and len(sent) == 2


def test_a_replica_names_itself_on_every_answer() -> None:
    messages = [start(200, b"application/json"), body(b"{}")]

    async def answer(scope: Any, receive: Any, send: Any) -> None:
        for m in messages:
            await send(m)

    sent, error = call(answer, lambda app: ReplicaHeaders(app, replica="r-1"))
    assert error is None and sent[1] == messages[1]
    headers = sent[0]["headers"]
    assert headers[0] == (b"content-type", b"application/json")  # the app's own headers first, kept
    assert dict(headers)[b"x-edgeroute-replica"] == b"r-1"
    assert dict(headers)[b"x-edgeroute-pid"] == str(os.getpid()).encode()


def test_non_http_scopes_pass_through_both() -> None:
    seen: list[str] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["type"])
        await send({"type": "lifespan.startup.complete"})

    async def go(middleware: Any) -> list[dict[str, Any]]:
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "lifespan.startup"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await middleware({"type": "lifespan"}, receive, send)
        return sent

    for middleware in (ProxyErrors(inner), ReplicaHeaders(inner, replica="r-1")):
        assert asyncio.run(go(middleware)) == [{"type": "lifespan.startup.complete"}]
    assert seen == ["lifespan", "lifespan"]
