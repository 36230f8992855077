"""``POST /v1/chat/completions``: a chat request (messages, tools, ``response_format``) -> the prompt and configs;
the engine's results -> ``chat.completion`` objects and ``chat.completion.chunk`` events (a role delta per choice,
content deltas with their logprobs, tool-call deltas, each choice's ``finish_reason``)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import edgeroute as er

from .encoder import ChoiceStream, Encoder, Reply, is_stop_entry, logprob_entries
from .protocol import (
    CHAT_FIELDS,
    Parsed,
    adapter_of,
    check_type,
    choice_configs,
    finish,
    generation_params,
    invalid,
    load_json,
    parse_common,
    short,
)
from .reasoning import ThinkSplit, opens_thinking, thinks
from .reasoning import split as reasoning_split
from .tools import CallStream, Tools, call_id, parse_call, parse_tools, render_messages

ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass
class ChatRequest(Parsed):
    tools: Tools | None = None  # None: no tools in play (none given, or tool_choice "none")
    # a reasoning model (serve.reasoning): whether its answer starts inside the thinking block; None: it does not think
    think: bool | None = None


class ChatEncoder(Encoder[ChatRequest]):
    """Chat completions. ``plain_content``: message contents tokenised as plain text (``Settings.plain_content``)."""

    path = "/v1/chat/completions"
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl-"
    prompt_param = "messages"

    def __init__(self, plain_content: bool = False) -> None:
        self.plain_content = plain_content

    def parse(self, body: Any, model: er.Model, served: str) -> ChatRequest:
        return parse_chat(body, model, served, self.plain_content)

    def choice(self, reply: Reply[ChatRequest], index: int, completion: er.Completion) -> dict[str, Any]:
        c, tools = completion, reply.p.tools
        reason = finish(c.finish_reason)
        logprobs = None
        if c.logprobs is not None:
            entries = [reply.texts.chat_entry(*e, stop=is_stop_entry(c, i)) for i, e in enumerate(logprob_entries(c))]
            logprobs = {"content": entries, "refusal": None}
        reasoning, content = (None, c.text) if reply.p.think is None else reasoning_split(c.text, reply.p.think)
        message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
        if reasoning is not None:
            message["reasoning_content"] = message["reasoning"] = reasoning
        call = parse_call(content or "", tools) if tools is not None and reason == "stop" else None
        if call is not None:
            message["content"] = None
            message["tool_calls"] = [{"id": call_id(), "type": "function", "function": call}]
            reason = "tool_calls"
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": reason}

    def opening(self, reply: Reply[ChatRequest], index: int) -> dict[str, Any] | None:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def stream(self, reply: Reply[ChatRequest], index: int) -> ChoiceStream:
        tools = reply.p.tools
        return _TextStream(reply, index) if tools is None else _ToolStream(reply, index, tools)


class _TextStream(ChoiceStream):
    """A streamed chat choice without tools: content deltas (a reasoning model's thinking as ``reasoning_content``
    and ``reasoning`` deltas first), then the finish reason."""

    def __init__(self, reply: Reply[ChatRequest], index: int) -> None:
        self.reply = reply
        self.index = index
        self.think = None if reply.p.think is None else ThinkSplit(reply.p.think)

    def _split(self, step: er.Step) -> list[tuple[str, str]]:
        """The step's text as ``("reasoning" | "content", piece)`` pieces."""
        if self.think is None:
            return [("content", step.text)] if step.text else []
        pieces = self.think.push(step.text)
        if step.finish_reason is not None:
            pieces += self.think.flush()
        return pieces

    def _deltas(self, step: er.Step) -> list[dict[str, Any]]:
        return [{"content": p} if kind == "content" else _reasoning(p) for kind, p in self._split(step)]

    def _logprobs(self, step: er.Step) -> dict[str, Any]:
        assert step.logprob is not None
        stop = self.reply.stop_token(self.index, step)
        entry = self.reply.texts.chat_entry(step.token_id, step.logprob, step.top_logprobs, stop)
        return {"content": [entry], "refusal": None}

    def step(self, step: er.Step, logprobs: bool) -> list[dict[str, Any]]:
        deltas = self._deltas(step)
        if logprobs and not deltas:
            deltas = [{"content": ""}]
        lp = self._logprobs(step) if logprobs else None
        out: list[dict[str, Any]] = [
            {"index": self.index, "delta": delta, "logprobs": lp if j == 0 else None, "finish_reason": None}
            for j, delta in enumerate(deltas)
        ]
        if step.finish_reason is not None:
            reason = finish(step.finish_reason)
            out.append({"index": self.index, "delta": {}, "logprobs": None, "finish_reason": reason})
        return out


