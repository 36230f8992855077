"""What every endpoint shares of OpenAI's request and response shapes, with no web framework in them: the error
body (:class:`APIError`), reading a JSON body, the parameters common to every endpoint and the generation configs
of one request (:class:`Parsed`, or an :class:`APIError` naming the parameter), and the pieces of OpenAI's objects
(usage, finish reasons, logprobs). Each endpoint's own fields are its encoder's (``serve.chat``,
``serve.completions``).

Request parameters: OpenAI's (``max_tokens``, ``max_completion_tokens``, ``temperature``, ``top_p``, ``n``,
``stop``, ``seed``, ``presence_penalty``, ``frequency_penalty``, ``logit_bias``, ``logprobs``, ``top_logprobs``,
``stream``, ``stream_options``, ``user``) and edgeroute's router settings as extra body fields (every name
:func:`edgeroute.from_params` takes: ``top_k``, ``min_p``, ``typical_p``, ``repetition_penalty``, ``explore`` ...).
An unknown field is a 400 naming it: nothing is silently dropped.

``model`` names the served model or one of the LoRA adapters loaded on it (vLLM's convention): a request that
names an adapter runs on it (:func:`parse_model`, the config's ``adapter``); any other name is a 404.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import edgeroute as er
from edgeroute.params import PARAMETERS

MAX_N = 16  # choices per request: each is a request of its own in the engine
# generation parameters the server takes itself rather than passing to the router
# an engine setting, a Python object (response_format is JSON's), what echo sets (completions), the server's own, and
# the adapter (named by ``model``, as vLLM does)
_GENERATION_ONLY = {"prefill_chunk", "constraint", "prompt_logprobs", "think_first", "adapter"}
# what a 400 for such a field says besides "not a parameter of this endpoint"
_HINTS = {"adapter": ": name the adapter in model (GET /v1/models lists the served adapters)"}
_COMMON = {"model", "n", "stream", "stream_options", "user"}
_TOOLS = {"tools", "tool_choice", "parallel_tool_calls"}
# what today's OpenAI SDKs and frameworks send that does not change an answer: each is checked for its type and
# otherwise left alone (nothing is stored; ``modalities`` must be ["text"])
INERT = {
    "metadata": dict,
    "store": bool,
    "service_tier": str,
    "prompt_cache_key": str,
    "prompt_cache_retention": str,
    "safety_identifier": str,
    "verbosity": str,
    "modalities": list,
}
# vLLM's extras that serving benchmarks and eval clients send (both endpoints); the chat template's own variables
_VLLM = {"ignore_eos", "skip_special_tokens"}
_TEMPLATE = {"chat_template_kwargs", "reasoning_effort"}
ROUTER_FIELDS = PARAMETERS - _GENERATION_ONLY  # the router's and generation's fields a request may send
CHAT_FIELDS = frozenset(
    _COMMON | {"messages", "response_format"} | _TOOLS | set(INERT) | _VLLM | _TEMPLATE | ROUTER_FIELDS
)
COMPLETION_FIELDS = frozenset(_COMMON | {"prompt", "echo", "best_of", "suffix"} | _VLLM | ROUTER_FIELDS)
MAX_TOKEN_NAMES = ("max_tokens", "max_completion_tokens", "max_new_tokens")
# JSON nesting a request body (and a tool call's arguments) may have: a JSON Schema or a tool's parameters of real
# clients nest < 20 levels; deeper input only serves to exhaust a recursive reader (json, jinja, llguidance)
MAX_JSON_DEPTH = 64


class APIError(Exception):
    """An error answered with OpenAI's body ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        message, param = _printable(message), None if param is None else _printable(param)
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind or _KIND.get(status, "invalid_request_error")
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


_KIND = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


