"""Structured output: JSON Schema, regex and grammar constraints as one more stage of the router (llguidance).

A *constraint* (:class:`JsonSchema`, :class:`JsonObject`, :class:`Regex`, :class:`Grammar`) is an immutable,
validated setting of a :class:`~edgeroute.GenerationConfig`: an invalid schema, pattern or grammar raises
``ConfigError`` when it is built, never mid-generation. Each request's router gets a ``grammar.GrammarStage``: a
llguidance matcher that follows the tokens of the turn and says, at every step, which tokens keep the text inside
the grammar (what that does to the routed distribution, and what it costs: ``grammar.py``).

llguidance is the ``grammar`` extra (``pip install 'edgeroute[grammar]'``; ``serve`` includes it), imported when a
constraint is built.

**Limits.** llguidance compiles a grammar recursively on the calling thread's native stack, 1.2 to 2.6 KB per
level of *chain* (an object or array entered, a ``$ref`` followed, a rule referenced, a bracket opened: counted
along the heaviest path through the references, a reference cycle counted whole); an 8 MB stack overflows past
some 3,200 levels and the process dies (SIGSEGV). So each constraint is measured first, in Python and iteratively,
and refused (``ConfigError`` naming the limit) past :data:`MAX_CHAIN` = 500 levels (at most 1.3 MB of stack: 6x
below Linux's 8 MB main and thread stacks, safe on 2 MB; real schemas and grammars chain under 50), a schema
nested past :data:`MAX_SCHEMA_DEPTH` = 64 (llguidance's JSON parser stops at 128) or larger than
:data:`MAX_SCHEMA_BYTES` = 256 KiB as JSON, a Lark grammar past :data:`MAX_GRAMMAR_BYTES` = 256 KiB (it may embed a
schema), a GBNF one past :data:`MAX_GBNF_BYTES` = 64 KiB (llguidance converts it in Python, in time quadratic in
its chain) and a regex past :data:`MAX_REGEX_CHARS` = 16 Ki characters (compile time outgrows size: ~2 s for 256
KiB of flat properties). A constraint whose language is empty (``{"$ref": "#"}``, ``[^\\s\\S]``, ``start:
start``) is refused too: its matcher over a 256-byte vocabulary allows nothing, not even the end, at the start.
"""

from __future__ import annotations

import bisect
import json
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import unquote

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


MAX_CHAIN = 500
MAX_SCHEMA_DEPTH = 64
MAX_SCHEMA_BYTES = 256 * 1024
MAX_GRAMMAR_BYTES = 256 * 1024
MAX_GBNF_BYTES = 64 * 1024
MAX_REGEX_CHARS = 16 * 1024


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


# -- bounds on what reaches llguidance's recursive compiler (module docstring, "Limits") -------------------------
class _TooBig(Exception):
    """A constraint past one of the limits; the message is the ConfigError's reason."""


def _chain_reason(chain: int) -> str:
    return f"chains {chain} levels deep through its references and nesting (the limit is {MAX_CHAIN})"


def _longest_path(weights: list[int], edges: list[set[int]]) -> int:
    """The heaviest path (the sum of its vertices' weights) of a directed graph, a strongly connected component
    counted as one vertex of its members' summed weight: a bound on any path that visits a vertex at most once.
    Iterative Tarjan (components come out successors first), then the longest path over the components."""
    n = len(weights)
    index, low, comp = [-1] * n, [0] * n, [-1] * n
    on_stack = [False] * n
    stack: list[int] = []
    best: list[int] = []  # per component (in the order they come out): its heaviest path
    counter = 0
    for root in range(n):
        if index[root] != -1:
            continue
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack[root] = True
        work = [(root, iter(edges[root]))]
        while work:
            v, successors = work[-1]
            for u in successors:
                if index[u] == -1:
                    index[u] = low[u] = counter
                    counter += 1
                    stack.append(u)
                    on_stack[u] = True
                    work.append((u, iter(edges[u])))
                    break
                if on_stack[u]:
                    low[v] = min(low[v], index[u])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    c, members = len(best), []
                    while True:
                        u = stack.pop()
                        on_stack[u] = False
                        comp[u] = c
                        members.append(u)
                        if u == v:
                            break
                    after = max((best[comp[x]] for m in members for x in edges[m] if comp[x] != c), default=0)
                    best.append(sum(weights[m] for m in members) + after)
    return max(best, default=0)


