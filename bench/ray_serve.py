"""edgeroute on Ray Serve against one `edgeroute serve`, in the same run, on SmolLM2-135M int4: N concurrent
streaming chat clients for a fixed time (the load of bench/serve.py) against

* `edgeroute serve --ray --replicas 1` (1 CPU, 1 thread),
* `edgeroute serve --ray --replicas 2` (1 CPU and 1 thread each: this machine's 2 cores as 2 replicas),
* `edgeroute serve --threads 2` (one process, one engine, both cores),

each with --max-batch 8. Per row: requests/s, aggregate tokens/s, TTFT p50/p99, errors, and per server the
start-up time (command started -> /health 200 with every replica running) — the deployment's cost over one process.

    python bench/ray_serve.py [--clients 1 4 8] [--seconds 20] [--tokens 64] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from _common import REPO, need_model
from engine import cpu_name

from serve import MODEL, Server, free_port, load

EDGEROUTE = str(REPO / ".venv" / "bin" / "edgeroute")


def all_running(server: Server, replicas: int | None, deadline_s: float = 300) -> None:
    """Once /health answers: on Ray, wait until it shows every replica running."""
    t0 = time.monotonic()
    while replicas is not None:
        d = httpx.get(server.url + "/health", timeout=5).json().get("deployment") or {}
        if d.get("replica_states") == {"RUNNING": replicas}:
            return
        if time.monotonic() - t0 > deadline_s:
            raise RuntimeError(f"{replicas} replicas not running within {deadline_s:g} s: {d}")
        time.sleep(0.1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=MODEL)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    need_model(args.model)
    common = [EDGEROUTE, "serve", str(args.model), "--max-batch", "8", "--model-name", "m", "--log-level", "warning"]
    setups: list[tuple[str, list[str], int | None]] = [
        ("ray, 1 replica x 1 thread", ["--ray", "--replicas", "1", "--ray-cpus", "2", "--threads", "1"], 1),
        ("ray, 2 replicas x 1 thread", ["--ray", "--replicas", "2", "--ray-cpus", "2", "--threads", "1"], 2),
        ("edgeroute serve, 2 threads", ["--threads", "2"], None),
    ]
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    for name, extra, replicas in setups:
        port = free_port()
        t0 = time.monotonic()
        try:
            server = Server(f"ray-{len(rows)}", [*common, *extra, "--port", str(port)], port)
        except RuntimeError as e:
            notes.append(f"{name}: {e}")
            continue
        try:
            all_running(server, replicas)
            startup = time.monotonic() - t0
            load(server.url, "m", max(args.clients), 5.0, 8)  # warm-up, as wide as the widest row
            for n in args.clients:
                row = load(server.url, "m", n, args.seconds, args.tokens)
                row.update(server=name, startup_s=startup)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
        except RuntimeError as e:
            notes.append(f"{name}: {e}")
        finally:
            server.stop()
    report = {"cpu": cpu_name(), "seconds": args.seconds, "tokens": args.tokens, "rows": rows, "notes": notes}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{report['cpu']}, {args.seconds:g} s per row, {args.tokens} tokens per request, streaming chat\n")
    print("| server | start-up s | clients | req/s | tok/s | TTFT p50 ms | TTFT p99 ms | errors |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        p50 = "-" if r["ttft_p50_ms"] is None else f"{r['ttft_p50_ms']:.0f}"
        p99 = "-" if r["ttft_p99_ms"] is None else f"{r['ttft_p99_ms']:.0f}"
        print(
            f"| {r['server']} | {r['startup_s']:.1f} | {r['clients']} | {r['requests_per_s']:.2f} | {r['tok_s']:.0f}"
            f" | {p50} | {p99} | {r['errors']} |"
        )
    for note in notes:
        print(f"\n{note}")


if __name__ == "__main__":
    main()
