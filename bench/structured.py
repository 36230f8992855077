"""Structured output: what a JSON Schema costs a decode, and what it buys.

    python bench/structured.py [--model models/smollm2-135m-int4] [--reps 5] [--samples 50] [--json]

- **Speed.** The same chat prompt, greedy and at temperature 1.0: a constrained generation (a schema that asks for
  a list of 8-10 items: ~150 tokens) against an unconstrained one of exactly the same number of tokens (end of
  sequence suppressed until then), alternating, ``--reps`` times each; decode tok/s (``Usage.tokens_per_second``)
  and the router's time per token (``Usage.router_seconds``), medians. The difference of router time per token is
  the constraint's cost (llguidance's mask, the candidate restriction or the bans, the parser following the text).
- **Validity.** ``--samples`` answers at temperature 0.7 to a prompt that shows the schema, with and without the
  constraint: the share that parse and validate with ``jsonschema`` (constrained: of those that ended by EOS; the
  others hit the length limit inside the structure).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import edgeroute as er
import jsonschema
from _common import REPO, need_model
from engine import cpu_name

ITEMS = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 24},
                    "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                    "unit": {"enum": ["kg", "g", "l", "pcs"]},
                },
                "required": ["name", "qty", "unit"],
                "additionalProperties": False,
            },
            "minItems": 8,
            "maxItems": 10,
        }
    },
    "required": ["items"],
    "additionalProperties": False,
}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "format": "email"},
        "tags": {"type": "array", "items": {"enum": ["friend", "family", "work"]}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 30},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "email", "tags", "address"],
    "additionalProperties": False,
}


def speed(model: er.Model, reps: int, temperature: float) -> dict[str, float]:
    ids = model.tokenizer.apply_chat_template(
        [{"role": "user", "content": "A shopping list for a party, as JSON: items with name, qty and unit."}]
    )
    sampling = er.SamplingConfig(temperature=temperature, seed=1)
    constrained = er.GenerationConfig(max_new_tokens=400, constraint=er.JsonSchema(ITEMS), sampling=sampling)
    model.generate(ids, constrained)  # warm up: the grammar's tokenizer is built once per model
    runs: dict[str, list[float]] = {"tok_s": [], "router_us": [], "plain_tok_s": [], "plain_router_us": []}
    tokens = []
    for _ in range(reps):
        c = model.generate(ids, constrained)
        n = c.usage.completion_tokens
        plain = er.GenerationConfig(max_new_tokens=n, min_new_tokens=n, sampling=sampling)
        p = model.generate(ids, plain)
        tokens.append(n)
        runs["tok_s"].append(c.usage.tokens_per_second or 0.0)
        runs["router_us"].append(1e6 * c.usage.router_seconds / n)
        runs["plain_tok_s"].append(p.usage.tokens_per_second or 0.0)
        runs["plain_router_us"].append(1e6 * p.usage.router_seconds / p.usage.completion_tokens)
    out = {k: statistics.median(v) for k, v in runs.items()}
    out["tokens"] = statistics.median(tokens)
    out["slowdown"] = out["plain_tok_s"] / out["tok_s"] - 1
    out["constraint_us_per_token"] = out["router_us"] - out["plain_router_us"]
    return out


def validity(model: er.Model, samples: int) -> dict[str, float]:
    prompt = (
        "Write one person record as JSON that validates against this JSON Schema, and nothing else:\n"
        + json.dumps(PERSON)
    )
    ids = model.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    out = {}
    for label, constraint in (("unconstrained", None), ("constrained", er.JsonSchema(PERSON))):
        valid = ended = 0
        with er.Engine(model, max_batch=8, max_queue=samples) as engine:
            reqs = [
                engine.submit(
                    ids,
                    er.GenerationConfig(
                        max_new_tokens=200,
                        constraint=constraint,
                        sampling=er.SamplingConfig(temperature=0.7, seed=s),
                    ),
                )
                for s in range(samples)
            ]
            for r in reqs:
                c = r.result(timeout=900)
                ended += c.finish_reason == "stop"
                try:
                    jsonschema.validate(json.loads(c.text.strip().removeprefix("```json").removesuffix("```")), PERSON)
                    valid += 1
                except (ValueError, jsonschema.ValidationError):
                    pass
        out[f"{label}_valid"] = valid / samples
        out[f"{label}_ended"] = ended / samples
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=REPO / "models" / "smollm2-135m-int4")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--samples", type=int, default=50)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    model = er.Model.load(need_model(args.model))
    result = {
        "machine": f"{cpu_name()}, {len(os.sched_getaffinity(0))} cores",
        "model": str(args.model),
        "greedy": speed(model, args.reps, 0.0),
        "temperature_1": speed(model, args.reps, 1.0),
        "validity": validity(model, args.samples),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"machine: {result['machine']}; {args.model.name}\n")
    print("| decoding | tokens | tok/s with the schema | tok/s without | slower by | router us/token with |", end="")
    print(" without | the constraint's cost us/token |")
    print("|---|---|---|---|---|---|---|---|")
    for name in ("greedy", "temperature_1"):
        r = result[name]
        print(
            f"| {name.replace('_', ' ')} | {r['tokens']:.0f} | {r['tok_s']:.1f} | {r['plain_tok_s']:.1f} |"
            f" {100 * r['slowdown']:.1f}% | {r['router_us']:.0f} | {r['plain_router_us']:.0f} |"
            f" {r['constraint_us_per_token']:.0f} |"
        )
    v = result["validity"]
    print(f"\nvalidity, {args.samples} answers at temperature 0.7 to a prompt that shows the schema:")
    print("| | valid JSON for the schema | ended by EOS |")
    print("|---|---|---|")
    for label in ("unconstrained", "constrained"):
        print(f"| {label} | {100 * v[label + '_valid']:.0f}% | {100 * v[label + '_ended']:.0f}% |")


if __name__ == "__main__":
    main()
