"""The gate of guidance on SmolLM2: which signal predicts where the mix matters, and what gating saves.

    python bench/gate.py [--model models/smollm2-135m] [--prompts 16] [--tokens 48] [--weight 1.5]

1. **The signal.** Ungated guidance (w, against the default empty context) over the built-in eval prompts (chat
   template); at every step the first flow's entropy H and top-1 margin (p1 - p2) are recorded with whether the
   mix changed the most likely token and the total variation between the two distributions. The AUC of each
   signal for "the mix changed the top token" (1 = it ranks every such step above every other) says which one a
   gate should read.
2. **The cost.** Plain decoding, ungated guidance and gated guidance at several θ on the same prompts and seeds
   (temperature 0.7): tokens per second (all tokens / generation time, prefill included), the share of
   gated steps, the second flow's graph runs. The quality/diversity side is ``edgeroute eval``'s gate family.
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from pathlib import Path

import edgeroute as er
import numpy as np
from _common import DEFAULT_MODEL, need_model
from edgeroute import routing
from edgeroute.eval import PROMPTS
from edgeroute.sampling import softmax


def auc(score: np.ndarray, label: np.ndarray) -> float:
    """The Mann-Whitney AUC of ``score`` for the positive ``label`` (ties count half)."""
    pos, neg = score[label], score[~label]
    if not len(pos) or not len(neg):
        return math.nan
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def signals(model: er.Model, prompts: list[list[int]], tokens: int, w: float) -> None:
    cfg = er.GenerationConfig(max_new_tokens=tokens, sampling=er.SamplingConfig(temperature=0.7, seed=0))
    neg = [model.manifest.bos_token_id if model.manifest.bos_token_id is not None else model.manifest.eos_token_ids[0]]
    h, margin, changed, tv = [], [], [], []
    for ids in prompts:
        out = model.generate(ids, cfg, guidance=w).token_ids
        cond = model.forward_last(np.array([ids + out]), model.new_cache(), len(out) + 1)[0][: len(out)]
        unc = model.forward_last(np.array([neg + out]), model.new_cache(), len(out) + 1)[0][: len(out)]
        for c, u in zip(cond, unc, strict=True):
            m = routing.guidance_mix(c, u, w)
            pc, pm = softmax(c.astype(np.float64)), softmax(m.astype(np.float64))
            top = np.partition(pc, -2)[-2:]
            h.append(routing.entropy(c))
            margin.append(float(top[1] - top[0]))
            changed.append(int(c.argmax()) != int(m.argmax()))
            tv.append(0.5 * float(np.abs(pc - pm).sum()))
    hs, ms, ch, tvs = np.array(h), np.array(margin), np.array(changed), np.array(tv)
    print(f"signal ({len(hs)} steps, guidance w={w}): the mix changed the top token at {ch.mean():.1%} of the steps")
    print(f"  AUC entropy H        {auc(hs, ch):.3f}")
    print(f"  AUC -margin (p1-p2)  {auc(-ms, ch):.3f}")
    print(
        f"  corr(H, TV)          {np.corrcoef(hs, tvs)[0, 1]:.3f}   corr(-margin, TV) {np.corrcoef(-ms, tvs)[0, 1]:.3f}"
    )
    for q in (0.25, 0.5, 0.75):
        theta = float(np.quantile(hs, q))
        low = hs <= theta
        print(
            f"  H <= {theta:.2f} nats ({q:.0%} of steps): top token changed at {ch[low].mean():.1%} of them,"
            f" mean TV {tvs[low].mean():.3f}; above: {ch[~low].mean():.1%}, TV {tvs[~low].mean():.3f}"
        )


def speed(model: er.Model, prompts: list[list[int]], tokens: int, w: float, thetas: list[float], runs: int) -> None:
    cfg = er.GenerationConfig(
        max_new_tokens=tokens, min_new_tokens=tokens, sampling=er.SamplingConfig(temperature=0.7, seed=0)
    )
    cases: list[tuple[str, dict]] = [("plain (no guidance)", {})]
    cases += [(f"guidance w={w} ungated", {"guidance": w})]
    cases += [(f"guidance w={w} gate margin θ={t:g}", {"guidance": w, "gate_threshold": t}) for t in thetas]
    cases += [(f"guidance w={w} gate entropy θ=2", {"guidance": w, "gate_threshold": 2.0, "gate_signal": "entropy"})]
    print(f"\nspeed ({len(prompts)} prompts x {tokens} tokens, temperature 0.7, best of {runs} rounds):")
    print(f"  {'case':40} {'tok/s':>7} {'vs plain':>8} {'gated':>6} {'2nd-flow runs':>13}")
    base = None
    for name, flows in cases:
        best = 0.0
        for _ in range(runs):
            n = seconds = 0.0
            skipped = steps = flow_runs = 0
            for ids in prompts:
                gen = model.generator(cfg, **flows)
                gen.append(ids)
                t0 = time.perf_counter()
                comp = gen.run()
                seconds += time.perf_counter() - t0
                n += comp.usage.completion_tokens
                steps += comp.usage.flow_steps
                skipped += comp.usage.flow_skipped
                flow_runs += comp.usage.flow_runs
            best = max(best, n / seconds)
        base = base or best
        share = f"{skipped / steps:.0%}" if steps else "-"
        print(f"  {name:40} {best:7.1f} {best / base:7.2f}x {share:>6} {flow_runs:>13}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--weight", type=float, default=1.5)
    ap.add_argument("--thetas", default="0.3,0.5,0.7", help="margin-signal thresholds to time")
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args()
    model = er.Model.load(need_model(args.model))
    texts = [p for _, p in PROMPTS][: args.prompts]
    prompts = [model.tokenizer.apply_chat_template([{"role": "user", "content": t}]) for t in texts]
    print(f"{model!r} on {platform.processor() or platform.machine()}")
    signals(model, prompts, args.tokens, args.weight)
    speed(model, prompts, args.tokens, args.weight, [float(t) for t in args.thetas.split(",")], args.runs)


if __name__ == "__main__":
    main()
