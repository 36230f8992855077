"""Router cost per token on real logits: the full chain and top-p alone, median microseconds.

    python bench/router.py [--model models/smollm2-135m] [--steps 64] [--repeat 20]

Logits come from the model decoding a chat prompt greedily, so the distributions are the real ones (peaked,
long-tailed). The target on a 2-core machine is a median <= 100 us per token for each chain.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import edgeroute as er
import numpy as np
from _common import DEFAULT_MODEL, median_us, need_model

CHAINS = {
    "full chain (penalties+temperature+top-k+top-p+min-p+draw)": er.SamplingConfig(
        temperature=0.7,
        top_k=40,
        top_p=0.9,
        min_p=0.05,
        repetition_penalty=1.1,
        presence_penalty=0.1,
        frequency_penalty=0.1,
    ),
    "top-p 0.9 alone (top-k off, temperature 0.7)": er.SamplingConfig(temperature=0.7, top_p=0.9),
    "top-p 0.95 alone (temperature 1.0)": er.SamplingConfig(top_p=0.95),
    "min-p 0.05 alone": er.SamplingConfig(min_p=0.05),
    "plain sampling (softmax + draw)": er.SamplingConfig(),
    "exploration q=0.1 + top-k 40": er.SamplingConfig(top_k=40, explore=0.1),
    "greedy": er.SamplingConfig(temperature=0),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    model = er.Model.load(need_model(args.model))
    ids = model.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
    )
    cache = model.new_cache()
    logits = model.forward(np.array([ids]), cache)[0]
    rows, history = [], list(ids)
    for _ in range(args.steps):
        rows.append(logits.copy())
        tok = int(np.argmax(logits))
        history.append(tok)
        logits = model.forward(np.array([[tok]]), cache)[0]
    hist = np.array(history, dtype=np.int64)
    results = {}
    for name, cfg in CHAINS.items():
        router = er.make_chain(cfg, model.vocab_size, model.special_ids)
        rng = np.random.default_rng(0)
        times = []
        for _ in range(args.repeat):
            for i, row in enumerate(rows):
                h = hist[: len(ids) + i]
                t0 = time.perf_counter()
                router.sample(row, h, rng, i)
                times.append(time.perf_counter() - t0)
        results[name] = round(median_us(times), 1)
    sort_cost = []
    for row in rows:
        t0 = time.perf_counter()
        np.argsort(row)
        sort_cost.append(time.perf_counter() - t0)
    results["reference: one full np.argsort of the vocabulary"] = round(median_us(sort_cost), 1)
    if args.json:
        print(json.dumps({"vocab": model.vocab_size, "median_us": results}, indent=2))
        return
    print(f"router cost per token, vocabulary {model.vocab_size}, {args.steps} real logit rows x {args.repeat}")
    for name, us in results.items():
        print(f"  {us:8.1f} us  {name}")


if __name__ == "__main__":
    main()
