"""Hostile structured-output constraints: chains of ``$ref`` s, rules and brackets that would overflow llguidance's
native stack (a SIGSEGV of the whole process, so those run in a subprocess), schemas nested past Python's
recursion limit, oversized constraints, constraints whose language is empty, and tool ``parameters`` with
``$defs`` (what pydantic writes for nested models)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import edgeroute as er
import jsonschema
import llguidance as llg
import openai
import pydantic
import pytest
from edgeroute.constraint import MAX_CHAIN, MAX_GBNF_BYTES, MAX_GRAMMAR_BYTES, MAX_REGEX_CHARS, MAX_SCHEMA_BYTES
from edgeroute.serve.tools import parse_tools

LIMIT = f"(the limit is {MAX_CHAIN})"

# The hostile shapes, as source for the subprocesses (and exec'd here for the in-process tests).
SHAPES = r"""
import json, threading
import edgeroute as er
from edgeroute.serve.tools import parse_tools
from edgeroute.serve.protocol import APIError

def chain(n, link):  # $defs D0 -> D1 -> ... -> Dn, each def made by link("#/$defs/D<i+1>")
    defs = {f"D{i}": link(f"#/$defs/D{i + 1}") for i in range(n)}
    defs[f"D{n}"] = {"type": "integer"}
    return {"$ref": "#/$defs/D0", "$defs": defs}

def objects(n):
    return chain(n, lambda r: {"type": "object", "properties": {"x": {"$ref": r}}, "required": ["x"]})

def refs(n):
    return chain(n, lambda r: {"$ref": r})

def options(n):
    return chain(n, lambda r: {"anyOf": [{"type": "object", "properties": {"x": {"$ref": r}}}, {"type": "null"}]})

def rules(n):
    return "start: r0\n" + "".join(f'r{i}: "a" r{i + 1}\n' for i in range(n)) + f'r{n}: "b"\n'

def brackets(n):
    body = "".join(f"r{i}: " + "(" * 20 + f'"a" r{i + 1}' + ")" * 20 + "\n" for i in range(n))
    return "start: r0\n" + body + f'r{n}: "b"\n'

def gbnf(n):
    return "root ::= r0\n" + "".join(f'r{i} ::= "a" r{i + 1}\n' for i in range(n)) + f'r{n} ::= "b"\n'

def embedded(n):
    return "start: %json " + json.dumps(objects(n)) + "\n"

def tool(parameters):
    body = {"tools": [{"type": "function", "function": {"name": "f", "parameters": parameters}}]}
    try:
        parse_tools(body)
    except APIError as e:
        return e.message  # "<param>: <reason>"
    return "accepted"

def refused(make):
    try:
        make()
    except er.ConfigError as e:
        return f"{e.field}: {e.reason}"
    return "accepted"
"""


def run(code: str) -> list[str]:
    """``code`` after SHAPES in a fresh interpreter (a stack overflow kills only it): its printed lines."""
    out = subprocess.run([sys.executable, "-c", SHAPES + code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"exit {out.returncode}: {out.stderr[-2000:]}"
    return out.stdout.splitlines()


# -- 1. chains that overflow llguidance's native stack -------------------------------------------------------------
def test_the_reported_chains_are_refused_before_llguidance_compiles_them() -> None:
    lines = run(
        """
for make in (lambda: er.JsonSchema(objects(1000)), lambda: er.JsonSchema(json.dumps(refs(2500))),
             lambda: er.Grammar(rules(3000)), lambda: er.Grammar(gbnf(3000), syntax="gbnf"),
             lambda: er.Grammar(embedded(1000))):
    print(refused(make))
