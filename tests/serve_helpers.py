"""Starting a real server in tests: uvicorn on 127.0.0.1 and a free port, in a thread, stopped afterwards; every
wait bounded in time."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import uvicorn


class Running:
    """An app served by uvicorn in a thread (``with Running(app) as srv: srv.url``)."""

    def __init__(self, app: Any, ready: bool = True) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.wait_ready = ready

    def __enter__(self) -> Running:
        self.thread.start()
        wait_until(lambda: self.server.started, 20)
        if self.wait_ready:
            wait_until(lambda: httpx.get(self.url + "/health", timeout=5).status_code == 200, 20)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()
        assert not self.thread.is_alive(), "the server did not stop"


def wait_until(cond: Callable[[], bool], seconds: float = 10.0, show: Callable[[], Any] | None = None) -> None:
    end = time.monotonic() + seconds
    while True:
        try:
            if cond():
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < end, f"timed out ({show() if show else ''})"
        time.sleep(0.01)


def sse_events(lines: Iterator[str], limit: int = 10_000) -> Iterator[str]:
    """The ``data:`` payloads of a server-sent event stream (at most ``limit``), checking the framing: each event
    is one ``data: ...`` line followed by a blank line."""
    pending = None
    for count, line in enumerate(lines):
        assert count < 2 * limit, "too many lines"
        if pending is None:
            assert line.startswith("data: "), line
            pending = line[len("data: ") :]
        else:
            assert line == "", f"an event is followed by a blank line, not {line!r}"
            yield pending
            pending = None
    assert pending is None, "the stream ended inside an event"


def stream_json(client: httpx.Client, path: str, body: dict[str, Any], **kw: Any) -> list[Any]:
    """Every event of a streamed request, decoded (``[DONE]`` kept as the string)."""
    out: list[Any] = []
    with client.stream("POST", path, json=body, timeout=60, **kw) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for data in sse_events(r.iter_lines()):
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def run_cli(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgeroute.cli", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


@contextlib.contextmanager
def cli_server(*args: str, env: dict | None = None) -> Iterator[tuple[subprocess.Popen, str]]:
    """``edgeroute serve ARGS --port P`` on a free port of 127.0.0.1 as a subprocess, once ``/health`` answers 200
    (at most 60 s): ``(process, url)``; killed afterwards if it still runs (a test stops it with a signal)."""
    port = free_port()
    cmd = [sys.executable, "-m", "edgeroute.cli", "serve", *args, "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(url + "/health", timeout=2).status_code == 200, 60)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def openai_client(server: Running, api_key: str = "unused") -> Any:
    """The official client on ``server``'s ``/v1``: no retries, a bounded timeout."""
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=api_key, max_retries=0, timeout=60)


def alone(model: Any, messages: list[dict[str, Any]], tokens: int = 12, **template: Any) -> Any:
    """What the model answers ``messages`` alone, greedy, ``tokens`` at most (``template``: the chat template's
    variables): what a served answer must equal."""
    import edgeroute as er

    ids = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True, **template)
    return model.generate(ids, er.GenerationConfig(max_new_tokens=tokens, sampling=er.SamplingConfig(temperature=0)))