def _printable(text: str) -> str:
    """``text`` as valid Unicode: a lone surrogate the client sent (and an error message echoes) as ``\\udXXX``."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def invalid(param: str | None, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param, code)


def from_config_error(e: er.ConfigError, fallback: str | None = None) -> APIError:
    """A ``ConfigError`` as a 400 naming the parameter (as the request spelled it); an adapter that is not loaded
    (unloaded after the request was read) is the 404 of an unknown ``model``."""
    if e.field == "adapter":
        message = f"The model '{e.value}' does not exist: adapter '{e.value}' {e.reason}"
        return APIError(404, message, "model", "model_not_found")
    param = e.field if e.field in CHAT_FIELDS | COMPLETION_FIELDS else fallback or e.field
    return invalid(param, f"{param}: {e.reason} (got {short(e.value)})")


def short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# -- requests ---------------------------------------------------------------------------------------------------
def load_json(raw: bytes | str, what: str = "the request body", param: str | None = None) -> Any:
    """Parse JSON from a client: a 400 (naming ``param``) for text that is not JSON, an integer json refuses
    (over 4,300 digits), nesting over :data:`MAX_JSON_DEPTH` or a string that is not valid Unicode (a lone
    surrogate escape such as ``"\\ud800"``), anywhere, key or value: nothing later meets such input."""
    try:
        value = json.loads(raw)
    except RecursionError:
        raise invalid(param, f"{what} is nested deeper than {MAX_JSON_DEPTH} levels", "invalid_json") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of too many digits
        detail = str(e).split(";")[0]
        raise invalid(param, f"{what} is not valid JSON: {detail}", "invalid_json") from None
    _check_json(value, what, param)
    return value


def _check_json(value: Any, what: str, param: str | None) -> None:
    """Depth and Unicode of a parsed JSON value, walked without recursion; the error names the path within."""
    todo: list[tuple[Any, int, str]] = [(value, 1, "")]
    while todo:
        item, depth, path = todo.pop()
        if isinstance(item, str):
            _check_text(item, path, what, param)
        elif isinstance(item, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                where = _clip(path.lstrip(".") or param or "body")
                raise invalid(where, f"{what} is nested deeper than {MAX_JSON_DEPTH} levels (at {where})")
            pairs = item.items() if isinstance(item, dict) else enumerate(item)
            for k, v in pairs:
                if isinstance(k, str):
                    _check_text(k, f"{path}.{k}", what, param)
                    todo.append((v, depth + 1, f"{path}.{k}"))
                else:
                    todo.append((v, depth + 1, f"{path}[{k}]"))


def _clip(path: str, limit: int = 120) -> str:
    return path if len(path) <= limit else path[: limit - 3] + "..."


def _check_text(text: str, path: str, what: str, param: str | None) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        where = _clip(path.lstrip(".") or param or "body")
        message = f"{where}: {what} holds a lone surrogate at character {e.start}: not valid Unicode"
        raise invalid(where, message) from None


@dataclass
class Parsed:
    """One validated request: its prompts (token ids), one config per choice, and how to answer. An endpoint
    whose answers need more of the request (chat's tools, completions' echo) subclasses it."""

    model: str
    prompts: list[list[int]]
    configs: list[list[er.GenerationConfig]]  # [prompt][choice]
    flows: er.Flows
    n: int
    stream: bool
    include_usage: bool

    def choices(self) -> list[tuple[list[int], er.GenerationConfig]]:
        """Every choice's prompt and config, prompt by prompt (choice i of the answer is item i)."""
        return [(ids, cfg) for ids, configs in zip(self.prompts, self.configs, strict=True) for cfg in configs]


def check_type(body: Mapping[str, Any], name: str, types: type | tuple[type, ...], what: str) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise invalid(name, f"{name} must be {what}, not a boolean", "invalid_type")
    if not isinstance(value, types):
        raise invalid(name, f"{name} must be {what} (got {type(value).__name__})", "invalid_type")
    return value


def parse_model(body: Mapping[str, Any], served: str, model: er.Model | None = None) -> str | None:
    """The body's ``model``: absent, the served name, or the name of an adapter loaded on ``model`` (another is a
    404 ``model_not_found``)."""
    name = check_type(body, "model", str, "a string")
    if name is None or name == served or (model is not None and name in model.adapters):
        return name
    raise unknown_model(name, served, model)


def unknown_model(name: str, served: str, model: er.Model | None = None) -> APIError:
    """The 404 of a ``model`` this server does not serve: the message lists what it does."""
    adapters = model.adapters.names() if model is not None else []
    what = f"'{served}'"
    if adapters:
        shown = ", ".join(f"'{a}'" for a in adapters[:16]) + (", ..." if len(adapters) > 16 else "")
        what += f" and its adapter{'s' if len(adapters) > 1 else ''} {shown}"
    return APIError(404, f"The model '{name}' does not exist (this server serves {what})", "model", "model_not_found")


def adapter_of(name: str, served: str) -> str | None:
    """The adapter a request runs on: None for the served model, else the adapter ``name`` (``parse_model``)."""
    return None if name == served else name


