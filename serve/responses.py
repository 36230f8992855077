"""``POST /v1/responses``: OpenAI's Responses API as a thin layer over chat. The request's ``input`` items,
``instructions``, ``text.format``, function ``tools`` and ``tool_choice`` become a chat request (``serve.chat``
parses and renders it); the answer becomes a ``response`` object whose ``output`` holds a ``message`` (its
``output_text``), a ``function_call`` or, for a reasoning model, a ``reasoning`` item first. Streamed, it is
OpenAI's event sequence (``response.created`` ... ``response.output_text.delta`` ... ``response.completed``).

Stateless: nothing is stored, so ``previous_response_id`` is a 400 (send the whole conversation as ``input``).
With tools, or for a reasoning model, a stream sends each output item whole when the answer ends (its text is
only known to be a call, or an answer after thinking, then).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, cast

import edgeroute as er

from .chat import ChatEncoder, ChatRequest, parse_chat
from .encoder import ChoiceStream, Encoder, Reply
from .protocol import MAX_TOKEN_NAMES, ROUTER_FIELDS, APIError, TokenText, check_fields, check_type, invalid, short

_FIELDS = {
    "model",
    "input",
    "instructions",
    "max_output_tokens",
    "temperature",
    "top_p",
    "text",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "stream",
    "store",
    "metadata",
    "user",
    "previous_response_id",
    "reasoning",
    "truncation",
    "service_tier",
    "safety_identifier",
    "prompt_cache_key",
    "prompt_cache_retention",
    "include",
    "top_logprobs",
}
# the router's extra fields as chat takes them (the length is max_output_tokens here)
_ROUTER = ROUTER_FIELDS - set(MAX_TOKEN_NAMES)
# fields chat takes under the same name and meaning
_AS_IN_CHAT = {"model", "stream", "user", "metadata", "store", "service_tier", "safety_identifier"}
_AS_IN_CHAT |= {"prompt_cache_key", "prompt_cache_retention", "temperature", "top_p", "parallel_tool_calls"}
# what ``include`` may ask: the answer's logprobs; reasoning's encrypted content, which this server never makes
# (reasoning items come back in clear: there is nothing to encrypt for a later stateless turn)
INCLUDES = ("message.output_text.logprobs", "reasoning.encrypted_content")
# chat's parameter names in its errors -> this endpoint's
_RENAMED = (("messages", "input"), ("response_format.json_schema", "text.format"), ("max_tokens", "max_output_tokens"))


@dataclass
class ResponsesRequest(ChatRequest):
    echo_fields: dict[str, Any] = field(default_factory=dict)  # what the response object repeats of the request


class ResponsesEncoder(Encoder[ResponsesRequest]):
    path = "/v1/responses"
    object = "response"
    chunk_object = "response"
    id_prefix = "resp_"
    prompt_param = "input"

    def __init__(self, plain_content: bool = False) -> None:
        self.chat = ChatEncoder(plain_content)

    def parse(self, body: Any, model: er.Model, served: str) -> ResponsesRequest:
        chat_body, echo = to_chat(body)
        try:
            parsed = parse_chat(chat_body, model, served, self.chat.plain_content)
        except APIError as e:
            raise _renamed(e) from None
        values = {f.name: getattr(parsed, f.name) for f in fields(ChatRequest)}
        return ResponsesRequest(**values, echo_fields=echo)

    def reply(self, parsed: ResponsesRequest, texts: TokenText, eos: frozenset[int], fingerprint: str) -> Reply[Any]:
        return ResponsesReply(self, parsed, texts, eos, fingerprint)

    def choice(self, reply: Reply[ResponsesRequest], index: int, completion: er.Completion) -> dict[str, Any]:
        return self.chat.choice(cast(Reply[ChatRequest], reply), index, completion)

    def stream(self, reply: Reply[ResponsesRequest], index: int) -> ChoiceStream:
        raise NotImplementedError  # ResponsesReply renders its own events


def to_chat(body: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The chat request a Responses request stands for, and the request fields the response repeats."""
    body = check_fields(body, _FIELDS | _ROUTER)
    if body.get("previous_response_id") is not None:
        raise invalid(
            "previous_response_id",
            "previous_response_id: this server stores no responses; send the whole conversation as input",
            "unsupported_value",
        )
    if body.get("truncation") not in (None, "disabled"):
        raise invalid("truncation", "truncation: only 'disabled' (a prompt that does not fit is a 400)")
    chat: dict[str, Any] = {k: v for k, v in body.items() if k in _ROUTER | _AS_IN_CHAT}
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    _logprobs(body, chat)
    reasoning = check_type(body, "reasoning", dict, "an object")
    if reasoning:
        extra = sorted(set(reasoning) - {"effort", "summary"})
        if extra:
            raise invalid(f"reasoning.{extra[0]}", f"reasoning.{extra[0]} is not supported", "unknown_parameter")
        if reasoning.get("effort") is not None:
            chat["reasoning_effort"] = reasoning["effort"]
    messages = _input(body.get("input"))
    instructions = check_type(body, "instructions", str, "a string")
    if instructions:
        messages = [{"role": "system", "content": instructions}, *messages]
    chat["messages"] = messages
    fmt = _format(body)
    if fmt is not None:
        chat["response_format"] = fmt
    if body.get("tools") is not None and body["tools"] != []:  # [] is no tools here (OpenAI's agents SDK sends it)
        chat["tools"] = _tools(body["tools"])
    if body.get("tool_choice") is not None:
        choice = body["tool_choice"]
        if isinstance(choice, dict) and choice.get("type") == "function":
            choice = {"type": "function", "function": {"name": choice.get("name")}}
        chat["tool_choice"] = choice
    echo = {
        "instructions": instructions,
        "max_output_tokens": body.get("max_output_tokens"),
        "temperature": body.get("temperature"),
        "top_p": body.get("top_p"),
        "tools": body.get("tools") or [],
        "tool_choice": body.get("tool_choice") or "auto",
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "text": {"format": (body.get("text") or {}).get("format") or {"type": "text"}},
        "metadata": body.get("metadata") or {},
        "store": False,  # stored: nothing
    }
    return chat, echo


