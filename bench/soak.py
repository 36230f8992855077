"""Soak test of `edgeroute serve`: N concurrent clients for a fixed time, mixing normal, streamed, cancelled and
hostile requests; zero 5xx, no innocent request failed, the server's RSS within a bound, a clean exit.

    python bench/soak.py models/smollm2-135m-int8 --clients 16 --minutes 10 [--port 0] [--seed 0] [--out FILE.json]

The server is started here (127.0.0.1, a free port unless --port), warmed up with one normal chat per client, and
stopped with SIGTERM at the end (it must exit 0). Each client loops: with probability --hostile a hostile item
(drawn from a shuffled deck of every item, refilled when empty: each comes up, in random order), else a normal
kind at random. Every request has a --timeout. Per kind: 2xx / 4xx / 429 / 5xx / transport errors, and failures:
a normal kind that got anything but a complete 200 or a 429 (innocent), a hostile item that got a 2xx where a 4xx
is due, or a dropped connection. RSS (psutil, else /proc) is sampled every 2 s. Exit 1 on any 5xx, failure,
RSS growth (end - after warm-up) over --rss-growth-mb, or a server exit code other than 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

try:
    import psutil
except ImportError:
    psutil = None

JSON = {"content-type": "application/json"}
PROMPTS = ["Name three fruits.", "What is the capital of France?", "Write a haiku about rain.", "Count to five."]
Outcome = tuple[int, bool]  # (HTTP status; 0: transport error, -1: no answer expected), the answer was complete


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> float:
    try:
        if psutil is not None:
            return float(psutil.Process(pid).memory_info().rss / 2**20)
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except Exception:  # noqa: BLE001 - the process is gone
        pass
    return float("nan")


def chat(rng: random.Random, **extra: Any) -> dict[str, Any]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": rng.choice(PROMPTS)}], "max_tokens": 8}
    return {**body, **extra}


MODEL = "?"  # the served name, read from /v1/models at start


async def post(http: httpx.AsyncClient, path: str, body: dict[str, Any] | bytes) -> Outcome:
    """A non-streamed request: its status, and whether a 200 carried a finish_reason for every choice."""
    try:
        if isinstance(body, bytes):
            r = await http.post(path, content=body, headers=JSON)
        else:
            r = await http.post(path, json=body)
    except httpx.HTTPError:
        return 0, False
    if r.status_code != 200:
        return r.status_code, False
    try:
        choices = r.json()["choices"]
        return 200, bool(choices) and all(c.get("finish_reason") for c in choices)
    except (ValueError, KeyError, TypeError):
        return 200, False


async def stream(http: httpx.AsyncClient, path: str, body: dict[str, Any], stop_after: int | None = None) -> Outcome:
    """A streamed request read to [DONE] (complete: a finish_reason arrived), or closed after ``stop_after``
    data chunks (complete: that many arrived)."""
    finished, chunks = False, 0
    try:
        async with http.stream("POST", path, json={**body, "stream": True}) as r:
            if r.status_code != 200:
                await r.aread()
                return r.status_code, False
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    return 200, finished
                event = json.loads(line[6:])
                if "error" in event:
                    return 200, False
                chunks += 1
                finished = finished or any(c.get("finish_reason") for c in event.get("choices", []))
                if stop_after is not None and chunks >= stop_after:
                    return 200, True  # leaving the block closes the connection: the server cancels the request
    except (httpx.HTTPError, ValueError):
        return 0, False
    return 200, False  # the stream ended without [DONE]


# -- normal kinds ---------------------------------------------------------------------------------------------
async def normal_chat(http: httpx.AsyncClient, rng: random.Random) -> Outcome:
    return await post(http, "/v1/chat/completions", chat(rng, max_tokens=rng.randint(16, 48), temperature=0.7))


async def normal_completion(http: httpx.AsyncClient, rng: random.Random) -> Outcome:
    body = {"model": MODEL, "prompt": rng.choice(PROMPTS), "max_tokens": rng.randint(16, 48), "temperature": 0}
    return await post(http, "/v1/completions", body)


async def streamed_chat(http: httpx.AsyncClient, rng: random.Random) -> Outcome:
    return await stream(http, "/v1/chat/completions", chat(rng, max_tokens=rng.randint(16, 48)))


async def cancelled_stream(http: httpx.AsyncClient, rng: random.Random) -> Outcome:
    body = chat(rng, max_tokens=200, temperature=0.7)
    return await stream(http, "/v1/chat/completions", body, stop_after=rng.randint(1, 3))


async def seeded_n2(http: httpx.AsyncClient, rng: random.Random) -> Outcome:
    body = chat(rng, n=2, seed=rng.randint(0, 1000), temperature=0.8, max_tokens=rng.randint(16, 32))
    return await post(http, "/v1/chat/completions", body)


# -- hostile items: each must get a 4xx (but ANY_STATUS), never a 5xx or a dropped connection ---------------
def schema(s: Any, rng: random.Random) -> dict[str, Any]:
    return chat(rng, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": s}})


def defs_chain(rng: random.Random) -> bytes:
    """Schemas nested 1,000 deep through ``$defs`` (JSON text: deeper than json.dumps writes)."""
    s = '{"type": "string"}'
    s = '{"$defs": {"a": ' * 1000 + s + '}, "$ref": "#/$defs/a"}' * 1000
    fmt = '{"type": "json_schema", "json_schema": {"name": "x", "schema": ' + s + "}}"
    return raw(rng, f'"model": "{MODEL}", "max_tokens": 8, "response_format": {fmt}')


def ref_chain(rng: random.Random) -> dict[str, Any]:
    defs: dict[str, Any] = {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(2500)}
    defs["d2500"] = {"type": "string"}
    return schema({"$defs": defs, "$ref": "#/$defs/d0"}, rng)


def grammar_chain(rng: random.Random) -> dict[str, Any]:
    rules = [f"r{i}: r{i + 1}" for i in range(3000)]
    return chat(rng, guided_grammar="start: r0\n" + "\n".join(rules) + '\nr3000: "a"\n')


def raw(rng: random.Random, text: str) -> bytes:
    """A chat body with ``text`` spliced in raw (what json.dumps cannot write, or would refuse to)."""
    return ('{"messages": [{"role": "user", "content": "hi"}], ' + text + "}").encode()


HOSTILE: dict[str, Any] = {
    "defs_chain_1000": defs_chain,
    "ref_chain_2500": ref_chain,
    "grammar_3000_rules": grammar_chain,
    "stop_64k_chars": lambda rng: chat(rng, stop="x" * 65536),
    "endless_grammar": lambda rng: chat(rng, guided_grammar='start: "a" start', max_tokens=32),
    "json_depth_10000": lambda rng: raw(rng, f'"model": "{MODEL}", "stop": ' + "[" * 10**4 + "]" * 10**4),
    "max_tokens_5000_digits": lambda rng: raw(rng, f'"model": "{MODEL}", "max_tokens": ' + "7" * 5000),
    "lone_surrogate_model": lambda rng: raw(rng, '"model": "\\ud800", "max_tokens": 8'),
    "logit_bias_superscript": lambda rng: chat(rng, logit_bias={"²": 1}),
    "draft_k_superscript": lambda rng: chat(rng, draft="ngram", draft_k="²"),
    "regex_a_min_tokens_8": lambda rng: chat(rng, guided_regex="a", min_tokens=8),
    "schema_ref_self": lambda rng: schema({"$ref": "#"}, rng),
    "regex_empty_class": lambda rng: chat(rng, guided_regex="[^\\s\\S]"),
    "stop_token_ids_1e9": lambda rng: chat(rng, stop_token_ids=[10**9]),
    "message_name_5": lambda rng: chat(rng, messages=[{"role": "user", "content": "hi", "name": 5}]),
    "n16_x_16_prompts": lambda rng: {"model": MODEL, "prompt": PROMPTS * 4, "n": 16, "max_tokens": 8},
    "logprobs_minus_5": lambda rng: {"model": MODEL, "prompt": "hi", "logprobs": -5, "max_tokens": 8},
    "slow_header": None,  # see slow_header
}
COMPLETION_ITEMS = {"n16_x_16_prompts", "logprobs_minus_5"}
ANY_STATUS = {"endless_grammar", "slow_header"}  # a 200 (ends on `length`) or a 4xx: fine, counted apart


async def slow_header(http: httpx.AsyncClient) -> Outcome:
    """A partial request line, one byte every 0.1 s for ~3 s, then closed: it must cost the server nothing."""
    host, port = http.base_url.host, http.base_url.port
    status = -1
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
        for b in b"POST /v1/chat/completions HTT":
            writer.write(bytes([b]))
            await writer.drain()
            await asyncio.sleep(0.1)
        try:
            answer = await asyncio.wait_for(reader.read(64), 0.1)  # an answer the server sent already, if any
        except asyncio.TimeoutError:
            answer = b""
        writer.close()
    except (OSError, asyncio.TimeoutError):
        return 0, False
    if answer.startswith(b"HTTP/1.1 ") and answer[9:12].isdigit():
        status = int(answer[9:12])
    return status, False


async def send_hostile(http: httpx.AsyncClient, rng: random.Random, kind: str) -> Outcome:
    if kind == "slow_header":
        return await slow_header(http)
    path = "/v1/completions" if kind in COMPLETION_ITEMS else "/v1/chat/completions"
    return await post(http, path, HOSTILE[kind](rng))


NORMAL = {f.__name__: f for f in (normal_chat, normal_completion, streamed_chat, cancelled_stream, seeded_n2)}
COLUMNS = ("2xx", "4xx", "429", "5xx", "transport", "none")


def classify(kind: str, status: int, complete: bool) -> tuple[str, bool]:
    """The outcome's column, and whether it is a failure (innocent: a normal kind's; else a hostile's)."""
    col = {0: "transport", -1: "none"}.get(status) or (
        "429" if status == 429 else "5xx" if status >= 500 else "4xx" if status >= 400 else "2xx"
    )
    if kind in NORMAL:
        return col, not (col == "429" or (col == "2xx" and complete))
    if kind in ANY_STATUS:
        return col, col in ("5xx", "transport")
    return col, col not in ("4xx", "429")


