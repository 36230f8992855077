"""OpenAI's request and response shapes, with no web framework in them: a JSON body -> the prompts and configs
of one request (or an :class:`APIError` naming the parameter), and the engine's results -> OpenAI's objects.

Request parameters: OpenAI's (``max_tokens``, ``max_completion_tokens``, ``temperature``, ``top_p``, ``n``,
``stop``, ``seed``, ``presence_penalty``, ``frequency_penalty``, ``logit_bias``, ``logprobs``, ``top_logprobs``,
``stream``, ``stream_options``, ``user``) and edgeroute's router settings as extra body fields (every name
:func:`edgeroute.from_params` takes: ``top_k``, ``min_p``, ``typical_p``, ``repetition_penalty``, ``explore`` ...).
An unknown field is a 400 naming it: nothing is silently dropped.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import edgeroute as er
from edgeroute.params import PARAMETERS

if TYPE_CHECKING:
    from .tools import Tools

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_N = 16  # choices per request: each is a request of its own in the engine
# generation parameters the server takes itself rather than passing to the router
_GENERATION_ONLY = {"prefill_chunk", "constraint"}  # an engine setting, and a Python object (response_format is JSON's)
_COMMON = {"model", "n", "stream", "stream_options", "user"}
_TOOLS = {"tools", "tool_choice", "parallel_tool_calls"}
CHAT_FIELDS = frozenset(_COMMON | {"messages", "response_format"} | _TOOLS | (PARAMETERS - _GENERATION_ONLY))
COMPLETION_FIELDS = frozenset(_COMMON | {"prompt", "echo", "best_of", "suffix"} | (PARAMETERS - _GENERATION_ONLY))
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
    """A ``ConfigError`` as a 400 naming the parameter (as the request spelled it)."""
    param = e.field if e.field in CHAT_FIELDS | COMPLETION_FIELDS else fallback or e.field
    return invalid(param, f"{param}: {e.reason} (got {_short(e.value)})")


def _short(value: Any) -> str:
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
    """One validated request: its prompts (token ids), one config per choice, and how to answer."""

    kind: str  # "chat" or "completion"
    model: str
    prompts: list[list[int]]
    configs: list[list[er.GenerationConfig]]  # [prompt][choice]
    flows: er.Flows
    n: int
    stream: bool
    include_usage: bool
    echo: bool = False
    prompt_texts: list[str] = field(default_factory=list)
    tools: Tools | None = None


def _check_type(body: Mapping[str, Any], name: str, types: type | tuple[type, ...], what: str) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise invalid(name, f"{name} must be {what}, not a boolean", "invalid_type")
    if not isinstance(value, types):
        raise invalid(name, f"{name} must be {what} (got {type(value).__name__})", "invalid_type")
    return value


def _common(body: Any, allowed: frozenset[str], served: str) -> tuple[str, int, bool, bool]:
    if not isinstance(body, dict):
        raise invalid(None, "the request body must be a JSON object", "invalid_type")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise invalid(unknown[0], f"{unknown[0]} is not a parameter of this endpoint", "unknown_parameter")
    model = _check_type(body, "model", str, "a string")
    if model is not None and model != served:
        raise APIError(
            404, f"The model '{model}' does not exist (this server serves '{served}')", "model", "model_not_found"
        )
    _check_type(body, "user", str, "a string")
    n = _check_type(body, "n", int, "an integer")
    n = 1 if n is None else n
    if not 1 <= n <= MAX_N:
        raise invalid("n", f"n must be in [1, {MAX_N}] (got {n})")
    stream = _check_type(body, "stream", bool, "a boolean") or False
    options = _check_type(body, "stream_options", dict, "an object")
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
    return model or served, n, stream, include_usage


def _params(body: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k in PARAMETERS}


def _configs(
    model: er.Model, params: dict[str, Any], prompts: list[list[int]], n: int, where: str
) -> tuple[list[list[er.GenerationConfig]], er.Flows]:
    """One config per prompt and choice: ``max_tokens`` not given means up to the model's default (256) that fits
    the context; choice i of a seeded request uses ``seed + i`` (same seed, same choices)."""
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
        seed = cfg.sampling.seed
        row = [cfg if seed is None else cfg.replace(sampling=cfg.sampling.replace(seed=seed + i)) for i in range(n)]
        out.append(row)
    return out, flows


def parse_chat(body: Any, model: er.Model, served: str, plain_content: bool = False) -> Parsed:
    """A chat request; ``plain_content``: message contents tokenised as plain text (``Settings.plain_content``)."""
    from .tools import parse_tools, render_messages

    name, n, stream, include_usage = _common(body, CHAT_FIELDS, served)
    params = _params(body)
    tools = parse_tools(body)
    constraint = _response_format(body)
    if constraint is not None:
        if tools is not None:
            raise invalid(
                "response_format", "response_format with tools is not supported: use one", "unsupported_value"
            )
        params["constraint"] = constraint
    elif tools is not None:
        params["constraint"] = tools.constraint()
    # a guided_* field besides response_format or tools: from_params refuses the pair, naming the guided_* field
    messages = _messages(body.get("messages"))
    if any("tool_calls" in m for m in messages):
        messages = _show_calls(messages, model.tokenizer)
    if _check_type(body, "logprobs", bool, "a boolean") is not True and body.get("top_logprobs") is not None:
        raise invalid("top_logprobs", "top_logprobs needs logprobs: true")
    try:
        if tools is not None:
            ids = render_messages(messages, tools, model.tokenizer, plain_content)
        else:
            ids = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True, plain_content=plain_content)
    except er.ConfigError as e:
        raise invalid("messages", f"messages: {e.reason}") from None
    except er.ChatTemplateError as e:
        raise invalid("messages", f"the model's chat template cannot render these messages: {e}") from None
    configs, flows = _configs(model, params, [ids], n, "messages")
    return Parsed("chat", name, [ids], configs, flows, n, stream, include_usage, tools=tools)


def _response_format(body: Mapping[str, Any]) -> er.Constraint | None:
    """OpenAI's ``response_format``: ``text`` (no constraint), ``json_object``, or ``json_schema`` with ``name``,
    ``schema``, ``strict`` and ``description`` (the answer always follows the schema: strict or not)."""
    fmt = _check_type(body, "response_format", dict, "an object")
    if fmt is None or fmt.get("type") == "text":
        return None
    kind = fmt.get("type")
    if kind == "json_object":
        return er.JsonObject()
    if kind != "json_schema":
        raise invalid("response_format.type", "response_format.type must be 'text', 'json_object' or 'json_schema'")
    spec = fmt.get("json_schema")
    where = "response_format.json_schema"
    if not isinstance(spec, dict):
        raise invalid(where, f"{where} must be an object with a name and a schema", "invalid_type")
    extra = sorted(set(spec) - {"name", "schema", "strict", "description"})
    if extra:
        raise invalid(f"{where}.{extra[0]}", f"{where}.{extra[0]} is not supported", "unknown_parameter")
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise invalid(f"{where}.name", f"{where}.name is required (a string)", "missing_required_parameter")
    if spec.get("strict") is not None and not isinstance(spec.get("strict"), bool):
        raise invalid(f"{where}.strict", f"{where}.strict must be a boolean", "invalid_type")
    schema = spec.get("schema", {})
    try:
        return er.JsonSchema(schema, name=name)
    except er.ConfigError as e:
        raise invalid(f"{where}.schema", f"{where}.schema: {e.reason}") from None


def _messages(messages: Any) -> list[dict[str, Any]]:
    if messages is None:
        raise invalid("messages", "messages is required", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "messages must be a non-empty array of message objects", "invalid_type")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise invalid(where, f"{where} must be an object with a role and a content", "invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise invalid(f"{where}.role", f"{where}.role must be one of {', '.join(ROLES)} (got {_short(role)})")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise invalid(
                        f"{where}.content[{j}]",
                        f"{where}.content[{j}]: only text parts are supported",
                        "unsupported_value",
                    )
                parts.append(part["text"])
            content = "".join(parts)
        if content is None and role != "assistant":
            raise invalid(f"{where}.content", f"{where}.content is required", "missing_required_parameter")
        if content is not None and not isinstance(content, str):
            raise invalid(
                f"{where}.content", f"{where}.content must be a string or an array of text parts", "invalid_type"
            )
        allowed = {"role", "content", "name"} | ({"tool_calls"} if role == "assistant" else set())
        allowed |= {"tool_call_id"} if role == "tool" else set()
        extra = sorted(set(m) - allowed)
        if extra:
            raise invalid(f"{where}.{extra[0]}", f"{where}.{extra[0]} is not supported", "unsupported_value")
        msg: dict[str, Any] = {"role": role, "content": content or ""}
        if m.get("name") is not None:
            if not isinstance(m["name"], str):
                raise invalid(f"{where}.name", f"{where}.name must be a string", "invalid_type")
            msg["name"] = m["name"]
        if m.get("tool_calls") is not None:
            msg["tool_calls"] = _tool_calls(m["tool_calls"], f"{where}.tool_calls")
        if role == "tool":
            tid = m.get("tool_call_id")
            if not isinstance(tid, str):
                raise invalid(
                    f"{where}.tool_call_id",
                    f"{where}.tool_call_id is required (a string)",
                    "missing_required_parameter",
                )
            msg["tool_call_id"] = tid
        out.append(msg)
    return out


def _show_calls(messages: list[dict[str, Any]], tokenizer: er.Tokenizer) -> list[dict[str, Any]]:
    """For a chat template that does not render ``tool_calls``, an assistant message with calls and no content
    shows its calls as the JSON the model writes for one (the conversation reads as it happened)."""
    bare = [{k: v for k, v in m.items() if k != "tool_calls"} for m in messages]
    try:
        if tokenizer.render_chat(messages) != tokenizer.render_chat(bare):
            return messages
    except (er.ConfigError, er.ChatTemplateError):
        return messages  # the render below reports it
    for m, orig in zip(bare, messages, strict=True):
        if orig.get("tool_calls") and not m["content"]:
            m["content"] = "\n".join(
                json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]}, ensure_ascii=False)
                for c in orig["tool_calls"]
            )
    return bare


def _tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    """An assistant message's ``tool_calls``, with their JSON ``arguments`` as objects (what chat templates read)."""
    if not isinstance(calls, list):
        raise invalid(where, f"{where} must be an array", "invalid_type")
    out = []
    for i, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise invalid(
                f"{where}[{i}]",
                f'{where}[{i}] must be {{"id", "type": "function", "function": {{"name", "arguments"}}}}',
                "invalid_type",
            )
        args = fn.get("arguments", "{}")
        name = f"{where}[{i}].function.arguments"
        parsed = load_json(args, name, name) if isinstance(args, str) else args
        out.append({"id": call.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": parsed}})
    return out


def parse_completion(body: Any, model: er.Model, served: str) -> Parsed:
    name, n, stream, include_usage = _common(body, COMPLETION_FIELDS, served)
    echo = _check_type(body, "echo", bool, "a boolean") or False
    best_of = _check_type(body, "best_of", int, "an integer")
    if best_of is not None and best_of != n:
        raise invalid(
            "best_of", f"best_of must equal n ({n}): choosing the best of several is not supported", "unsupported_value"
        )
    if body.get("suffix") is not None:
        raise invalid("suffix", "suffix (insertion) is not supported", "unsupported_value")
    logprobs = body.get("logprobs")
    if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)):
        raise invalid("logprobs", "logprobs must be an integer in [0, 20] for completions", "invalid_type")
    if echo and logprobs is not None:
        raise invalid("echo", "echo with logprobs (the prompt's logprobs) is not supported", "unsupported_value")
    if body.get("top_logprobs") is not None:
        raise invalid(
            "top_logprobs", "top_logprobs is a chat parameter: completions take logprobs: int", "unknown_parameter"
        )
    prompts, texts = _prompts(body.get("prompt"), model)
    configs, flows = _configs(model, _params(body), prompts, n, "prompt")
    return Parsed("completion", name, prompts, configs, flows, n, stream, include_usage, echo, texts)


