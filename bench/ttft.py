"""Time to first token on a long prompt: all-position logits (optimum's graph as exported) against the
last-position logits of edgeroute's export (its ``logits_to_keep`` input). Same weights, same runtime.

    python bench/ttft.py [--model models/smollm2-135m] [--tokens 1000] [--repeat 5]

The "before" graph is the edgeroute graph with ``logits_to_keep`` fed the prompt length, which is exactly the
computation of optimum's unmodified graph (LM head over every position, a [tokens, vocabulary] array returned).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import edgeroute as er
import numpy as np
from _common import DEFAULT_MODEL, need_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--tokens", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    model = er.Model.load(need_model(args.model), threads=args.threads)
    text = "The history of painting reaches back to the objects made by pre-historic humans. " * 200
    ids = model.tokenizer.encode(text)[: args.tokens]
    assert len(ids) == args.tokens
    arr = np.array([ids])
    out = {}
    for label, keep in (("all positions (before)", len(ids)), ("last position (after)", 1)):
        times = []
        for _ in range(args.repeat + 1):
            cache = model.new_cache()
            t0 = time.perf_counter()
            logits = model.forward_last(arr, cache, keep)
            int(np.argmax(logits[0, -1]))
            times.append(time.perf_counter() - t0)
        out[label] = {
            "ttft_ms": round(1000 * statistics.median(times[1:]), 1),
            "logits_mb": round(logits.nbytes / 2**20, 1),
        }
    print(json.dumps({"prompt_tokens": len(ids), **out}, indent=2))


if __name__ == "__main__":
    main()