@dataclass
class Run:
    """What the clients share: the deadline, the hostile deck, the tallies, what each client is sending now."""

    until: float
    hostile_share: float
    kinds: list[str]  # the hostile items in play (all but --skip)
    tally: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    deck: list[str] = field(default_factory=list)
    sending: dict[int, str] = field(default_factory=dict)
    first_drop: dict[str, Any] | None = None  # the first transport error, and what was in flight then
    died: dict[str, Any] | None = None
    seconds: float = 0.0


async def client(url: str, i: int, seed: int, timeout: float, run: Run) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=timeout) as http:
        while time.monotonic() < run.until:
            if run.kinds and rng.random() < run.hostile_share:
                if not run.deck:
                    run.deck.extend(run.kinds)
                    rng.shuffle(run.deck)
                kind = run.deck.pop()
            else:
                kind = rng.choice(list(NORMAL))
            run.sending[i] = kind
            status, complete = await (NORMAL[kind](http, rng) if kind in NORMAL else send_hostile(http, rng, kind))
            del run.sending[i]
            col, failed = classify(kind, status, complete)
            run.tally[kind][col] += 1
            run.tally[kind]["failed"] += failed
            if col == "transport" and run.first_drop is None:
                run.first_drop = {"kind": kind, "in_flight": sorted({*run.sending.values(), kind})}
            if failed and run.tally[kind]["failed"] <= 3 and run.died is None:
                print(f"  {kind}: {col} ({status}){' incomplete' if kind in NORMAL else ''}", file=sys.stderr)


