"""The prefix cache (issue 38) on SmolLM2 int4: time to first token for a long shared system prompt cold, reused from
memory, and reused from disk after a restart; a multi-tenant trace against slot-only reuse; disk and memory use.

    .venv/bin/python bench/prefix_cache.py [--model models/smollm2-135m-int4] [--rounds 3] [--out FILE.json]

Every measured setting runs in a child process of its own (a restart is a new process: nothing in memory); the
settings take turns for ``--rounds`` rounds and the table gives medians. The page cache is warm when the restarted
process reads the blocks back (the files were just written; dropping the page cache needs root): the figure is a
restart's read of files the system still has in memory, as on an edge box that restarts the app, not the machine.

1. TTFT for a 1,000- and a 4,000-token system prompt followed by a short question: cold (no cache), from memory (the
   prefix cache warmed by another question first), from disk (a new process with the cache directory), and the
   slot reuse of today's engine for reference (the same system prompt in the same slot).
2. A multi-tenant trace: 8 system prompts of ~600 tokens, 64 requests (a system prompt and a question each) in
   random order, 4 clients in a closed loop on an engine of 4 slots (more prompts than slots): hit rate and mean
   TTFT with slot-only reuse (today) and with the prefix cache.
3. Disk bytes per 1,000 cached tokens; the cache's memory against its budget.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import REPO, need_model
from edgeroute.prefix_cache import BLOCK

TEXT = (
    "The committee met on Tuesday to review the budget for the coming year. After a long discussion about schools,"
    " roads, the new library and the harbour, the members agreed to meet again next month. Section {i}: every"
    " department shall report its spending by the fifth day of each month, with receipts and a short note on what"
    " changed since the last report; late reports are returned without review. "
)


CHILD = r"""
import json, sys, time
import edgeroute as er
args = json.loads(sys.argv[1])
load = {"prefix_cache": args["cache"]} if args.get("cache") else {}
m = er.Model.load(args["model"], **load, **({"context_size": 4160} if args["length"] > 3000 else {}))
from bench_prefix_ids import prompts
system, questions = prompts(m.tokenizer, args["length"])
cfg = er.GenerationConfig(max_new_tokens=1, sampling=er.SamplingConfig(temperature=0))
out = {}
if args["mode"] == "slot":  # today's engine: the same system prompt in the same slot
    with er.Engine(m, max_batch=1) as engine:
        engine.submit(system + questions[0], cfg).result()
        t = time.perf_counter()
        r = engine.submit(system + questions[1], cfg)
        next(iter(r))
        out["ttft"] = time.perf_counter() - t
        out["cached"] = r.result().usage.cached_tokens
else:
    if args["mode"] == "memory":
        m.generate(system + questions[0], cfg)  # warms the cache
    c = m.generate(system + questions[1], cfg)
    out["ttft"], out["cached"] = c.usage.time_to_first_token, c.usage.cached_tokens
    if m.prefix_cache is not None:
        m.prefix_cache.close()
        s = m.prefix_cache.stats()
        out["memory_bytes"], out["disk_bytes"], out["disk_blocks"] = s.memory_bytes, s.disk_bytes, s.disk_blocks
print(json.dumps(out))
"""

TRACE = r"""
import json, random, sys, threading, time
import edgeroute as er
args = json.loads(sys.argv[1])
load = {"prefix_cache": True, "prefix_cache_memory": args["memory"]} if args["cache"] else {}
m = er.Model.load(args["model"], **load)
from bench_prefix_ids import trace
items = trace(m.tokenizer)
cfg = er.GenerationConfig(max_new_tokens=16, sampling=er.SamplingConfig(temperature=0))
ttfts, cached, total = [], [0], [0]
lock = threading.Lock()
with er.Engine(m, max_batch=4) as engine:
    todo = list(items)
    def client():
        while True:
            with lock:
                if not todo:
                    return
                ids = todo.pop()
            t = time.perf_counter()
            r = engine.submit(ids, cfg)
            next(iter(r))
            first = time.perf_counter() - t
            c = r.result()
            with lock:
                ttfts.append(first)
                cached[0] += c.usage.cached_tokens
                total[0] += len(ids)
    threads = [threading.Thread(target=client) for _ in range(4)]
    t0 = time.perf_counter()
    for th in threads: th.start()
    for th in threads: th.join()
    wall = time.perf_counter() - t0
