"""onnxruntime-genai with a static batch: N copies of one prompt, greedy, exactly --tokens new tokens each; prints
one JSON line (aggregate tok/s over the whole generation, prefill included, and the time to the first tokens).
Run by bench/engine.py with onnxruntime-genai's own environment (.venv-genai, bench/README.md)."""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import onnxruntime_genai as og


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--tokens", type=int, required=True)
    ap.add_argument("--ids", required=True)
    args = ap.parse_args()
    ids = json.loads(args.ids)
    model = og.Model(args.model)

    def once() -> tuple[float, float]:
        params = og.GeneratorParams(model)
        n = len(ids) + args.tokens
        params.set_search_options(max_length=n, min_length=n, do_sample=False, batch_size=args.batch)
        t0 = time.perf_counter()
        gen = og.Generator(model, params)
        gen.append_tokens(np.array([ids] * args.batch, dtype=np.int32))  # token ids: see bench/peers.py
        gen.generate_next_token()
        first = time.perf_counter() - t0
        made = 1
        while not gen.is_done() and made < args.tokens:
            gen.generate_next_token()
            made += 1
        return args.batch * made / (time.perf_counter() - t0), first

    once()  # warm-up
    runs = [once() for _ in range(3)]
    print(
        json.dumps(
            {"aggregate_tok_s": statistics.median(r[0] for r in runs), "ttft_s": statistics.median(r[1] for r in runs)}
        )
    )


if __name__ == "__main__":
    main()
