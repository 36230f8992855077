"""Speculative decoding against plain decoding on SmolLM2, in one run: tokens per second and acceptance.

    python bench/speculative.py [--tokens 128] [--runs 3]

Targets fp32 (and int8 when exported); drafts: the int4 export of the same checkpoint, and prompt lookup
(n-gram) on a summarise-this-text prompt, where the answer copies from the prompt. Greedy, so every speculative
run must produce exactly the plain tokens (checked).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import edgeroute as er
from _common import REPO, need_model

TEXT = (
    "The city council met on Tuesday to discuss the new public library. The library will open next spring in the "
    "old train station, which has been empty for ten years. It will have a children's room, a reading garden, a "
    "cafe and a workshop where people can repair bicycles and small electronics. The council expects about two "
    "thousand visitors a week. The building work will cost four million euros, half of it paid by the region. "
    "Some residents worried about parking, so the council promised forty new bicycle racks and a bus stop at the "
    "entrance. The library will be open every day from eight in the morning until ten at night."
)
PROMPTS = {
    "summarise": f"Summarise this text in a few sentences, reusing its words.\n\n{TEXT}",
    "story": "Write a short story about a robot who learns to paint.",
}


def run(model: er.Model, ids: list[int], cfg: er.GenerationConfig, runs: int, **flows) -> tuple[float, er.Completion]:
    speeds, comp = [], None
    for _ in range(runs + 1):
        comp = model.generate(ids, cfg, **flows)
        speeds.append(
            comp.usage.completion_tokens
            / (comp.usage.decode_seconds + comp.usage.time_to_first_token - comp.usage.prefill_seconds)
        )
    assert comp is not None
    return statistics.median(speeds[1:]), comp


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    models = REPO / "models"
    draft = er.Model.load(need_model(models / "smollm2-135m-int4"), spin=False)
    targets = {"fp32": models / "smollm2-135m", "int8": models / "smollm2-135m-int8"}
    cfg = er.GenerationConfig(max_new_tokens=args.tokens, sampling=er.SamplingConfig(temperature=0))
    print(f"greedy, up to {args.tokens} new tokens, median of {args.runs}; tok/s counts generation after prefill\n")
    print("| target | prompt | route | tok/s | speedup | acceptance | same tokens |")
    print("|---|---|---|---|---|---|---|")
    for tname, tpath in targets.items():
        if not Path(tpath, "edgeroute.json").is_file():
            print(f"(target {tname}: {tpath} missing, skipped)")
            continue
        target = er.Model.load(tpath)  # spinning: fastest for the plain rows
        paired = er.Model.load(tpath, spin=False)  # for the rows with a draft model (docs/router.md, spinning)
        for pname, prompt in PROMPTS.items():
            ids = target.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
            base, plain = run(target, ids, cfg, args.runs)
            print(f"| {tname} | {pname} | plain | {base:.1f} | 1.00x | - | - |")
            routes = {
                "int4 draft, k=4": {"draft": draft, "draft_k": 4},
                "int4 draft, adaptive k": {"draft": draft, "draft_k": 4, "adaptive_k": True},
                "n-gram lookup, k=4": {"draft": "ngram", "draft_k": 4},
                "n-gram lookup, adaptive k": {"draft": "ngram", "draft_k": 4, "adaptive_k": True},
            }
            for rname, flows in routes.items():
                speed, comp = run(paired if "draft" in rname else target, ids, cfg, args.runs, **flows)
                same = "yes" if comp.token_ids == plain.token_ids else "NO"
                print(
                    f"| {tname} | {pname} | {rname} | {speed:.1f} | {speed / base:.2f}x | "
                    f"{100 * comp.usage.acceptance_rate:.0f}% | {same} |"
                )


if __name__ == "__main__":
    main()
