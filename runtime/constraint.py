"""Structured output: JSON Schema, regex and grammar constraints as one more stage of the router (llguidance).

A *constraint* (:class:`JsonSchema`, :class:`JsonObject`, :class:`Regex`, :class:`Grammar`) is an immutable,
validated setting of a :class:`~edgeroute.GenerationConfig`: an invalid schema, pattern or grammar raises
``ConfigError`` when it is built, never mid-generation. Each request's router gets a ``grammar.GrammarStage``: a
llguidance matcher that follows the tokens of the turn and says, at every step, which tokens keep the text inside
the grammar (what that does to the routed distribution, and what it costs: ``grammar.py``).

llguidance is the ``grammar`` extra (``pip install 'edgeroute[grammar]'``; ``serve`` includes it), imported when a
constraint is built.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import ConfigError, MissingExtraError

INSTALL_HINT = "structured output needs llguidance: pip install 'edgeroute[grammar]'"
WHITESPACE = ("spaced", "compact", "flexible")
_JSON_OPTIONS: dict[str, dict[str, Any]] = {
    # one line, the separators json.dumps writes: what small models write most often
    "spaced": {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "},
    "compact": {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"},
    # any JSON whitespace between tokens (pretty-printing allowed; a model may also run on with blank lines)
    "flexible": {"whitespace_flexible": True},
}


def load_llguidance() -> Any:
    try:
        import llguidance
        import llguidance.numpy  # noqa: F401  (fill_next_token_bitmask)
    except ImportError:
        raise MissingExtraError(INSTALL_HINT) from None
    return llguidance


def first_line(message: str) -> str:
    """llguidance's message on one line: its first line, and the line that says what is wrong when the first only
    says where (``regex parse error:`` ... ``error: unclosed group``)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if not lines:
        return message
    cause = next((line for line in lines[1:] if line.startswith("error:")), None)
    return f"{lines[0]} {cause}" if cause and lines[0].endswith(":") else lines[0]


def shorten(value: Any, limit: int = 60) -> Any:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Constraint:
    """The shape the generated text must take: a compiled llguidance grammar. ``param`` names the setting in
    errors (``schema``, ``regex``, ``grammar``); ``kind`` says what it is in results and reports."""

    param: ClassVar[str] = "constraint"
    kind: ClassVar[str] = "grammar"

    @property
    def grammar(self) -> str:
        """The llguidance grammar (validated when the constraint was built)."""
        return str(self.__dict__["_grammar"])

    def _compile(self, make: Any, value: Any) -> None:
        llg = load_llguidance()
        try:
            grammar = make(llg)
        except (ValueError, TypeError) as e:
            raise ConfigError(self.param, shorten(value), first_line(str(e))) from None
        error = llg.LLMatcher.validate_grammar(grammar)
        if error and not error.startswith("WARNING"):
            raise ConfigError(self.param, shorten(value), first_line(error))
        object.__setattr__(self, "_grammar", grammar)


@dataclass(frozen=True)
class JsonSchema(Constraint):
    """JSON that validates against ``schema`` (a JSON Schema as a mapping or as JSON text; llguidance's subset:
    objects, arrays, strings with patterns and formats, numbers with ranges, enums, const, anyOf/oneOf, $ref).

    ``whitespace``: ``"spaced"`` (one line, ``", "`` and ``": "``; the default), ``"compact"`` (no whitespace) or
    ``"flexible"`` (any JSON whitespace). ``name`` is a label (OpenAI's ``json_schema.name``)."""

    schema: Any
    whitespace: str = "spaced"
    name: str | None = None
    param: ClassVar[str] = "schema"
    kind: ClassVar[str] = "json_schema"

    def __post_init__(self) -> None:
        schema = self.schema
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise ConfigError(self.param, shorten(self.schema), f"is not valid JSON: {e}") from None
        if not isinstance(schema, (Mapping, bool)):
            raise ConfigError(self.param, shorten(schema), "must be a JSON Schema (an object)")
        if self.whitespace not in WHITESPACE:
            raise ConfigError("whitespace", self.whitespace, f"must be one of {', '.join(WHITESPACE)}")
        text = json.dumps(schema, sort_keys=False)
        object.__setattr__(self, "schema", text)
        options = _JSON_OPTIONS[self.whitespace]
        self._compile(lambda llg: llg.LLMatcher.grammar_from_json_schema(text, options), schema)

    @property
    def schema_dict(self) -> Any:
        """The schema as Python objects."""
        return json.loads(self.schema)


@dataclass(frozen=True)
class JsonObject(JsonSchema):
    """Any JSON object (OpenAI's ``response_format: {"type": "json_object"}``)."""

    schema: Any = field(default_factory=lambda: {"type": "object"})
    kind: ClassVar[str] = "json_object"


@dataclass(frozen=True)
class Regex(Constraint):
    """Text that matches ``pattern`` in full (Rust ``regex`` syntax: no look-around, no backreferences)."""

    pattern: str
    param: ClassVar[str] = "regex"
    kind: ClassVar[str] = "regex"

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ConfigError(self.param, self.pattern, "must be a non-empty string")
        self._compile(lambda llg: llg.LLMatcher.grammar_from_regex(self.pattern), self.pattern)


@dataclass(frozen=True)
class Grammar(Constraint):
    """Text in the language of a context-free grammar: ``syntax="lark"`` (llguidance's Lark dialect, with
    ``%json {...}`` for embedded schemas) or ``"gbnf"`` (llama.cpp's grammars, converted to Lark)."""

    text: str
    syntax: str = "lark"
    param: ClassVar[str] = "grammar"
    kind: ClassVar[str] = "grammar"

    def __post_init__(self) -> None:
        if not isinstance(self.text, str) or not self.text.strip():
            raise ConfigError(self.param, self.text, "must be a non-empty grammar")
        if self.syntax not in ("lark", "gbnf"):
            raise ConfigError("syntax", self.syntax, "must be 'lark' or 'gbnf'")
        self._compile(lambda llg: llg.grammar_from(self.syntax, self.text), self.text)