def check_fields(body: Any, allowed: frozenset[str] | set[str]) -> dict[str, Any]:
    """``body`` as a JSON object with no field outside ``allowed`` (else a 400 naming the first unknown one)."""
    if not isinstance(body, dict):
        raise invalid(None, "the request body must be a JSON object", "invalid_type")
    unknown = sorted(set(body) - allowed)
    if unknown:
        hint = _HINTS.get(unknown[0], "")
        raise invalid(unknown[0], f"{unknown[0]} is not a parameter of this endpoint{hint}", "unknown_parameter")
    return body


def parse_common(
    body: Any, allowed: frozenset[str], served: str, model: er.Model | None = None
) -> tuple[str, int, bool, bool]:
    """The common fields: the model's name (``served``, or an adapter's loaded on ``model``), ``n``, ``stream`` and
    ``stream_options.include_usage``."""
    body = check_fields(body, allowed)
    wanted = parse_model(body, served, model)
    check_type(body, "user", str, "a string")
    for name, kind in INERT.items():
        check_type(body, name, kind, f"a{'n' if kind in (dict, list) else ''} {_KIND_NAMES[kind]}")
    if body.get("modalities") is not None and body["modalities"] != ["text"]:
        raise invalid("modalities", 'modalities: this server answers in text only (["text"])', "unsupported_value")
    if body.get("skip_special_tokens") is not None:
        if check_type(body, "skip_special_tokens", bool, "a boolean") is False:
            raise invalid(
                "skip_special_tokens",
                "skip_special_tokens: false is not supported (special tokens are never part of the text)",
                "unsupported_value",
            )
    n = check_type(body, "n", int, "an integer")
    n = 1 if n is None else n
    if not 1 <= n <= MAX_N:
        raise invalid("n", f"n must be in [1, {MAX_N}] (got {n})")
    stream = check_type(body, "stream", bool, "a boolean") or False
    options = check_type(body, "stream_options", dict, "an object")
    include_usage = False
    if options is not None:
        if not stream:
            raise invalid("stream_options", "stream_options is only allowed when stream is true")
        extra = sorted(set(options) - {"include_usage", "continuous_usage_stats"})
        if extra:
            raise invalid(
                f"stream_options.{extra[0]}", f"stream_options.{extra[0]} is not supported", "unknown_parameter"
            )
        usage = options.get("include_usage", False)
        if not isinstance(usage, bool):
            raise invalid(
                "stream_options.include_usage", "stream_options.include_usage must be a boolean", "invalid_type"
            )
        include_usage = usage
    return wanted or served, n, stream, include_usage


_KIND_NAMES = {dict: "object", list: "array", bool: "boolean", str: "string"}


def generation_params(body: Mapping[str, Any]) -> dict[str, Any]:
    """The router's and generation's parameters of ``body``; vLLM's ``ignore_eos`` (true: generate ``max_tokens``
    tokens, the end-of-sequence token suppressed as under ``min_tokens``; stop strings still end the answer) is
    kept under its name for :func:`choice_configs`."""
    params = {k: v for k, v in body.items() if k in PARAMETERS}
    if check_type(body, "ignore_eos", bool, "a boolean"):
        if params.get("stop_token_ids"):
            raise invalid("ignore_eos", "ignore_eos with stop_token_ids is not supported: use one", "unsupported_value")
        params["ignore_eos"] = True
    return params


def choice_configs(
    model: er.Model, params: dict[str, Any], prompts: list[list[int]], n: int, where: str
) -> tuple[list[list[er.GenerationConfig]], er.Flows]:
    """One config per prompt and choice: ``max_tokens`` not given means up to the model's default (256) that fits
    the context; choice i of a seeded request uses ``seed + i`` (same seed, same choices)."""
    params = dict(params)
    ignore_eos = params.pop("ignore_eos", False)
    try:
        config, flows = er.from_params(params, model.manifest.generation_defaults)
    except er.ConfigError as e:
        raise from_config_error(e) from None
    given_max = any(params.get(k) is not None for k in MAX_TOKEN_NAMES)
    ctx = model.context_length
    out = []
    for ids in prompts:
        cfg = config
        room = ctx - len(ids)
        if room < 1 or (given_max and len(ids) + cfg.max_new_tokens > ctx):
            need = len(ids) + (cfg.max_new_tokens if given_max else 1)
            name = next((k for k in MAX_TOKEN_NAMES if params.get(k) is not None), None)
            detail = f" + {name}={cfg.max_new_tokens}" if given_max else ""
            raise APIError(
                400,
                f"This model's context holds {ctx} tokens; the prompt has {len(ids)}{detail}: {need} tokens needed."
                " Shorten the prompt or lower max_tokens.",
                where,
                "context_length_exceeded",
            )
        if not given_max and cfg.max_new_tokens > room:
            try:
                cfg = cfg.replace(max_new_tokens=room)
            except er.ConfigError as e:  # min_tokens above what fits
                raise from_config_error(e) from None
        if ignore_eos:
            cfg = cfg.replace(min_new_tokens=cfg.max_new_tokens)
        seed = cfg.sampling.seed
        row = [cfg if seed is None else cfg.replace(sampling=cfg.sampling.replace(seed=seed + i)) for i in range(n)]
        out.append(row)
    return out, flows


