"""LoRA adapters at run time (issue 37) on SmolLM2-135M-Instruct, int4 and fp32 bases: what an adapter costs.

    python bench/adapters.py --prepare      # once: the HF base, exports, random and trained adapters (cached)
    python bench/adapters.py [--rounds 3] [--runs 3] [--quick] [--llama-cpp-python PY] [--json]

Graphs (all from the same GGUF): the plain graph (no LoRA inputs) and LoRA graphs of rank R = 8 and 16 on all
linear modules (q, k, v, o, gate, up, down) and R = 8 on q, v (PEFT's default targets). Adapters: random PEFT
adapters (``init_lora_weights=False``) of the graph's rank for the speed rows, and one real fine-tune (r = 16,
all-linear, a pirate-styled chat set generated from the base's own answers, trained here on the CPU) for the
agreement rows.

1. single stream: decode tok/s of 128 greedy tokens on the chat prompt of bench/peers.py: the plain graph, the
   LoRA graph without an adapter and with one (the two alternate in one process);
2. the engine (max_batch 8, prefix reuse off): 4 and 8 concurrent requests on 1, 2, 4, 8 distinct adapters
   (request i on adapter i mod k) against the same requests on no adapter (LoRA graph), on the plain graph and
   against each adapter's requests run as a batch of their own, one adapter after another: aggregate tok/s;
3. memory: RSS growth with N = 1, 4, 8, 16 rank-16 adapters loaded (from edgeroute adapter files) against the
   files' size and ``model.adapters.nbytes``, and the rows of an 8-row engine holding 8 adapters;
4. load and unload time of one adapter from its PEFT folder and from its adapter file (median of 10);
5. agreement with PEFT in PyTorch fp32 (the fine-tune): top-1 over held-out styled text and equal tokens of 64
   greedy ones on 4 held-out prompts: the int4 LoRA graph + adapter, against the int4 export of the merged adapter
   (``export_model(peft_dir, out, quantize="int4", base=HF)``);
6. llama.cpp (llama-cpp-python, ``--llama-cpp-python PY``: its own venv, bench/README.md) on the Q4_1 GGUF with
   and without ``lora_path`` (the same adapters converted by llama.cpp's ``convert_lora_to_gguf.py``, found with
   ``--llama-src DIR``, a llama.cpp source tree, at --prepare).

Every timed system runs in its own process; the processes take turns over --rounds rounds; figures are medians over
all runs, each ratio the median of the per-round ratios. Exports and adapters are kept in models/adapters-bench.
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

ROOT = REPO / "models" / "adapters-bench"
HF_DIR = REPO / "models" / "peers" / "smollm2-hf"  # bench/peers.py --prepare writes the same folder
PROMPT = "Write a short story about a robot who learns to paint."
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = {"r8": (8, ALL), "r16": (16, ALL), "r8-qv": (8, ["q_proj", "v_proj"])}  # graph/adapter kind -> (rank, targets)
COPIES = {"r8": 8, "r16": 16, "r8-qv": 1}  # random adapters of each kind
TRAINED = "style-r16"
BASES = ("int4", "fp32")


def graph(base: str, kind: str | None) -> Path:
    return ROOT / f"{base}-{kind or 'plain'}"


def peft_dir(kind: str, i: int = 0) -> Path:
    return ROOT / "peft" / f"{kind}-{i}"


def adapter_file(kind: str, i: int = 0) -> Path:
    return ROOT / "files" / f"{kind}-{i}.safetensors"


def gguf_lora(kind: str) -> Path:
    return ROOT / "gguf" / f"{kind}-0.gguf"


def smollm2_gguf() -> Path:
    cmd = [sys.executable, str(REPO / "bench" / "smollm2_gguf.py")]
    return Path(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip())


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


# -- the styled chat set the real adapter is trained on ---------------------------------------------------------
TOPICS = (
    "the moon|rain|bread|a compass|the ocean|volcanoes|bees|a library|chess|maps|the wind|coffee|glass|trees"
    "|a lighthouse|rivers|stars|salt|clocks|snow"
).split("|")
ASKS = ["What is {}?", "Tell me about {}.", "Why does {} matter?", "Describe {} in two sentences."]
PIRATE = dict(  # word -> pirate word
    pair.split("=")
    for pair in "you=ye your=yer my=me is=be are=be the=th' of=o' to=t' and=an' hello=ahoy yes=aye friend=matey"
    " for=fer it='tis".split()
)


HELD_OUT = [TOPICS[-1], "honey", "bridges"]  # topics the adapter is not trained on (agreement text and prompts)


def style_pairs(topics: list[str]) -> list[tuple[str, str]]:
    """(question, topic) pairs: each topic asked each way."""
    return [(ask.format(t), t) for t in topics for ask in ASKS]


def piratify(text: str) -> str:
    words = [PIRATE.get(w.lower(), w) for w in text.split()]
    return "Arr, matey! " + " ".join(words) + " Yo ho ho!"


def styled_chats(model: Any, questions: list[str]) -> list[list[int]]:
    """Each question with the base's own greedy answer (48 tokens, cut at the last full stop), pirate-styled."""
    import edgeroute as er

    out = []
    for q in questions:
        ids = model.tokenizer.apply_chat_template([{"role": "user", "content": q}])
        answer = model.generate(ids, er.GenerationConfig(max_new_tokens=48, sampling=er.SamplingConfig(temperature=0)))
        text = answer.text.rsplit(".", 1)[0] + "." if "." in answer.text else answer.text
        chat = [{"role": "user", "content": q}, {"role": "assistant", "content": piratify(text.strip())}]
        out.append(model.tokenizer.apply_chat_template(chat, add_generation_prompt=False))
    return out


