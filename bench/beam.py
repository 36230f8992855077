"""Beam search on SmolLM2 against transformers' beam search on the same GGUF weights, in one run.

    python bench/beam.py [--beams 4] [--tokens 48] [--runs 2]

Per system: total time per request, tokens per second per beam (generated positions x beams / decode time), the
best sequence and whether it equals transformers'. edgeroute fp32 and int4 (when `models/smollm2-135m-int4`
exists: `python bench/peers.py --prepare`), transformers fp32 (PyTorch, same threads).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import edgeroute as er
from _common import DEFAULT_MODEL, REPO, need_model

QUESTIONS = ["Explain why the sky is blue.", "Write a short poem about the sea.", "What is a good breakfast?"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--beams", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args()
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    model = er.Model.load(need_model(DEFAULT_MODEL))
    eos = sorted(set(model.manifest.eos_token_ids))
    import subprocess
    import sys

    gguf = Path(subprocess.check_output([sys.executable, str(REPO / "bench" / "smollm2_gguf.py")], text=True).strip())
    hf = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    prompts = [model.tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    cfg = er.GenerationConfig(
        max_new_tokens=args.tokens, sampling=er.SamplingConfig(temperature=0), num_beams=args.beams
    )
    print(f"SmolLM2-135M-Instruct, {args.beams} beams, <= {args.tokens} new tokens, {platform.machine()}")

    def hf_run(ids: list[int]) -> list[int]:
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                do_sample=False,
                temperature=None,
                top_p=None,
                num_beams=args.beams,
                max_new_tokens=args.tokens,
                eos_token_id=eos,
                pad_token_id=eos[0],
            )
        row = out[0, len(ids) :].tolist()
        return row[: next((i for i, t in enumerate(row) if t in eos), len(row))]

    systems: list[tuple[str, object]] = [("transformers fp32", hf_run)]
    for name, folder in (("edgeroute fp32", DEFAULT_MODEL), ("edgeroute int4", REPO / "models" / "smollm2-135m-int4")):
        if (folder / "edgeroute.json").is_file():
            m = model if folder == DEFAULT_MODEL else er.Model.load(folder)
            systems.append((name, lambda ids, m=m: m.generate(ids, cfg).token_ids))
    ref = {i: hf_run(p) for i, p in enumerate(prompts)}
    print(f"{'system':20} {'s/request':>10} {'tok/s/beam':>11} {'vs transformers':>16} {'same best':>10}")
    base = None
    for name, fn in systems:
        times, tokens, same = [], 0, 0
        for _ in range(args.runs):
            for i, ids in enumerate(prompts):
                t0 = time.perf_counter()
                got = fn(ids)  # type: ignore[operator]
                times.append(time.perf_counter() - t0)
                tokens += len(got) + 1
                same += got == ref[i]
        per = sum(times) / len(times)
        base = base or per
        rate = tokens * args.beams / sum(times)
        print(f"{name:20} {per:10.2f} {rate:11.1f} {base / per:15.2f}x {same:>4}/{len(times)}")


if __name__ == "__main__":
    main()