class _ToolStream(_TextStream):
    """A streamed chat choice with tools: content deltas (with their logprobs) while the answer is text, tool-call
    deltas once it is a call; the finish reason is ``tool_calls`` for a complete call."""

    def __init__(self, reply: Reply[ChatRequest], index: int, tools: Tools) -> None:
        super().__init__(reply, index)
        self.calls = CallStream(tools)

    def step(self, step: er.Step, logprobs: bool) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = []
        for kind, piece in self._split(step):  # a reasoning model's thinking first, then the answer: text or a call
            deltas += self.calls.push(piece) if kind == "content" else [_reasoning(piece)]
        reason = None
        if step.finish_reason is not None:
            last, reason = self.calls.finish(finish(step.finish_reason))
            deltas += last
        lp = None
        if logprobs and not self.calls.calling:
            lp = self._logprobs(step)
            if not deltas:
                deltas = [{"content": ""}]
        out: list[dict[str, Any]] = [
            {"index": self.index, "delta": delta, "logprobs": lp if j == 0 else None, "finish_reason": None}
            for j, delta in enumerate(deltas)
        ]
        if reason is not None:
            out.append({"index": self.index, "delta": {}, "logprobs": None, "finish_reason": reason})
        return out


def _reasoning(piece: str) -> dict[str, Any]:
    return {"reasoning_content": piece, "reasoning": piece}


# -- the request ------------------------------------------------------------------------------------------------
def parse_chat(body: Any, model: er.Model, served: str, plain_content: bool = False) -> ChatRequest:
    """A chat request; ``plain_content``: message contents tokenised as plain text (``Settings.plain_content``)."""
    name, n, stream, include_usage = parse_common(body, CHAT_FIELDS, served, model)
    params = generation_params(body)
    adapter = adapter_of(name, served)
    if adapter is not None:  # the model names an adapter: the request runs on it
        params["adapter"] = adapter
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
    messages = parse_messages(body.get("messages"))
    if any("tool_calls" in m for m in messages):
        messages = _show_calls(messages, model.tokenizer)
    if check_type(body, "logprobs", bool, "a boolean") is not True and body.get("top_logprobs") is not None:
        raise invalid("top_logprobs", "top_logprobs needs logprobs: true")
    variables = template_variables(body, model.tokenizer)
    try:
        if tools is not None:
            ids = render_messages(messages, tools, model.tokenizer, plain_content, variables)
        else:
            ids = model.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, plain_content=plain_content, **variables
            )
    except er.ConfigError as e:
        raise invalid("messages", f"messages: {e.reason}") from None
    except er.ChatTemplateError as e:
        raise invalid("messages", f"the model's chat template cannot render these messages: {e}") from None
    think = opens_thinking(model.tokenizer, ids) if thinks(model.tokenizer) else None
    if think is not None and params.get("think_first") is None:  # a constraint applies to the answer only
        params["think_first"] = True  # (edgeroute.thinking); without one it changes nothing
    configs, flows = choice_configs(model, params, [ids], n, "messages")
    return ChatRequest(name, [ids], configs, flows, n, stream, include_usage, tools=tools, think=think)


REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high")
# the template's own names, which chat_template_kwargs may not replace
_RESERVED = {"messages", "add_generation_prompt", "tools", "documents"}


