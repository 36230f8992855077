"""edgeroute against its peers on the same prompt, token count and machine, the systems taking turns.

    python bench/peers.py --prepare        # once: edgeroute's int8/int4 folders and the peers' under models/peers/
    python bench/peers.py [--rounds 3] [--runs 3] [--tokens 128] [--json]

Every system runs in its own subprocess (so peak RSS is its own), greedy, on the chat prompt "Write a short story
about a robot who learns to paint.", generating exactly --tokens tokens. The systems take turns: --rounds rounds,
each running every system once for --runs timed generations after one warm-up, so that a slow spell of the machine
falls on all of them alike. Figures are medians over all rounds' runs; each ratio (edgeroute's decode tok/s over a
peer's) is the median of the ratios within each round. Peers that are not installed, or whose model folder is
missing, are skipped with a note; edgeroute is not optional.
See bench/README.md for installing each peer.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import REPO

PROMPT = "Write a short story about a robot who learns to paint."
LONG = 1000  # tokens of the long prompt for time to first token
ROUTER = {"temperature": 0.7, "top_k": 40, "top_p": 0.9, "min_p": 0.05, "repetition_penalty": 1.1, "seed": 0}
MODELS = REPO / "models"
PEERS = MODELS / "peers"
HF_DIR = PEERS / "smollm2-hf"
GENAI_PYTHON = REPO / ".venv-genai" / "bin" / "python"  # onnxruntime-genai's own environment (bench/README.md)


def _gguf() -> Path:
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "smollm2_gguf.py")], capture_output=True, text=True, check=True
    )
    return Path(out.stdout.strip())


SYSTEMS: dict[str, dict[str, Any]] = {
    "edgeroute fp32": {"kind": "edgeroute", "path": MODELS / "smollm2-135m"},
    "edgeroute int8": {"kind": "edgeroute", "path": MODELS / "smollm2-135m-int8"},
    "edgeroute int4": {"kind": "edgeroute", "path": MODELS / "smollm2-135m-int4"},
    "edgeroute int4, router on": {"kind": "edgeroute", "path": MODELS / "smollm2-135m-int4", "sampling": ROUTER},
    "edgeroute int4 block 64": {"kind": "edgeroute", "path": MODELS / "smollm2-135m-int4-b64"},
    "edgeroute int4 block 64, router on": {
        "kind": "edgeroute",
        "path": MODELS / "smollm2-135m-int4-b64",
        "sampling": ROUTER,
    },
    "transformers, PyTorch fp32": {"kind": "transformers", "path": HF_DIR},
    "optimum ORTModelForCausalLM fp32": {"kind": "optimum", "path": PEERS / "optimum-fp32"},
    "onnxruntime-genai fp32": {"kind": "genai", "path": PEERS / "genai-fp32"},
    "onnxruntime-genai int4": {"kind": "genai", "path": PEERS / "genai-int4"},
    "llama.cpp Q4_1 (llama-cpp-python)": {"kind": "llamacpp", "path": None},
}


# -- workers (each runs in its own process) -------------------------------------------------------------------
def _threads() -> int:
    return int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1))


def _measure(first_token, rest, runs: int, prompt: list[int]) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """first_token(prompt ids) -> (state, ttft seconds); rest(state) -> (token ids, seconds for the other tokens).

    Also times the first token of a LONG-token prompt (the chat prompt's ids repeated), median of 3 after a
    warm-up, for the time-to-first-token goal at long context.
    """
    ttft, decode, ids = [], [], []
    for i in range(runs + 1):
        state, t1 = first_token(prompt)
        ids, t2 = rest(state)
        if i:
            ttft.append(t1)
            decode.append((len(ids) - 1) / t2)
    long_prompt = (prompt * (LONG // len(prompt) + 1))[:LONG]
    long_ttft = [first_token(long_prompt)[1] for _ in range(4)][1:]
    return {"decode_tok_s": decode, "ttft_s": ttft, "ttft_long_s": long_ttft, "token_ids": ids}


def work_edgeroute(path: Path, ids: list[int], tokens: int, runs: int, sampling: dict | None = None) -> dict[str, Any]:
    import edgeroute as er

    model = er.Model.load(path, threads=_threads(), context_size=LONG + tokens)
    router = er.SamplingConfig(**(sampling or {"temperature": 0}))
    cfg = er.GenerationConfig(max_new_tokens=tokens, min_new_tokens=tokens, sampling=router)
    return _measure(*edgeroute_steps(model, cfg), runs, ids)


def edgeroute_steps(model, cfg):  # type: ignore[no-untyped-def]
    """``first``/``rest`` for ``_measure`` over one edgeroute Generator per prompt (bench/gpu.py shares them)."""

    def first(prompt):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        gen = model.generator(cfg)
        gen.append(prompt)
        step = gen.step()
        return (gen, [step.token_id]), time.perf_counter() - t0

    def rest(state):  # type: ignore[no-untyped-def]
        gen, out = state
        t0 = time.perf_counter()
        out += [s.token_id for s in gen]
        return out, time.perf_counter() - t0

    return first, rest


def work_transformers(path: Path, ids: list[int], tokens: int, runs: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(_threads())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def first(prompt):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model(torch.tensor([prompt]), use_cache=True)
        tok0 = int(out.logits[0, -1].argmax())
        return (out.past_key_values, [tok0]), time.perf_counter() - t0

    def rest(state):  # type: ignore[no-untyped-def]
        past, out = state
        t0 = time.perf_counter()
        with torch.no_grad():
            for _ in range(tokens - 1):
                o = model(torch.tensor([[out[-1]]]), past_key_values=past, use_cache=True)
                past = o.past_key_values
                out.append(int(o.logits[0, -1].argmax()))
        return out, time.perf_counter() - t0

    return _measure(first, rest, runs, ids)


def work_optimum(path: Path, ids: list[int], tokens: int, runs: int) -> dict[str, Any]:
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    so = ort.SessionOptions()
    so.intra_op_num_threads = _threads()
    so.inter_op_num_threads = 1
    model = ORTModelForCausalLM.from_pretrained(path, session_options=so, provider="CPUExecutionProvider")
    prompt = torch.tensor([ids])
    eos = model.generation_config.eos_token_id

    def first(ids_):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        model.generate(torch.tensor([ids_]), max_new_tokens=1, do_sample=False)
        return None, time.perf_counter() - t0

    def rest(state):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, eos_token_id=eos)
        total = time.perf_counter() - t0
        return out[0, prompt.shape[1] :].tolist(), total

    res = _measure(first, rest, runs, ids)
    # rest() timed the whole generation: take each run's first-token time out of it
    res["decode_tok_s"] = [
        (tokens - 1) / ((tokens - 1) / d - t) for d, t in zip(res["decode_tok_s"], res["ttft_s"], strict=True)
    ]
    return res


def work_genai(path: Path, ids: list[int], tokens: int, runs: int) -> dict[str, Any]:
    import onnxruntime_genai as og

    model = og.Model(str(path))
    # token ids, not text: its own tokenizer mis-encodes this GGUF-derived tokenizer.json
    return _measure(*genai_steps(model, tokens), runs, ids)


def genai_steps(model, tokens: int):  # type: ignore[no-untyped-def]
    """``first``/``rest`` for ``_measure`` over one onnxruntime-genai Generator per prompt (greedy)."""
    import numpy as np
    import onnxruntime_genai as og

    def first(prompt):  # type: ignore[no-untyped-def]
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + tokens, min_length=len(prompt) + tokens, do_sample=False)
        t0 = time.perf_counter()
        gen = og.Generator(model, params)
        gen.append_tokens(np.array(prompt, dtype=np.int32))
        gen.generate_next_token()
        return (gen, [int(gen.get_next_tokens()[0])]), time.perf_counter() - t0

    def rest(state):  # type: ignore[no-untyped-def]
        gen, out = state
        t0 = time.perf_counter()
        while not gen.is_done() and len(out) < tokens:
            gen.generate_next_token()
            out.append(int(gen.get_next_tokens()[0]))
        return out, time.perf_counter() - t0

    return first, rest


def work_llamacpp(path: Path | None, ids: list[int], tokens: int, runs: int) -> dict[str, Any]:
    from llama_cpp import Llama

    n = LONG + tokens
    # flash attention on, as llama.cpp's own CLI does by default (`-fa auto`); llama-cpp-python leaves it off,
    # which measured ~8% slower decoding here (157-163 vs 167-177 tok/s, 3 alternating runs)
    llm = Llama(model_path=str(_gguf()), n_threads=_threads(), n_ctx=n, n_batch=n, flash_attn=True, verbose=False)

    def first(prompt):  # type: ignore[no-untyped-def]
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        tok0 = int(llm.scores[llm.n_tokens - 1].argmax())
        return [tok0], time.perf_counter() - t0

    def rest(out):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        for _ in range(tokens - 1):
            llm.eval([out[-1]])
            out.append(int(llm.scores[llm.n_tokens - 1].argmax()))
        return out, time.perf_counter() - t0

    return _measure(first, rest, runs, ids)


WORKERS = {
    "edgeroute": work_edgeroute,
    "transformers": work_transformers,
    "optimum": work_optimum,
    "genai": work_genai,
    "llamacpp": work_llamacpp,
}
IMPORTS = {
    "edgeroute": "edgeroute",
    "transformers": "torch",
    "optimum": "optimum.onnxruntime",
    "genai": "onnxruntime_genai",
    "llamacpp": "llama_cpp",
}


# -- preparation and the driver -------------------------------------------------------------------------------
def prepare() -> None:
    """Create the model folders from the same GGUF: edgeroute's int8, int4 and int4 block-64 exports (fp32 comes
    from ``make demo``), an HF checkpoint folder and optimum's export."""
    from transformers import AutoTokenizer

    PEERS.mkdir(parents=True, exist_ok=True)
    gguf = _gguf()
    from edgeroute.export import export_model

    for folder, quantize, block in (("smollm2-135m-int8", "int8", 32), ("smollm2-135m-int4", "int4", 32),
                                    ("smollm2-135m-int4-b64", "int4", 64)):  # fmt: skip
        if not (MODELS / folder / "edgeroute.json").is_file():
            export_model(gguf, MODELS / folder, quantize=quantize, block_size=block)
            print(f"wrote {MODELS / folder}")
    if not (HF_DIR / "config.json").is_file():
        from edgeroute.export.sources import load_source

        src = load_source(gguf)
        src.model.save_pretrained(HF_DIR)
        src.tokenizer.save_pretrained(HF_DIR)
        print(f"wrote {HF_DIR}")
    opt = PEERS / "optimum-fp32"
    if not (opt / "model.onnx").is_file():
        from optimum.exporters.onnx import main_export

        main_export(str(HF_DIR), opt, task="text-generation-with-past", do_validation=False)
        AutoTokenizer.from_pretrained(HF_DIR).save_pretrained(opt)
        print(f"wrote {opt}")
    print("onnxruntime-genai folders: see bench/README.md (its model builder needs transformers >= 5)")