async def soak(url: str, proc: subprocess.Popen[Any], args: argparse.Namespace) -> tuple[Run, dict[str, Any]]:
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout) as http:  # warm-up: every batch width
        await asyncio.gather(*(normal_chat(http, random.Random(i)) for i in range(args.clients)))
    t0 = time.monotonic()
    rss: dict[str, Any] = {"warm": rss_mb(proc.pid), "samples": []}
    run = Run(t0 + args.minutes * 60, args.hostile, [k for k in HOSTILE if k not in args.skip])
    tasks = asyncio.gather(*(client(url, i, args.seed * 1000 + i, args.timeout, run) for i in range(args.clients)))
    while not tasks.done():
        await asyncio.wait({tasks}, timeout=0.1)  # type: ignore[arg-type]
        if proc.poll() is not None and run.died is None:  # stop; what was in flight at the first drop is suspect
            run.died = {"after_s": round(time.monotonic() - t0, 1), "code": proc.returncode, **(run.first_drop or {})}
            run.until = 0.0
            print(f"  the server died ({proc.returncode}): {run.died}", file=sys.stderr)
        if len(rss["samples"]) < (time.monotonic() - t0) / 2:
            rss["samples"].append(round(rss_mb(proc.pid), 1))
    await tasks
    run.seconds = time.monotonic() - t0
    rss["end"] = rss_mb(proc.pid)
    rss["peak"] = max([rss["warm"], rss["end"], *rss["samples"]])
    return run, rss


