"""The transport every generating endpoint shares, whatever it renders: the body read within its limits, the
request parsed and submitted to the engine (all choices or none), the engine's steps gathered in one queue, the
client's disconnection watched (its choices cancelled, their slots back), the metrics (time to first token,
between tokens, tokens, cancellations), and the answer sent: one JSON object, or server-sent events
(``data: {...}`` and a blank line each, ``data: [DONE]`` last). What the objects hold is the endpoint's encoder's
(``serve.encoder``)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import edgeroute as er
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from .encoder import Encoder, Reply, completion_tokens
from .metrics import Metrics
from .protocol import APIError, TokenText, fingerprint, from_config_error, invalid, load_json

log = logging.getLogger("edgeroute.serve")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class Transport:
    """Answers a generating endpoint's requests for one app: ``served`` is the model's public name, the body is
    read within ``max_body_bytes`` (413) and ``read_timeout`` seconds (408)."""

    def __init__(self, served: str, max_body_bytes: int, read_timeout: float, metrics: Metrics | None) -> None:
        self.served = served
        self.max_body_bytes = max_body_bytes
        self.read_timeout = read_timeout
        self.metrics = metrics
        self._texts: TokenText | None = None

    async def generate(self, request: Request, encoder: Encoder[Any], model: er.Model, engine: er.Engine) -> Response:
        with engine.incoming():  # an idle engine waits for the requests of a burst still being read (Engine.gather)
            raw = await self._body(request)
            parsed, handles = await run_in_threadpool(self._submit, encoder, raw, model, engine)
        if self._texts is None:
            self._texts = TokenText(model.tokenizer)
        reply = encoder.reply(parsed, self._texts, frozenset(model.manifest.eos_token_ids), fingerprint(model))
        assert self.metrics is not None  # (a generating app's transport has them)
        answer = Answer(reply, handles, self.metrics)
        if parsed.stream:
            return StreamingResponse(answer.events(), media_type="text/event-stream", headers=SSE_HEADERS)
        return JSONResponse(await answer.collect(request))

    async def read_json(self, request: Request) -> Any:
        """The body as JSON, read within the same limits as a generating request's."""
        return load_json(await self._body(request))

    async def _body(self, request: Request) -> bytes:
        """The body, within ``max_body_bytes`` (413) and ``read_timeout`` seconds (408)."""
        limit = self.max_body_bytes
        chunks: list[bytes] = []

        async def read() -> None:
            size = 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large(limit)
                chunks.append(chunk)

        try:
            await asyncio.wait_for(read(), self.read_timeout)
        except asyncio.TimeoutError:
            raise APIError(
                408,
                f"the request body did not arrive within {self.read_timeout:g} seconds",
                None,
                "request_timeout",
                headers={"Connection": "close"},
            ) from None
        except ClientDisconnect:
            raise APIError(
                400, "the client closed the connection while sending the body", None, "client_disconnected"
            ) from None
        raw = b"".join(chunks)
        if not raw.strip():
            raise APIError(400, "the request body is empty: send a JSON object", None, "invalid_json")
        return raw

    def _submit(
        self, encoder: Encoder[Any], raw: bytes, model: er.Model, engine: er.Engine
    ) -> tuple[Any, list[er.Request]]:
        """Parse, validate and queue every choice, in a worker thread (a large body, a chat template or a long
        prompt takes time). All or nothing (``Engine.submit_all``): a request refused holds no place in the
        queue; one with more choices than the server can ever hold at once is a 400 naming ``n``."""
        parsed = encoder.parse(load_json(raw), model, self.served)
        items = parsed.choices()
        try:
            handles = engine.submit_all(items, parsed.flows)
        except er.EdgerouteError as e:
            if isinstance(e, er.ConfigError) and e.field == "requests":  # more than the engine can ever hold
                prompts = f"{len(parsed.prompts)} prompts x " if len(parsed.prompts) > 1 else ""
                raise invalid(
                    "n",
                    f"this request asks for {len(items)} choices ({prompts}n={parsed.n}); the server holds at most"
                    f" {engine.max_batch + engine.max_queue} at once (its batch and queue): lower n or send fewer"
                    " prompts per request",
                ) from None
            if isinstance(e, er.QueueFullError):
                raise APIError(
                    429, f"the server is busy: {e}", None, "queue_full", headers={"Retry-After": "1"}
                ) from None
            if isinstance(e, er.ContextOverflowError):
                raise APIError(400, str(e), encoder.prompt_param, "context_length_exceeded") from None
            if isinstance(e, er.ConfigError):
                raise from_config_error(e, encoder.prompt_param) from None
            if isinstance(e, er.EngineClosedError):
                raise shutting_down() from None
            raise
        return parsed, handles