def _logprobs(body: dict[str, Any], chat: dict[str, Any]) -> None:
    """``include: ["message.output_text.logprobs"]`` (or ``top_logprobs``) -> chat's logprobs and top_logprobs."""
    include = check_type(body, "include", list, "an array") or []
    for i, value in enumerate(include):
        if value not in INCLUDES:
            raise invalid(
                f"include[{i}]",
                f"include[{i}]: {short(value)} is not supported (only {', '.join(INCLUDES)})",
                "unsupported_value",
            )
    top = check_type(body, "top_logprobs", int, "an integer")
    if INCLUDES[0] in include or top is not None:
        chat["logprobs"] = True
        chat["top_logprobs"] = top or 0


def _input(items: Any) -> list[dict[str, Any]]:
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise invalid("input", "input must be a string or a non-empty array of input items", "invalid_type")
    out: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise invalid(where, f"{where} must be an object", "invalid_type")
        kind = item.get("type", "message")
        if kind == "message":
            extra = sorted(set(item) - {"type", "role", "content", "id", "status"})
            if extra:
                raise invalid(f"{where}.{extra[0]}", f"{where}.{extra[0]} is not supported", "unknown_parameter")
            out.append({"role": item.get("role"), "content": _text(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function"}
            call["function"] = {"name": item.get("name"), "arguments": item.get("arguments")}
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls"):
                out[-1]["tool_calls"].append(call)  # parallel calls of one turn
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            if not isinstance(output, str):
                raise invalid(f"{where}.output", f"{where}.output must be a string", "invalid_type")
            out.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": output})
        else:
            raise invalid(f"{where}.type", f"{where}.type {short(kind)} is not supported", "unsupported_value")
    return out


def _text(content: Any, where: str) -> Any:
    """A message's content: a string, or its text parts joined (input_text, output_text)."""
    if not isinstance(content, list):
        return content
    parts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text"):
            raise invalid(f"{where}[{j}]", f"{where}[{j}]: only text parts are supported", "unsupported_value")
        parts.append(part.get("text"))
    texts = [p for p in parts if isinstance(p, str)]
    if len(texts) != len(parts):
        raise invalid(where, f"{where}: each text part needs a text string", "invalid_type")
    return "".join(texts)


def _format(body: dict[str, Any]) -> dict[str, Any] | None:
    text = check_type(body, "text", dict, "an object") or {}
    extra = sorted(set(text) - {"format", "verbosity"})
    if extra:
        raise invalid(f"text.{extra[0]}", f"text.{extra[0]} is not supported", "unknown_parameter")
    if text.get("verbosity") not in (None, "low", "medium", "high"):  # accepted, as chat's: it changes nothing
        raise invalid("text.verbosity", "text.verbosity must be 'low', 'medium' or 'high'")
    fmt = text.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise invalid("text.format", "text.format must be an object", "invalid_type")
    kind = fmt.get("type")
    if kind in ("text", "json_object"):
        return {"type": kind}
    if kind != "json_schema":
        raise invalid("text.format.type", "text.format.type must be 'text', 'json_object' or 'json_schema'")
    spec = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
    return {"type": "json_schema", "json_schema": spec}


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise invalid("tools", "tools must be an array", "invalid_type")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise invalid(f"tools[{i}].type", f"tools[{i}]: only function tools are supported", "unsupported_value")
        fn = {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
        out.append({"type": "function", "function": fn})
    return out


def _renamed(e: APIError) -> APIError:
    param, message = e.param, e.message
    for old, new in _RENAMED:
        if param is not None and param.startswith(old):
            param, message = new + param[len(old) :], message.replace(old, new, 1)
            break
    return APIError(e.status, message, param, e.code, e.kind, e.headers)


# -- the answer ---------------------------------------------------------------------------------------------------
class ResponsesReply(Reply[ResponsesRequest]):
    """A response object, or its stream of events (one choice: the Responses API has no ``n``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sequence = 0
        self.live = self.p.tools is None and self.p.think is None  # text deltas as they come
        self.msg_id = "msg_" + uuid.uuid4().hex[:24]
        self.opened = False
        self.pending: list[dict[str, Any]] = []  # logprob entries of streamed tokens whose text is still to come

    def _event(self, kind: str, **data: Any) -> dict[str, Any]:
        self.sequence += 1
        return {"type": kind, "sequence_number": self.sequence - 1, **data}

    def _response(self, status: str, output: list[dict[str, Any]], completion: er.Completion | None) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": None,
            "incomplete_details": None,
            "model": self.p.model,
            "output": output,
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None},
            "usage": None,
            **self.p.echo_fields,
        }
        if completion is not None:
            out_tokens = completion.usage.completion_tokens
            obj["usage"] = {
                "input_tokens": self.prompt_tokens,
                "input_tokens_details": {"cached_tokens": completion.usage.cached_tokens},
                "output_tokens": out_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self.prompt_tokens + out_tokens,
            }
            if completion.finish_reason == "length":
                obj["status"], obj["incomplete_details"] = "incomplete", {"reason": "max_output_tokens"}
        return obj

    def _items(self, completion: er.Completion) -> list[dict[str, Any]]:
        choice = self.encoder.choice(self, 0, completion)
        message = choice["message"]
        done = "incomplete" if completion.finish_reason == "length" else "completed"
        items: list[dict[str, Any]] = []
        if message.get("reasoning_content") is not None:
            text = message["reasoning_content"]
            items.append(
                {
                    "type": "reasoning",
                    "id": "rs_" + uuid.uuid4().hex[:24],
                    "summary": [],
                    "content": [{"type": "reasoning_text", "text": text}],
                }
            )
        for call in message.get("tool_calls") or []:
            items.append(
                {
                    "type": "function_call",
                    "id": "fc_" + uuid.uuid4().hex[:24],
                    "call_id": call["id"],
                    "name": call["function"]["name"],
                    "arguments": call["function"]["arguments"],
                    "status": "completed",
                }
            )
        if not message.get("tool_calls") and message.get("content") is not None:
            logprobs = choice["logprobs"]  # chat's entries: the shape of the Responses API's
            items.append(self._message(message["content"], done, logprobs["content"] if logprobs else []))
        return items

    def _message(self, text: str, status: str, logprobs: list[dict[str, Any]]) -> dict[str, Any]:
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}
        return {"type": "message", "id": self.msg_id, "status": status, "role": "assistant", "content": [part]}

    # -- whole -------------------------------------------------------------------------------------------------
    def whole(self, completions: Sequence[er.Completion]) -> dict[str, Any]:
        (c,) = completions
        obj = self._response("completed", self._items(c), c)
        return obj

    # -- streamed ----------------------------------------------------------------------------------------------
    def opening(self) -> list[dict[str, Any]]:
        start = self._response("in_progress", [], None)
        return [self._event("response.created", response=start), self._event("response.in_progress", response=start)]

    def _open(self) -> list[dict[str, Any]]:
        self.opened = True
        item = {"type": "message", "id": self.msg_id, "status": "in_progress", "role": "assistant", "content": []}
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        ids = {"item_id": self.msg_id, "output_index": 0, "content_index": 0}
        return [
            self._event("response.output_item.added", output_index=0, item=item),
            self._event("response.content_part.added", part=part, **ids),
        ]

    def step(self, index: int, step: er.Step) -> list[dict[str, Any]]:
        if not self.live:
            return []
        if self.configs[index].want_logprobs and step.logprob is not None:
            stop = self.stop_token(index, step)
            self.pending.append(self.texts.chat_entry(step.token_id, step.logprob, step.top_logprobs, stop))
        if not step.text:
            return []
        out = [] if self.opened else self._open()
        ids = {"item_id": self.msg_id, "output_index": 0, "content_index": 0}
        logprobs, self.pending = self.pending, []
        out.append(self._event("response.output_text.delta", delta=step.text, logprobs=logprobs, **ids))
        return out

    def closing(self, completions: Sequence[er.Completion]) -> list[dict[str, Any]]:
        """The events after the last step: each output item done (added first when it was not streamed), then
        ``response.completed`` (or ``response.incomplete``) with the whole response and its usage."""
        (c,) = completions
        items = self._items(c)
        out: list[dict[str, Any]] = []
        for n, item in enumerate(items):
            if item["type"] == "message":
                out += self._close_message(item, n)
            else:
                out.append(self._event("response.output_item.added", output_index=n, item=item))
                if item["type"] == "function_call":
                    ids = {"item_id": item["id"], "output_index": n}
                    out.append(self._event("response.function_call_arguments.delta", delta=item["arguments"], **ids))
                    out.append(self._event("response.function_call_arguments.done", arguments=item["arguments"], **ids))
                out.append(self._event("response.output_item.done", output_index=n, item=item))
        obj = self._response("completed", items, c)
        done = "response.incomplete" if obj["status"] == "incomplete" else "response.completed"
        return [*out, self._event(done, response=obj)]

    def _close_message(self, item: dict[str, Any], n: int) -> list[dict[str, Any]]:
        part = item["content"][0]
        text = part["text"]
        ids = {"item_id": self.msg_id, "output_index": n, "content_index": 0}
        out = []
        if not self.opened:  # not streamed: added now, its text as one delta
            self.opened = True
            out += [
                self._event("response.output_item.added", output_index=n, item={**item, "content": []}),
                self._event("response.content_part.added", part={**part, "text": "", "logprobs": []}, **ids),
            ]
            if text:
                delta = self._event("response.output_text.delta", delta=text, logprobs=part["logprobs"], **ids)
                out.append(delta)
        return out + [
            self._event("response.output_text.done", text=text, logprobs=part["logprobs"], **ids),
            self._event("response.content_part.done", part=item["content"][0], **ids),
            self._event("response.output_item.done", output_index=n, item=item),
        ]