def main() -> int:
    global MODEL
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--port", type=int, default=0, help="0: a free port")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hostile", type=float, default=0.3, help="share of requests that are hostile items")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    ap.add_argument("--rss-growth-mb", type=float, default=100.0, help="bound on RSS end - RSS after warm-up")
    ap.add_argument("--skip", type=lambda t: t.split(","), default=[], help="hostile items left out: A,B,...")
    ap.add_argument("--out", type=Path, default=None, help="the figures as JSON")
    args = ap.parse_args()
    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    exe = Path(sys.executable).with_name("edgeroute")
    log = tempfile.NamedTemporaryFile("w+", prefix="soak-server-", suffix=".log", delete=False)  # noqa: SIM115
    cmd = [str(exe), "serve", str(args.model), "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                sys.exit(f"the server exited ({proc.returncode}) before it was ready: see {log.name}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                sys.exit(f"the server was not healthy within 180 s: see {log.name}")
            time.sleep(0.5)
        MODEL = httpx.get(url + "/v1/models", timeout=5).json()["data"][0]["id"]
        ready = rss_mb(proc.pid)
        run, rss = asyncio.run(soak(url, proc, args))
        tally = run.tally
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code: int | str = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = "killed after 30 s"
    rss["ready"] = ready
    growth = rss["end"] - rss["warm"]
    total = Counter[str]()
    print(f"\n{args.clients} clients, {run.seconds / 60:.1f} min, {args.model.name}, seed {args.seed}")
    print(f"skipped: {', '.join(args.skip)}\n" if args.skip else "")
    print("| kind | requests | " + " | ".join(COLUMNS) + " | failed |")
    print("|---" * (len(COLUMNS) + 3) + "|")
    for kind in [*NORMAL, *run.kinds]:
        c = tally.get(kind, Counter())
        total.update(c)
        n = sum(c[k] for k in COLUMNS)
        print(f"| {kind} | {n} | " + " | ".join(str(c[k]) for k in COLUMNS) + f" | {c['failed']} |")
    innocent = sum(tally[k]["failed"] for k in NORMAL if k in tally)
    wrong = total["failed"] - innocent
    missing = [k for k in run.kinds if k not in tally]
    print(
        f"\nRSS MB: ready {ready:.0f}, after warm-up {rss['warm']:.0f}, peak {rss['peak']:.0f}, end {rss['end']:.0f}"
        f" (growth {growth:+.0f}, bound {args.rss_growth_mb:.0f}); server exit: {code}; log: {log.name}"
    )
    problems = [
        f"{total['5xx']} 5xx" if total["5xx"] else "",
        f"{innocent} innocent failures" if innocent else "",
        f"{wrong} hostile items answered wrongly" if wrong else "",
        f"RSS grew {growth:.0f} MB" if growth > args.rss_growth_mb else "",
        f"server exit {code}" if code != 0 else "",
        f"the server died after {run.died['after_s']} s (in flight: {run.died.get('in_flight')})" if run.died else "",
        f"hostile items never sent: {', '.join(missing)}" if missing else "",
    ]
    problems = [p for p in problems if p]
    verdict = "PASS" if not problems else "FAIL: " + "; ".join(problems)
    print(f"verdict: {verdict}")
    if args.out:
        figures = dict(clients=args.clients, minutes=run.seconds / 60, model=str(args.model), seed=args.seed)
        figures.update(skipped=args.skip, kinds={k: dict(v) for k, v in tally.items()}, server_died=run.died)
        figures.update(rss_mb=rss, server_exit=code, verdict=verdict)
        args.out.write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
