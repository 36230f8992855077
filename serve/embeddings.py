"""``edgeroute serve`` for an encoder model (issue 36, first part): for an embedding model OpenAI's
``POST /v1/embeddings`` and text-embeddings-inference's ``POST /embed``; for a classifier TEI's ``POST /predict``
(every label with its score, best first; ``raw_scores`` for the logits); both with ``/v1/models`` and ``/health``.

Requests are batched across clients: each request's texts go to one queue, and a worker thread takes the waiting
requests with the same options (normalise, dimensions, truncation) together, up to :data:`BATCH_TEXTS` texts, into
one :meth:`~edgeroute.EncoderModel.embed` call (which sorts them by length and runs them in token-budget batches);
each request gets its own rows back. A request is checked before it is queued (its inputs, their token counts
against the model's maximum length), so one client's bad input never fails another's.

Bounds: at most :data:`MAX_INPUTS` inputs per request (OpenAI's 2,048), each at most the model's maximum length
unless the request asks to truncate (``truncate: true``, TEI's; vLLM's ``truncate_prompt_tokens`` is not taken),
the body within the server's size limit; the queue holds at most :data:`MAX_QUEUED` requests (then a 429).
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import edgeroute as er
import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .protocol import APIError, check_fields, check_type, invalid, parse_model

MAX_INPUTS = 2048
BATCH_TEXTS = 256
MAX_QUEUED = 256
_OPENAI_FIELDS = frozenset({"model", "input", "encoding_format", "dimensions", "user", "truncate"})
_TEI_FIELDS = frozenset({"inputs", "normalize", "dimensions", "truncate", "truncation_direction"})
_PREDICT_FIELDS = frozenset({"inputs", "raw_scores", "truncate"})


class EmbedQueue:
    """The worker that batches requests across clients (module docstring)."""

    def __init__(self, run: Callable[[list[Any], tuple[Any, ...]], Any]) -> None:
        self.run = run  # (texts, options) -> one result per text
        self._lock = threading.Condition()
        self._waiting: deque[tuple[tuple[Any, ...], list[Any], concurrent.futures.Future[Any]]] = deque()
        self._closed = False
        self.requests = 0
        self.runs = 0
        self._thread = threading.Thread(target=self._work, name="edgeroute-embed", daemon=True)
        self._thread.start()

    def submit(self, inputs: list[Any], options: tuple[Any, ...]) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise APIError(503, "the server is shutting down", None, "shutting_down")
            if len(self._waiting) >= MAX_QUEUED:
                raise APIError(429, f"{MAX_QUEUED} requests are waiting: retry shortly", None, "queue_full")
            self._waiting.append((options, inputs, future))
            self.requests += 1
            self._lock.notify()
        return future

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._thread.join(timeout=30)

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._closed:
                    self._lock.wait()
                if not self._waiting:
                    return
                options, inputs, future = self._waiting.popleft()
                batch = [(inputs, future)]
                count = len(inputs)
                for item in list(self._waiting):  # the waiting requests with the same options join this run
                    if item[0] == options and count + len(item[1]) <= BATCH_TEXTS:
                        self._waiting.remove(item)
                        batch.append((item[1], item[2]))
                        count += len(item[1])
            texts = [t for inputs, _ in batch for t in inputs]
            try:
                vectors = self.run(texts, options)
            except Exception as e:  # noqa: BLE001 - each request of the run hears it
                for _, f in batch:
                    f.set_exception(e)
                continue
            self.runs += 1
            start = 0
            for inputs, f in batch:
                f.set_result(vectors[start : start + len(inputs)])
                start += len(inputs)


def create_embedding_app(model: er.EncoderModel, settings: Any) -> Starlette:
    """The ASGI app of an embedding model (``settings``: ``serve.Settings``: the name, key, body limit)."""
    from .app import _api_error, _Guard, _http_error, _server_error
    from .transport import Transport

    def run(texts: list[Any], options: tuple[Any, ...]) -> Any:  # one result per text (rows, label lists)
        if model.task == "classification":
            raw, truncate = options
            return model.classify(texts, top_k=None, function="none" if raw else None, truncate=truncate)
        normalize, dimensions, truncate = options
        return model.embed(texts, normalize=normalize, dimensions=dimensions, truncate=truncate).vectors

    queue = EmbedQueue(run)
    transport = Transport(settings.model_name, settings.max_body_bytes, settings.read_timeout, None)
    served = settings.model_name
    started = int(time.time())

    def lengths(inputs: Sequence[Any], truncate: bool, where: str) -> int:
        """Check each input's token count (a 400 naming it when over the maximum); the tokens of the request."""
        try:
            counts = model.count_tokens(inputs)
        except er.ConfigError as e:  # a token id outside the vocabulary: named as the request names it
            param = e.field.replace("texts", where, 1)
            raise invalid(param, f"{param}: {e.value} {e.reason}") from None
        total = 0
        for i, n in enumerate(counts):
            if n > model.max_length and not truncate:
                raise invalid(
                    f"{where}[{i}]",
                    f"{where}[{i}] is {n} tokens, over the model's {model.max_length}: shorten it, or send"
                    ' "truncate": true to cut it at the end',
                )
            total += min(n, model.max_length)
        return total

    async def embed(inputs: list[Any], options: tuple[Any, ...]) -> Any:
        future = queue.submit(inputs, options)
        try:
            return await run_in_threadpool(future.result)
        except er.ConfigError as e:
            raise invalid(e.field, f"{e.field}: {e.reason}") from None

    async def openai(request: Request) -> Response:
        body = check_fields(await transport.read_json(request), _OPENAI_FIELDS)
        parse_model(body, served)
        check_type(body, "user", str, "a string")
        inputs = _inputs(body.get("input"), "input")
        fmt = body.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            raise invalid("encoding_format", "encoding_format must be 'float' or 'base64'")
        dimensions = _dimensions(body, model)
        truncate = bool(check_type(body, "truncate", bool, "a boolean"))
        tokens = await run_in_threadpool(lengths, inputs, truncate, "input")
        vectors = await embed(inputs, (None, dimensions, truncate))
        data = [{"object": "embedding", "index": i, "embedding": _encoded(v, fmt)} for i, v in enumerate(vectors)]
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return JSONResponse({"object": "list", "data": data, "model": served, "usage": usage})

    async def tei(request: Request) -> Response:
        body = check_fields(await transport.read_json(request), _TEI_FIELDS)
        inputs = _inputs(body.get("inputs"), "inputs")
        if body.get("truncation_direction") not in (None, "right", "Right"):
            raise invalid("truncation_direction", "truncation_direction: only 'right' (the end is cut)")
        normalize = check_type(body, "normalize", bool, "a boolean")
        dimensions = _dimensions(body, model)
        truncate = bool(check_type(body, "truncate", bool, "a boolean"))
        await run_in_threadpool(lengths, inputs, truncate, "inputs")
        vectors = await embed(inputs, (True if normalize is None else normalize, dimensions, truncate))
        return JSONResponse([[float(x) for x in v] for v in vectors])

    async def predict(request: Request) -> Response:
        """TEI's ``/predict``: each input's labels with their scores, best first (``raw_scores``: the logits)."""
        body = check_fields(await transport.read_json(request), _PREDICT_FIELDS)
        single = isinstance(body.get("inputs"), str)
        inputs = _inputs(body.get("inputs"), "inputs")
        raw = bool(check_type(body, "raw_scores", bool, "a boolean"))
        truncate = bool(check_type(body, "truncate", bool, "a boolean"))
        await run_in_threadpool(lengths, inputs, truncate, "inputs")
        results = await embed(inputs, (raw, truncate))
        answers = [[{"label": x.label, "score": x.score} for x in labels] for labels in results]
        return JSONResponse(answers[0] if single else answers)

    async def models(request: Request) -> Response:
        entry = {"id": served, "object": "model", "created": started, "owned_by": "edgeroute"}
        return JSONResponse({"object": "list", "data": [entry]})

    async def health(request: Request) -> Response:
        answer = {"status": "ok", "model": served, "task": model.task, "requests": queue.requests, "runs": queue.runs}
        return JSONResponse(answer)

    if model.task == "classification":
        routes = [Route("/predict", predict, methods=["POST"])]
    else:
        routes = [Route("/v1/embeddings", openai, methods=["POST"]), Route("/embed", tei, methods=["POST"])]
    routes += [Route("/v1/models", models, methods=["GET"]), Route("/health", health, methods=["GET"])]

    class _Metrics:  # the guard counts answers; this app keeps its counts in /health
        def count(self, path: str, status: int) -> None:
            pass

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await run_in_threadpool(queue.close)

    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={APIError: _api_error, HTTPException: _http_error, Exception: _server_error},
    )
    app.state.embed_queue = queue
    app.add_middleware(_Guard, settings=settings, metrics=_Metrics())
    return app


def _inputs(value: Any, name: str) -> list[Any]:
    """A string, a list of strings, a list of token ids, or a list of lists of token ids -> a list of inputs."""
    if isinstance(value, str):
        value = [value]
    elif isinstance(value, list) and value and all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        value = [value]
    if not isinstance(value, list) or not value:
        raise invalid(name, f"{name} must be a non-empty string or array", "invalid_type")
    if len(value) > MAX_INPUTS:
        raise invalid(name, f"{name} holds {len(value)} inputs: at most {MAX_INPUTS} per request")
    for i, x in enumerate(value):
        ok = (isinstance(x, str) and x != "") or (
            isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x)
        )
        if not ok:
            raise invalid(f"{name}[{i}]", f"{name}[{i}] must be a non-empty string or array of token ids")
    return value


def _dimensions(body: dict[str, Any], model: er.EncoderModel) -> int | None:
    d = check_type(body, "dimensions", int, "an integer")
    if d is not None and not 1 <= d <= model.dimension:
        raise invalid("dimensions", f"dimensions must be in [1, {model.dimension}]")
    return d


def _encoded(vector: np.ndarray, fmt: str) -> Any:
    if fmt == "base64":  # OpenAI's: the little-endian float32 bytes
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector]