def template_variables(body: Mapping[str, Any], tokenizer: er.Tokenizer) -> dict[str, Any]:
    """The chat template's extra variables: ``chat_template_kwargs`` (vLLM's, e.g. ``{"enable_thinking": false}``)
    and ``reasoning_effort``, which sets the template's thinking switch where it has one (``enable_thinking``:
    off for ``none`` and ``minimal``, on otherwise; unless ``chat_template_kwargs`` sets it) and is passed as
    ``reasoning_effort`` to a template that reads that name. A template with neither cannot honour it: a 400."""
    kwargs = check_type(body, "chat_template_kwargs", dict, "an object") or {}
    for key in kwargs:
        if not key.isidentifier() or key in _RESERVED or key in tokenizer.special_tokens:
            where = f"chat_template_kwargs.{key if key.isidentifier() else short(key)}"
            raise invalid(
                where,
                f"{where}: not a variable a request may set"
                f" (not {', '.join(sorted(_RESERVED))} or a special token's name)",
                "unsupported_value",
            )
    variables = dict(kwargs)
    effort = check_type(body, "reasoning_effort", str, "a string")
    if effort is not None:
        if effort not in REASONING_EFFORTS:
            raise invalid("reasoning_effort", f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}")
        template = tokenizer.chat_template or ""
        switch, named = "enable_thinking" in template, "reasoning_effort" in template
        if not (switch or named):
            raise invalid(
                "reasoning_effort",
                "reasoning_effort: this model's chat template has no thinking switch (enable_thinking)",
                "unsupported_value",
            )
        if switch:
            variables.setdefault("enable_thinking", effort not in ("none", "minimal"))
        if named:
            variables.setdefault("reasoning_effort", effort)
    return variables


def _response_format(body: Mapping[str, Any]) -> er.Constraint | None:
    """OpenAI's ``response_format``: ``text`` (no constraint), ``json_object``, or ``json_schema`` with ``name``,
    ``schema``, ``strict`` and ``description`` (the answer always follows the schema: strict or not)."""
    fmt = check_type(body, "response_format", dict, "an object")
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


def parse_messages(messages: Any) -> list[dict[str, Any]]:
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
            raise invalid(f"{where}.role", f"{where}.role must be one of {', '.join(ROLES)} (got {short(role)})")
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
        allowed = {"role", "content", "name"} | (_ASSISTANT if role == "assistant" else set())
        allowed |= {"tool_call_id"} if role == "tool" else set()
        extra = sorted(set(m) - allowed)
        if extra:
            raise invalid(f"{where}.{extra[0]}", f"{where}.{extra[0]} is not supported", "unsupported_value")
        if role == "assistant":
            content = _answer_back(m, content, where)
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


# what an assistant message of a chat answer can carry when a client passes it back (the SDK's own message object,
# ``messages.append(response.choices[0].message)``)
_ASSISTANT = {"tool_calls", "refusal", "annotations", "audio", "function_call"}


def _answer_back(m: Mapping[str, Any], content: str | None, where: str) -> str | None:
    """An assistant message's content, given the fields an answer carries besides it: ``refusal`` (a refusal's text
    is what the assistant said when there is no content), ``annotations`` (citations: no text of their own),
    ``audio`` and the deprecated ``function_call``, which must be null (this server never answers with them)."""
    refusal = m.get("refusal")
    for name, kind, what in (("refusal", str, "a string"), ("annotations", list, "an array")):
        if m.get(name) is not None and not isinstance(m[name], kind):
            raise invalid(f"{where}.{name}", f"{where}.{name} must be {what} or null", "invalid_type")
    for name, instead in (("audio", "text"), ("function_call", "tool_calls")):
        if m.get(name) is not None:
            raise invalid(
                f"{where}.{name}", f"{where}.{name} is not supported: use {instead} (or null)", "unsupported_value"
            )
    return content if content or not refusal else refusal


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