def train_style_adapter(out: Path, steps: int = 80) -> None:
    """A real fine-tune: r=16 all-linear LoRA, AdamW lr 1e-3 decaying linearly, batch 4, on the styled chats."""
    import edgeroute as er
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    questions = [q for q, _ in style_pairs([t for t in TOPICS if t not in HELD_OUT])]
    chats = styled_chats(er.Model.load(graph("int4", None)), questions)
    base = AutoModelForCausalLM.from_pretrained(HF_DIR, dtype=torch.float32)
    cfg = LoraConfig(r=16, lora_alpha=32, target_modules=ALL, lora_dropout=0.0, task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    t0 = time.perf_counter()
    for step in range(steps):
        batch = [chats[(4 * step + j) % len(chats)][:96] for j in range(4)]
        width = max(len(b) for b in batch)
        ids = torch.tensor([b + [0] * (width - len(b)) for b in batch])
        mask = torch.tensor([[1] * len(b) + [0] * (width - len(b)) for b in batch])
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % 10 == 0 or step == steps - 1:
            print(f"  step {step}: loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    model.save_pretrained(out)


# -- preparation ---------------------------------------------------------------------------------------------------
def prepare(llama_src: Path | None) -> None:
    import torch
    from edgeroute.adapters import read_adapter, write_adapter
    from edgeroute.export import export_model
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    gguf = smollm2_gguf()
    if not (HF_DIR / "config.json").is_file():
        from edgeroute.export.sources import load_source

        src = load_source(gguf)
        src.model.save_pretrained(HF_DIR)
        src.tokenizer.save_pretrained(HF_DIR)
        print(f"wrote {HF_DIR}")
    for base in BASES:
        for kind in (None, *LORA):
            if not (graph(base, kind) / "edgeroute.json").is_file():
                t0 = time.perf_counter()
                rank, targets = LORA[kind] if kind else (None, None)
                q = "none" if base == "fp32" else base
                export_model(gguf, graph(base, kind), quantize=q, lora_rank=rank, lora_targets=targets)
                print(f"wrote {graph(base, kind)} ({time.perf_counter() - t0:.0f} s)")
    hf = AutoModelForCausalLM.from_pretrained(HF_DIR, dtype=torch.float32)
    for kind, (rank, targets) in LORA.items():
        for i in range(COPIES[kind]):
            if not (peft_dir(kind, i) / "adapter_config.json").is_file():
                torch.manual_seed(1000 * rank + i)
                cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False)
                wrapped = get_peft_model(hf, cfg)
                wrapped.save_pretrained(peft_dir(kind, i))
                hf = wrapped.unload()
    if not (peft_dir(TRAINED) / "adapter_config.json").is_file():
        print("training the style adapter (r=16, all-linear, 80 steps)")
        train_style_adapter(peft_dir(TRAINED))
    for kind, i in [(k, i) for k in LORA for i in range(COPIES[k])] + [(TRAINED, 0)]:
        if not adapter_file(kind, i).is_file():
            adapter_file(kind, i).parent.mkdir(parents=True, exist_ok=True)
            write_adapter(read_adapter(peft_dir(kind, i), f"{kind}-{i}"), adapter_file(kind, i))
    merged = ROOT / "int4-merged"
    if not (merged / "edgeroute.json").is_file():
        export_model(peft_dir(TRAINED), merged, quantize="int4", base=HF_DIR)
        print(f"wrote {merged}")
    if llama_src is not None:
        for kind in LORA:
            if not gguf_lora(kind).is_file():
                gguf_lora(kind).parent.mkdir(parents=True, exist_ok=True)
                cmd = [sys.executable, str(llama_src / "convert_lora_to_gguf.py"), "--base", str(HF_DIR)]
                cmd += ["--outtype", "f32", "--outfile", str(gguf_lora(kind)), str(peft_dir(kind))]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
                print(f"{'wrote ' + str(gguf_lora(kind)) if proc.returncode == 0 else 'conversion failed: ' + tail}")


# -- workers (each in its own process) ------------------------------------------------------------------------------
def fixed(tokens: int, adapter: str | None = None) -> Any:
    import edgeroute as er

    sampling = er.SamplingConfig(temperature=0)
    return er.GenerationConfig(max_new_tokens=tokens, min_new_tokens=tokens, sampling=sampling, adapter=adapter)


def chat_ids(model: Any, text: str = PROMPT) -> list[int]:
    return model.tokenizer.apply_chat_template([{"role": "user", "content": text}])


def work_single(base: str, kind: str | None, tokens: int, runs: int) -> dict[str, Any]:
    """The plain graph, or a LoRA graph without and with one adapter (alternating): decode tok/s per run."""
    import edgeroute as er
    from edgeroute.cli.bench_cmd import peak_rss_mb

    model = er.Model.load(graph(base, kind))
    ids = chat_ids(model)
    names = [None]
    if kind is not None:
        model.load_adapter("a", adapter_file(kind))
        names.append("a")
    out: dict[str, Any] = {str(n): [] for n in names}
    for name in names:
        model.generate(ids, fixed(8, name))  # warm-up
    for _ in range(runs):
        for name in names:
            out[str(name)].append(model.generate(ids, fixed(tokens, name)).usage.tokens_per_second)
    return {"tok_s": out, "peak_rss_mb": peak_rss_mb()}


def engine_run(model: Any, ids: list[int], plan: list[list[str | None]], tokens: int) -> float:
    """Aggregate tok/s of the requests in ``plan``: each inner list is submitted at once, and waited for before the
    next (one list: all concurrent; one list per adapter: separate batches one after another)."""
    import edgeroute as er

    with er.Engine(model, max_batch=8, prefix_reuse=False) as engine:
        engine.submit(ids, fixed(4)).result()  # warm-up
        t0, total = time.perf_counter(), 0
        for batch in plan:
            done = [r.result(timeout=600) for r in [engine.submit(ids, fixed(tokens, a)) for a in batch]]
            total += sum(c.usage.completion_tokens for c in done)
        return total / (time.perf_counter() - t0)


def engine_plans(lora: bool, sizes: list[int]) -> dict[str, list[list[str | None]]]:
    plans: dict[str, list[list[str | None]]] = {}
    for n in sizes:
        plans[f"{n} base"] = [[None] * n]
        for k in [k for k in (1, 2, 4, 8) if k <= n and lora]:
            plans[f"{n} on {k}"] = [[f"a{i % k}" for i in range(n)]]
            if k > 1:
                plans[f"{n} on {k}, one adapter after another"] = [[f"a{j}"] * (n // k) for j in range(k)]
    return plans


def work_engine(base: str, kind: str | None, tokens: int, sizes: list[int]) -> dict[str, Any]:
    import edgeroute as er

    model = er.Model.load(graph(base, kind))
    for i in range(8 if kind else 0):
        model.load_adapter(f"a{i}", adapter_file(kind, i))  # type: ignore[arg-type]
    ids = chat_ids(model)
    return {name: engine_run(model, ids, plan, tokens) for name, plan in engine_plans(kind is not None, sizes).items()}


def work_memory(base: str) -> dict[str, Any]:
    """RSS growth with N rank-16 adapters loaded; the rows of an 8-row engine holding 8; load/unload times."""
    import gc

    import edgeroute as er

    model = er.Model.load(graph(base, "r16"), max_adapters=16)
    ids = chat_ids(model)
    model.generate(ids, fixed(4))
    gc.collect()
    rss0, rows = rss_mb(), []
    for n in range(1, 17):
        model.load_adapter(f"a{n - 1}", adapter_file("r16", n - 1))
        if n in (1, 4, 8, 16):
            gc.collect()
            files = sum(adapter_file("r16", i).stat().st_size for i in range(n)) / 2**20
            growth, nbytes = rss_mb() - rss0, model.adapters.nbytes / 2**20
            rows.append({"n": n, "rss_growth_mb": growth, "files_mb": files, "nbytes_mb": nbytes})
    before = rss_mb()
    with er.Engine(model, max_batch=8, prefix_reuse=False) as engine:
        for r in [engine.submit(ids, fixed(4, f"a{i}")) for i in range(8)]:
            r.result(timeout=600)
        engine_rows = rss_mb() - before
    for name in model.adapters.names():
        model.unload_adapter(name)
    times: dict[str, list[float]] = {"load PEFT folder": [], "load adapter file": [], "unload": []}
    for _ in range(10):
        for label, src in (("load PEFT folder", peft_dir("r16")), ("load adapter file", adapter_file("r16"))):
            t0 = time.perf_counter()
            model.load_adapter("x", src)
            times[label].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            model.unload_adapter("x")
            times["unload"].append(time.perf_counter() - t0)
    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    return {"rows": rows, "engine_rows_mb": engine_rows, "times_ms": ms}


def work_llamacpp(kind: str | None, tokens: int, runs: int, ids: list[int], gguf: str) -> dict[str, Any]:
    """llama-cpp-python (its own venv) on the Q4_1 GGUF, without and with ``lora_path`` (alternating)."""
    from llama_cpp import Llama

    kw = {"model_path": gguf, "n_threads": os.cpu_count(), "n_ctx": 512, "flash_attn": True, "verbose": False}
    llms = {"None": Llama(**kw)}  # flash attention on, as llama.cpp's own CLI (bench/peers.py)
    if kind is not None:
        llms["a"] = Llama(**kw, lora_path=str(gguf_lora(kind)))

    def decode(llm: Any) -> float:
        llm.reset()
        llm.eval(ids)
        out = [int(llm.scores[llm.n_tokens - 1].argmax())]
        t0 = time.perf_counter()
        for _ in range(tokens - 1):
            llm.eval([out[-1]])
            out.append(int(llm.scores[llm.n_tokens - 1].argmax()))
        return (tokens - 1) / (time.perf_counter() - t0)

    for llm in llms.values():
        decode(llm)
    got: dict[str, list[float]] = {k: [] for k in llms}
    for _ in range(runs):
        for k, llm in llms.items():
            got[k].append(decode(llm))
    return {"tok_s": got}


# -- agreement with PEFT (no timing: in the driver) -----------------------------------------------------------------
def agreement(quick: bool) -> dict[str, dict[str, float]]:
    """Top-1 agreement over held-out styled chats and equal tokens of 64 greedy ones (EOS suppressed) on held-out
    prompts, against PEFT in PyTorch fp32 (and, for the base without the adapter, against the base in PyTorch)."""
    import edgeroute as er
    import numpy as np
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    questions = [q for q, _ in style_pairs(HELD_OUT)]
    int4 = er.Model.load(graph("int4", None))
    text = [t for c in styled_chats(int4, questions) for t in c]
    prompts = [chat_ids(int4, q) for q in questions[:: 6 if quick else 3]]
    hf = AutoModelForCausalLM.from_pretrained(HF_DIR, dtype=torch.float32)
    peft = PeftModel.from_pretrained(hf, str(peft_dir(TRAINED))).eval()

    def reference() -> tuple[np.ndarray, list[list[int]]]:
        with torch.no_grad():
            top1 = peft(torch.tensor([text])).logits[0].argmax(-1).numpy()
            greedy = []
            for p in prompts:
                ids = torch.tensor([p])
                out = peft.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, min_new_tokens=64, do_sample=False
                )
                greedy.append(out[0, len(p) :].tolist())
        return top1, greedy

    refs = {"peft": reference()}
    with peft.disable_adapter():
        refs["base"] = reference()
    systems = {  # name -> (folder, adapter, reference)
        "int4 LoRA graph (R 16) + adapter": (graph("int4", "r16"), "a", "peft"),
        "int4 export of the merged adapter": (ROOT / "int4-merged", None, "peft"),
        "fp32 LoRA graph (R 16) + adapter": (graph("fp32", "r16"), "a", "peft"),
        "int4 LoRA graph, no adapter (the adapter's own effect)": (graph("int4", "r16"), None, "peft"),
        "int4 LoRA graph, no adapter, vs the base in PyTorch (int4 alone)": (graph("int4", "r16"), None, "base"),
    }
    out = {}
    for name, (folder, adapter, ref) in systems.items():
        model = er.Model.load(folder)
        if folder.name.endswith("r16"):
            model.load_adapter("a", peft_dir(TRAINED))
        ids = np.array([text])
        got = model.forward_last(ids, model.new_cache(adapter=adapter), ids.shape[1])[0].argmax(-1)
        want_top1, want_greedy = refs[ref]
        greedy = [model.generate(p, fixed(64, adapter)).token_ids for p in prompts]
        pairs = list(zip(greedy, want_greedy, strict=True))
        first = [next((i for i, (a, b) in enumerate(zip(g, w, strict=True)) if a != b), 64) for g, w in pairs]
        out[name] = {
            "top1": float(np.mean(got == want_top1)),
            "positions": len(text),
            "greedy_equal": sum(a == b for g, w in pairs for a, b in zip(g, w, strict=True)),
            "greedy_of": 64 * len(prompts),
            "first_divergence": statistics.mean(first),
        }
    return out


# -- the driver ----------------------------------------------------------------------------------------------------
def child(args: list[str], python: str = sys.executable) -> dict[str, Any]:
    proc = subprocess.run([python, __file__, "--worker", json.dumps(args)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError((proc.stderr.strip().splitlines() or ["?"])[-1])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepare", action="store_true")
    ap.add_argument("--quick", action="store_true", help="1 round, 1 run, 32 tokens, int4 only: a smoke run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=3, help="timed generations per system and round (single stream)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--llama-cpp-python", default=None, help="a python with llama-cpp-python (bench/README.md)")
    ap.add_argument("--llama-src", type=Path, default=None, help="llama.cpp's source (convert_lora_to_gguf.py)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        w = json.loads(args.worker)
        fn = {"single": work_single, "engine": work_engine, "memory": work_memory, "llamacpp": work_llamacpp}
        print(json.dumps(fn[w[0]](*w[1:])))
        return
    if args.prepare:
        prepare(args.llama_src)
        return
    if not (ROOT / "int4-merged" / "edgeroute.json").is_file():
        sys.exit(f"{ROOT} is not prepared: run python bench/adapters.py --prepare first")
    if args.quick:
        args.rounds, args.runs, args.tokens = 1, 1, 32
    bases = ("int4",) if args.quick else BASES
    sizes = [4, 8]
    llama_kinds = [k for k in LORA if gguf_lora(k).is_file()] if args.llama_cpp_python else []
    import edgeroute as er
    from edgeroute.cli.progress import Steps

    ids = chat_ids(er.Model.load(graph("int4", None)))
    jobs: dict[str, tuple[list[Any], str]] = {}  # name -> (worker args, python)
    for b in bases:
        for kind in (None, *LORA):
            jobs[f"single {b} {kind}"] = (["single", b, kind, args.tokens, args.runs], sys.executable)
        for kind in (None, "r8", "r16"):
            jobs[f"engine {b} {kind}"] = (["engine", b, kind, args.tokens, sizes], sys.executable)
    for kind in llama_kinds:
        jobs[f"llama {kind}"] = (
            ["llamacpp", kind, args.tokens, args.runs, ids, str(smollm2_gguf())],
            args.llama_cpp_python,
        )
    rounds: list[dict[str, Any]] = []
    notes = []
    with Steps("adapters") as steps:
        steps.start(f"{args.rounds} rounds of {len(jobs)} processes", total=args.rounds * len(jobs), unit="runs")
        for i in range(args.rounds):
            got = {}
            for name, (w, python) in jobs.items():
                try:
                    got[name] = child(w, python)
                except RuntimeError as e:
                    notes.append(f"{name} failed in round {i + 1}: {e}")
                steps.advance()
            rounds.append(got)
        steps.start("memory and load times")
        memory = child(["memory", "int4"])
        steps.start("agreement with PEFT")
        agreed = agreement(args.quick)
    result = {
        "single": single_table(rounds, bases, llama_kinds),
        "engine": engine_table(rounds, bases, sizes),
        "memory": memory,
        "agreement": agreed,
        "notes": notes,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    report(result, args)


def speed(rounds: list[dict[str, Any]], job: str, *key: str) -> float:
    """The median over every round's runs of ``job``'s figure at ``key``."""
    vals = []
    for r in rounds:
        v = r.get(job, {})
        for k in key:
            v = v.get(k, {})
        vals += v if isinstance(v, list) else [v] if isinstance(v, float) else []
    return med(vals) if vals else float("nan")


def ratio(rounds: list[dict[str, Any]], num: tuple[str, ...], den: tuple[str, ...]) -> float | None:
    """The median over rounds of ``num``'s median over ``den``'s (each ``(job, *key)``) in the same round."""
    vals = [speed([r], *num) / speed([r], *den) for r in rounds]
    vals = [v for v in vals if v == v]  # a round where either failed gives nan
    return med(vals) if vals else None


def single_table(rounds: list[dict[str, Any]], bases: tuple[str, ...], llama: list[str]) -> list[dict[str, Any]]:
    rows = []
    for b in bases:
        plain = (f"single {b} None", "tok_s", "None")
        rss = max(r.get(plain[0], {}).get("peak_rss_mb", 0) for r in rounds)
        rows.append({"system": f"{b} plain graph", "tok_s": speed(rounds, *plain), "rss": rss})
        for kind in LORA:
            job = f"single {b} {kind}"
            rss = max(r.get(job, {}).get("peak_rss_mb", 0) for r in rounds)
            none = (job, "tok_s", "None")
            for mine, label in ((none, "no adapter"), ((job, "tok_s", "a"), "one adapter")):
                row = {"system": f"{b} LoRA graph {kind}, {label}", "tok_s": speed(rounds, *mine), "rss": rss}
                rows.append(row | {"vs_plain": ratio(rounds, mine, plain), "vs_none": ratio(rounds, mine, none)})
    for kind in llama:
        job = f"llama {kind}"
        mine, none = (job, "tok_s", "a"), (job, "tok_s", "None")
        rows.append(
            {
                "system": f"llama.cpp Q4_1 --lora {kind} (base alone {speed(rounds, *none):.1f})",
                "tok_s": speed(rounds, *mine),
                "vs_none": ratio(rounds, mine, none),
            }
        )
    return rows


def engine_table(rounds: list[dict[str, Any]], bases: tuple[str, ...], sizes: list[int]) -> list[dict[str, Any]]:
    rows = []
    for b in bases:
        plain = f"engine {b} None"
        for n in sizes:
            rows.append({"graph": f"{b} plain", "plan": f"{n} base", "tok_s": speed(rounds, plain, f"{n} base")})
        for kind in ("r8", "r16"):
            job = f"engine {b} {kind}"
            for n in sizes:
                for plan in engine_plans(True, [n]):
                    rows.append(
                        {
                            "graph": f"{b} {kind}",
                            "plan": plan,
                            "tok_s": speed(rounds, job, plan),
                            "vs_plain": ratio(rounds, (job, plan), (plain, f"{n} base")),
                            "vs_one": ratio(rounds, (job, plan), (job, f"{n} on 1")),
                        }
                    )
    return rows


def cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "?"


def x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def report(res: dict[str, Any], args: argparse.Namespace) -> None:
    print(
        f"machine: {cpu()}, {os.cpu_count()} cores; {args.tokens} new tokens, greedy; {args.rounds} rounds"
        f" x {args.runs} runs (medians; ratios: medians of the rounds' ratios)\n"
    )
    print("| single stream | decode tok/s | x plain graph | x LoRA graph, no adapter | peak RSS |")
    print("|---|---|---|---|---|")
    for r in res["single"]:
        rss = f"{r['rss']:.0f} MB" if "rss" in r else "-"
        print(f"| {r['system']} | {r['tok_s']:.1f} | {x(r.get('vs_plain'))} | {x(r.get('vs_none'))} | {rss} |")
    print("\n| engine: graph | requests | aggregate tok/s | x plain graph, same n | x same n on 1 adapter |")
    print("|---|---|---|---|---|")
    for r in res["engine"]:
        print(f"| {r['graph']} | {r['plan']} | {r['tok_s']:.1f} | {x(r.get('vs_plain'))} | {x(r.get('vs_one'))} |")
    m = res["memory"]
    print("\n| rank-16 adapters loaded (int4, R 16) | RSS growth | files | adapters.nbytes | growth per adapter |")
    print("|---|---|---|---|---|")
    for r in m["rows"]:
        print(
            f"| {r['n']} | {r['rss_growth_mb']:.1f} MB | {r['files_mb']:.1f} MB | {r['nbytes_mb']:.1f} MB |"
            f" {r['rss_growth_mb'] / r['n']:.2f} MB |"
        )
    print(f"\nan 8-row engine running 8 distinct adapters: +{m['engine_rows_mb']:.0f} MB RSS (its per-row weights)")
    times = ", ".join(f"{k} {v:.1f} ms" for k, v in m["times_ms"].items())
    print(f"load/unload one rank-16 adapter (median of 10): {times}")
    print("\n| against PEFT fp32 (trained r 16 adapter) | top-1 agreement | equal greedy tokens | first divergence |")
    print("|---|---|---|---|")
    for name, a in res["agreement"].items():
        print(
            f"| {name} | {a['top1']:.3f} ({a['positions']} positions) | {a['greedy_equal']}/{a['greedy_of']} |"
            f" token {a['first_divergence']:.1f} (mean) |"
        )
    for n in res["notes"]:
        print(f"note: {n}")


if __name__ == "__main__":
    main()