def _schema_chain(schema: Any) -> int:
    """The chain of a JSON Schema (module docstring): raises ``_TooBig`` past the depth or size limits, else
    returns the heaviest path through ``$ref`` s, where following a reference costs one plus the height of the
    target (its deepest nesting), and the root its height. What counts as a target is an over-estimate (a JSON
    pointer tried from the root and from every ``$id``; an anchor, every ``$anchor`` of that name); a ``$ref``
    under ``$defs``/``definitions`` belongs only to the definition that holds it (llguidance compiles
    definitions when they are referenced)."""
    max_nodes = MAX_SCHEMA_BYTES // 2  # every object or array takes at least two bytes of JSON
    nodes: list[Any] = []
    parent: list[int] = []
    barrier: list[int] = []  # the node of the nearest enclosing $defs/definitions (-1: none)
    where: dict[int, int] = {}
    if not isinstance(schema, (Mapping, list, tuple)):
        return 0
    todo: list[tuple[Any, int, int, bool]] = [(schema, -1, 1, False)]
    while todo:  # pre-order, so that a node's subtree is the range [i, i + size[i])
        obj, up, depth, is_defs = todo.pop()
        if depth > MAX_SCHEMA_DEPTH:
            raise _TooBig(f"nests objects and arrays more than {MAX_SCHEMA_DEPTH} levels deep")
        i = len(nodes)
        if i >= max_nodes:
            raise _TooBig(f"is larger than {MAX_SCHEMA_BYTES} bytes as JSON")
        nodes.append(obj)
        parent.append(up)
        barrier.append(i if is_defs else barrier[up] if up >= 0 else -1)
        where.setdefault(id(obj), i)
        items = list(obj.items()) if isinstance(obj, Mapping) else list(enumerate(obj))
        for key, child in reversed(items):
            if isinstance(child, (Mapping, list, tuple)):
                defs = isinstance(obj, Mapping) and key in ("$defs", "definitions")
                todo.append((child, i, depth + 1, defs))
    n = len(nodes)
    height, size = [1] * n, [1] * n
    for i in range(n - 1, 0, -1):
        height[parent[i]] = max(height[parent[i]], height[i] + 1)
        size[parent[i]] += size[i]
    refs: list[tuple[int, str]] = []
    anchors: dict[str, list[int]] = {}
    bases = [0]
    for i, obj in enumerate(nodes):
        if isinstance(obj, Mapping):
            if isinstance(obj.get("$ref"), str):
                refs.append((i, obj["$ref"]))
            for key in ("$anchor", "$dynamicAnchor"):
                if isinstance(obj.get(key), str):
                    anchors.setdefault(obj[key], []).append(i)
            if i and any(isinstance(obj.get(key), str) for key in ("$id", "id")):
                bases.append(i)
    if not refs:
        return height[0]
    targets: dict[str, list[int]] = {}
    for _, ref in refs:
        if ref not in targets:
            targets[ref] = _ref_targets(ref, nodes, where, bases, anchors)
    vertex = {0: 0}
    for found in targets.values():
        for t in found:
            vertex.setdefault(t, len(vertex))
    weights = [0] * len(vertex)
    edges: list[set[int]] = [set() for _ in vertex]
    at = [i for i, _ in refs]
    for node, v in vertex.items():
        weights[v] = height[node] + (1 if node else 0)
        for k in range(bisect.bisect_left(at, node), bisect.bisect_left(at, node + size[node])):
            i, ref = refs[k]
            if barrier[i] < node:  # not inside a $defs of this vertex
                edges[v].update(vertex[t] for t in targets[ref])
    return _longest_path(weights, edges)


def _ref_targets(ref: str, nodes: list[Any], where: dict[int, int], bases: list[int], anchors: dict) -> list[int]:
    _, hash_, fragment = ref.partition("#")
    if not hash_ or not fragment:
        return bases
    if not fragment.startswith("/"):
        return anchors.get(unquote(fragment), [])
    found = []
    for base in bases:
        obj: Any = nodes[base]
        for part in fragment[1:].split("/"):
            part = unquote(part).replace("~1", "/").replace("~0", "~")
            if isinstance(obj, Mapping) and part in obj:
                obj = obj[part]
            elif isinstance(obj, (list, tuple)) and part.isdigit() and int(part) < len(obj):
                obj = obj[int(part)]
            else:
                obj = None
                break
        if isinstance(obj, (Mapping, list, tuple)) and id(obj) in where:
            found.append(where[id(obj)])
    return found


