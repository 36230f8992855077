"""The continuous-batching engine: aggregate and per-request decode speed at 1, 2, 4, 8 concurrent requests
against the same requests run one after another, time to first token while others decode, the stall a long
prompt costs running streams, prefix reuse, and token agreement with each request run alone.

    python bench/engine.py [--model models/smollm2-135m-int4] [--tokens 128] [--concurrency 1 2 4 8] [--json]

Every request generates exactly --tokens tokens (end of sequence suppressed until then), greedy, on the chat
prompt of bench/peers.py ("Write a short story about a robot who learns to paint."). "aggregate" is all
requests' tokens over the wall time from the first submission to the last token; "per request" is the median of
each request's own decode tok/s (``Usage.tokens_per_second``); "sequential" runs the same requests one after
another through ``Model.generate`` (aggregate = tokens over their total time). Agreement: the share of requests
(mixed greedy and seeded sampling, different prompts) whose tokens in the engine equal their tokens alone.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import threading
import time
from pathlib import Path

import edgeroute as er
from _common import REPO, need_model

PROMPT = "Write a short story about a robot who learns to paint."
QUESTIONS = [
    "Write a short story about a robot who learns to paint.",
    "What is the capital of France?",
    "List three uses of a paperclip.",
    "Explain rain to a child.",
    "Give me a haiku about the sea.",
    "How do I boil an egg?",
    "Name a famous painter and one of their works.",
    "Why is the sky blue?",
]


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def fixed(tokens: int, **sampling: object) -> er.GenerationConfig:
    return er.GenerationConfig(max_new_tokens=tokens, min_new_tokens=tokens, sampling=er.SamplingConfig(**sampling))


def concurrent(model: er.Model, n: int, tokens: int, max_batch: int) -> dict[str, float]:
    ids = model.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}])
    cfg = fixed(tokens, temperature=0)
    with er.Engine(model, max_batch=max_batch, prefix_reuse=False) as engine:  # every request prefills its prompt
        engine.submit(ids, fixed(4, temperature=0)).result()  # warm up
        t0 = time.perf_counter()
        requests = [engine.submit(ids, cfg) for _ in range(n)]
        done = [r.result(timeout=600) for r in requests]
        wall = time.perf_counter() - t0
    total = sum(c.usage.completion_tokens for c in done)
    ttft = sorted(c.usage.time_to_first_token or 0.0 for c in done)
    return {
        "aggregate_tok_s": total / wall,
        "per_request_tok_s": statistics.median(c.usage.tokens_per_second for c in done),
        "ttft_p50_ms": 1000 * ttft[len(ttft) // 2],
        "ttft_p95_ms": 1000 * ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))],
    }


def sequential(model: er.Model, n: int, tokens: int) -> float:
    ids = model.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}])
    cfg = fixed(tokens, temperature=0)
    model.generate(ids, fixed(4, temperature=0))
    t0 = time.perf_counter()
    total = sum(model.generate(ids, cfg).usage.completion_tokens for _ in range(n))
    return total / (time.perf_counter() - t0)


def stall(model: er.Model, budget: int, tokens: int) -> dict[str, float]:
    """Three streams decode; a 2,000-token prompt arrives: the longest gap between two tokens of the running
    streams, against their median gap."""
    ids = model.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}])
    long_text = " ".join(f"item {i} is a small red box." for i in range(400))
    long_ids = model.tokenizer.encode(long_text)[:2000]
    with er.Engine(model, max_batch=4, prefill_budget=budget, prefix_reuse=False) as engine:
        engine.submit(ids, fixed(4, temperature=0)).result()
        running = [engine.submit(ids, fixed(tokens, temperature=0)) for _ in range(3)]
        stamps: list[list[float]] = [[] for _ in running]

        def read(k: int) -> None:  # a reader per stream, so each token is stamped when it arrives
            for _ in running[k].stream(timeout=600):
                stamps[k].append(time.perf_counter())

        readers = [threading.Thread(target=read, args=(k,)) for k in range(len(running))]
        for t in readers:
            t.start()
        while min(len(s) for s in stamps) < 10:  # let them decode a little
            time.sleep(0.001)
        t_join = time.perf_counter()
        newcomer = engine.submit(long_ids, fixed(8, temperature=0))
        for t in readers:
            t.join()
        first = newcomer.result(timeout=600).usage.time_to_first_token or 0.0
    gaps = [b - a for s in stamps for a, b in zip(s, s[1:], strict=False)]
    after = [b - a for s in stamps for a, b in zip(s, s[1:], strict=False) if b > t_join]
    return {
        "median_gap_ms": 1000 * statistics.median(gaps),
        "max_gap_ms": 1000 * max(after),
        "newcomer_ttft_ms": 1000 * first,
    }


def prefix_reuse(model: er.Model) -> dict[str, float]:
    system = " ".join(f"Rule {i}: answer politely and briefly, and never invent facts." for i in range(80))
    sys_ids = model.tokenizer.encode(system)[:1000]
    out = {}
    for reuse in (False, True):
        with er.Engine(model, max_batch=2, prefix_reuse=reuse) as engine:
            q1 = model.tokenizer.encode(" What is rain?")
            q2 = model.tokenizer.encode(" What is snow?")
            engine.submit(sys_ids + q1, fixed(4, temperature=0)).result()
            second = engine.submit(sys_ids + q2, fixed(4, temperature=0)).result()
        out["ttft_reuse_ms" if reuse else "ttft_cold_ms"] = 1000 * (second.usage.time_to_first_token or 0.0)
    return out


def agreement(model: er.Model, tokens: int) -> dict[str, float]:
    cfgs = [fixed(tokens, temperature=0) if i % 2 == 0 else fixed(tokens, temperature=0.8, seed=i) for i in range(8)]
    prompts = [model.tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    alone = [model.generate(p, c).token_ids for p, c in zip(prompts, cfgs, strict=True)]
    with er.Engine(model, max_batch=8) as engine:
        requests = [engine.submit(p, c) for p, c in zip(prompts, cfgs, strict=True)]
        got = [r.result(timeout=600).token_ids for r in requests]
    same = sum(a == g for a, g in zip(alone, got, strict=True))
    first_diff = [
        next((i for i, (x, y) in enumerate(zip(a, g, strict=False)) if x != y), len(a))
        for a, g in zip(alone, got, strict=True)
    ]
    return {"identical_requests": same, "of": len(alone), "mean_first_divergence": statistics.mean(first_diff)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=REPO / "models" / "smollm2-135m-int4")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--concurrency", type=int, nargs="*", default=[1, 2, 4, 8])
    ap.add_argument("--budgets", type=int, nargs="*", default=[32, 64, 128, 256])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    model = er.Model.load(need_model(args.model))
    rows = {}
    for n in args.concurrency:
        row = concurrent(model, n, args.tokens, max(args.concurrency))
        row["sequential_aggregate_tok_s"] = sequential(model, n, args.tokens)
        rows[n] = row
    lone = rows[min(rows)]["per_request_tok_s"] if 1 in rows else None
    result = {
        "machine": f"{cpu_name()}, {len(__import__('os').sched_getaffinity(0))} cores",
        "model": str(args.model),
        "tokens": args.tokens,
        "concurrency": rows,
        "stall": {b: stall(model, b, 48) for b in args.budgets},
        "prefix_reuse_1000_tokens": prefix_reuse(model),
        "agreement": agreement(model, 48),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"machine: {result['machine']}; {args.model.name}; {args.tokens} new tokens per request, greedy\n")
    print("| concurrent | aggregate tok/s | x lone | per request tok/s | x lone | TTFT p50 | TTFT p95 |", end="")
    print(" sequential tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    for n, r in rows.items():
        xa = f"{r['aggregate_tok_s'] / lone:.2f}x" if lone else "-"
        xp = f"{r['per_request_tok_s'] / lone:.2f}x" if lone else "-"
        print(
            f"| {n} | {r['aggregate_tok_s']:.1f} | {xa} | {r['per_request_tok_s']:.1f} | {xp} |"
            f" {r['ttft_p50_ms']:.0f} ms | {r['ttft_p95_ms']:.0f} ms | {r['sequential_aggregate_tok_s']:.1f} |"
        )
    print("\nprefill budget vs the stall a 2,000-token prompt costs 3 running streams:")
    print("| budget (tokens/step) | median gap | longest gap after it arrives | its time to first token |")
    print("|---|---|---|---|")
    for b, s in result["stall"].items():
        print(f"| {b} | {s['median_gap_ms']:.1f} ms | {s['max_gap_ms']:.0f} ms | {s['newcomer_ttft_ms']:.0f} ms |")
    p = result["prefix_reuse_1000_tokens"]
    print(f"\nprefix reuse, 1,000-token shared system prompt: TTFT {p['ttft_cold_ms']:.0f} ms cold,"
          f" {p['ttft_reuse_ms']:.0f} ms reused")  # fmt: skip
    a = result["agreement"]
    print(f"agreement with each request alone (8 requests, 48 tokens): {a['identical_requests']}/{a['of']} identical,"
          f" first divergence at token {a['mean_first_divergence']:.1f} on average")  # fmt: skip


if __name__ == "__main__":
    main()
