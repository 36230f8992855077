"""Python + router overhead per token: the graph step alone against the same step inside edgeroute's loop.

    python bench/overhead.py [--model models/smollm2-135m-int4] [--tokens 128] [--runs 5]

"graph step": a bare loop of ``session.run_with_iobinding`` over the model's shared KV buffer, one token at a
time, greedy argmax on the bound output (the least any Python driver of this graph can spend). "edgeroute loop":
the Generator producing the same number of tokens, greedy and with the router on (temperature 0.7, top-k 40,
top-p 0.9, min-p 0.05, repetition penalty 1.1): cache bookkeeping, router, text streaming and stop checks
included. Overhead = 1 - step / loop, each a mean over the tokens, medians of --runs, interleaved so that both see
the same machine state. Needs a graph exported with the fused backend.

"in the loop": the same Generator loop with the graph runs timed inside it; overhead = the share of the loop's
time spent outside ``run_with_iobinding``. It compares the step and the loop within one run, so it is not moved
by the machine getting faster or slower between the runs being compared (the first figure is, by several
percent on a noisy VM); it does not see any slowdown the loop's Python work causes inside the next graph run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from _common import REPO

PROMPT = "Write a short story about a robot who learns to paint."
ROUTER = {"temperature": 0.7, "top_k": 40, "top_p": 0.9, "min_p": 0.05, "repetition_penalty": 1.1, "seed": 0}


def graph_steps(model, ids: list[int], tokens: int) -> float:  # type: ignore[no-untyped-def]
    """Seconds per token of the bare graph loop after a prefill of ``ids``: greedy argmax on the bound output,
    the three small inputs written, ``run_with_iobinding`` (the least any Python driver of this graph does)."""
    cache = model.new_cache()
    model.forward(np.array([ids]), cache)
    model.forward(np.array([[ids[-1]]]), cache)  # binds the one-token shapes
    b, n = cache.binding, cache.length
    t0 = time.perf_counter()
    for _ in range(tokens - 1):
        b.ids[0, 0] = int(b.logits[0, -1].argmax())
        b.seqlens[0] = n
        b.total[...] = n + 1
        model.session.run_with_iobinding(b.io)
        n += 1
    return (time.perf_counter() - t0) / (tokens - 1)


def loop_steps(model, ids: list[int], tokens: int, sampling: dict) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """(seconds per token of the Generator's decode loop after its first token, of which inside the graph runs)."""
    import edgeroute as er

    cfg = er.GenerationConfig(max_new_tokens=tokens, min_new_tokens=tokens, sampling=er.SamplingConfig(**sampling))
    runs: list[float] = []
    session = model.session
    model.session = _Timed(session, runs)  # before the generator's KV binding takes the session
    try:
        gen = model.generator(cfg)
        gen.append(ids)
        gen.step()
        start = len(runs)
        t0 = time.perf_counter()
        n = sum(1 for _ in gen)
        total = time.perf_counter() - t0
    finally:
        model.session = session
    return total / n, sum(runs[start:]) / n


class _Timed:
    """The model's session with ``run_with_iobinding`` timed into ``runs`` (two clock reads per token)."""

    def __init__(self, session, runs: list[float]) -> None:  # type: ignore[no-untyped-def]
        self._session, self._runs = session, runs

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self._session, name)

    def run_with_iobinding(self, io, *args) -> None:  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        self._session.run_with_iobinding(io, *args)
        self._runs.append(time.perf_counter() - t0)


def main() -> None:
    import edgeroute as er

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / "models" / "smollm2-135m-int4"))
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    model = er.Model.load(args.model, context_size=1024)
    if not model.shared_kv:
        raise SystemExit(f"{args.model} was not exported with the fused backend (no shared KV buffer)")
    ids = model.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}])
    rows: dict[str, list[float]] = {"graph step": [], "loop, greedy": [], "loop, router on": []}
    inside: dict[str, list[float]] = {"loop, greedy": [], "loop, router on": []}  # share outside the graph runs
    for i in range(args.runs + 1):
        step = graph_steps(model, ids, args.tokens)
        configs = (("loop, greedy", {"temperature": 0}), ("loop, router on", ROUTER))
        measured = {name: loop_steps(model, ids, args.tokens, s) for name, s in configs}
        if i:  # the first round warms up
            rows["graph step"].append(step)
            for name, (total, graph) in measured.items():
                rows[name].append(total)
                inside[name].append(1 - graph / total)
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"{args.model}: {args.tokens} tokens, median of {args.runs}")
    for name, sec in med.items():
        extra = ""
        if name != "graph step":
            extra = f"   overhead {100 * (1 - med['graph step'] / sec):.1f}%"
            extra += f", in the loop {100 * statistics.median(inside[name]):.1f}%"
        print(f"  {name:16s} {1000 * sec:7.3f} ms/token  {1 / sec:7.1f} tok/s{extra}")


if __name__ == "__main__":
    main()
