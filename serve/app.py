"""The OpenAI-compatible app: Starlette routes over one :class:`edgeroute.Engine`.

Starlette rather than FastAPI: every request body is validated by edgeroute's own rules (``serve.protocol``, then
the configs' ``ConfigError``, which names the parameter), so FastAPI's pydantic layer would be a second validator
with its own messages and status codes; Starlette is the ASGI toolkit FastAPI is built on, without that layer.

Every answer to user input is a 2xx or a 4xx with OpenAI's error body; a 5xx means the server failed (a graph run
that failed, the model still loading, the server shutting down).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import edgeroute as er
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .metrics import Metrics
from .protocol import (
    APIError,
    Parsed,
    TokenText,
    fingerprint,
    finish,
    from_config_error,
    invalid,
    load_json,
    new_id,
    now,
    parse_chat,
    parse_completion,
    usage,
)
from .tools import CallStream, call_id, parse_call

log = logging.getLogger("edgeroute.serve")
MAX_BODY_BYTES = 4 * 1024 * 1024  # far above any prompt a context holds; a body beyond it is a 413
# a request's headers must arrive within this many seconds (from the connection, or the previous answer), and its
# body within as many more: ~140 KB/s fills a 4 MB body in time; a client sending a byte a second holds nothing long
READ_TIMEOUT = 30.0
# open connections at once: each running request holds one (max_batch + max_queue of them at most), the rest is
# headroom for keep-alive clients; one more is closed as it arrives
MAX_CONNECTIONS = 256
PUBLIC_PATHS = ("/health",)  # answered without the API key (load balancers probe it)


@dataclass
class Settings:
    """What the app serves and how: the model's public name, the API key (None: no key), the engine's slots and
    queue, the largest request body, the time to send a request and the open connections (``serve.server``).

    ``prefix_reuse``: a new prompt reuses the cached tokens it shares with an earlier one (faster; but how fast a
    prompt is answered tells a client whether another client sent the same prefix: turn it off for clients that
    must not learn of each other). ``plain_content``: message contents are tokenised as plain text, so that
    special-token text in them stays text (by default, as in transformers and most servers, a message containing
    ``<|im_start|>system`` writes real control tokens)."""

    model_name: str
    api_key: str | None = None
    max_batch: int = 8
    max_queue: int = 64
    max_body_bytes: int = MAX_BODY_BYTES
    prefix_reuse: bool = True
    plain_content: bool = False
    read_timeout: float = READ_TIMEOUT
    max_connections: int = MAX_CONNECTIONS


class State:
    """The loaded model and its engine (None while loading), or why loading failed."""

    def __init__(self) -> None:
        self.model: er.Model | None = None
        self.engine: er.Engine | None = None
        self.error: str | None = None
        self.loaded = threading.Event()
        self.started = time.time()
        self.draining = False

    def stats(self) -> er.EngineStats | None:
        return self.engine.stats() if self.engine is not None else None

    async def drain(self, grace: float, forced: Callable[[], bool] = lambda: False) -> None:
        """Stop taking requests (a new one is a 503), give the running and queued ones ``grace`` seconds (less if
        ``forced()`` turns true: a second Ctrl-C), then close the engine: what still runs ends with
        ``EngineClosedError``, which each answer turns into its final event or a JSON 503."""
        self.draining = True
        engine = self.engine
        if engine is None:
            return
        end = time.monotonic() + grace
        while time.monotonic() < end and not forced():
            st = engine.stats()
            if st.active == 0 and st.queued == 0 and st.incoming == 0:
                break
            await asyncio.sleep(0.05)
        await run_in_threadpool(engine.close)


def create_app(
    model: er.Model | Callable[[], er.Model],
    settings: Settings,
    on_load_error: Callable[[BaseException], None] | None = None,
    health: Callable[[], dict[str, Any]] | None = None,
) -> Starlette:
    """The ASGI app. ``model`` is a loaded :class:`~edgeroute.Model`, or a callable that loads one: it runs in a
    thread when the app starts, and ``/health`` answers 503 until it returns (``on_load_error`` hears if it
    raises). ``health`` adds fields to ``/health``'s answer (called in a worker thread: it may block briefly)."""
    state = State()

    def start(m: er.Model) -> None:
        state.engine = er.Engine(
            m, max_batch=settings.max_batch, max_queue=settings.max_queue, prefix_reuse=settings.prefix_reuse
        )
        state.model = m
        state.loaded.set()

    def load() -> None:
        try:
            assert callable(model)
            start(model())
            log.info(
                "model %s loaded: engine %s, %d slots",
                settings.model_name,
                state.engine and state.engine.mode,
                settings.max_batch,
            )
        except BaseException as e:  # noqa: BLE001 - reported through /health and on_load_error
            state.error = " ".join(str(e).split()) or type(e).__name__
            if on_load_error is not None:
                on_load_error(e)  # the caller reports it (the command: one line, exit 1)
            else:
                log.error("loading the model failed: %s", state.error)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if isinstance(model, er.Model):
            start(model)
        else:
            threading.Thread(target=load, name="edgeroute-load", daemon=True).start()
        try:
            yield
        finally:
            if state.engine is not None:
                await run_in_threadpool(state.engine.close)

    api = _Api(state, settings, health)
    routes = [
        Route("/v1/chat/completions", api.chat, methods=["POST"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/health", api.health, methods=["GET"]),
        Route("/metrics", api.metrics_page, methods=["GET"]),
    ]
    metrics = api.metrics = Metrics(state.stats, [r.path for r in routes])
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={APIError: _api_error, HTTPException: _http_error, Exception: _server_error},
    )
    app.state.edgeroute = state
    app.add_middleware(_Guard, settings=settings, metrics=metrics)
    return app


# -- errors -----------------------------------------------------------------------------------------------------
def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
    return error_response(APIError(exc.status_code, message.get(exc.status_code, str(exc.detail)), None, code))


async def _server_error(request: Request, exc: Exception) -> Response:
    log.exception("internal error on %s", request.url.path, exc_info=exc)
    return error_response(APIError(500, f"internal server error: {type(exc).__name__}", None, "internal_error"))


class _Guard:
    """Pure ASGI middleware: counts every answer by endpoint and status, refuses oversized bodies (413, from
    ``Content-Length``; a chunked body is counted as it is read) and checks the API key (401)."""

    def __init__(self, app: ASGIApp, settings: Settings, metrics: Metrics) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics
        self.key = settings.api_key.encode() if settings.api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        status = 500

        async def counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        headers = {k.decode("latin-1").lower(): v for k, v in scope["headers"]}
        try:
            refusal = self._refusal(path, headers)
            if refusal is not None:
                await error_response(refusal)(scope, receive, counted)
            else:
                await self.app(scope, receive, counted)
        finally:
            self.metrics.count(path, status)

    def _refusal(self, path: str, headers: dict[str, bytes]) -> APIError | None:
        if self.key is not None and path not in PUBLIC_PATHS:
            auth = headers.get("authorization", b"")
            scheme, _, given = auth.partition(b" ")
            # compare_digest: the time taken does not depend on how much of the key matched
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.key):
                what = "no API key" if not auth else "an incorrect API key"
                return APIError(
                    401,
                    f"{what} provided: send 'Authorization: Bearer <key>'",
                    None,
                    "invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        length = headers.get("content-length")
        if length is not None:
            try:
                size = int(length)
            except ValueError:
                return APIError(400, "Content-Length is not a number", None, "invalid_request")
            if size > self.settings.max_body_bytes:
                return _too_large(self.settings.max_body_bytes)
        return None


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is over {limit} bytes", None, "request_too_large")


# -- the endpoints ----------------------------------------------------------------------------------------------
class _Api:
    metrics: Metrics  # set by create_app, once the routes it counts exist

    def __init__(self, state: State, settings: Settings, extra: Callable[[], dict[str, Any]] | None = None) -> None:
        self.state = state
        self.settings = settings
        self.extra = extra
        self._texts: TokenText | None = None

    def _ready(self) -> tuple[er.Model, er.Engine]:
        s = self.state
        if s.draining:
            raise _shutting_down()
        if s.error is not None:
            raise APIError(503, f"the model failed to load: {s.error}", None, "model_load_failed")
        if s.model is None or s.engine is None:
            raise APIError(
                503, "the model is loading: retry shortly", None, "model_loading", headers={"Retry-After": "1"}
            )
        return s.model, s.engine

    async def health(self, request: Request) -> Response:
        s = self.state
        if s.error is not None:
            return JSONResponse({"status": "error", "error": s.error}, status_code=503)
        if s.engine is None:
            return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "1"})
        st = s.engine.stats()
        answer = {
            "status": "ok",
            "model": self.settings.model_name,
            "active": st.active,
            "queued": st.queued,
            "max_batch": st.max_batch,
        }
        if self.extra is not None:
            answer.update(await run_in_threadpool(self.extra))
        return JSONResponse(answer)

    async def metrics_page(self, request: Request) -> Response:
        body, media = self.metrics.render()
        return Response(body, media_type=media)

    async def models(self, request: Request) -> Response:
        s = self.state
        entry: dict[str, Any] = {
            "id": self.settings.model_name,
            "object": "model",
            "created": int(s.started),
            "owned_by": "edgeroute",
        }
        if s.model is not None:
            entry["context_length"] = s.model.context_length
        return JSONResponse({"object": "list", "data": [entry]})

    async def chat(self, request: Request) -> Response:
        plain = self.settings.plain_content
        return await self._generate(request, lambda body, m, name: parse_chat(body, m, name, plain_content=plain))

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, parse_completion)

    # -- generation ---------------------------------------------------------------------------------------------
    async def _generate(self, request: Request, parse: Callable[[Any, er.Model, str], Parsed]) -> Response:
        model, engine = self._ready()
        with engine.incoming():  # an idle engine waits for the requests of a burst still being read (Engine.gather)
            raw = await self._body(request)
            parsed, handles = await run_in_threadpool(self._submit, parse, raw, model, engine)
        if self._texts is None:
            self._texts = TokenText(model.tokenizer)
        answer = _Answer(parsed, handles, model, self._texts, self.metrics)
        if parsed.stream:
            return StreamingResponse(
                answer.events(),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return JSONResponse(await answer.collect(request))

    async def _body(self, request: Request) -> bytes:
        """The body, within ``max_body_bytes`` (413) and ``read_timeout`` seconds (408)."""
        limit = self.settings.max_body_bytes
        chunks: list[bytes] = []

        async def read() -> None:
            size = 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise _too_large(limit)
                chunks.append(chunk)

        try:
            await asyncio.wait_for(read(), self.settings.read_timeout)
        except asyncio.TimeoutError:
            raise APIError(
                408,
                f"the request body did not arrive within {self.settings.read_timeout:g} seconds",
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
        self, parse: Callable[[Any, er.Model, str], Parsed], raw: bytes, model: er.Model, engine: er.Engine
    ) -> tuple[Parsed, list[er.Request]]:
        """Parse, validate and queue every choice, in a worker thread (a large body, a chat template or a long
        prompt takes time). All or nothing (``Engine.submit_all``): a request refused holds no place in the
        queue; one with more choices than the server can ever hold at once is a 400 naming ``n``."""
        parsed = parse(load_json(raw), model, self.settings.model_name)
        where = "messages" if parsed.kind == "chat" else "prompt"
        items = [(ids, cfg) for ids, configs in zip(parsed.prompts, parsed.configs, strict=True) for cfg in configs]
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
                raise APIError(400, str(e), where, "context_length_exceeded") from None
            if isinstance(e, er.ConfigError):
                raise from_config_error(e, where) from None
            if isinstance(e, er.EngineClosedError):
                raise _shutting_down() from None
            raise
        return parsed, handles


class _Answer:
    """The engine's requests of one HTTP request -> OpenAI's response object, or its server-sent events."""

    def __init__(
        self, parsed: Parsed, handles: list[er.Request], model: er.Model, texts: TokenText, metrics: Metrics
    ) -> None:
        self.p = parsed
        self.handles = handles
        self.texts = texts
        self.metrics = metrics
        self.id = new_id(parsed.kind)
        self.created = now()
        self.fp = fingerprint(model)
        self.eos = frozenset(model.manifest.eos_token_ids)
        self.prompt_tokens = sum(len(ids) for ids in parsed.prompts)
        tools = parsed.tools
        self.calls = [CallStream(tools) for _ in handles] if tools is not None else None

    def _stop_token(self, h: er.Request, step: er.Step) -> bool:
        """The token that ended the request on a stop id: not part of the answer (nor of its logprobs)."""
        return step.finish_reason == "stop" and (step.token_id in self.eos or step.token_id in h.config.stop_token_ids)

    def _head(self) -> dict[str, Any]:
        kind = "chat.completion" if self.p.kind == "chat" else "text_completion"
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.p.model,
            "system_fingerprint": self.fp,
        }

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

    def _account(self, completions: list[er.Completion]) -> int:
        done = sum(c.usage.completion_tokens for c in completions)
        self.metrics.prompt_tokens.inc(self.prompt_tokens)
        self.metrics.completion_tokens.inc(done)
        return done

    # -- whole answers ------------------------------------------------------------------------------------------
    async def collect(self, request: Request) -> dict[str, Any]:
        """Wait for every choice; a client that disconnects first cancels them (their slots come back)."""
        queue: asyncio.Queue[Any] = asyncio.Queue()
        tasks = [asyncio.ensure_future(self._steps(i, h, queue)) for i, h in enumerate(self.handles)]
        watcher = asyncio.ensure_future(_disconnect(request))
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
                    raise _failure(item)
        finally:
            watcher.cancel()
            for t in tasks:
                t.cancel()
            self._end(gone)
        completions = [h.result(timeout=0) for h in self.handles]
        done_tokens = self._account(completions)
        choices = [self._choice(i, h, c) for i, (h, c) in enumerate(zip(self.handles, completions, strict=True))]
        return {**self._head(), "choices": choices, "usage": usage(self.prompt_tokens, done_tokens)}

    def _choice(self, index: int, h: er.Request, c: er.Completion) -> dict[str, Any]:
        entries = [(lp.token_id, lp.logprob, lp.top) for lp in (c.logprobs or [])][: len(c.token_ids)]
        reason = finish(c.finish_reason)
        if self.p.kind == "chat":
            logprobs = None
            if c.logprobs is not None:
                logprobs = {"content": [self.texts.chat_entry(*e) for e in entries], "refusal": None}
            message: dict[str, Any] = {"role": "assistant", "content": c.text, "refusal": None}
            call = parse_call(c.text, self.p.tools) if self.p.tools is not None and reason == "stop" else None
            if call is not None:
                message["content"] = None
                message["tool_calls"] = [{"id": call_id(), "type": "function", "function": call}]
                reason = "tool_calls"
            return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": reason}
        prefix = self.p.prompt_texts[index // self.p.n] if self.p.echo else ""
        lp_obj = None
        if c.logprobs is not None:
            lp_obj = self.texts.completion_logprobs(entries, len(prefix), h.config.top_logprobs > 0)
        return {"index": index, "text": prefix + c.text, "logprobs": lp_obj, "finish_reason": reason}

    # -- streams ------------------------------------------------------------------------------------------------
    async def events(self) -> AsyncIterator[str]:
        """Server-sent events in the order the official client expects: (chat) a role delta per choice, content
        deltas, a chunk with each choice's ``finish_reason``, the usage chunk (``choices: []``) when
        ``stream_options.include_usage``, then ``data: [DONE]``. A client that disconnects stops the generator at
        its next await: the ``finally`` cancels every choice still running."""
        queue: asyncio.Queue[Any] = asyncio.Queue()
        tasks = [asyncio.ensure_future(self._steps(i, h, queue)) for i, h in enumerate(self.handles)]
        finished = False
        try:
            for i in range(len(self.handles)):
                if self.p.kind == "chat":
                    yield self._event(
                        [
                            {
                                "index": i,
                                "delta": {"role": "assistant", "content": ""},
                                "logprobs": None,
                                "finish_reason": None,
                            }
                        ]
                    )
                elif self.p.echo:
                    text = self.p.prompt_texts[i // self.p.n]
                    yield self._event([{"index": i, "text": text, "logprobs": None, "finish_reason": None}])
            left = len(tasks)
            offsets = [len(self.p.prompt_texts[i // self.p.n]) if self.p.echo else 0 for i in range(len(self.handles))]
            while left:
                i, item = await queue.get()
                if item is None:
                    left -= 1
                    continue
                if isinstance(item, BaseException):
                    err = _failure(item)
                    yield "data: " + json.dumps(err.body()) + "\n\n"
                    break
                for chunk in self._deltas(i, self.handles[i], item, offsets):
                    yield chunk
            else:
                completions = [h.result(timeout=0) for h in self.handles]
                done_tokens = self._account(completions)
                if self.p.include_usage:
                    yield self._event([], usage(self.prompt_tokens, done_tokens))
            yield "data: [DONE]\n\n"
            finished = True
        finally:
            for t in tasks:
                t.cancel()
            self._end(gone=not finished)

    def _event(self, choices: list[dict[str, Any]], use: dict[str, int] | None = None) -> str:
        kind = "chat.completion.chunk" if self.p.kind == "chat" else "text_completion"
        obj = {**self._head(), "object": kind, "choices": choices}
        if self.p.include_usage:
            obj["usage"] = use  # null on every chunk but the last, as OpenAI sends it
        return "data: " + json.dumps(obj, ensure_ascii=False) + "\n\n"

    def _deltas(self, i: int, h: er.Request, step: er.Step, offsets: list[int]) -> list[str]:
        stop_token = self._stop_token(h, step)
        want = h.config.want_logprobs and step.logprob is not None and not stop_token
        out = []
        if self.calls is not None:  # a chat with tools: the text may be a call
            return self._tool_deltas(i, step, want)
        if step.text or want:
            if self.p.kind == "chat":
                lp = None
                if want:
                    assert step.logprob is not None
                    lp = {
                        "content": [self.texts.chat_entry(step.token_id, step.logprob, step.top_logprobs)],
                        "refusal": None,
                    }
                out.append(
                    self._event([{"index": i, "delta": {"content": step.text}, "logprobs": lp, "finish_reason": None}])
                )
            else:
                lp = None
                if want:
                    assert step.logprob is not None
                    lp = self.texts.completion_logprobs(
                        [(step.token_id, step.logprob, step.top_logprobs)], offsets[i], h.config.top_logprobs > 0
                    )
                offsets[i] += len(step.text)
                out.append(self._event([{"index": i, "text": step.text, "logprobs": lp, "finish_reason": None}]))
        if step.finish_reason is not None:
            reason = finish(step.finish_reason)
            if self.p.kind == "chat":
                out.append(self._event([{"index": i, "delta": {}, "logprobs": None, "finish_reason": reason}]))
            else:
                out.append(self._event([{"index": i, "text": "", "logprobs": None, "finish_reason": reason}]))
        return out

    def _tool_deltas(self, i: int, step: er.Step, want: bool) -> list[str]:
        """A step of a chat with tools: content deltas (with their logprobs) while the answer is text, tool-call
        deltas once it is a call; the finish reason is ``tool_calls`` for a complete call."""
        assert self.calls is not None
        stream = self.calls[i]
        deltas = stream.push(step.text)
        reason = None
        if step.finish_reason is not None:
            last, reason = stream.finish(finish(step.finish_reason))
            deltas += last
        lp = None
        if want and not stream.calling:
            assert step.logprob is not None
            lp = {"content": [self.texts.chat_entry(step.token_id, step.logprob, step.top_logprobs)], "refusal": None}
            if not deltas:
                deltas = [{"content": ""}]
        out = []
        for j, delta in enumerate(deltas):
            out.append(
                self._event([{"index": i, "delta": delta, "logprobs": lp if j == 0 else None, "finish_reason": None}])
            )
        if reason is not None:
            out.append(self._event([{"index": i, "delta": {}, "logprobs": None, "finish_reason": reason}]))
        return out


def _shutting_down() -> APIError:
    return APIError(503, "the server is shutting down", None, "shutting_down", headers={"Retry-After": "1"})


def _failure(e: BaseException) -> APIError:
    """What a request that failed while generating answers: its own settings that could not be followed (a
    constraint that leaves no token once ``min_tokens`` holds the end back) are a 400 naming them; the server
    closing is a 503; anything else is the server's failure (500)."""
    if isinstance(e, er.EngineClosedError):
        return APIError(503, "the server shut down while generating", None, "shutting_down")
    if isinstance(e, er.ConfigError):
        return from_config_error(e)
    log.error("generation failed: %s", e)
    return APIError(500, f"generation failed: {e}", None, "generation_failed")


async def _disconnect(request: Request) -> None:
    """Returns when the client has gone (the body was read already: the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