_LARK = re.compile(
    r"""(?P<skip>\s+|(?://|\#)[^\n]*|"(?:[^"\\\n]|\\.)*"|/(?:[^/\\\n]|\\.)+/)
    |(?P<directive>%[A-Za-z_]+)|(?P<name>[A-Za-z_][A-Za-z0-9_-]*)|(?P<open>[(\[{])|(?P<close>[)\]}])|(?P<colon>:)""",
    re.VERBOSE,
)
_GBNF = re.compile(  # the same tokens in llama.cpp's GBNF: ``[...]`` is a character class, ``::=`` a colon
    r"""(?P<skip>\s+|\#[^\n]*|"(?:[^"\\\n]|\\.)*"|\[(?:[^\]\\\n]|\\.)*\])
    |(?P<name>[A-Za-z0-9_-]+)|(?P<open>[({])|(?P<close>[)}])|(?P<colon>:)""",
    re.VERBOSE,
)
_SPACE = re.compile(r"\s*")
_BODY_DIRECTIVES = ("%json", "%lark", "%regex")  # the others (%ignore, %import, ...) end the rule before them


def _lark_chain(text: str, lexer: re.Pattern[str] = _LARK) -> int:
    """The chain of a Lark grammar: the heaviest path through rule references, a rule weighing two plus the
    deepest nesting of its brackets plus the chains of its ``%json`` schemas (rules that refer to each other
    counted whole; names that may not be rules counted as references: an over-estimate)."""
    rules: list[tuple[str, list[str], int]] = []  # name, referenced names, weight
    refs: list[str] = []
    name, nest, extra = "", 0, 0
    opens: list[bool] = []  # per open bracket: whether it nests (a %lark {...} scope does not)
    depth = 0
    last = (-1, "")  # the last name outside brackets: the next rule's name when a colon follows
    pos, scope_next = 0, False
    while pos < len(text):
        m = lexer.match(text, pos)
        if m is None:
            pos += 1
            continue
        pos, kind, token = m.end(), m.lastgroup, m.group()
        if kind == "name":
            if depth == 0:
                last = (len(refs), token)
            refs.append(token)
        elif kind == "open":
            opens.append(not scope_next)
            depth += 0 if scope_next else 1
            nest = max(nest, depth)
            scope_next = False
        elif kind == "close" and opens:
            depth -= 1 if opens.pop() else 0
        elif kind == "colon" and depth == 0 and last[0] >= 0:
            del refs[last[0] :]
            rules.append((name, refs, 2 + nest + extra))
            name, refs, nest, extra, last = last[1], [], 0, 0, (-1, "")
        elif kind == "directive":
            scope_next = token == "%lark"
            if token in ("%json", "%regex", "%llguidance"):
                try:
                    value, pos = json.JSONDecoder().raw_decode(text, _SPACE.match(text, pos).end())  # type: ignore[union-attr]
                except RecursionError:
                    raise _TooBig(f"nests objects and arrays more than {MAX_SCHEMA_DEPTH} levels deep") from None
                except ValueError:
                    continue
                if token == "%json":
                    extra += _schema_chain(value)
            if depth == 0 and token not in _BODY_DIRECTIVES:
                rules.append((name, refs, 2 + nest + extra))
                name, refs, nest, extra, last = "", [], 0, 0, (-1, "")
    rules.append((name, refs, 2 + nest + extra))
    index: dict[str, list[int]] = {}
    for i, (rule, _, _) in enumerate(rules):
        index.setdefault(rule, []).append(i)
    edges = [{j for r in set(refs) for j in index.get(r, ())} for _, refs, _ in rules]
    return _longest_path([w for _, _, w in rules], edges)


_BYTES: list[Any] = []  # the byte-level llguidance tokenizer (built once)
_BYTES_LOCK = threading.Lock()


class _ByteVocabulary:
    """256 one-byte tokens and an end token: what the emptiness check runs a matcher over."""

    eos_token_id = 256
    bos_token_id = None
    tokens = [bytes([b]) for b in range(256)] + [b""]
    special_token_ids = [256]

    def __call__(self, text: bytes | str) -> list[int]:
        return list(text.encode() if isinstance(text, str) else text)


def _byte_tokenizer(llg: Any) -> Any:
    with _BYTES_LOCK:
        if not _BYTES:
            wrapper = llg.TokenizerWrapper(_ByteVocabulary())
            _BYTES.append(llg.LLTokenizer(wrapper, n_vocab=257, eos_token=256, slices=[]))
        return _BYTES[0]


def _is_empty(llg: Any, grammar: str) -> bool:
    """True when the grammar's language is empty as far as its start shows: a matcher over single bytes that
    allows no byte and cannot end (a grammar the byte vocabulary cannot express, one that names special tokens,
    is not judged)."""
    matcher = llg.LLMatcher(_byte_tokenizer(llg), grammar, log_level=0)
    if matcher.is_error():
        return False
    matcher.compute_bitmask()
    return bool(matcher.is_stopped() and not matcher.is_accepting())


