"""The OpenAI-compatible app: Starlette routes over one :class:`edgeroute.Engine`: the settings, the model's
loading, the middleware (API key, body size, counting every answer), the error handlers, ``/health``,
``/v1/models`` and ``/metrics``, and one route per encoder (``serve.chat``, ``serve.completions``), each answered by
the transport (``serve.transport``).

LoRA adapters, in vLLM's conventions: a request's ``model`` names the served model or an adapter loaded on it
(``serve.protocol.parse_model``); ``/v1/models`` lists both (an adapter with ``parent``: the served model);
``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` change them while requests run. Loading reads files
where the server runs, so those two routes answer 403 unless the server has an API key or
``Settings.allow_adapter_loading`` says otherwise.

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
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import edgeroute as er
from edgeroute.errors import one_line
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import tokens
from .adapter_routes import AdapterRoutes
from .chat import ChatEncoder
from .completions import CompletionsEncoder
from .encoder import Encoder
from .metrics import Metrics
from .protocol import APIError, unknown_model
from .responses import ResponsesEncoder
from .transport import Transport, shutting_down, too_large

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
    must not learn of each other). ``prefix_cache_memory``: when set (bytes; ``edgeroute serve`` sets 512 MiB unless
    told otherwise) and ``prefix_reuse`` is on, a model that has no prefix cache and can hold one (a shared-buffer
    graph on the host KV cache) gets one in memory of that budget when it loads: prompts reuse the blocks of
    earlier prompts beyond the slots' own, and scored prompts (``echo`` with ``logprobs``) reuse them at all (the
    slots keep no scores). ``plain_content``: message contents are tokenised as plain text, so that
    special-token text in them stays text (by default, as in transformers and most servers, a message containing
    ``<|im_start|>system`` writes real control tokens).

    ``adapters``: LoRA adapters (name -> a PEFT folder or an adapter file) loaded on the model before the engine
    starts (a model given loaded is changed); one that fails is a failure to load the model.
    ``allow_adapter_loading``: whether ``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` answer
    (they read the server's files at paths clients send): None (the default) when an API key is set, else 403;
    True always; False never."""

    model_name: str
    api_key: str | None = None
    max_batch: int = 8
    max_queue: int = 64
    max_body_bytes: int = MAX_BODY_BYTES
    prefix_reuse: bool = True
    prefix_cache_memory: int | None = None
    plain_content: bool = False
    read_timeout: float = READ_TIMEOUT
    max_connections: int = MAX_CONNECTIONS
    adapters: dict[str, str] = field(default_factory=dict)
    allow_adapter_loading: bool | None = None

    def adapter_loading(self) -> bool:
        """Whether the adapter routes load and unload (``allow_adapter_loading``, else: an API key is set)."""
        return self.api_key is not None if self.allow_adapter_loading is None else self.allow_adapter_loading


class State:
    """The loaded model and its engine (None while loading), or why loading failed."""

    def __init__(self) -> None:
        self.model: er.Model | None = None
        self.engine: er.Engine | None = None
        self.error: str | None = None
        self.loaded = threading.Event()
        self.started = time.time()
        self.draining = False
        # each adapter loaded through the app: where from (``root`` in /v1/models) and when (``created``)
        self.adapter_sources: dict[str, tuple[str, int]] = {}

    def load_adapter(self, model: er.Model, name: str, path: str) -> None:
        """Load the adapter at ``path`` on ``model`` as ``name`` and remember where from (``/v1/models``' root)."""
        model.load_adapter(name, path)
        self.adapter_sources[name] = (path, int(time.time()))

    def stats(self) -> er.EngineStats | None:
        return self.engine.stats() if self.engine is not None else None

    def prefix_stats(self) -> er.PrefixCacheStats | None:
        """The prefix cache's figures (None without one)."""
        cache = self.model.prefix_cache if self.model is not None else None
        return cache.stats() if cache is not None else None

    def adapter_count(self) -> int:
        """The LoRA adapters loaded on the model (0 while it loads)."""
        return len(self.model.adapters) if self.model is not None else 0

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
        for name, entry in m.manifest.adapters.items():  # the folder's own adapters: their file in it
            state.adapter_sources[name] = (str(entry.get("file", name)), int(state.started))
        for name, path in settings.adapters.items():
            if name == settings.model_name:
                raise er.AdapterError(f"adapter {name!r}: the served model's name: give the adapter another")
            state.load_adapter(m, name, str(path))
        memory = settings.prefix_cache_memory
        if memory and settings.prefix_reuse and m.prefix_cache is None and m.can_cache_prefixes:
            m.use_prefix_cache(memory=memory)
        state.engine = er.Engine(
            m, max_batch=settings.max_batch, max_queue=settings.max_queue, prefix_reuse=settings.prefix_reuse
        )
        state.model = m
        state.loaded.set()

    def load() -> None:
        try:
            assert callable(model)
            start(model())
            cache = state.model.prefix_cache if state.model is not None else None
            log.info(
                "model %s loaded: engine %s, %d slots, %s",
                settings.model_name,
                state.engine and state.engine.mode,
                settings.max_batch,
                f"prefix cache {cache.memory_bytes >> 20} MiB" if cache is not None else "no prefix cache",
            )
        except BaseException as e:  # noqa: BLE001 - reported through /health and on_load_error
            state.error = one_line(e)
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

    # the generating endpoints: adding one is adding its encoder here (``serve.encoder``)
    encoders: list[Encoder[Any]] = [
        ChatEncoder(plain_content=settings.plain_content),
        CompletionsEncoder(),
        ResponsesEncoder(plain_content=settings.plain_content),
    ]
    api = _Api(state, settings, health)
    routes = [
        *(Route(e.path, api.generation(e), methods=["POST"]) for e in encoders),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", api.model, methods=["GET"]),
        # vLLM's routes to load and unload LoRA adapters at run time
        Route("/v1/load_lora_adapter", api.load_adapter, methods=["POST"]),
        Route("/v1/unload_lora_adapter", api.unload_adapter, methods=["POST"]),
        # vLLM's tokenizer routes at the root, where lm-eval's local-completions probes them (serve.tokens)
        Route("/tokenizer_info", api.tokenizer_info, methods=["GET"]),
        Route("/tokenize", api.tokenizer_route(tokens.tokenize), methods=["POST"]),
        Route("/detokenize", api.tokenizer_route(tokens.detokenize), methods=["POST"]),
        Route("/health", api.health, methods=["GET"]),
        Route("/metrics", api.metrics_page, methods=["GET"]),
    ]
    metrics = api.metrics = Metrics(state.stats, [r.path for r in routes], state.adapter_count, state.prefix_stats)
    api.transport = Transport(settings.model_name, settings.max_body_bytes, settings.read_timeout, metrics)
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


