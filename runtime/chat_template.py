"""Chat templates: compiled and rendered exactly as transformers' ``apply_chat_template`` does, within a budget.

The environment is transformers' own: jinja2's ``ImmutableSandboxedEnvironment`` with ``trim_blocks``,
``lstrip_blocks``, ``loopcontrols`` and the ``{% generation %}`` tag, the same ``tojson`` filter and the
``raise_exception`` and ``strftime_now`` globals.

A template comes with the model folder, so it is untrusted code: the sandbox keeps it away from Python's
internals, and a budget keeps it from hanging or exhausting memory. Each render may take at most
``RENDER_SECONDS`` and produce at most ``MAX_CHARS`` characters, checked as it goes: at every piece of output, every
loop step over ``range``, every call, attribute and item lookup, filter and arithmetic operator; repetition
(``'a' * n``), powers, string formatting widths and integer arguments that would build something larger are
refused before they run. Any failure of the template's own making (a syntax error, ``{{ 1/0 }}``, a recursive
macro, an ``{% include %}``, the budget) raises :class:`~edgeroute.errors.ChatTemplateError` naming the template;
``raise_exception`` in the template (a template refusing the messages) raises ``ConfigError`` on ``messages``.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from functools import lru_cache, wraps
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range

from .errors import ChatTemplateError, ConfigError, first_line

RENDER_SECONDS = 5.0  # real templates render in milliseconds
MAX_CHARS = 8_000_000  # characters of output, and of any one string or list a template builds (> any context)
MAX_INT_ARG = 1_000_000  # the largest integer a template may pass to a call or a filter (widths, counts)
_WIDE_SPEC = re.compile(r"%[-#0 +*.]*\d{7,}|\{[^{}]*:[^{}]*\d{7,}[^{}]*\}")  # a width/precision of 10^6 or more
_CHECK_EVERY = 256  # loop steps between clock reads
_TICKING = "__edgeroute_ticking"  # the global every for-loop's iterable goes through (not a name templates use)


class _Refused(Exception):
    """A template went past its budget (the message says how)."""


class _Budget(threading.local):
    """The running render's budget in this thread (renders in other threads have their own)."""

    deadline: float | None = None
    ticks: int = 0

    def tick(self) -> None:
        self.ticks += 1
        if self.ticks % _CHECK_EVERY == 0:
            self.check_time()

    def check_time(self) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise _Refused(f"took longer than {RENDER_SECONDS:g} s")


_BUDGET = _Budget()


def _size(x: Any) -> int:
    return len(x) if isinstance(x, (str, list, tuple)) else 0


def _check_int(x: Any) -> None:
    if isinstance(x, int) and not isinstance(x, bool) and abs(x) > MAX_INT_ARG:
        raise _Refused(f"passes {x} to a call (at most {MAX_INT_ARG})")


def _check_size(x: Any) -> Any:
    if _size(x) > MAX_CHARS:
        raise _Refused(f"builds a value of {_size(x)} items (at most {MAX_CHARS})")
    return x


def _counting_range(*args: int) -> Iterator[int]:
    """jinja's sandboxed ``range`` (at most 100,000 items), counting each step against the budget."""
    return _ticking(safe_range(*args))


def _ticking(iterable: Any) -> Iterator[Any]:
    """``iterable``, counting each step against the budget (every ``{% for %}`` loop iterates through this)."""
    for item in iterable:
        _BUDGET.tick()
        yield item


def _bounded(f: Callable[..., Any]) -> Callable[..., Any]:
    """A filter that counts against the budget and refuses huge integer arguments and results."""

    @wraps(f)  # keeps jinja's pass_context/pass_environment marks
    def g(*args: Any, **kwargs: Any) -> Any:
        _BUDGET.tick()
        for a in (*args[1:], *kwargs.values()):
            _check_int(a)
        return _check_size(f(*args, **kwargs))

    return g


class _CodeGenerator(CodeGenerator):
    """jinja's code generator, with string concatenation (``a ~ b``) checked against the budget too."""

    def visit_Concat(self, node: jinja2.nodes.Concat, frame: Any) -> None:
        self.write("environment.checked(")
        super().visit_Concat(node, frame)
        self.write(")")


