"""The token lists a battery of routes produces, as JSON: run before and after a refactor and byte-compare the files.

    python bench/behaviour.py models/smollm2-135m models/smollm2-135m-int8 models/smollm2-135m-int4 --out a.json
    ... change the code ...
    python bench/behaviour.py ... --out b.json && cmp a.json b.json

Every route the router and the engine have: greedy, the full router chain, bans, penalties, exploration, speculation
(n-gram and a draft model), guidance, contrast, the gate, beams, a batch, the engine with requests joining and
leaving (more requests than slots, different lengths), a chat session's turns, a rewind, and constrained decoding
(a JSON Schema, a regex). The last model given is the draft and the contrast model of the others.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import edgeroute as er

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
    "List three colours:",
]


def cfg(n: int = 24, **sampling: Any) -> er.GenerationConfig:
    return er.GenerationConfig(max_new_tokens=n, sampling=er.SamplingConfig(**sampling))


def routes(model: er.Model, small: er.Model) -> dict[str, Any]:
    chat = model.tokenizer.apply_chat_template
    p0, p1 = PROMPTS[0], chat([{"role": "user", "content": PROMPTS[1]}])
    out: dict[str, Any] = {}

    def one(name: str, prompt: Any, config: er.GenerationConfig, **flows: Any) -> None:
        c = model.generate(prompt, config, **flows)
        out[name] = [c.token_ids, c.finish_reason]

    one("greedy", p0, cfg(temperature=0))
    full = dict(temperature=0.8, top_k=40, top_p=0.9, min_p=0.05, typical_p=0.95, seed=7)
    one("chain", p1, cfg(**full))
    one("bans", p0, cfg(temperature=0, logit_bias={model.tokenizer.encode(" Paris")[0]: float("-inf")}))
    one("bias", p1, cfg(temperature=0.7, seed=3, logit_bias={13: 4.0, 28: -2.0}))
    penalties = dict(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.4, penalty_last_n=16)
    one("penalties", PROMPTS[3], cfg(40, temperature=0, **penalties))
    one("penalties_sampled", PROMPTS[3], cfg(40, temperature=0.9, seed=11, **penalties))
    one("explore", p1, cfg(temperature=0.7, seed=5, explore=0.2))
    one(
        "explore_linear",
        p1,
        cfg(temperature=0.7, seed=5, explore=0.5, explore_end=0.0, explore_steps=12, explore_schedule="linear"),
    )
    one(
        "min_tokens_stop",
        p0,
        er.GenerationConfig(
            max_new_tokens=24, min_new_tokens=4, stop=("\n",), sampling=er.SamplingConfig(temperature=0)
        ),
    )
    one("ngram", PROMPTS[2], cfg(40, temperature=0), draft="ngram", draft_k=3)
    one("ngram_sampled", PROMPTS[2], cfg(40, temperature=0.8, seed=2), draft="ngram", adaptive_k=True)
    one("draft", p1, cfg(temperature=0.8, seed=9), draft=small, draft_k=4)
    one("draft_greedy", p0, cfg(temperature=0), draft=small)
    one("guidance", p1, cfg(temperature=0.7, seed=4), guidance=1.5, negative_prompt="Write badly.")
    one("guidance_gate", p1, cfg(temperature=0), guidance=2.0, gate_threshold=0.5, gate_width=0.2)
    one("contrast", p1, cfg(temperature=0.6, seed=8), contrast=small, contrast_alpha=0.5)
    one("contrast_gate", p1, cfg(temperature=0), contrast=small, gate_threshold=2.0, gate_signal="entropy")
    beams = er.GenerationConfig(max_new_tokens=16, num_beams=3, num_return_sequences=2)
    c = model.generate(p0, beams)
    out["beams"] = [[h.token_ids for h in (c.sequences or ())], c.token_ids, c.score]
    batch = model.generate(PROMPTS, cfg(20, temperature=0.8, seed=6))
    out["batch"] = [c.token_ids for c in batch]
    out["batch_greedy"] = [c.token_ids for c in model.generate(PROMPTS, cfg(20, temperature=0))]
    lp = model.generate(
        p0, er.GenerationConfig(max_new_tokens=6, logprobs=3, sampling=er.SamplingConfig(temperature=0))
    )
    out["logprobs"] = [[(t.token_id, round(t.logprob, 4), [(a, round(b, 4)) for a, b in t.top]) for t in lp.logprobs]]
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    one(
        "schema",
        chat([{"role": "user", "content": "Give a person as JSON."}]),
        er.GenerationConfig(
            max_new_tokens=40, constraint=er.JsonSchema(schema), sampling=er.SamplingConfig(temperature=0.7, seed=1)
        ),
    )
    one(
        "regex",
        p0,
        er.GenerationConfig(
            max_new_tokens=20,
            constraint=er.Regex(r" [A-Z][a-z]+( [a-z]+){0,3}\."),
            sampling=er.SamplingConfig(temperature=0),
        ),
    )
    # a generator's turns and a rewind
    gen = model.generator(cfg(12, temperature=0.8, seed=12))
    gen.append(model.encode_prompt(p0))
    first = gen.run().token_ids
    gen.rewind(5)
    again = gen.run().token_ids
    gen.append(model.encode_prompt(" And Germany's is"))
    out["generator_turns"] = [first, again, gen.run().token_ids]
    session = er.ChatSession(model, cfg(16, temperature=0))
    out["chat"] = [[st.token_id for st in session.send(q)] for q in ("Hi!", "What is 2+2?")]
    # the engine: 7 requests over 3 slots, different lengths (they leave at different steps, queued ones join),
    # sampled and greedy, a repeated prompt (prefix reuse), a constrained one and a guided one (solo)
    if model.shared_kv:
        with er.Engine(model, max_batch=3, max_queue=8, prefill_budget=16) as engine:
            items = [(PROMPTS[i % 4], cfg(8 + 5 * i, temperature=0.8 if i % 2 else 0, seed=20 + i)) for i in range(6)]
            items.append((PROMPTS[0], cfg(10, temperature=0)))
            reqs = engine.submit_all(items)
            guided = engine.submit(p1, cfg(10, temperature=0), guidance=1.5)
            out["engine"] = [r.result(timeout=300).token_ids for r in reqs]
            out["engine_solo"] = guided.result(timeout=300).token_ids
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", type=Path, help="model folders; the last is also the draft/contrast model")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    small = er.Model.load(args.models[-1], spin=False)
    result = {}
    for folder in args.models:
        model = small if folder == args.models[-1] else er.Model.load(folder, spin=False)
        print(f"{folder} ...", file=sys.stderr, flush=True)
        result[folder.name] = routes(model, small)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out} ({sum(len(v) for v in result.values())} routes)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