class Counting(Protocol):
    """What the guard tells of each answer (``Metrics``; the embedding app keeps its own counts)."""

    def count(self, path: str, status: int) -> None: ...


class _Guard:
    """Pure ASGI middleware: counts every answer by endpoint and status, refuses oversized bodies (413, from
    ``Content-Length``; a chunked body is counted as it is read) and checks the API key (401)."""

    def __init__(self, app: ASGIApp, settings: Settings, metrics: Counting) -> None:
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
                return too_large(self.settings.max_body_bytes)
        return None


# -- the endpoints ----------------------------------------------------------------------------------------------
class _Api(AdapterRoutes):
    metrics: Metrics  # set by create_app, once the routes it counts exist
    transport: Transport  # ... with them

    def __init__(self, state: State, settings: Settings, extra: Callable[[], dict[str, Any]] | None = None) -> None:
        self.state = state
        self.settings = settings
        self.extra = extra

    def _ready(self) -> tuple[er.Model, er.Engine]:
        s = self.state
        if s.draining:
            raise shutting_down()
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
        if s.model is not None and s.model.adapters.layout is not None:  # a graph that takes adapters
            answer["adapters"] = len(s.model.adapters)
        if self.extra is not None:
            answer.update(await run_in_threadpool(self.extra))
        return JSONResponse(answer)

    async def metrics_page(self, request: Request) -> Response:
        body, media = self.metrics.render()
        return Response(body, media_type=media)

    def _model_entry(self) -> dict[str, Any]:
        s = self.state
        served = self.settings.model_name
        entry: dict[str, Any] = {
            "id": served,
            "object": "model",
            "created": int(s.started),
            "owned_by": "edgeroute",
            "root": served,
            "parent": None,
        }
        if s.model is not None:
            entry["context_length"] = s.model.context_length
        return entry

    async def models(self, request: Request) -> Response:
        """``GET /v1/models``: the served model, then each adapter loaded on it."""
        data = [self._model_entry(), *(self._adapter_entry(n) for n in self._adapters())]
        return JSONResponse({"object": "list", "data": data})

    async def model(self, request: Request) -> Response:
        """``GET /v1/models/{id}`` (the clients' ``models.retrieve``): the served model, an adapter, or a 404."""
        wanted = request.path_params["model_id"]
        if wanted == self.settings.model_name:
            return JSONResponse(self._model_entry())
        if wanted in self._adapters():
            return JSONResponse(self._adapter_entry(wanted))
        return error_response(unknown_model(wanted, self.settings.model_name, self.state.model))

    async def tokenizer_info(self, request: Request) -> Response:
        model, _ = self._ready()
        return JSONResponse(tokens.tokenizer_info(model))

    def tokenizer_route(
        self, handle: Callable[[Any, er.Model, str], dict[str, Any]]
    ) -> Callable[[Request], Awaitable[Response]]:
        """The route of ``/tokenize`` or ``/detokenize``: the body read within the limits, ``handle`` in a thread."""

        async def route(request: Request) -> Response:
            model, _ = self._ready()
            body = await self.transport.read_json(request)
            return JSONResponse(await run_in_threadpool(handle, body, model, self.settings.model_name))

        return route

    def generation(self, encoder: Encoder[Any]) -> Callable[[Request], Awaitable[Response]]:
        """The route of a generating endpoint: ``encoder``'s requests through the transport (``serve.transport``)."""

        async def generate(request: Request) -> Response:
            model, engine = self._ready()
            return await self.transport.generate(request, encoder, model, engine)

        return generate
