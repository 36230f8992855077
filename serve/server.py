"""Running the app under uvicorn: the model loads in the background (``/health`` says 503 until it is ready), and
SIGINT/SIGTERM stop it cleanly: no new connections, running streams get ``grace`` seconds to finish and are then
cancelled (their slots freed), the engine closes, and :func:`serve` returns (the command exits 0)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import edgeroute as er
import uvicorn

from .app import Settings, create_app

GRACE_SECONDS = 3  # a running stream's time to finish after Ctrl-C / SIGTERM before it is cancelled


class _Server(uvicorn.Server):
    """uvicorn's server, except that a signal it handled is not raised again once it has shut down (uvicorn does
    that so a parent sees the signal; a command that shut down cleanly exits 0 instead)."""

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


def serve(
    model: str | Path | Callable[[], er.Model],
    settings: Settings,
    host: str = "127.0.0.1",
    port: int = 8000,
    provider: str = "cpu",
    threads: int | None = None,
    context_size: int | None = None,
    grace: int = GRACE_SECONDS,
    log_level: str = "info",
    cuda_graph: bool = False,
) -> None:
    """Serve ``model`` (a folder, loaded in the background, or a callable that loads one) until a signal.

    Raises what loading raised (``ModelLoadError``, ``ProviderUnavailableError``, ...) after the server stopped,
    when the model could not be loaded."""
    if callable(model):
        load = model
    else:
        folder = Path(model)
        er.Manifest.load(folder)  # a missing or broken folder is the caller's error now, not a 503 later

        def load() -> er.Model:
            return er.Model.load(
                folder, provider=provider, threads=threads, context_size=context_size, cuda_graph=cuda_graph
            )

    failed: list[BaseException] = []
    server: _Server | None = None

    def on_load_error(e: BaseException) -> None:
        failed.append(e)
        if server is not None:
            server.should_exit = True

    app = create_app(load, settings, on_load_error)
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=grace, lifespan="on", access_log=False
    )
    server = _Server(config)
    server.run()
    if failed:
        raise failed[0]
