"""Multiple-choice scoring speed: ``edgeroute eval --choices`` against lm-evaluation-harness on the same items, in
one run, with each run's accuracy and peak RSS.

The items are made from the quality text's sentences (``edgeroute.quality.QUALITY_TEXT``): the context is the
first part of a sentence, the right choice its rest, the three others the rests of other sentences (seeded), 4
choices an item, ``--items`` items (200).

Systems (each in its own process, one after another):

- ``edgeroute eval EXPORT --choices items.jsonl`` (the context computed once for its 4 choices);
- ``lm_eval --model local-completions`` against ``edgeroute serve EXPORT`` (``--concurrent`` requests at once);
- ``lm_eval --model hf`` on a PyTorch folder of the same weights (``--hf``), if given.

lm-eval runs from its own environment (``--lm-eval-python``). For SmolLM2 from its GGUF, ``--prepare-hf DIR`` writes
the PyTorch folder first: the GGUF dequantised by transformers, with the export's tokenizer (transformers' own GGUF
tokenizer adds a BOS the GGUF says not to add, which would make the two sides score other tokens).

    python bench/scoring.py models/smollm2-135m --prepare-hf /tmp/smollm2-hf --lm-eval-python /tmp/lmeval/bin/python
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lm_eval_check import accuracy, lm_eval, write_task

from serve import Server, free_port, gguf_path  # bench/serve.py


def make_items(n: int, seed: int = 0) -> list[dict[str, object]]:
    from edgeroute.quality import QUALITY_TEXT

    sentences = [s for s in re.split(r"(?<=[.!?])\s+", QUALITY_TEXT) if len(s.split()) >= 8]
    rng = random.Random(seed)
    items = []
    for i in range(n):
        words = sentences[i % len(sentences)].split()
        cut = max(3, int(len(words) * rng.uniform(0.35, 0.65)))
        others = rng.sample([s for j, s in enumerate(sentences) if j != i % len(sentences)], 3)
        wrong = [" ".join(o.split()[cut:]) or o.split()[-1] for o in others]
        choices = [" ".join(words[cut:]), *wrong]
        rng.shuffle(choices)
        items.append(
            {"context": " ".join(words[:cut]), "choices": choices, "answer": choices.index(" ".join(words[cut:]))}
        )
    return items


def prepare_hf(export: Path, folder: Path) -> None:
    """SmolLM2's GGUF as a PyTorch folder with the export's tokenizer."""
    import transformers

    gguf = Path(gguf_path())
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    model.save_pretrained(folder)
    manifest = json.loads((export / "edgeroute.json").read_text(encoding="utf-8"))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(export / "tokenizer.json"))
    tok.eos_token = manifest.get("special_tokens", {}).get("eos_token") or "<|im_end|>"
    tok.save_pretrained(folder)


def timed(cmd: list[str]) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (MB, from /usr/bin/time's format, the child's), stdout."""
    t0 = time.perf_counter()
    out = subprocess.run(["/usr/bin/time", "-f", "RSS %M", *cmd], capture_output=True, text=True, timeout=7200)
    if out.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed:\n{out.stderr[-3000:]}")
    rss = float(re.findall(r"RSS (\d+)", out.stderr)[-1]) / 1024
    return time.perf_counter() - t0, rss, out.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("export", type=Path)
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--lm-eval-python", default=None)
    ap.add_argument("--hf", type=Path, default=None, help="a PyTorch folder of the same weights (lm-eval --model hf)")
    ap.add_argument("--prepare-hf", type=Path, default=None, help="write that folder from SmolLM2's GGUF first")
    ap.add_argument("--concurrent", type=int, default=1, help="lm-eval local-completions' num_concurrent")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-scoring-"))
    items = make_items(a.items)
    path = work / "items.jsonl"
    path.write_text("\n".join(json.dumps(i) for i in items) + "\n", encoding="utf-8")
    tasks = write_task(work / "tasks", path)
    if a.prepare_hf is not None:
        prepare_hf(a.export, a.prepare_hf)
        a.hf = a.prepare_hf
    exe = Path(sys.executable).parent / "edgeroute"
    rows = []
    secs, rss, out = timed([str(exe), "eval", str(a.export), "--choices", str(path), "--json"])
    data = json.loads(out)
    rows.append(("edgeroute eval --choices", secs, rss, data["acc"]["value"], data["acc_norm"]["value"]))
    if a.lm_eval_python:
        port = free_port()
        server = Server("scoring", [str(exe), "serve", str(a.export), "--port", str(port), "--model-name", "m"], port)
        try:
            args = f"model=m,base_url={server.url}/v1/completions,num_concurrent={a.concurrent},max_length=2048"
            cmd = lm_eval(a.lm_eval_python, tasks, "local-completions", args, work / "lc", samples=False)
            secs, rss, _ = timed(cmd)
            name = f"lm-eval local-completions -> edgeroute serve (x{a.concurrent})"
            rows.append((name, secs, rss, *accuracy(work / "lc")))
        finally:
            server.stop()
        if a.hf is not None:
            cmd = lm_eval(a.lm_eval_python, tasks, "hf", f"pretrained={a.hf},dtype=float32", work / "hf", samples=False)
            secs, rss, _ = timed(cmd)
            rows.append(("lm-eval hf (PyTorch fp32)", secs, rss, *accuracy(work / "hf")))
    print(f"{a.items} items x 4 choices, {a.export}")
    print(f"{'system':<52}{'s':>8}{'items/s':>9}{'peak RSS MB':>13}{'acc':>7}{'acc_norm':>10}")
    for name, secs, rss, acc, norm in rows:
        print(f"{name:<52}{secs:>8.1f}{a.items / secs:>9.2f}{rss:>13.0f}{acc:>7.3f}{norm:>10.3f}")


if __name__ == "__main__":
    main()