def _prompts(prompt: Any, model: er.Model) -> tuple[list[list[int]], list[str]]:
    """OpenAI's four prompt shapes: a string, strings, token ids, lists of token ids."""
    if prompt is None:
        raise invalid("prompt", "prompt is required", "missing_required_parameter")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and _ids(prompt)):
        items: list[Any] = [prompt]
    elif isinstance(prompt, list) and prompt:
        items = prompt
    else:
        raise invalid(
            "prompt", "prompt must be a string, an array of strings, token ids or arrays of token ids", "invalid_type"
        )
    if len(items) > MAX_N:
        raise invalid("prompt", f"at most {MAX_N} prompts per request (got {len(items)})")
    ids_out, texts = [], []
    for i, item in enumerate(items):
        where = "prompt" if len(items) == 1 else f"prompt[{i}]"
        if not (isinstance(item, str) or (isinstance(item, list) and _ids(item))):
            raise invalid(where, f"{where} must be a string or an array of token ids", "invalid_type")
        try:
            ids = model.encode_prompt(item)
        except er.ConfigError as e:
            raise invalid(where, f"{where}: {e.reason}") from None
        bad = [t for t in ids if not 0 <= t < model.vocab_size]
        if bad:
            raise invalid(where, f"{where}: token id {bad[0]} is outside the vocabulary [0, {model.vocab_size})")
        ids_out.append(ids)
        texts.append(item if isinstance(item, str) else model.tokenizer.decode(ids))
    return ids_out, texts


