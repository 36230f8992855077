"""Speed of one tree of edgeroute, for a before/after comparison of a refactor (issue 34, the house): single-stream
decode (``Model.generate``, greedy and the full router chain; median of 5 runs of 128 tokens) and the engine's
aggregate at 4 and 8 concurrent requests (96 tokens each), on a model folder. Prints one JSON line of tokens/s.

Run it alternately against the old and the new tree (each importing its own ``edgeroute``), three rounds each; the
figures of 2026-12-07 are in ``bench/results/house-speed-smollm2-int4-2026-12-07.md``.

    python bench/house_speed.py models/smollm2-135m-int4
"""

import json
import statistics
import sys
import time

import edgeroute as er

PROMPT = "Write a short story about a robot who learns to paint."
model = er.Model.load(sys.argv[1])
ids = model.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}])


def fixed(tokens, **s):
    return er.GenerationConfig(max_new_tokens=tokens, min_new_tokens=tokens, sampling=er.SamplingConfig(**s))


def single(cfg, runs=5):
    model.generate(ids, fixed(4, temperature=0))
    return statistics.median(model.generate(ids, cfg).usage.tokens_per_second for _ in range(runs))


def engine(n, tokens=96):
    with er.Engine(model, max_batch=8, prefix_reuse=False) as eng:
        eng.submit(ids, fixed(4, temperature=0)).result()
        t0 = time.perf_counter()
        done = [r.result(timeout=600) for r in [eng.submit(ids, fixed(tokens, temperature=0)) for _ in range(n)]]
        return sum(c.usage.completion_tokens for c in done) / (time.perf_counter() - t0)


out = {
    "greedy": single(fixed(128, temperature=0)),
    "chain": single(fixed(128, temperature=0.8, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.1, seed=1)),
    "engine4": engine(4),
    "engine8": engine(8),
}
print(json.dumps({k: round(v, 1) for k, v in out.items()}))