def _peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM): ru_maxrss would include the driver's peak, inherited across exec."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def run_worker(name: str, ids: list[int], tokens: int, runs: int) -> dict[str, Any]:
    spec = SYSTEMS[name]
    extra = {"sampling": spec["sampling"]} if "sampling" in spec else {}
    res = WORKERS[spec["kind"]](spec["path"], ids, tokens, runs, **extra)
    res["peak_rss_mb"] = _peak_rss_mb()
    return res


def _combine(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """One row per system from the rounds: medians over every round's runs, the highest peak RSS, and for
    edgeroute's rows the median over rounds of its decode speed over each peer's in the same round."""
    out: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(n for r in rounds for n in r):
        rows = [r[name] for r in rounds if name in r]
        out[name] = {
            "decode_tok_s": statistics.median(v for row in rows for v in row["decode_tok_s"]),
            "ttft_ms": 1000 * statistics.median(v for row in rows for v in row["ttft_s"]),
            "ttft_long_ms": 1000 * statistics.median(v for row in rows for v in row["ttft_long_s"]),
            "peak_rss_mb": max(row["peak_rss_mb"] for row in rows),
            "token_ids": rows[-1]["token_ids"],
        }
        if name.startswith("edgeroute"):
            out[name]["ratios"] = {
                peer: statistics.median(
                    statistics.median(r[name]["decode_tok_s"]) / statistics.median(r[peer]["decode_tok_s"])
                    for r in rounds
                    if name in r and peer in r
                )
                for peer in dict.fromkeys(n for r in rounds for n in r if not n.startswith("edgeroute"))
                if any(name in r and peer in r for r in rounds)
            }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepare", action="store_true")
    ap.add_argument("--runs", type=int, default=3, help="Timed generations per system and round.")
    ap.add_argument("--rounds", type=int, default=3, help="Rounds in which every system runs in turn.")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--only", nargs="*", default=None, help="Run only these systems (names as printed).")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--ids", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.prepare:
        prepare()
        return
    if args.worker:
        print(json.dumps(run_worker(args.worker, json.loads(args.ids), args.tokens, args.runs)))
        return
    ids = prompt_ids()
    import importlib.util

    runnable: dict[str, str] = {}  # name -> python executable
    notes = []
    for name, spec in SYSTEMS.items():
        if args.only and name not in args.only:
            continue
        python = str(GENAI_PYTHON) if spec["kind"] == "genai" and GENAI_PYTHON.exists() else sys.executable
        if python == sys.executable and importlib.util.find_spec(IMPORTS[spec["kind"]].split(".")[0]) is None:
            notes.append(f"{name}: skipped, {IMPORTS[spec['kind']]} is not installed (bench/README.md)")
            continue
        if spec["path"] is not None and not Path(spec["path"]).exists():
            if spec["kind"] == "edgeroute" and name == "edgeroute fp32":
                sys.exit(f"edgeroute's model {spec['path']} is missing: run `make demo` first")
            notes.append(f"{name}: skipped, {spec['path']} is missing (python bench/peers.py --prepare)")
            continue
        runnable[name] = python
    from edgeroute.cli.progress import Steps  # here: a worker may run in another environment's python

    rounds: list[dict[str, dict[str, Any]]] = []
    with Steps("peers") as steps:  # on stderr: a bar on a terminal, plain lines otherwise
        steps.start(f"{args.rounds} rounds of {len(runnable)} systems", total=args.rounds * len(runnable), unit="runs")
        for i in range(args.rounds):
            got: dict[str, dict[str, Any]] = {}
            for name, python in runnable.items():
                cmd = [python, __file__, "--worker", name, "--tokens", str(args.tokens), "--runs", str(args.runs)]
                proc = subprocess.run([*cmd, "--ids", json.dumps(ids)], capture_output=True, text=True)
                steps.advance()
                if proc.returncode != 0:
                    tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
                    notes.append(f"{name}: failed in round {i + 1}: {tail}")
                    continue
                got[name] = json.loads(proc.stdout.strip().splitlines()[-1])
            rounds.append(got)
    results = _combine(rounds)
    ref = results.get("transformers, PyTorch fp32", {}).get("token_ids")
    for name, r in results.items():
        sampled = "sampling" in SYSTEMS[name]
        r["same_tokens_as_pytorch"] = None if ref is None or sampled else r.pop("token_ids") == ref
    for r in results.values():
        r.pop("token_ids", None)
    if args.json:
        print(json.dumps({"machine": machine(), "results": results, "notes": notes}, indent=2))
        return
    setup = f"{args.tokens} new tokens, greedy, {args.rounds} rounds x {args.runs} runs (medians)"
    print(f"machine: {machine()}; {setup}\n")
    print(
        f"| system | decode tok/s | time to first token | same, {LONG}-token prompt | peak RSS"
        " | same greedy tokens as PyTorch |"
    )
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        same = {None: "n/a", True: "yes", False: "no"}[r["same_tokens_as_pytorch"]]
        print(
            f"| {name} | {r['decode_tok_s']:.1f} | {r['ttft_ms']:.0f} ms | {r['ttft_long_ms']:.0f} ms"
            f" | {r['peak_rss_mb']:.0f} MB | {same} |"
        )
    ours = {n: r for n, r in results.items() if n.startswith("edgeroute")}
    others = {n: r for n, r in results.items() if not n.startswith("edgeroute")}
    if ours and others:
        print(f"\nedgeroute decode speed as a ratio of each peer's (median of the {args.rounds} rounds' ratios):")
        for o, orow in ours.items():
            cells = ", ".join(f"{orow['ratios'][p]:.2f}x {p}" for p in others if p in orow["ratios"])
            print(f"  {o}: {cells}")
    for n in notes:
        print(f"note: {n}")


def prompt_ids() -> list[int]:
    """The chat prompt's token ids, computed once (edgeroute's tokenizer renders the template exactly as
    transformers does) and given to every system, so all of them see the same prompt."""
    import edgeroute as er

    path = SYSTEMS["edgeroute fp32"]["path"]
    if not (Path(path) / "edgeroute.json").is_file():
        sys.exit(f"edgeroute's model {path} is missing: run `make demo` first")
    return er.Model.load(path).tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}])


def machine() -> str:
    import platform

    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


if __name__ == "__main__":
    main()