def _ids(items: list[Any]) -> bool:
    return bool(items) and all(isinstance(t, int) and not isinstance(t, bool) for t in items)


# -- responses --------------------------------------------------------------------------------------------------
def fingerprint(model: er.Model) -> str:
    """``system_fingerprint``: changes when the runtime, the provider or the model's graph does."""
    m = model.manifest
    key = f"{er.__version__}|{model.provider}|{m.graph}|{m.quantization}|{model.context_length}"
    return "fp_" + hashlib.sha256(key.encode()).hexdigest()[:12]


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
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

    def chat_entry(self, token_id: int, logprob: float, top: Sequence[tuple[int, float]] | None) -> dict[str, Any]:
        text, raw = self(token_id)
        alts = []
        for t, v in top or ():
            s, b = self(t)
            alts.append({"token": s, "logprob": _lp(v), "bytes": b})
        return {"token": text, "logprob": _lp(logprob), "bytes": raw, "top_logprobs": alts}

    def completion_logprobs(
        self, entries: Sequence[tuple[int, float, Sequence[tuple[int, float]] | None]], offset: int, want_top: bool
    ) -> dict[str, Any]:
        tokens, lps, tops, offsets = [], [], [], []
        for token_id, logprob, top in entries:
            text, _ = self(token_id)
            offsets.append(offset)
            offset += len(text)
            tokens.append(text)
            lps.append(_lp(logprob))
            if want_top:
                tops.append({self(t)[0]: _lp(v) for t, v in top or ()})
        return {
            "tokens": tokens,
            "token_logprobs": lps,
            "top_logprobs": tops if want_top else None,
            "text_offset": offsets,
        }
