"""Running the app under uvicorn: the model loads in the background (``/health`` says 503 until it is ready), and
SIGINT/SIGTERM drain it: the listening socket closes at once, running and queued requests get ``grace`` seconds to
finish, then the engine closes (each stream still running ends with an error event, a ``shutting_down`` 503 and
``data: [DONE]``; each whole answer still waiting gets that 503 as JSON), and :func:`serve` returns (the command
exits 0). A second Ctrl-C ends the grace period at once; the drain is the same.

Connections are bounded (``Settings.max_connections`` open at once: one more is closed as it arrives) and so is the time
a client may take to send a request (``Settings.read_timeout`` seconds for its headers, from the connection or from the
previous answer, and as long again for its body, ``serve.app``): a client that trickles bytes holds nothing long.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import edgeroute as er
import uvicorn
from edgeroute.encoder import is_encoder_folder
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from .app import Settings, create_app

GRACE_SECONDS = 3  # a running request's time to finish after Ctrl-C / SIGTERM before the engine closes
FLUSH_SECONDS = 2  # after the engine closed: time for the last events and 503s to reach their clients
log = logging.getLogger("edgeroute.serve")


def guarded_protocol(base: type[Any], read_timeout: float, max_connections: int) -> type[Any]:
    """uvicorn's HTTP protocol (``base``) with a bound on open connections and on the time a request's headers take
    to arrive (uvicorn has neither: its keep-alive timer stops at a connection's first byte)."""

    class Guarded(base):
        _timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                log.warning("refused a connection: %d are open (max %d)", len(self.connections) - 1, max_connections)
                transport.abort()
                return
            self._arm()

        def _arm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
            seen = self.cycle

            def expire() -> None:
                idle = self.cycle is None or self.cycle.response_complete
                if self.cycle is seen and idle and not self.transport.is_closing():
                    self.transport.abort()  # no (complete) request since the timer started: a slow sender

            self._timer = self.loop.call_later(read_timeout, expire)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._timer is not None:
                self._timer.cancel()
            super().connection_lost(exc)

    return Guarded


class _Server(uvicorn.Server):
    """uvicorn's server, draining the app before uvicorn's own shutdown (which would cancel running requests
    mid-answer), and not raising a handled signal again once it has shut down (uvicorn does that so a parent sees
    the signal; a command that shut down cleanly exits 0 instead)."""

    def __init__(self, config: uvicorn.Config, drain: Callable[[Callable[[], bool]], Any]) -> None:
        super().__init__(config)
        self.drain = drain

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:  # stop accepting now; uvicorn's shutdown below closes the rest
            server.close()
        for sock in sockets or []:
            sock.close()
        await self.drain(lambda: self.force_exit)
        # the answers the engine's close just ended write their last events: let them, even after a second Ctrl-C
        # (uvicorn then waits for nothing)
        end = time.monotonic() + FLUSH_SECONDS
        while self.server_state.tasks and time.monotonic() < end:
            await asyncio.sleep(0.02)
        await super().shutdown(sockets)
        if self.force_exit:  # uvicorn skips the app's lifespan shutdown then: its task would die with a traceback
            await self.lifespan.shutdown()


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (before the model loads: an address in use is one line and exit 1)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def serve(
    model: str | Path | Callable[[], er.Model],
    settings: Settings,
    host: str = "127.0.0.1",
    port: int = 8000,
    provider: str = "cpu",
    threads: int | None = None,
    context_size: int | None = None,
    grace: float = GRACE_SECONDS,
    log_level: str = "info",
    cuda_graph: bool = False,
    load_options: Mapping[str, Any] | None = None,
) -> None:
    """Serve ``model`` (a folder, loaded in the background, or a callable that loads one) until a signal.
    ``load_options``: more of ``Model.load``'s options (``max_adapters``: the most LoRA adapters loaded at once;
    ``prefix_cache``, ``prefix_cache_memory``, ``prefix_cache_disk``); the adapters of ``settings.adapters`` are
    loaded with the model.

    Raises ``OSError`` when ``host:port`` cannot be bound, and what loading raised (``ModelLoadError``,
    ``ProviderUnavailableError``, ...) after the server stopped, when the model could not be loaded."""
    if not callable(model) and is_encoder_folder(model):  # an embedding model: its own small app (serve.embeddings)
        if settings.adapters:
            raise er.ConfigError("adapters", sorted(settings.adapters), "an encoder model takes no LoRA adapters")
        _serve_encoder(Path(model), settings, host, port, provider, threads, log_level)
        return
    if callable(model):
        load = model
    else:
        folder = Path(model)
        er.Manifest.load(folder)  # a missing or broken folder is the caller's error now, not a 503 later

        extra = dict(load_options or {})

        def load() -> er.Model:
            return er.Model.load(
                folder, provider=provider, threads=threads, context_size=context_size, cuda_graph=cuda_graph, **extra
            )

    sock = listen(host, port)
    failed: list[BaseException] = []
    server: _Server | None = None

    def on_load_error(e: BaseException) -> None:
        failed.append(e)
        if server is not None:
            server.should_exit = True

    app = create_app(load, settings, on_load_error)
    config = _config(app, settings, log_level)
    state = app.state.edgeroute
    server = _Server(config, lambda forced: state.drain(grace, forced))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if failed:
        raise failed[0]


def _config(app: Any, settings: Settings, log_level: str) -> uvicorn.Config:
    """uvicorn's configuration for one of the apps: its own request-read guard, no access log."""
    return uvicorn.Config(
        app,
        log_level=log_level,
        timeout_graceful_shutdown=FLUSH_SECONDS,
        lifespan="on",
        access_log=False,
        http=guarded_protocol(AutoHTTPProtocol, settings.read_timeout, settings.max_connections),
    )


def _serve_encoder(
    folder: Path, settings: Settings, host: str, port: int, provider: str, threads: int | None, log_level: str
) -> None:
    """Serve an embedding model (``serve.embeddings``) until a signal: loaded before the socket opens."""
    from .embeddings import create_embedding_app

    model = er.EncoderModel.load(folder, provider, threads)
    sock = listen(host, port)
    app = create_embedding_app(model, settings)
    config = _config(app, settings, log_level)

    async def drain(forced: Callable[[], bool]) -> None:  # the queue finishes what it holds (its close joins it)
        await asyncio.to_thread(app.state.embed_queue.close)

    try:
        _Server(config, drain).run(sockets=[sock])
    finally:
        sock.close()
