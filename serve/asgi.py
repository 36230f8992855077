"""The pure-ASGI middlewares of the Ray deployment (:mod:`edgeroute.serve.ray`), kept apart from Ray: this module
imports neither ``ray`` nor anything that does, so they are importable and testable with the serve extra alone
(``tests/test_asgi.py`` calls them as plain ASGI apps).

* :class:`ProxyErrors` runs in Ray Serve's HTTP proxies (``edgeroute.serve.ray:proxy_middlewares`` installs it):
  Ray's own answers become OpenAI's error body.
* :class:`ReplicaHeaders` runs in each replica: every answer names the replica and process that gave it.
"""

from __future__ import annotations

import json
import os

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .app import error_response
from .protocol import APIError

__all__ = ["ProxyErrors", "ReplicaHeaders"]

_PROXY_CODES = {404: "not_found", 408: "timeout", 429: "overloaded", 503: "overloaded", 500: "internal_error"}


class ReplicaHeaders:
    """Pure ASGI middleware in a replica: every answer says which replica and process gave it
    (``x-edgeroute-replica``, ``x-edgeroute-pid``)."""

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self.app = app
        self.headers = [(b"x-edgeroute-replica", replica.encode()), (b"x-edgeroute-pid", str(os.getpid()).encode())]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.headers]}
            await send(message)

        await self.app(scope, receive, tagged)


class ProxyErrors:
    """Pure ASGI middleware in Ray Serve's HTTP proxies (installed by
    :func:`edgeroute.serve.ray.proxy_middlewares`): Ray's own answers become OpenAI's error body, so a client sees
    the same errors whichever part of the service failed.

    * A request whose replica died before answering gets nothing from the proxy (uvicorn would send a bare 500):
      it becomes a 503 with ``Retry-After: 1`` and code ``replica_failed``.
    * A stream cut mid-way (its replica died) ends with an error event and ``data: [DONE]``, as the server ends a
      stream whose request failed, so the official client raises ``APIError`` instead of a protocol error.
    * Ray's plain-text errors (404 for an unknown route or a deleted application, 503 when every replica's queue is
      full, 408 on a timeout) are rewritten with their status and ``Retry-After`` kept.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = finished = False
        stream = False
        held: Message | None = None  # a plain-text error's start, sent once its body is known
        body = b""

        async def watch(message: Message) -> None:
            nonlocal started, finished, stream, held, body
            kind = message["type"]
            if kind == "http.response.start":
                headers = {k.lower(): v for k, v in message.get("headers", [])}
                ctype = headers.get(b"content-type", b"")
                if message["status"] >= 400 and ctype.startswith(b"text/plain"):
                    held = message
                    return
                started = True
                stream = ctype.startswith(b"text/event-stream")
            elif kind == "http.response.body" and held is not None:
                body += message.get("body", b"")
                if message.get("more_body", False):
                    return
                status = held["status"]
                retry = {k.lower(): v for k, v in held.get("headers", [])}.get(b"retry-after")
                held = None
                error = _proxy_error(status, body.decode("utf-8", "replace"), retry)
                await error_response(error)(scope, receive, send)
                started = finished = True
                return
            elif kind == "http.response.body" and not message.get("more_body", False):
                finished = True
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception:  # noqa: BLE001 - the replica's failure, answered below
            if started and not stream:
                raise  # a JSON body half sent: only dropping the connection tells the client
        if finished:
            return
        if not started:
            await error_response(_replica_failed())(scope, receive, send)
        elif stream:
            event = json.dumps(_replica_failed().body())
            await send({"type": "http.response.body", "body": f"data: {event}\n\ndata: [DONE]\n\n".encode()})


def _replica_failed() -> APIError:
    return APIError(
        503,
        "the replica serving this request stopped before it finished (it is being replaced): retry the request",
        None,
        "replica_failed",
        headers={"Retry-After": "1"},
    )


def _proxy_error(status: int, text: str, retry: bytes | None) -> APIError:
    message = " ".join(text.split()) or f"HTTP {status}"
    headers = {"Retry-After": retry.decode("latin-1")} if retry else None
    return APIError(status, f"Ray Serve: {message}", None, _PROXY_CODES.get(status), headers=headers)
