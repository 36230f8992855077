"""OpenAI-compatible servers under load: N concurrent streaming chat clients for a fixed time against
`edgeroute serve`, llama-cpp-python's server and llama.cpp's llama-server, in the same run, on SmolLM2-135M
(edgeroute's int4 export; llama.cpp's Q4_1 GGUF it was exported from).

    python bench/serve.py [--clients 1 4 8 16] [--seconds 20] [--tokens 64] [--json]
    python bench/serve.py --soak 600 --clients 4          # edgeroute alone: errors and RSS over 10 minutes

Each client loops: POST /v1/chat/completions with stream=true, the chat prompt of bench/peers.py, max_tokens
--tokens, temperature 0, and logit_bias -100 on the end-of-sequence tokens (every server generates --tokens
tokens: OpenAI's own way to say so, which all three take). Per concurrency: requests/s, aggregate tokens/s
(content chunks received over the window), TTFT p50/p99 (request sent -> first content chunk), errors (non-200,
a broken stream, no [DONE]), and the server's RSS before and after. Each server is started by this script on a
free port of 127.0.0.1 and stopped after its rows; a server that cannot start is reported with the reason.

llama-cpp-python's server is run with --interrupt_requests False (its default, True, ends a running stream when a
new request arrives) from its own environment: --llama-cpp-python PYTHON (bench/README.md builds it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from _common import REPO, need_model
from engine import PROMPT, cpu_name, find_llama_server

MODEL = REPO / "models" / "smollm2-135m-int4"
EOS_IDS = (0, 2)  # SmolLM2: <|endoftext|>, <|im_end|>


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def gguf_path() -> str:
    out = subprocess.run([sys.executable, str(REPO / "bench" / "smollm2_gguf.py")], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "no GGUF")
    return out.stdout.strip()


class Server:
    """A server process on a free port, healthy (its /health, else /v1/models, answers 200) or an error."""

    def __init__(self, name: str, cmd: list[str], port: int, env: dict[str, str] | None = None) -> None:
        self.name, self.port = name, port
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(f"/tmp/bench-serve-{name}.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                tail = Path(self.log.name).read_text().strip().splitlines()
                raise RuntimeError(f"{name} exited: {tail[-1] if tail else '?'}")
            try:
                for path in ("/health", "/v1/models"):
                    if httpx.get(self.url + path, timeout=2).status_code == 200:
                        return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{name} did not become healthy within 180 s")
            time.sleep(0.3)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


async def client(http: httpx.AsyncClient, body: dict[str, Any], until: float, out: dict[str, list[float]]) -> None:
    async with http:
        first_request = True
        while time.monotonic() < until:
            t0 = time.perf_counter()
            first, tokens, done = None, 0, False
            try:
                async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                    if r.status_code != 200:
                        await r.aread()
                        out["errors"].append(1)
                        continue
                    async for line in r.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        data = line[6:]
                        if data == "[DONE]":
                            done = True
                            break
                        chunk = json.loads(data)
                        if "error" in chunk:
                            break
                        choices = chunk.get("choices") or []
                        if choices and choices[0].get("delta", {}).get("content"):
                            now = time.perf_counter()
                            if first is None:
                                first = now - t0
                            tokens += 1
                            out["stamps"].append(now)
            except (httpx.HTTPError, json.JSONDecodeError):
                done = False
            if not done or first is None:
                out["errors"].append(1)
                continue
            out["ttft"].append(first)
            if not first_request:
                out["ttft_later"].append(first)
            first_request = False
            out["requests"].append(time.perf_counter())
            out["tokens"].append(tokens)


def load(url: str, model: str, clients: int, seconds: float, tokens: int) -> dict[str, Any]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "logit_bias": {str(i): -100 for i in EOS_IDS},
    }
    out: dict[str, list[float]] = {
        "ttft": [],
        "ttft_later": [],
        "requests": [],
        "tokens": [],
        "errors": [],
        "stamps": [],
    }

    async def run() -> float:
        # every client is built before the first request goes out: building an httpx client takes 20-50 ms (its
        # SSL context), which would block the event loop under the requests already sent and count in their TTFT
        https = [httpx.AsyncClient(base_url=url, timeout=120) for _ in range(clients)]
        t0, until = time.perf_counter(), time.monotonic() + seconds
        await asyncio.gather(*(client(http, body, until, out) for http in https))
        return t0

    t0 = asyncio.run(run())
    wall = time.perf_counter() - t0
    window = [s for s in out["stamps"] if s - t0 <= seconds]  # tokens inside the window (not the drain)
    ttft, later = sorted(out["ttft"]), sorted(out["ttft_later"])
    return {
        "clients": clients,
        "requests": len(out["requests"]),
        "requests_per_s": len(out["requests"]) / wall,
        "tok_s": len(window) / seconds,
        "ttft_p50_ms": 1000 * statistics.median(ttft) if ttft else None,
        "ttft_p99_ms": 1000 * ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))] if ttft else None,
        # every client's first request arrives at once with the others' (a burst of prefills); later ones do not
        "ttft_p99_later_ms": 1000 * later[min(len(later) - 1, int(0.99 * len(later)))] if later else None,
        "errors": len(out["errors"]),
        "tokens_per_request": statistics.median(out["tokens"]) if out["tokens"] else None,
    }


def servers(args: argparse.Namespace, width: int) -> list[tuple[str, list[str], dict[str, str] | None]]:
    threads = str(len(os.sched_getaffinity(0)))
    out: list[tuple[str, list[str], dict[str, str] | None]] = []
    edgeroute = [str(REPO / ".venv" / "bin" / "edgeroute"), "serve", str(args.model), "--max-batch", "8"]
    out.append(("edgeroute", edgeroute + ["--max-queue", "64", "--log-level", "warning"], None))
    if args.soak:
        return out
    gguf = gguf_path()
    if args.llama_cpp_python:
        cmd = [str(args.llama_cpp_python), "-m", "llama_cpp.server", "--model", gguf, "--n_ctx", "2048"]
        cmd += ["--n_threads", threads, "--interrupt_requests", "False"]
        out.append(("llama-cpp-python", cmd, None))
    llama = find_llama_server(args.llama_server)
    if llama is not None:
        per_slot = 512
        cmd = [str(llama), "-m", gguf, "-np", str(width), "-c", str(width * per_slot), "-t", threads]
        cmd += ["-fa", "on", "--no-webui"]
        out.append((f"llama-server -np {width}", cmd, None))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=MODEL)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--soak", type=float, default=0.0, help="edgeroute alone for this many seconds per level")
    ap.add_argument("--llama-cpp-python", type=Path, default=None, help="python of an env with llama-cpp-python")
    ap.add_argument("--llama-server", type=Path, default=None, help="llama.cpp's llama-server binary")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    need_model(args.model)
    seconds = args.soak or args.seconds
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    if not args.llama_cpp_python:
        notes.append("llama-cpp-python: not given (--llama-cpp-python PYTHON, bench/README.md)")
    width = max(args.clients)
    for name, cmd, env in servers(args, width):
        port = free_port()
        host = ["--host", "127.0.0.1", "--port", str(port)]
        try:
            server = Server(name.split()[0], cmd + host, port, env)
        except RuntimeError as e:
            notes.append(f"{name}: {e}")
            continue
        try:
            model = args.model.name if name == "edgeroute" else "smollm2"
            load(server.url, model, width, 5.0, 8)  # warm-up, as wide as the widest row (buffers of every width)
            for n in args.clients:
                before = rss_mb(server.proc.pid)
                row = load(server.url, model, n, seconds, args.tokens)
                row.update(server=name, rss_before_mb=before, rss_after_mb=rss_mb(server.proc.pid))
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
        finally:
            server.stop()
    report = {"cpu": cpu_name(), "seconds": seconds, "tokens": args.tokens, "rows": rows, "notes": notes}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{report['cpu']}, {seconds:g} s per row, {args.tokens} tokens per request, streaming chat\n")
    print(
        "| server | clients | req/s | tok/s | TTFT p50 ms | TTFT p99 ms | p99 after the first burst | errors |"
        " RSS MB before -> after |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        p50 = "-" if r["ttft_p50_ms"] is None else f"{r['ttft_p50_ms']:.0f}"
        p99 = "-" if r["ttft_p99_ms"] is None else f"{r['ttft_p99_ms']:.0f}"
        later = "-" if r["ttft_p99_later_ms"] is None else f"{r['ttft_p99_later_ms']:.0f}"
        print(
            f"| {r['server']} | {r['clients']} | {r['requests_per_s']:.2f} | {r['tok_s']:.0f} | {p50} | {p99} |"
            f" {later} | {r['errors']} | {r['rss_before_mb']:.0f} -> {r['rss_after_mb']:.0f} |"
        )
    for note in notes:
        print(f"\n{note}")


if __name__ == "__main__":
    main()
