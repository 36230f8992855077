"""Multiple-choice scoring speed: ``edgeroute eval --choices`` against lm-evaluation-harness on the same items, in
one run, with each run's accuracy and peak RSS.

The items are made from the quality text's sentences (``edgeroute.quality.QUALITY_TEXT``): the context is the
first part of a sentence (no two items share one), the right choice its rest, the three others the rests of other
sentences at the same cut (seeded), 4 choices an item, ``--items`` items (200).

Systems (each in its own process, one after another):

- ``edgeroute eval EXPORT --choices items.jsonl`` (the context computed once for its 4 choices);
- ``lm_eval --model local-completions`` against ``edgeroute serve EXPORT`` as it starts by default (with its prefix
  cache in memory: an item's choices reuse its context's scored blocks), one prompt per request (lm-eval's
  default); the same on a server started with ``--no-prefix-cache``; and ``--batch-size`` prompts per request
  (lm-eval's ``--batch_size`` for API models: the server's engine prefills a request's prompts together, in ragged
  rows) on a default server; a fresh server each; ``--concurrent`` requests at once;
- ``lm_eval --model hf`` on a PyTorch folder of the same weights (``--hf``), if given;
- ``lm_eval --model onnxruntime`` (lm-eval 0.4.13's in-process onnxruntime backend: one request at a time, the full
  sequence's logits, no cache reuse) on an onnxruntime-genai Model Builder export of that folder (``--ort``),
  fitted to the backend by :func:`prepare_ort`; build it in the genai environment of ``bench/README.md``:
  ``.venv-genai/bin/python -m onnxruntime_genai.models.builder -i HF -o DIR -p fp32 -e cpu``;
- ``edgeroute eval`` on an int4 export (``--int4``), if given.

lm-eval runs from ``--lm-eval-python`` (the dev extra installs lm-eval 0.4.13: ``.venv/bin/python``). For SmolLM2
from its GGUF, ``--prepare-hf DIR`` writes the PyTorch folder first: the GGUF dequantised by transformers, with the
export's tokenizer (transformers' own GGUF tokenizer adds a BOS the GGUF says not to add, which would make the two
sides score other tokens). lm-eval's hf backend runs with ``logits_cache=False`` (see ``main``).

    python bench/scoring.py models/smollm2-135m --prepare-hf /tmp/smollm2-hf --lm-eval-python .venv/bin/python \\
        --ort /tmp/genai-fp32 --int4 models/smollm2-135m-int4
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


def make_items(n: int, seed: int = 0, shots: int = 0) -> list[dict[str, object]]:
    """``n`` items, no two with the same context: sentence after sentence, cut at 3, 5, 7, ... words on each pass;
    ``shots``: the context starts with that many other sentences, whole (a few-shot prompt's length, as HellaSwag's
    and MMLU's contexts are long next to their endings)."""
    from edgeroute.quality import QUALITY_TEXT

    sentences = [s.split() for s in re.split(r"(?<=[.!?])\s+", QUALITY_TEXT) if len(s.split()) >= 8]
    rng = random.Random(seed)
    items: list[dict[str, object]] = []
    for cut in range(3, max(len(w) for w in sentences) - 2, 2):
        for i, words in enumerate(sentences):
            if len(items) == n:
                return items
            if cut > len(words) - 3:
                continue
            others = rng.sample([w for j, w in enumerate(sentences) if j != i], 3)
            wrong = [" ".join(o[cut:]) or o[-1] for o in others]
            choices = [" ".join(words[cut:]), *wrong]
            rng.shuffle(choices)
            before = [" ".join(sentences[(i + k + 1) % len(sentences)]) for k in range(shots)]
            context = " ".join([*before, " ".join(words[:cut])])
            items.append({"context": context, "choices": choices, "answer": choices.index(" ".join(words[cut:]))})
    raise SystemExit(f"the quality text gives {len(items)} distinct items, fewer than {n}")


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


def prepare_ort(folder: Path, hf: Path) -> None:
    """Fit an onnxruntime-genai Model Builder export (0.18) to lm-eval 0.4.13's ``onnxruntime`` backend: the
    builder writes the KV head size as a symbolic dimension (``kv_cache_dim``), which the backend binds to 1 for
    its empty past (onnxruntime then refuses the run), so it is pinned to the head size; and its
    ``tokenizer_config.json`` names a transformers 5 class (``TokenizersBackend``), so the PyTorch folder's (the
    same tokenizer, written by transformers 4.57) replaces it. Idempotent."""
    import shutil

    import onnx

    head = json.loads((folder / "genai_config.json").read_text(encoding="utf-8"))["model"]["decoder"]["head_size"]
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    pinned = 0
    for value in [*graph.graph.input, *graph.graph.output]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == "kv_cache_dim":
                dim.ClearField("dim_param")
                dim.dim_value = head
                pinned += 1
    if pinned:
        onnx.save(graph, str(folder / "model.onnx"))
    shutil.copy(hf / "tokenizer_config.json", folder / "tokenizer_config.json")


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
    ap.add_argument("--shots", type=int, default=0, help="whole sentences before each context (long contexts)")
    ap.add_argument("--lm-eval-python", default=None)
    ap.add_argument("--hf", type=Path, default=None, help="a PyTorch folder of the same weights (lm-eval --model hf)")
    ap.add_argument("--prepare-hf", type=Path, default=None, help="write that folder from SmolLM2's GGUF first")
    ap.add_argument("--concurrent", type=int, default=1, help="lm-eval local-completions' num_concurrent")
    ap.add_argument("--batch-size", type=int, default=8, help="prompts per request of the second served run")
    ap.add_argument("--ort", type=Path, default=None, help="an onnxruntime-genai Model Builder export of --hf (fp32)")
    ap.add_argument("--int4", type=Path, default=None, help="an int4 edgeroute export of the same model, also run")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-scoring-"))
    items = make_items(a.items, shots=a.shots)
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
    if a.int4 is not None:
        secs, rss, out = timed([str(exe), "eval", str(a.int4), "--choices", str(path), "--json"])
        data = json.loads(out)
        rows.append(("edgeroute eval --choices (int4)", secs, rss, data["acc"]["value"], data["acc_norm"]["value"]))
    if a.lm_eval_python:
        served = [(1, ()), (1, ("--no-prefix-cache",))] + ([(a.batch_size, ())] if a.batch_size > 1 else [])
        for i, (batch, flags) in enumerate(served):  # a fresh server each: no run finds another's prompts cached
            port = free_port()
            cmd = [str(exe), "serve", str(a.export), "--port", str(port), "--model-name", "m", *flags]
            server = Server("scoring", cmd, port)
            try:
                args = f"model=m,base_url={server.url}/v1/completions,num_concurrent={a.concurrent},max_length=2048"
                out = work / f"lc{i}"
                cmd = lm_eval(a.lm_eval_python, tasks, "local-completions", args, out, samples=False)
                secs, rss, _ = timed([*cmd, "--batch_size", str(batch)])
                name = f"lm-eval local-completions -> edgeroute serve {' '.join(flags)}".rstrip()
                name += f" (x{a.concurrent}, {batch}/request)"
                rows.append((name, secs, rss, *accuracy(out)))
            finally:
                server.stop()
        if a.hf is not None:
            # logits_cache=False: lm-eval 0.4.13's one-token-continuation cache hands requests whose context +
            # continuation tokens match another request's at another split that request's log-likelihood (measured
            # on these items: 167 of 200 items scored wrong, acc 0.115 for 0.430); it only saves one-token work
            hf_args = f"pretrained={a.hf},dtype=float32,logits_cache=False"
            cmd = lm_eval(a.lm_eval_python, tasks, "hf", hf_args, work / "hf", samples=False)
            secs, rss, _ = timed(cmd)
            rows.append(("lm-eval hf (PyTorch fp32)", secs, rss, *accuracy(work / "hf")))
            if a.ort is not None:
                prepare_ort(a.ort, a.hf)
                cmd = lm_eval(
                    a.lm_eval_python, tasks, "onnxruntime", f"pretrained={a.ort}", work / "ort", samples=False
                )
                secs, rss, _ = timed(cmd)
                rows.append(("lm-eval onnxruntime (Model Builder fp32)", secs, rss, *accuracy(work / "ort")))
    print(f"{a.items} items x 4 choices, {a.shots} sentences before each context, {a.export}")
    print(f"{'system':<64}{'s':>8}{'items/s':>9}{'peak RSS MB':>13}{'acc':>7}{'acc_norm':>10}")
    for name, secs, rss, acc, norm in rows:
        print(f"{name:<64}{secs:>8.1f}{a.items / secs:>9.2f}{rss:>13.0f}{acc:>7.3f}{norm:>10.3f}")


if __name__ == "__main__":
    main()