class _Environment(ImmutableSandboxedEnvironment):
    """transformers' sandbox, with the budget checked at every call, lookup, arithmetic operator and ``~``."""

    intercepted_binops = frozenset({"+", "*", "**", "%"})
    code_generator_class = _CodeGenerator

    def _parse(self, source: str, name: str | None, filename: str | None) -> jinja2.nodes.Template:
        """The template's syntax tree, with every ``{% for %}`` loop's iterable counted step by step (an empty loop
        body would otherwise run unchecked: nested loops over long lists hang like nested ranges)."""
        tree = super()._parse(source, name, filename)
        for loop in tree.find_all(jinja2.nodes.For):
            loop.iter = jinja2.nodes.Call(jinja2.nodes.Name(_TICKING, "load"), [loop.iter], [], None, None)
        return tree

    @staticmethod
    def checked(value: Any) -> Any:
        _BUDGET.tick()
        return _check_size(value)

    def call_binop(self, context: Any, op: str, left: Any, right: Any) -> Any:
        _BUDGET.tick()
        if op == "*":
            n = right if isinstance(right, int) else left if isinstance(left, int) else 0
            if max(_size(left), _size(right)) * abs(n) > MAX_CHARS:
                raise _Refused(f"repeats a value {n} times")
            if isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > 100_000:
                raise _Refused("multiplies integers of more than 100,000 bits")
        elif op == "**":
            if isinstance(left, int) and isinstance(right, int) and right * max(abs(left), 2).bit_length() > 100_000:
                raise _Refused(f"raises to the power {right}")
        elif op == "%" and isinstance(left, str) and _WIDE_SPEC.search(left):
            raise _Refused("formats with a width of a million characters or more")
        elif op == "+" and _size(left) + _size(right) > MAX_CHARS:
            raise _Refused("builds a value larger than its budget")
        return _check_size(super().call_binop(context, op, left, right))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (jinja's names)
        _BUDGET.tick()
        _BUDGET.check_time()
        for a in (*args, *kwargs.values()):
            _check_int(a)
        target = getattr(__obj, "__wrapped__", __obj)  # str.format comes wrapped by the sandbox
        owner = getattr(target, "__self__", None)
        if isinstance(owner, str) and getattr(target, "__name__", "") in ("format", "format_map"):
            if _WIDE_SPEC.search(owner):
                raise _Refused("formats with a width of a million characters or more")
        return _check_size(super().call(__context, __obj, *args, **kwargs))

    def getattr(self, obj: Any, attribute: str) -> Any:
        _BUDGET.tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _BUDGET.tick()
        return super().getitem(obj, argument)


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (assistant masks in transformers): renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return str(caller())


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = _Environment(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters = {name: _bounded(f) for name, f in env.filters.items()}
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["range"] = _counting_range
    env.globals[_TICKING] = _ticking
    return env.from_string(template)


def render(template: str, name: str, variables: Mapping[str, Any]) -> str:
    """Render ``template`` (called ``name`` in errors) with ``variables`` within the budget.

    Raises ``ConfigError`` (field ``messages``) when the template refuses the messages with ``raise_exception``,
    and :class:`ChatTemplateError` for anything else that goes wrong inside it.
    """
    try:
        compiled = _compile(template)
    except Exception as e:
        raise ChatTemplateError(f"the chat template of {name} does not compile: {first_line(e)}") from e
    outer = _BUDGET.deadline
    _BUDGET.deadline = time.monotonic() + RENDER_SECONDS if outer is None else outer
    try:
        pieces: list[str] = []
        total = 0
        for piece in compiled.generate(**variables):
            total += len(piece)
            if total > MAX_CHARS:
                raise _Refused(f"renders more than {MAX_CHARS} characters")
            pieces.append(piece)
            _BUDGET.tick()
        return "".join(pieces)
    except _Refused as e:
        raise ChatTemplateError(f"the chat template of {name} {e}: rendering stopped") from None
    except jinja2.exceptions.UndefinedError as e:  # the messages lack what the template reads
        raise ConfigError("messages", "chat", f"the chat template of {name} needs more: {first_line(e)}") from e
    except jinja2.exceptions.TemplateError as e:
        if type(e) is jinja2.exceptions.TemplateError:  # raise_exception(...) in the template
            raise ConfigError("messages", "chat", f"the chat template refused them: {e}") from e
        raise ChatTemplateError(f"the chat template of {name} failed: {first_line(e)}") from e
    except RecursionError:
        raise ChatTemplateError(f"the chat template of {name} recursed too deeply") from None
    except Exception as e:  # the template's own bug: 1/0, messages + 1, an include without a loader, ...
        raise ChatTemplateError(f"the chat template of {name} failed: {type(e).__name__}: {first_line(e)}") from e
    finally:
        _BUDGET.deadline = outer
