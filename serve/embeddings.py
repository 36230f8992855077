"""``edgeroute serve`` for an encoder model (issue 36): OpenAI's ``POST /v1/embeddings`` and
text-embeddings-inference's ``POST /embed`` (embedding models), TEI's ``POST /predict`` (classifiers: every label
with its score, best first; ``raw_scores`` for the logits; texts or [text, pair] arrays) and ``POST /rerank``
(one-score classifiers such as cross-encoders), ``POST /ner`` (token classifiers: entities shaped as transformers'
pipeline and the Hugging Face inference API give them: ``aggregation_strategy``, ``ignore_labels``, ``stride``,
and edgeroute's ``words``, ``scheme``, ``decode``), TEI's ``POST /tokenize`` (tokens with character offsets), and
``/v1/models``, ``/health``. A route the model's task does not answer is a 400 naming ``model``.

Requests are batched across clients: each request's inputs go to one queue, and a worker thread takes the waiting
requests of the same kind and options together, up to :data:`BATCH_TEXTS` inputs, into one library call (which
sorts them by length and runs them in token-budget batches); each request gets its own results back. A request is
checked before it is queued (its inputs, their token counts against the model's maximum length), so one client's
bad input never fails another's.

Long inputs: refused by default (a 400 naming the input and its token count); TEI's ``truncate: true`` cuts them
at the end; edgeroute's ``overflow``: ``"refuse"``, ``"truncate"`` or ``"chunk"`` (windows, as the library runs
them). Bounds: at most :data:`MAX_INPUTS` inputs per request (OpenAI's 2,048), the body within the server's size
limit, a chunked input at most ``edgeroute.encoder_runs.MAX_WINDOWS`` windows; the queue holds at most
:data:`MAX_QUEUED` requests (then a 429).
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
from edgeroute.encoder_math import spread as _spread
from edgeroute.encoder_runs import MAX_WINDOWS
from edgeroute.ner import AGGREGATIONS
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
_CUT = frozenset({"truncate", "truncation_direction", "overflow"})
_OPENAI_FIELDS = frozenset({"model", "input", "encoding_format", "dimensions", "user"}) | _CUT
_TEI_FIELDS = frozenset({"inputs", "normalize", "dimensions"}) | _CUT
_PREDICT_FIELDS = frozenset({"inputs", "raw_scores", "samples"}) | _CUT
_RERANK_FIELDS = frozenset({"query", "texts", "raw_scores", "return_text"}) | _CUT
_NER_FIELDS = (
    frozenset({"inputs", "aggregation_strategy", "ignore_labels", "stride", "words", "decode", "scheme", "samples"})
    | _CUT
)
_TOKENIZE_FIELDS = frozenset({"inputs", "add_special_tokens"})


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
    """The ASGI app of an encoder model (``settings``: ``serve.Settings``: the name, key, body limit)."""
    from .app import _api_error, _Guard, _http_error, _server_error
    from .transport import Transport

    def run(items: list[Any], options: tuple[Any, ...]) -> Any:  # one result per input, by the request's kind
        kind, *rest = options
        if kind == "predict":
            raw, overflow, samples = rest
            fn = "none" if raw else None
            return model.classify(items, top_k=None, function=fn, overflow=overflow, samples=samples)
        if kind == "rerank":
            raw, overflow = rest
            return model.score_pairs(items, raw_scores=raw, overflow=overflow)
        if kind == "ner":
            return model.entities(items, **dict(rest))
        normalize, dimensions, overflow = rest
        r = model.embed(items, normalize=normalize, dimensions=dimensions, overflow=overflow)
        return list(zip(r.vectors, r.tokens, strict=True))  # (each window's tokens counted)

    queue = EmbedQueue(run)
    transport = Transport(settings.model_name, settings.max_body_bytes, settings.read_timeout, None)
    served = settings.model_name
    started = int(time.time())
    ranks = model.task == "classification" and len(model.labels) == 1

    def need(ok: bool, route: str, what: str) -> None:
        if not ok:
            raise invalid("model", f"{route} needs {what}: the model '{served}' is a {model.task} model")

    def lengths(inputs: Sequence[Any], overflow: str, where: str, stride: int = 0, first: str = "") -> None:
        """Check each input before it is queued, so that no input can fail the requests it would share a run
        with: its token ids, its length (over the maximum and refused), its windows (``chunk``: at most
        ``MAX_WINDOWS``), and for (text, pair) inputs that the first text leaves room for the pair (``first``:
        the parameter that names the first texts, else each input's own name). A 400 naming it."""
        try:
            counts = model.count_tokens(inputs)
        except er.ConfigError as e:  # a token id outside the vocabulary: named as the request names it
            param = e.field.replace("texts", where, 1)
            raise invalid(param, f"{param}: {e.value} {e.reason}") from None
        for i, n in enumerate(counts):
            if n > model.max_length and overflow == "refuse":
                raise invalid(
                    f"{where}[{i}]",
                    f"{where}[{i}] is {n} tokens, over the model's {model.max_length}: shorten it, send"
                    ' "truncate": true to cut it at the end, or "overflow": "chunk" to run it in windows',
                )
            if overflow == "chunk" and model.windows_needed(n, stride) > MAX_WINDOWS:
                raise invalid(f"{where}[{i}]", f"{where}[{i}] is {n} tokens: more than {MAX_WINDOWS} windows")
        firsts = [x[0] for x in inputs if isinstance(x, tuple)]
        if firsts and overflow != "refuse":  # only the pair is cut: the first text and one token must fit
            for i, n in enumerate(model.count_tokens([(x, ".") for x in firsts])):
                if n > model.max_length:
                    param = first or f"{where}[{i}]"
                    raise invalid(param, f"{param} is too long to leave room for its pair in {model.max_length} tokens")

    async def submit(inputs: list[Any], options: tuple[Any, ...]) -> Any:
        future = queue.submit(inputs, options)
        try:
            return await run_in_threadpool(future.result)
        except er.ConfigError as e:
            raise invalid(e.field, f"{e.field}: {e.reason}") from None

    async def body_of(request: Request, fields: frozenset[str]) -> dict[str, Any]:
        return check_fields(await transport.read_json(request), fields)

    async def openai(request: Request) -> Response:
        need(model.task == "embedding", "/v1/embeddings", "an embedding model")
        body = await body_of(request, _OPENAI_FIELDS)
        parse_model(body, served)
        check_type(body, "user", str, "a string")
        inputs = _inputs(body.get("input"), "input")
        fmt = body.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            raise invalid("encoding_format", "encoding_format must be 'float' or 'base64'")
        dimensions = _dimensions(body, model)
        overflow = _overflow(body)
        await run_in_threadpool(lengths, inputs, overflow, "input")
        results = await submit(inputs, ("embed", None, dimensions, overflow))
        data = [{"object": "embedding", "index": i, "embedding": _encoded(v, fmt)} for i, (v, _) in enumerate(results)]
        tokens = sum(n for _, n in results)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return JSONResponse({"object": "list", "data": data, "model": served, "usage": usage})

    async def tei(request: Request) -> Response:
        need(model.task == "embedding", "/embed", "an embedding model")
        body = await body_of(request, _TEI_FIELDS)
        inputs = _inputs(body.get("inputs"), "inputs")
        normalize = check_type(body, "normalize", bool, "a boolean")
        dimensions = _dimensions(body, model)
        overflow = _overflow(body)
        await run_in_threadpool(lengths, inputs, overflow, "inputs")
        results = await submit(inputs, ("embed", True if normalize is None else normalize, dimensions, overflow))
        return JSONResponse([[float(x) for x in v] for v, _ in results])

    async def predict(request: Request) -> Response:
        """TEI's ``/predict``: each input's labels with their scores, best first (``raw_scores``: the logits); an
        input is a text or a [text, pair] array."""
        need(model.task == "classification", "/predict", "a classifier")
        body = await body_of(request, _PREDICT_FIELDS)
        value = body.get("inputs")
        single = isinstance(value, str) or (isinstance(value, list) and len(value) == 2 and _is_pair(value))
        inputs = _pairs_or_texts([value] if single else value, "inputs")
        raw = bool(check_type(body, "raw_scores", bool, "a boolean"))
        overflow = _overflow(body)
        await run_in_threadpool(lengths, inputs, overflow, "inputs")
        samples = check_type(body, "samples", int, "an integer")
        samples = 1 if samples is None else samples
        results = await submit(inputs, ("predict", raw, overflow, samples))
        answers = [[{"label": x.label, "score": x.score} | _spread(x) for x in labels] for labels in results]
        return JSONResponse(answers[0] if single else answers)

    async def rerank(request: Request) -> Response:
        """TEI's ``/rerank``: the texts by their score for the query, best first (``index`` into ``texts``)."""
        need(ranks, "/rerank", "a one-score classifier (a cross-encoder)")
        body = await body_of(request, _RERANK_FIELDS)
        query = body.get("query")
        if not isinstance(query, str) or not query:
            raise invalid("query", "query must be a non-empty string")
        texts = _inputs(body.get("texts"), "texts", text_only=True)
        raw = bool(check_type(body, "raw_scores", bool, "a boolean"))
        with_text = bool(check_type(body, "return_text", bool, "a boolean"))
        overflow = _overflow(body)
        pairs = [(query, t) for t in texts]
        await run_in_threadpool(lengths, pairs, overflow, "texts", 0, "query")
        scored = await submit(pairs, ("rerank", raw, overflow))
        answers = []  # (indices are this request's: the run it shared may have held other requests' texts first)
        for i, r in sorted(enumerate(scored), key=lambda x: -x[1].score):
            answers.append({"index": i, "score": r.score} | ({"text": texts[i]} if with_text else {}))
        return JSONResponse(answers)

    async def ner(request: Request) -> Response:
        """Entities, shaped as transformers' pipeline and the Hugging Face inference API give them."""
        need(model.task == "token-classification", "/ner", "a token classifier")
        body = await body_of(request, _NER_FIELDS)
        single = isinstance(body.get("inputs"), str)
        inputs = _inputs(body.get("inputs"), "inputs", text_only=True)
        options: dict[str, Any] = {"overflow": _overflow(body)}
        for name, param, kind in (
            ("aggregation", "aggregation_strategy", str),
            ("words", "words", str),
            ("decode", "decode", str),
            ("scheme", "scheme", str),
            ("stride", "stride", int),
            ("samples", "samples", int),
        ):
            value = check_type(body, param, kind, "a string" if kind is str else "an integer")
            if value is not None:
                options[name] = value
        if options.get("aggregation", "simple") not in AGGREGATIONS:
            raise invalid("aggregation_strategy", f"aggregation_strategy must be one of {', '.join(AGGREGATIONS)}")
        ignore = body.get("ignore_labels")
        if ignore is not None:
            if not isinstance(ignore, list) or not all(isinstance(x, str) for x in ignore):
                raise invalid("ignore_labels", "ignore_labels must be an array of strings")
            options["ignore_labels"] = tuple(ignore)
        overflow = "chunk" if "stride" in options else options["overflow"]
        stride = options.get("stride", model.default_stride)
        await run_in_threadpool(lengths, inputs, overflow, "inputs", stride if isinstance(stride, int) else 0)
        found = await submit(inputs, ("ner", *sorted(options.items())))
        group = "entity" if options.get("aggregation") == "none" else "entity_group"
        answers = [
            [
                {group: e.label, "score": e.score, "word": e.word, "start": e.start, "end": e.end}
                | ({"index": e.index} if e.index is not None else {})
                | _spread(e)
                for e in entities
            ]
            for entities in found
        ]
        return JSONResponse(answers[0] if single else answers)

    async def tokenize(request: Request) -> Response:
        """TEI's ``/tokenize``: each text's tokens with their character offsets (special tokens: null)."""
        body = await body_of(request, _TOKENIZE_FIELDS)
        inputs = _inputs(body.get("inputs"), "inputs", text_only=True)
        specials = check_type(body, "add_special_tokens", bool, "a boolean")
        encodings = await run_in_threadpool(model.encodings, inputs, specials is not False)
        answers = []
        for text, enc in zip(inputs, encodings, strict=True):
            answers.append(
                [
                    {"id": i, "text": text[a:b] if not s else tok, "special": bool(s)}
                    | ({"start": None, "stop": None} if s else {"start": a, "stop": b})
                    for i, tok, (a, b), s in zip(enc.ids, enc.tokens, enc.offsets, enc.special_tokens_mask, strict=True)
                ]
            )
        return JSONResponse(answers)

    async def models(request: Request) -> Response:
        entry = {"id": served, "object": "model", "created": started, "owned_by": "edgeroute"}
        return JSONResponse({"object": "list", "data": [entry]})

    async def health(request: Request) -> Response:
        answer = {"status": "ok", "model": served, "task": model.task, "requests": queue.requests, "runs": queue.runs}
        return JSONResponse(answer)

    routes = [
        Route("/v1/embeddings", openai, methods=["POST"]),
        Route("/embed", tei, methods=["POST"]),
        Route("/predict", predict, methods=["POST"]),
        Route("/rerank", rerank, methods=["POST"]),
        Route("/ner", ner, methods=["POST"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ]

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


def _is_pair(x: Any) -> bool:
    return isinstance(x, list) and len(x) == 2 and all(isinstance(t, str) and t for t in x)


def _pairs_or_texts(value: Any, name: str) -> list[Any]:
    """TEI's ``/predict`` inputs: texts, or [text, pair] arrays -> strings and (text, pair) tuples."""
    if not isinstance(value, list) or not value:
        raise invalid(name, f"{name} must be a non-empty string or array", "invalid_type")
    if len(value) > MAX_INPUTS:
        raise invalid(name, f"{name} holds {len(value)} inputs: at most {MAX_INPUTS} per request")
    out: list[Any] = []
    for i, x in enumerate(value):
        if _is_pair(x):
            out.append((x[0], x[1]))
        elif isinstance(x, str) and x:
            out.append(x)
        else:
            raise invalid(f"{name}[{i}]", f"{name}[{i}] must be a non-empty string or a [text, pair] array")
    return out


def _overflow(body: dict[str, Any]) -> str:
    """The request's handling of long inputs: TEI's ``truncate`` (true: cut at the end) or edgeroute's
    ``overflow`` (refuse, truncate, chunk); refuse by default."""
    if body.get("truncation_direction") not in (None, "right", "Right"):
        raise invalid("truncation_direction", "truncation_direction: only 'right' (the end is cut)")
    truncate = check_type(body, "truncate", bool, "a boolean")
    overflow = check_type(body, "overflow", str, "a string")
    if overflow is not None and overflow not in ("refuse", "truncate", "chunk"):
        raise invalid("overflow", "overflow must be 'refuse', 'truncate' or 'chunk'")
    if truncate is not None and overflow is not None and (overflow == "truncate") != truncate:
        raise invalid("truncate", f"truncate: {str(truncate).lower()} contradicts overflow: {overflow!r}")
    return overflow or ("truncate" if truncate else "refuse")


def _inputs(value: Any, name: str, text_only: bool = False) -> list[Any]:
    """A string, a list of strings, a list of token ids, or a list of lists of token ids (``text_only``: strings
    only) -> a list of inputs."""
    if isinstance(value, str):
        value = [value]
    elif (
        not text_only
        and isinstance(value, list)
        and value
        and all(isinstance(x, int) and not isinstance(x, bool) for x in value)
    ):
        value = [value]
    if not isinstance(value, list) or not value:
        raise invalid(name, f"{name} must be a non-empty string or array", "invalid_type")
    if len(value) > MAX_INPUTS:
        raise invalid(name, f"{name} holds {len(value)} inputs: at most {MAX_INPUTS} per request")
    for i, x in enumerate(value):
        ok = (isinstance(x, str) and x != "") or (
            not text_only
            and isinstance(x, list)
            and x
            and all(isinstance(t, int) and not isinstance(t, bool) for t in x)
        )
        if not ok:
            what = "string" if text_only else "string or array of token ids"
            raise invalid(f"{name}[{i}]", f"{name}[{i}] must be a non-empty {what}")
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