class Constraint:
    """The shape the generated text must take: a compiled llguidance grammar. ``param`` names the setting in
    errors (``schema``, ``regex``, ``grammar``); ``kind`` says what it is in results and reports."""

    param: ClassVar[str] = "constraint"
    kind: ClassVar[str] = "grammar"

    @property
    def grammar(self) -> str:
        """The llguidance grammar (validated when the constraint was built)."""
        return str(self.__dict__["_grammar"])

    def _compile(self, make: Any, value: Any, measure: Any = None) -> None:
        """``make(llg)`` -> the llguidance grammar; ``measure(grammar)`` raises ``_TooBig`` past the limits, before
        llguidance compiles it (module docstring)."""
        llg = load_llguidance()
        try:
            grammar = make(llg)
            if measure is not None:
                measure(grammar)
        except _TooBig as e:
            raise ConfigError(self.param, shorten(value), str(e)) from None
        except (ValueError, TypeError, RecursionError) as e:
            raise ConfigError(self.param, shorten(value), first_line(str(e))) from None
        error = llg.LLMatcher.validate_grammar(grammar)
        if error and not error.startswith("WARNING"):
            raise ConfigError(self.param, shorten(value), first_line(error))
        if _is_empty(llg, grammar):
            raise ConfigError(self.param, shorten(value), "matches no text at all (its language is empty)")
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
            if len(schema) > MAX_SCHEMA_BYTES:
                raise ConfigError(self.param, shorten(schema), f"is larger than {MAX_SCHEMA_BYTES} bytes as JSON")
            try:
                schema = json.loads(schema)
            except RecursionError:
                reason = f"nests objects and arrays more than {MAX_SCHEMA_DEPTH} levels deep"
                raise ConfigError(self.param, shorten(self.schema), reason) from None
            except ValueError as e:
                raise ConfigError(self.param, shorten(self.schema), f"is not valid JSON: {e}") from None
        if not isinstance(schema, (Mapping, bool)):
            raise ConfigError(self.param, shorten(schema), "must be a JSON Schema (an object)")
        if self.whitespace not in WHITESPACE:
            raise ConfigError("whitespace", self.whitespace, f"must be one of {', '.join(WHITESPACE)}")
        try:
            chain = _schema_chain(schema)  # first: it bounds the depth that json.dumps recurses to
            text = json.dumps(schema, sort_keys=False)
        except _TooBig as e:
            raise ConfigError(self.param, _short_schema(schema), str(e)) from None
        except (ValueError, TypeError) as e:  # a circular or non-JSON Python object
            raise ConfigError(self.param, _short_schema(schema), f"is not JSON: {e}") from None
        if len(text.encode()) > MAX_SCHEMA_BYTES:
            raise ConfigError(self.param, shorten(text), f"is larger than {MAX_SCHEMA_BYTES} bytes as JSON")
        if chain > MAX_CHAIN:
            raise ConfigError(self.param, shorten(text), _chain_reason(chain))
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
        if len(self.pattern) > MAX_REGEX_CHARS:
            raise ConfigError(self.param, shorten(self.pattern), f"is longer than {MAX_REGEX_CHARS} characters")
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
        limit = MAX_GRAMMAR_BYTES if self.syntax == "lark" else MAX_GBNF_BYTES
        if len(self.text.encode()) > limit:
            raise ConfigError(self.param, shorten(self.text), f"is larger than {limit} bytes")
        if self.syntax == "gbnf":  # before llguidance's converter, whose time grows with the square of the chain
            chain = _lark_chain(self.text, _GBNF)
            if chain > MAX_CHAIN:
                raise ConfigError(self.param, shorten(self.text), _chain_reason(chain))
        self._compile(lambda llg: llg.grammar_from(self.syntax, self.text), self.text, _measure_lark)


def _measure_lark(grammar: str) -> None:
    """Raises ``_TooBig`` when the Lark grammar (a GBNF one converted) is past the limits."""
    if len(grammar.encode()) > MAX_GRAMMAR_BYTES:
        raise _TooBig(f"is larger than {MAX_GRAMMAR_BYTES} bytes")
    chain = _lark_chain(grammar)
    if chain > MAX_CHAIN:
        raise _TooBig(_chain_reason(chain))


def _short_schema(schema: Any) -> str:
    """A schema too deep or too large for ``json.dumps``, named by its first keys."""
    if isinstance(schema, Mapping):
        return shorten("{" + ", ".join(json.dumps(str(k)) + ": ..." for k in list(schema)[:4]) + "}")
    return shorten(repr(schema))