print(tool(objects(1000)))
"""
    )
    assert len(lines) == 6, lines
    for line, field in zip(
        lines, ["schema", "schema", "grammar", "grammar", "grammar", "tools[0].function.parameters"], strict=True
    ):
        assert line.startswith(f"{field}: chains ") and line.endswith(LIMIT), line


def test_chains_within_the_limit_generate_on_a_2_mib_thread_and_longer_ones_are_refused(tiny_dir: Path) -> None:
    """Just under the limit (the bound's margin): the constraint builds, and the generation matcher over a real
    vocabulary computes its masks, on a thread with a quarter of Linux's default stack; four times the limit is
    refused there too."""
    lines = run(
        f"""
model = er.Model.load({str(tiny_dir)!r})
under = {{"objects": (objects, 120), "refs": (refs, 240), "options": (options, 80), "rules": (rules, 240),
         "brackets": (brackets, 20), "gbnf": (gbnf, 240), "embedded": (embedded, 120)}}
def work():
    for name, (shape, n) in under.items():
        for size in (n, 4 * n):
            value = shape(size)
            make = (lambda: er.JsonSchema(value)) if isinstance(value, dict) else (
                lambda: er.Grammar(value, syntax="gbnf" if name == "gbnf" else "lark"))
            verdict = refused(make)
            if verdict == "accepted":
                out = model.generate("hi", er.GenerationConfig(max_new_tokens=4, constraint=make()))
                verdict = f"generated {{len(out.token_ids)}}"
            print(name, size, verdict)
threading.stack_size(2 * 1024 * 1024)
t = threading.Thread(target=work)
t.start()
t.join()
"""
    )
    assert len(lines) == 14, lines
    for within, over in zip(lines[::2], lines[1::2], strict=True):
        assert within.split()[2] == "generated" and int(within.split()[3]) >= 1, within
        assert " chains " in over and over.endswith(LIMIT), over


# -- nesting and size ----------------------------------------------------------------------------------------------
def nested(n: int) -> dict:
    schema: dict = {"type": "integer"}
    for _ in range(n):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


DEEP_TEXT = '{"type": "object", "properties": {"a": ' * 1000 + "{}" + "}}" * 1000


@pytest.mark.parametrize("schema", [nested(1000), DEEP_TEXT], ids=["mapping", "text"])
def test_a_schema_nested_past_the_depth_limit_is_a_config_error(schema) -> None:  # noqa: ANN001
    with pytest.raises(er.ConfigError) as e:
        er.JsonSchema(schema)
    assert e.value.field == "schema" and "more than 64 levels deep" in e.value.reason
    circular: dict = {"type": "object"}
    circular["properties"] = {"a": circular}  # a Python schema that contains itself: no JSON at all
    with pytest.raises(er.ConfigError, match="64 levels"):
        er.JsonSchema(circular)
    er.JsonSchema(nested(30))  # 60 levels of JSON: within


@pytest.mark.parametrize(
    ("make", "field", "limit"),
    [
        (lambda: er.JsonSchema({"type": "string", "description": "x" * MAX_SCHEMA_BYTES}), "schema", MAX_SCHEMA_BYTES),
        (lambda: er.Grammar('start: "a"\n// ' + "x" * MAX_GRAMMAR_BYTES), "grammar", MAX_GRAMMAR_BYTES),
        (lambda: er.Grammar('root ::= "a"\n# ' + "x" * MAX_GBNF_BYTES, syntax="gbnf"), "grammar", MAX_GBNF_BYTES),
        (lambda: er.Regex("a" * (MAX_REGEX_CHARS + 1)), "regex", MAX_REGEX_CHARS),
    ],
    ids=["schema", "lark", "gbnf", "regex"],
)
def test_an_oversized_constraint_is_a_config_error_naming_the_limit(make, field: str, limit: int) -> None:  # noqa: ANN001
    with pytest.raises(er.ConfigError) as e:
        make()
    assert e.value.field == field and str(limit) in e.value.reason and len(str(e.value)) < 200


# -- 2. empty languages --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: er.JsonSchema({"$ref": "#"}), "schema"),
        (
            lambda: er.JsonSchema(
                {"$ref": "#/$defs/A", "$defs": {"A": {"$ref": "#/$defs/B"}, "B": {"$ref": "#/$defs/A"}}}
            ),
            "schema",
        ),
        (lambda: er.Regex(r"[^\s\S]"), "regex"),
        (lambda: er.Grammar("start: start"), "grammar"),
        (lambda: er.Grammar("root ::= root", syntax="gbnf"), "grammar"),
    ],
    ids=["self-ref", "ref-cycle", "regex", "lark", "gbnf"],
)
def test_a_constraint_whose_language_is_empty_is_a_config_error(make, field: str) -> None:  # noqa: ANN001
    with pytest.raises(er.ConfigError) as e:
        make()
    assert e.value.field == field and "language is empty" in e.value.reason


def test_the_emptiness_check_is_cheap_and_keeps_languages_that_are_not_empty() -> None:
    tree = {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#"}}}}
    er.JsonSchema(tree)  # recursive, with a base case
    er.Regex("a{0}")  # only the empty text: not empty
    er.Grammar('start: "a" <|im_end|>')  # a special token the byte vocabulary lacks: not judged
    start = time.perf_counter()
    for i in range(20):
        with pytest.raises(er.ConfigError, match="empty"):
            er.JsonSchema({"$ref": "#", "description": str(i)})
    assert (time.perf_counter() - start) / 20 < 0.02


# -- 3. tool parameters with $defs ---------------------------------------------------------------------------------
class Address(pydantic.BaseModel):
    street: str
    city: str


class Person(pydantic.BaseModel):
    name: str
    home: Address
    others: list[Address]
    boss: Person | None = None


class Move(pydantic.BaseModel):
    to: Address
    stops: list[Address] = []


CALL = {
    "name": "Person",
    "arguments": {
        "name": "Ann",
        "home": {"street": "Main", "city": "Oslo"},
        "others": [{"street": "High", "city": "Bergen"}],
        "boss": {"name": "Bo", "home": {"street": "Low", "city": "Oslo"}, "others": [], "boss": None},
    },
}


class _Bytes:
    eos_token_id, bos_token_id, special_token_ids = 256, None, [256]
    tokens = [bytes([b]) for b in range(256)] + [b""]

    def __call__(self, text: bytes | str) -> list[int]:
        return list(text.encode() if isinstance(text, str) else text)


def accepts(constraint: er.Constraint, text: str) -> bool:
    """Whether the constraint's grammar accepts ``text`` whole (a matcher driven byte by byte)."""
    tokenizer = llg.LLTokenizer(llg.TokenizerWrapper(_Bytes()), n_vocab=257, eos_token=256, slices=[])
    matcher = llg.LLMatcher(tokenizer, constraint.grammar, log_level=0)
    return bool(matcher.consume_tokens(list(text.encode()))) and matcher.is_accepting()


@pytest.mark.parametrize("choice", ["auto", "required", {"type": "function", "function": {"name": "Person"}}])
def test_pydantic_tools_with_nested_models_build_and_accept_a_valid_call(choice) -> None:  # noqa: ANN001
    tools = [openai.pydantic_function_tool(Person), openai.pydantic_function_tool(Move)]
    assert "$defs" in tools[0]["function"]["parameters"]
    parsed = parse_tools({"tools": tools, "tool_choice": choice})
    schema = parsed.call_schema()
    jsonschema.validate(CALL, schema)
    wrong = {**CALL, "arguments": {**CALL["arguments"], "home": {"street": 1}}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(wrong, schema)
    constraint = parsed.constraint()
    assert accepts(constraint, json.dumps(CALL))
    assert not accepts(constraint, json.dumps(wrong))
    if choice == "auto":
        assert accepts(constraint, "<tool_call>\n" + json.dumps(CALL) + "\n</tool_call>")


def test_the_call_schema_points_local_references_at_the_arguments() -> None:
    parameters = {
        "type": "object",
        "properties": {
            "self": {"$ref": "#"},
            "enum": {"$ref": "#/$defs/E"},  # a property named like a keyword: a schema
            "tag": {"const": {"$ref": "#/data"}},  # data: left alone
            "near": {"$ref": "#here"},  # an anchor: location-free
            "own": {"$id": "urn:own", "$ref": "#/$defs/X", "$defs": {"X": {"type": "integer"}}},
        },
        "$defs": {"E": {"enum": ["a", "b"], "$anchor": "here"}},
    }
    body = {"tools": [{"type": "function", "function": {"name": n, "parameters": parameters}} for n in ("f", "g")]}
    named = {"type": "function", "function": {"name": "f"}}
    for choice, at in ((named, "#/properties/arguments"), ("required", "#/anyOf/1/properties/arguments")):
        schema = parse_tools({**body, "tool_choice": choice}).call_schema()
        moved = schema["properties"]["arguments"] if choice == named else schema["anyOf"][1]["properties"]["arguments"]
        props = moved["properties"]
        assert props["self"] == {"$ref": at} and props["enum"] == {"$ref": f"{at}/$defs/E"}
        assert props["tag"] == parameters["properties"]["tag"] and props["near"] == {"$ref": "#here"}
        assert props["own"] == parameters["properties"]["own"]
        assert parameters["properties"]["self"] == {"$ref": "#"}  # the function's own schema is not changed
        name = "f" if choice == named else "g"
        jsonschema.validate({"name": name, "arguments": {"enum": "a", "self": {"enum": "b", "own": 3}}}, schema)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({"name": name, "arguments": {"self": {"enum": "c"}}}, schema)