class Answer:
    """The engine's requests of one HTTP request, sent as ``reply`` renders them: the whole answer, or its events."""

    def __init__(self, reply: Reply[Any], handles: list[er.Request], metrics: Metrics) -> None:
        self.reply = reply
        self.handles = handles
        self.metrics = metrics

    async def _steps(self, index: int, h: er.Request, out: asyncio.Queue[Any]) -> None:
        """Feed ``h``'s steps into ``out`` as ``(index, step)``, then ``(index, None)``; time them."""
        first, last = True, 0.0
        try:
            async for step in h:
                t = time.perf_counter()
                if first:
                    self.metrics.ttft.observe(t - h.submitted)
                    first = False
                else:
                    self.metrics.itl.observe(t - last)
                last = t
                out.put_nowait((index, step))
            out.put_nowait((index, None))
        except BaseException as e:  # noqa: BLE001 - handed to the reader
            out.put_nowait((index, e))

    def _end(self, gone: bool) -> None:
        for h in self.handles:
            if not h.done:
                h.cancel()
                if gone:
                    self.metrics.cancelled.inc()

    def _results(self) -> list[er.Completion]:
        """Every choice's completion (all have finished), counted in the metrics."""
        completions = [h.result(timeout=0) for h in self.handles]
        self.metrics.prompt_tokens.inc(self.reply.prompt_tokens)
        self.metrics.completion_tokens.inc(completion_tokens(completions))
        return completions

    async def collect(self, request: Request) -> dict[str, Any]:
        """Wait for every choice; a client that disconnects first cancels them (their slots come back)."""
        queue: asyncio.Queue[Any] = asyncio.Queue()
        tasks = [asyncio.ensure_future(self._steps(i, h, queue)) for i, h in enumerate(self.handles)]
        watcher = asyncio.ensure_future(disconnect(request))
        left, gone = len(tasks), False
        try:
            while left:
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    gone = True
                    raise APIError(499, "the client went away", None, "client_closed_request")
                _, item = getter.result()
                if item is None:
                    left -= 1
                elif isinstance(item, BaseException):
                    raise failure(item)
        finally:
            watcher.cancel()
            for t in tasks:
                t.cancel()
            self._end(gone)
        return self.reply.whole(self._results())

    async def events(self) -> AsyncIterator[str]:
        """Server-sent events in the order the official client expects: each choice's opening event (chat's role
        delta), the steps' events, the usage event (``choices: []``) when ``stream_options.include_usage``, then
        ``data: [DONE]``; a choice that fails ends the stream with its error's body and ``[DONE]``. A client that
        disconnects stops the generator at its next await: the ``finally`` cancels every choice still running."""
        queue: asyncio.Queue[Any] = asyncio.Queue()
        tasks = [asyncio.ensure_future(self._steps(i, h, queue)) for i, h in enumerate(self.handles)]
        finished = False
        try:
            for event in self.reply.opening():
                yield sse(event)
            left = len(tasks)
            while left:
                i, item = await queue.get()
                if item is None:
                    left -= 1
                    continue
                if isinstance(item, BaseException):
                    yield "data: " + json.dumps(failure(item).body()) + "\n\n"
                    break
                for event in self.reply.step(i, item):
                    yield sse(event)
            else:
                for event in self.reply.closing(self._results()):
                    yield sse(event)
            yield "data: [DONE]\n\n"
            finished = True
        finally:
            for t in tasks:
                t.cancel()
            self._end(gone=not finished)


def sse(obj: dict[str, Any]) -> str:
    """One server-sent event: ``data: <the object's JSON>`` and a blank line."""
    return "data: " + json.dumps(obj, ensure_ascii=False) + "\n\n"


def too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is over {limit} bytes", None, "request_too_large")


def shutting_down() -> APIError:
    return APIError(503, "the server is shutting down", None, "shutting_down", headers={"Retry-After": "1"})


def failure(e: BaseException) -> APIError:
    """What a request that failed while generating answers: its own settings that could not be followed (a
    constraint that leaves no token once ``min_tokens`` holds the end back) are a 400 naming them; the server
    closing is a 503; anything else is the server's failure (500)."""
    if isinstance(e, er.EngineClosedError):
        return APIError(503, "the server shut down while generating", None, "shutting_down")
    if isinstance(e, er.ConfigError):
        return from_config_error(e)
    log.error("generation failed: %s", e)
    return APIError(500, f"generation failed: {e}", None, "generation_failed")


async def disconnect(request: Request) -> None:
    """Returns when the client has gone (the body was read already: the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