# -- responses --------------------------------------------------------------------------------------------------
def fingerprint(model: er.Model) -> str:
    """``system_fingerprint``: changes when the runtime, the provider or the model's graph does."""
    m = model.manifest
    key = f"{er.__version__}|{model.provider}|{m.graph}|{m.quantization}|{model.context_length}"
    return "fp_" + hashlib.sha256(key.encode()).hexdigest()[:12]


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; ``prompt_tokens_details.cached_tokens``: prompt positions taken from a cache (a slot's
    or the prefix cache), not computed."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def finish(reason: str) -> str:
    """edgeroute's finish reason as OpenAI's: ``length``, else ``stop`` (a stop token or a stop string)."""
    return "length" if reason == "length" else "stop"


def _lp(value: float) -> float:
    return value if math.isfinite(value) else -9999.0  # JSON has no -inf; OpenAI's floor


class TokenText:
    """Token ids -> the strings and bytes of OpenAI's logprobs (cached: a vocabulary is small)."""

    def __init__(self, tokenizer: er.Tokenizer) -> None:
        self.tok = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        got = self._cache.get(token_id)
        if got is None:
            raw = self.tok.token_bytes(token_id)
            got = (raw.decode("utf-8", errors="replace"), list(raw))
            self._cache[token_id] = got
        return got

    def chat_entry(
        self, token_id: int, logprob: float, top: Sequence[tuple[int, float]] | None, stop: bool = False
    ) -> dict[str, Any]:
        """One entry of a chat answer's ``logprobs.content``; ``stop``: the token that ended the answer (counted in
        the usage, not part of the text: its ``token`` is empty)."""
        text, raw = ("", []) if stop else self(token_id)
        alts = []
        for t, v in top or ():
            s, b = self(t)
            alts.append({"token": s, "logprob": _lp(v), "bytes": b})
        return {"token": text, "logprob": _lp(logprob), "bytes": raw, "top_logprobs": alts}

    def prompt_logprobs(self, ids: Sequence[int], scores: Sequence[er.TokenScore], want_top: bool) -> dict[str, Any]:
        """The echoed prompt's part of a completion's ``logprobs``: every prompt token, the first with ``null``
        logprob and top alternatives (nothing comes before it), offsets from the echoed text's start."""
        entries = [(ids[0], None, None), *((s.token_id, s.logprob, s.top) for s in scores)]
        return self.completion_logprobs(entries, 0, want_top)

    def completion_logprobs(
        self,
        entries: Sequence[tuple[int, float | None, Sequence[tuple[int, float]] | None]],
        offset: int,
        want_top: bool,
        text_tokens: int | None = None,
    ) -> dict[str, Any]:
        """A completion's ``logprobs`` object; entries from ``text_tokens`` on (the stop token that ended the
        answer) have an empty token text; an entry without a logprob (a prompt's first token) has ``null`` ones."""
        tokens: list[str] = []
        lps: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        offsets: list[int] = []
        for i, (token_id, logprob, top) in enumerate(entries):
            text = "" if text_tokens is not None and i >= text_tokens else self(token_id)[0]
            offsets.append(offset)
            offset += len(text)
            tokens.append(text)
            lps.append(None if logprob is None else _lp(logprob))
            if want_top:
                tops.append(None if logprob is None else {self(t)[0]: _lp(v) for t, v in top or ()})
        return {
            "tokens": tokens,
            "token_logprobs": lps,
            "top_logprobs": tops if want_top else None,
            "text_offset": offsets,
        }