print(json.dumps({"mean_ttft": sum(ttfts) / len(ttfts), "p50_ttft": sorted(ttfts)[len(ttfts) // 2],
                  "hit_rate": cached[0] / total[0], "wall": wall}))
"""

IDS = r"""
import random
TEXT = {text!r}
def system_prompt(tokenizer, n, seed=0):
    ids, i = [], seed * 1000
    while len(ids) < n:
        ids += tokenizer.encode(TEXT.format(i=i))
        i += 1
    return ids[:n]
def prompts(tokenizer, n):
    system = system_prompt(tokenizer, n)
    ask = " Question {{}}: what does section {{}} ask of each department?"
    questions = [tokenizer.encode(ask.format(q, q)) for q in range(3)]
    return system, questions
def trace(tokenizer):
    systems = [system_prompt(tokenizer, 600, seed=s + 1) for s in range(8)]
    rng = random.Random(7)
    items = [systems[rng.randrange(8)] + tokenizer.encode(f" Question {{q}}: summarise it.") for q in range(64)]
    return items
"""


def run_child(code: str, args: dict, env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"child failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO / "models" / "smollm2-135m-int4")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    model = need_model(args.model)
    work = Path(tempfile.mkdtemp(prefix="bench-prefix-"))
    (work / "bench_prefix_ids.py").write_text(IDS.format(text=TEXT))
    env = {**os.environ, "PYTHONPATH": str(work)}
    print(f"model {model}; {os.cpu_count()} cores; rounds {args.rounds}")
    results: dict[str, list[dict]] = {}
    for length in (1000, 4000):
        for r in range(args.rounds):
            cache = work / f"cache-{length}-{r}"
            for mode in ("cold", "slot", "memory", "disk-write", "disk"):
                child = {"model": str(model), "length": length, "mode": mode}
                if mode in ("memory", "disk-write", "disk"):
                    child["cache"] = str(cache) if mode != "memory" else True
                if mode == "disk-write":
                    child["mode"] = "memory"  # fills the directory (its TTFT is a memory hit)
                got = run_child(CHILD, child, env)
                results.setdefault(f"{length}/{mode}", []).append(got)
    print("\n## Time to first token (median of rounds)\n")
    print(
        "| system prompt | cold | slot reuse (today) | prefix cache, memory | prefix cache, disk after restart |"
        " restart / cold (per round) |"
    )
    print("|---|---|---|---|---|---|")
    table = {}
    for length in (1000, 4000):
        med = {
            m: statistics.median(x["ttft"] for x in results[f"{length}/{m}"])
            for m in ("cold", "slot", "memory", "disk")
        }
        cached = {m: results[f"{length}/{m}"][0]["cached"] for m in ("slot", "memory", "disk")}
        rounds = zip(results[f"{length}/disk"], results[f"{length}/cold"], strict=True)
        ratio = statistics.median(d["ttft"] / c["ttft"] for d, c in rounds)  # the same round's cold prefill
        table[length] = {"ttft": med, "cached": cached, "restart_over_cold": ratio}
        print(
            f"| {length} tokens | {1000 * med['cold']:.0f} ms | {1000 * med['slot']:.0f} ms ({cached['slot']}) |"
            f" {1000 * med['memory']:.0f} ms ({cached['memory']}) | {1000 * med['disk']:.0f} ms ({cached['disk']}) |"
            f" {100 * ratio:.1f}% |"
        )
    w = results["4000/disk-write"][0]
    per_1000 = w["disk_bytes"] / (w["disk_blocks"] * BLOCK) * 1000 if w["disk_blocks"] else 0
    print(
        f"\ndisk: {w['disk_bytes'] / 2**20:.1f} MiB for {w['disk_blocks']} blocks of {BLOCK} positions:"
        f" {per_1000 / 2**20:.1f} MiB per 1,000 cached tokens (fp32 KV);"
        f" memory held {w['memory_bytes'] / 2**20:.1f} MiB"
    )
    trace: dict[str, list[dict]] = {}
    for _ in range(args.rounds):
        for name, cache in (("slots only", False), ("prefix cache", True)):
            trace.setdefault(name, []).append(run_child(TRACE, {"model": str(model), "cache": cache,
                                                                "memory": 1 << 30}, env))  # fmt: skip
    print("\n## Multi-tenant trace: 8 system prompts (~600 tokens), 64 requests, 4 clients, 4 slots\n")
    print("| reuse | prompt tokens cached | mean TTFT | p50 TTFT | wall |")
    print("|---|---|---|---|---|")
    for name, runs in trace.items():
        mean = statistics.median(x["mean_ttft"] for x in runs)
        print(
            f"| {name} | {100 * statistics.median(x['hit_rate'] for x in runs):.0f}% | {1000 * mean:.0f} ms |"
            f" {1000 * statistics.median(x['p50_ttft'] for x in runs):.0f} ms |"
            f" {statistics.median(x['wall'] for x in runs):.1f} s |"
        )
    pairs = zip(trace["slots only"], trace["prefix cache"], strict=True)
    ratio = statistics.median(b["mean_ttft"] / a["mean_ttft"] for a, b in pairs)
    print(f"\nmean TTFT with the prefix cache / slots only: {ratio:.2f} (goal <= 0.5)")
    if args.out:
        args.out.write_text(json.dumps({"ttft": table, "trace": trace, "raw": results}, indent=1))


if __name__ == "__main__":
    main()
