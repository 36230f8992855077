"""edgeroute on a GPU, side by side with onnxruntime-genai and optimum on CUDA (issue 19's table).

    python bench/gpu.py --fp16 DIR --int4 DIR [--genai-fp16 DIR] [--genai-int4 DIR] [--optimum DIR] [--hf CKPT]

DIR are edgeroute folders exported for CUDA (``edgeroute export SRC DIR --device cuda --dtype fp16 [--quantize
int4]``); genai folders come from onnxruntime-genai's model builder (bench/README.md), ``--optimum`` is optimum's
own export folder and ``--hf`` the Hugging Face checkpoint (PyTorch fp16 on CUDA: the parity reference).

Rows (each in its own process, the same chat prompt, greedy unless "router on"):
- edgeroute fp16 / int4, device KV cache, with and without CUDA graphs, the NumPy router off (temperature 0) and on
  (temperature 0.7, top-k 50, top-p 0.9, repetition penalty 1.1: every token through the router chain);
- onnxruntime-genai fp16 / int4, with and without its CUDA graph (``enable_cuda_graph`` in a copy of its config);
- optimum ORTModelForCausalLM on CUDAExecutionProvider with IO binding.
Each row: decode tok/s (median of --runs), time to first token on the chat prompt and on a 1,000-token prompt.
Then the parity of edgeroute's fp16 graph with PyTorch fp16: top-1 agreement over the quality text, and 64 greedy
tokens compared.

``--provider cpu`` runs the edgeroute rows on the CPU provider (no CUDA graphs, no peers): a smoke test of this
script on a machine without a GPU, not a GPU figure.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from peers import LONG, PROMPT, _measure, edgeroute_steps, genai_steps, machine

ROUTER_ON = {"temperature": 0.7, "top_k": 50, "top_p": 0.9, "repetition_penalty": 1.1, "seed": 1}


def work_edgeroute(
    path: str, provider: str, cuda_graph: bool, router: bool, ids: list[int], tokens: int, runs: int
) -> dict:
    import edgeroute as er

    model = er.Model.load(path, provider=provider, context_size=LONG + tokens, cuda_graph=cuda_graph)
    sampling = er.SamplingConfig(**(ROUTER_ON if router else {"temperature": 0}))
    cfg = er.GenerationConfig(max_new_tokens=tokens, min_new_tokens=tokens, sampling=sampling)

    res = _measure(*edgeroute_steps(model, cfg), runs, ids)
    res["kv"] = model.kv
    res["nodes"] = model.node_providers()
    return res


def work_genai(path: str, cuda_graph: bool, ids: list[int], tokens: int, runs: int) -> dict:
    import onnxruntime_genai as og

    folder = Path(tempfile.mkdtemp(prefix="genai-"))
    for f in Path(path).iterdir():  # a copy of the folder whose config says whether to capture CUDA graphs
        (folder / f.name).symlink_to(f.resolve())
    cfg_path = folder / "genai_config.json"
    cfg = json.loads(Path(path, "genai_config.json").read_text())
    opts = cfg["model"]["decoder"].setdefault("session_options", {})
    cuda = {"enable_cuda_graph": "1" if cuda_graph else "0"}
    opts["provider_options"] = [{"cuda": cuda}]
    cfg_path.unlink()
    cfg_path.write_text(json.dumps(cfg))
    model = og.Model(str(folder))  # token ids, not text: the same prompt ids as every other row
    try:
        return _measure(*genai_steps(model, tokens), runs, ids)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def work_optimum(path: str, ids: list[int], tokens: int, runs: int) -> dict:
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    model = ORTModelForCausalLM.from_pretrained(path, provider="CUDAExecutionProvider", use_io_binding=True)
    eos = model.generation_config.eos_token_id

    def first(ids_):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        model.generate(torch.tensor([ids_], device="cuda"), max_new_tokens=1, do_sample=False)
        return ids_, time.perf_counter() - t0

    def rest(ids_):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        out = model.generate(
            torch.tensor([ids_], device="cuda"), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
            eos_token_id=eos,
        )  # fmt: skip
        return out[0, len(ids_) :].tolist(), time.perf_counter() - t0

    res = _measure(first, rest, runs, ids)
    res["decode_tok_s"] = [  # rest() timed the whole generation: take each run's first token out of it
        (tokens - 1) / ((tokens - 1) / d - t) for d, t in zip(res["decode_tok_s"], res["ttft_s"], strict=True)
    ]
    return res


def work_parity(path: str, hf: str, provider: str, ids: list[int]) -> dict:
    """edgeroute's fp16 graph against PyTorch fp16 on the GPU: top-1 agreement over the quality text and 64 greedy
    tokens from the chat prompt."""
    import edgeroute as er
    import numpy as np
    import torch
    from edgeroute.quality import QUALITY_TEXT
    from transformers import AutoModelForCausalLM

    dev = "cuda" if provider == "cuda" else "cpu"
    dtype = torch.float16 if dev == "cuda" else torch.float32
    ref = AutoModelForCausalLM.from_pretrained(hf, dtype=dtype).to(dev).eval()
    model = er.Model.load(path, provider=provider)
    text = model.tokenizer.encode(QUALITY_TEXT)[:512]
    ours = model.forward_last(np.array([text]), model.new_cache(), len(text))[0]
    with torch.no_grad():
        theirs = ref(torch.tensor([text], device=dev)).logits[0].float().cpu().numpy()
    prompt = list(ids)
    greedy = model.generate(prompt, er.GenerationConfig(max_new_tokens=64, sampling=er.SamplingConfig(temperature=0)))
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt], device=dev), max_new_tokens=64, do_sample=False)
    want = out[0, len(prompt) :].tolist()
    same = next((i for i, (a, b) in enumerate(zip(greedy.token_ids, want, strict=False)) if a != b), len(want))
    return {
        "top1_agreement": float(np.mean(ours.argmax(-1) == theirs.argmax(-1))),
        "max_abs_logit_diff": float(np.abs(ours - theirs).max()),
        "greedy_identical_prefix": same,
        "greedy_tokens": len(want),
    }


def _worker(spec: dict) -> dict:
    kind = spec.pop("kind")
    return {"edgeroute": work_edgeroute, "genai": work_genai, "optimum": work_optimum, "parity": work_parity}[kind](
        **spec
    )


def run(spec: dict, timeout: int) -> dict:
    """One row in its own process; a failure is reported with its reason, never as a figure."""
    try:
        res = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if res.returncode != 0:
        lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
        return {"error": lines[-1] if lines else f"exit {res.returncode}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fp16", help="edgeroute folder: --device cuda --dtype fp16")
    ap.add_argument("--int4", help="edgeroute folder: --device cuda --dtype fp16 --quantize int4")
    ap.add_argument("--genai-fp16")
    ap.add_argument("--genai-int4")
    ap.add_argument("--optimum", help="optimum's export folder (fp16)")
    ap.add_argument("--hf", help="the Hugging Face checkpoint: PyTorch's parity reference")
    ap.add_argument("--provider", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--timeout", type=int, default=300, help="seconds per row")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return
    import edgeroute as er

    if args.provider not in er.available_providers():
        sys.exit(f"bench/gpu.py: provider {args.provider!r} is not available here (onnxruntime-gpu and a GPU needed)")
    if not (args.fp16 or args.int4):
        sys.exit("bench/gpu.py: give --fp16 and/or --int4 (edgeroute folders exported with --device cuda)")
    graphs = (False, True) if args.provider == "cuda" else (False,)
    rows: list[tuple[str, dict[str, Any]]] = []
    folder = Path(args.fp16 or args.int4)
    manifest = er.Manifest.load(folder)
    tok = er.Tokenizer.from_folder(folder, manifest.chat_template, manifest.special_tokens)
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}])  # one prompt's ids for every row
    common = {"ids": ids, "tokens": args.tokens, "runs": args.runs}
    for label, path in (("fp16", args.fp16), ("int4", args.int4)):
        if not path:
            continue
        for graph in graphs:
            for router in (False, True):
                name = f"edgeroute {label}{' + CUDA graph' if graph else ''}, router {'on' if router else 'off'}"
                spec = {"kind": "edgeroute", "path": path, "provider": args.provider, "cuda_graph": graph}
                rows.append((name, {**spec, "router": router, **common}))
    if args.provider == "cuda":
        for label, path in (("fp16", args.genai_fp16), ("int4", args.genai_int4)):
            for graph in (False, True) if path else ():
                name = f"onnxruntime-genai {label}{' + CUDA graph' if graph else ''}"
                rows.append((name, {"kind": "genai", "path": path, "cuda_graph": graph, **common}))
        if args.optimum:
            rows.append(("optimum on CUDA (IO binding)", {"kind": "optimum", "path": args.optimum, **common}))
    results = {name: run(spec, args.timeout) for name, spec in rows}
    parity = None
    if args.hf and args.fp16:
        spec = {"kind": "parity", "path": args.fp16, "hf": args.hf, "provider": args.provider, "ids": ids}
        parity = run(spec, args.timeout)
    print(f"# {machine()}; provider {args.provider}; {args.tokens} new tokens, median of {args.runs}")
    print("| system | decode tok/s | TTFT chat ms | TTFT 1,000 tok ms |")
    print("|---|---|---|---|")
    for name, r in results.items():
        if "error" in r:
            print(f"| {name} | failed: {r['error']} | | |")
            continue
        med = sorted(r["decode_tok_s"])[len(r["decode_tok_s"]) // 2]
        ttft = 1000 * sorted(r["ttft_s"])[len(r["ttft_s"]) // 2]
        long = 1000 * sorted(r["ttft_long_s"])[len(r["ttft_long_s"]) // 2]
        print(f"| {name} | {med:.1f} | {ttft:.1f} | {long:.1f} |")
    if parity is not None:
        print(f"parity (edgeroute fp16 vs PyTorch): {json.dumps(parity)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "rows": results, "parity": parity}, indent=2))


if __name__ == "__main__":
    main()
