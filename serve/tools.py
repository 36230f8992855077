"""OpenAI function calling on a constraint: ``tools`` and ``tool_choice`` -> the prompt, the grammar of the answer,
and the answer back as ``tool_calls`` (whole, or streamed as deltas).

- **Prompt.** The tools go to the model's chat template (the ``tools`` variable transformers passes); a template
  that ignores them gets a system message listing them and saying how to call one.
- **The call** is one JSON object ``{"name": ..., "arguments": {...}}``, its arguments valid against the function's
  ``parameters`` schema (no argument it does not declare, unless the schema says ``additionalProperties``),
  written on one line (``", "`` and ``": "``). ``tool_choice``:
  ``"required"`` or a named function: the answer *is* a call (constrained to it); ``"auto"`` (the default with
  tools): a call, the same call inside ``<tool_call>\\n ... \\n</tool_call>`` (the Hermes/Qwen form), or text
  that starts with neither ``{`` nor ``<`` nor whitespace; ``"none"``: the tools are left out, text only.
- At most one call per answer (``parallel_tool_calls`` is accepted; a second call is not generated).
- The call's schema holds each function's ``parameters`` where its arguments go, their local ``$ref`` s (``#``,
  ``#/$defs/...``: what pydantic writes for nested models) rewritten to point there.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import edgeroute as er

from .protocol import invalid

NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_JSON_STYLE = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}
_OPEN, _CLOSE = "<tool_call>\n", "\n</tool_call>"
_HEAD = re.compile(r'(<tool_call>\n)?\{"name": "((?:[^"\\]|\\.)*)", "arguments": ')
_HOLD = len("}" + _CLOSE)  # what may follow the arguments: never streamed as part of them


@dataclass(frozen=True)
class Function:
    name: str
    description: str | None
    parameters: dict[str, Any]


@dataclass(frozen=True)
class Tools:
    """A request's tools and its ``tool_choice`` (``"auto"``, ``"required"``, or the one function's name)."""

    functions: tuple[Function, ...]
    choice: str

    @property
    def forced(self) -> bool:
        return self.choice != "auto"

    def _callable(self) -> tuple[Function, ...]:
        return (
            self.functions
            if self.choice in ("auto", "required")
            else tuple(f for f in self.functions if f.name == self.choice)
        )

    def call_schema(self) -> dict[str, Any]:
        """The schema of one call: ``{"name": ..., "arguments": ...}`` per callable function (``anyOf`` them)."""
        functions = self._callable()
        options = [
            {
                "type": "object",
                "properties": {
                    "name": {"const": f.name},
                    "arguments": _moved(
                        f.parameters,
                        "/properties/arguments" if len(functions) == 1 else f"/anyOf/{i}/properties/arguments",
                    ),
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for i, f in enumerate(functions)
        ]
        return options[0] if len(options) == 1 else {"anyOf": options}

    def constraint(self) -> er.Constraint:
        """The grammar of the answer (module docstring)."""
        schema = self.call_schema()
        try:
            if self.forced:
                return er.JsonSchema(schema)
            embedded = json.dumps({**schema, "x-guidance": _JSON_STYLE})
            lark = (
                f'start: call | "{_lark(_OPEN)}" call "{_lark(_CLOSE)}" | TEXT\n'
                f"call: %json {embedded}\n"
                "TEXT: /[^{<\\s][\\s\\S]*/\n"
            )
            return er.Grammar(lark)
        except er.ConfigError as e:
            raise invalid(
                "tools", f"tools: a function's parameters are not a schema this server can follow: {e.reason}"
            ) from None

    def template_tools(self) -> list[dict[str, Any]]:
        """The tools as transformers' chat templates take them (OpenAI's shape)."""
        out = []
        for f in self.functions:
            fn: dict[str, Any] = {"name": f.name, "parameters": f.parameters}
            if f.description:
                fn["description"] = f.description
            out.append({"type": "function", "function": fn})
        return out

    def system_text(self) -> str:
        """For a chat template that ignores ``tools``: what the tools are and how to call one."""
        listed = json.dumps([t["function"] for t in self.template_tools()], ensure_ascii=False)
        how = 'reply with only a JSON object {"name": <the function\'s name>, "arguments": <its arguments>}'
        if self.forced:
            return f"You call functions. The functions, as JSON Schema: {listed}\nTo call one, {how}."
        return (
            f"You can call functions. The functions, as JSON Schema: {listed}\n"
            f"To call one, {how}; otherwise answer in text."
        )


_DATA = frozenset({"const", "enum", "default", "examples"})  # keywords whose values are JSON values, not schemas
_NAMES = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})  # name -> schema


def _moved(schema: Any, at: str) -> Any:
    """A copy of ``schema`` to sit at the JSON pointer ``at`` of a larger schema: its local references (``#`` and
    ``#/...``, which point into it) made to point under ``at``. Left alone: anchors (``#name``) and other URIs, the
    inside of a subschema with its own ``$id`` (its references are relative to it), and data (``const``, ``enum``,
    ``default``, ``examples``). Iterative: a schema's depth is bounded only when it is compiled."""
    if not isinstance(schema, dict) or isinstance(schema.get("$id"), str):
        return schema
    root: dict[str, Any] = {}
    todo: list[tuple[Any, Any, bool]] = [(schema, root, False)]  # source, copy, whether its keys are names
    while todo:
        src, dst, names = todo.pop()
        for key, value in src.items() if isinstance(src, dict) else enumerate(src):
            schema_key = isinstance(src, dict) and not names
            if schema_key and key == "$ref" and isinstance(value, str) and (value == "#" or value.startswith("#/")):
                value = "#" + at + value[1:]
            elif isinstance(value, (dict, list)) and not (schema_key and key in _DATA):
                if not (isinstance(value, dict) and isinstance(value.get("$id"), str)):
                    copy: Any = {} if isinstance(value, dict) else [None] * len(value)
                    todo.append((value, copy, schema_key and key in _NAMES))
                    value = copy
            dst[key] = value
    return root


def _lark(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def parse_tools(body: dict[str, Any]) -> Tools | None:
    """``tools``, ``tool_choice`` and ``parallel_tool_calls`` of a chat request (None: no tools in play)."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise invalid("parallel_tool_calls", "parallel_tool_calls must be a boolean", "invalid_type")
    if tools is None:
        if choice not in (None, "none"):
            raise invalid("tool_choice", "tool_choice needs tools")
        return None
    if not isinstance(tools, list) or not tools:
        raise invalid("tools", "tools must be a non-empty array of function tools", "invalid_type")
    functions: list[Function] = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise invalid(where, f'{where} must be {{"type": "function", "function": {{...}}}}', "invalid_type")
        fn = tool["function"]
        extra = sorted(set(fn) - {"name", "description", "parameters", "strict"})
        if extra:
            raise invalid(
                f"{where}.function.{extra[0]}", f"{where}.function.{extra[0]} is not supported", "unknown_parameter"
            )
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise invalid(f"{where}.function.name", f"{where}.function.name must match [A-Za-z0-9_-]{{1,64}}")
        if any(f.name == name for f in functions):
            raise invalid(f"{where}.function.name", f"{where}.function.name {name!r} is given twice")
        desc = fn.get("description")
        if desc is not None and not isinstance(desc, str):
            raise invalid(
                f"{where}.function.description", f"{where}.function.description must be a string", "invalid_type"
            )
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise invalid(f"{where}.function.parameters", f"{where}.function.parameters must be a JSON Schema object")
        if params.get("type") == "object" and "additionalProperties" not in params:
            params = {**params, "additionalProperties": False}  # a call passes the arguments a function declares
        functions.append(Function(name, desc, params))
    if choice is None:
        choice = "auto"
    if isinstance(choice, dict):
        fn = choice.get("function") if choice.get("type") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            raise invalid(
                "tool_choice",
                'tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}',
            )
        if not any(f.name == name for f in functions):
            raise invalid("tool_choice", f"tool_choice names {name!r}, which is not among the tools")
        choice = name
    elif choice not in ("none", "auto", "required"):
        raise invalid("tool_choice", 'tool_choice must be "none", "auto", "required" or a named function')
    if choice == "none":
        return None
    out = Tools(tuple(functions), choice)
    for i, f in enumerate(functions):  # every schema must compile, named or not: a bad one is the request's error
        try:
            er.JsonSchema(f.parameters)
        except er.ConfigError as e:
            raise invalid(f"tools[{i}].function.parameters", f"tools[{i}].function.parameters: {e.reason}") from None
    return out


def render_messages(
    messages: list[dict[str, Any]],
    tools: Tools,
    tokenizer: er.Tokenizer,
    plain_content: bool = False,
    variables: Mapping[str, Any] | None = None,
) -> list[int]:
    """The prompt's ids: the tools through the template, or (a template that ignores them) in a system message.
    ``plain_content``: message contents tokenised as plain text (``Tokenizer.apply_chat_template``); ``variables``:
    the template's extra variables (``chat_template_kwargs``)."""
    listed = tools.template_tools()
    extra = dict(variables or {})
    if tokenizer.render_chat(messages, tools=listed, **extra) != tokenizer.render_chat(messages, **extra):
        return tokenizer.apply_chat_template(messages, True, plain_content, tools=listed, **extra)
    text = tools.system_text()
    if messages and messages[0]["role"] in ("system", "developer"):
        first = {**messages[0], "content": f"{messages[0]['content']}\n\n{text}".strip()}
        messages = [first, *messages[1:]]
    else:
        messages = [{"role": "system", "content": text}, *messages]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, plain_content=plain_content, **extra)


def call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def parse_call(text: str, tools: Tools) -> dict[str, Any] | None:
    """The call in a complete answer (``{"name", "arguments"}``, arguments as JSON text), or None for text."""
    head = _HEAD.match(text)
    if head is None:
        return None
    try:
        name = json.loads(f'"{head.group(2)}"')
        args, end = json.JSONDecoder().raw_decode(text, head.end())
    except ValueError:
        return None
    tail = text[end:]
    if tail != ("}" + _CLOSE if head.group(1) else "}") or not any(f.name == name for f in tools.functions):
        return None
    return {"name": name, "arguments": text[head.end() : end]}


class CallStream:
    """One streamed choice with tools: text pieces in, chat deltas out. Text that cannot start a call streams as
    ``content``; a call streams as ``tool_calls`` deltas: the id and name once its name is complete, then its
    arguments as they are generated (holding back the few characters that may close the call)."""

    def __init__(self, tools: Tools) -> None:
        self.tools = tools
        self.id = call_id()
        self.buffer = ""
        self.mode: str | None = "call" if tools.forced else None  # None: undecided; "text"; "call"
        self.head_end: int | None = None
        self.sent = 0  # characters of the arguments streamed

    @property
    def calling(self) -> bool:
        return self.mode == "call"

    def push(self, piece: str) -> list[dict[str, Any]]:
        if self.mode is None and piece:  # text never starts with "{" or "<" (the grammar): the first character says
            self.mode = "call" if piece[0] in "{<" else "text"
        if self.mode == "text":
            return [{"content": piece}] if piece else []
        self.buffer += piece
        out = []
        if self.head_end is None:
            head = _HEAD.match(self.buffer)
            if head is None:
                return []
            self.head_end = head.end()
            name = json.loads(f'"{head.group(2)}"')
            out.append(self._delta({"id": self.id, "type": "function", "function": {"name": name, "arguments": ""}}))
        upto = len(self.buffer) - _HOLD
        if upto > self.head_end + self.sent:
            out.append(self._delta({"function": {"arguments": self.buffer[self.head_end + self.sent : upto]}}))
            self.sent = upto - self.head_end
        return out

    def finish(self, reason: str) -> tuple[list[dict[str, Any]], str]:
        """The last deltas and OpenAI's finish reason (``tool_calls`` for a complete call)."""
        if self.mode != "call":
            return [], reason
        call = parse_call(self.buffer, self.tools) if reason == "stop" else None
        if self.head_end is None:  # never got as far as a name: what there is, as text
            return ([{"content": self.buffer}] if self.buffer else []), reason
        rest = call["arguments"][self.sent :] if call else self.buffer[self.head_end + self.sent :]
        out = [self._delta({"function": {"arguments": rest}})] if rest else []
        return out, ("tool_calls" if call else reason)

    @staticmethod
    def _delta(call: dict[str, Any]) -> dict[str, Any]:
        return {"tool_calls": [{"index": 0, **call}]}
