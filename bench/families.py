"""The newer fused families at their real geometry (random weights: enough for speed): decode tok/s and time to
first token of the fused graph against optimum's graph of the same checkpoint (the fallback these families took
before), fp32 and fused int4, in one run. The fused fp32 export is validated against PyTorch at that geometry.

    python bench/families.py [--families gemma3_text,qwen3,smollm3] [--prompt 500] [--new 64] [--rounds 3]

Decode is measured twice: after a 16-token prompt, and after the 500-token prompt (each step then attends over
~500 cached positions, which optimum's graph concatenates and copies every step).

Geometries: Gemma 3 270M (gemma3_text), Qwen3-0.6B (qwen3; optimum's export of it fails, so also qwen3-8: 8 of
its 28 layers), SmolLM3-3B with 4 of its 36 layers (smollm3: the whole model is 12 GB in fp32; its per-layer cost
is what the fused graph changes). Context capped at 2,048.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

from _common import REPO

sys.path.insert(0, str(REPO / "tests"))


def _config(family: str):  # type: ignore[no-untyped-def]
    import transformers as t

    if family == "gemma3_text":
        return t.Gemma3TextConfig(
            vocab_size=262_144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
            num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
            sliding_window=512, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
            max_position_embeddings=32_768, tie_word_embeddings=True, pad_token_id=0,
        ), t.Gemma3ForCausalLM  # fmt: skip
    if family == "qwen3":
        return t.Qwen3Config(
            vocab_size=151_936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
            num_attention_heads=16, num_key_value_heads=8, head_dim=128, rope_theta=1_000_000.0,
            max_position_embeddings=40_960, tie_word_embeddings=True,
        ), t.Qwen3ForCausalLM  # fmt: skip
    if family == "qwen3-8":  # Qwen3-0.6B with 8 of its 28 layers: small enough for optimum's export to succeed
        cfg, cls = _config("qwen3")
        cfg.num_hidden_layers = 8
        cfg.layer_types = cfg.layer_types[:8]
        return cfg, cls
    if family == "smollm3":
        return t.SmolLM3Config(
            vocab_size=128_256, hidden_size=2048, intermediate_size=11_008, num_hidden_layers=4,
            num_attention_heads=16, num_key_value_heads=4, no_rope_layers=[1, 1, 1, 0], rope_theta=5_000_000.0,
            max_position_embeddings=65_536, tie_word_embeddings=True, pad_token_id=0,
        ), t.SmolLM3ForCausalLM  # fmt: skip
    raise SystemExit(f"unknown family {family!r}")


def _checkpoint(family: str, folder: Path) -> Path:
    import torch
    import transformers
    from tiny_model import CHATML, build_tokenizer

    if (folder / "config.json").is_file():
        return folder
    cfg, cls = _config(family)
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():  # norms away from their init (Gemma: zeros) so the graph computes something non-trivial
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=build_tokenizer(), eos_token="<|endoftext|>")
    tok.chat_template = CHATML
    tok.save_pretrained(folder)
    return folder


def _measure(folder: Path, prompt: int, new: int, rounds: int, threads: int) -> dict[str, float]:
    import edgeroute as er
    import numpy as np

    model = er.Model.load(folder, threads=threads)
    rng = np.random.default_rng(0)
    ids = [int(i) for i in rng.integers(10, 300, size=prompt)]
    # min_new_tokens holds EOS back: every run decodes `new` tokens
    cfg = er.GenerationConfig(max_new_tokens=new, min_new_tokens=new, sampling=er.SamplingConfig(temperature=0))
    ttft, short, long = [], [], []
    for _ in range(rounds + 1):  # the first round warms up
        cache = model.new_cache()
        t0 = time.perf_counter()
        model.forward_last(np.array([ids]), cache, 1)
        ttft.append(time.perf_counter() - t0)
        short.append(model.generate(ids[:16], cfg).usage.tokens_per_second)
        long.append(model.generate(ids, cfg).usage.tokens_per_second)  # every step reads the prompt's cache
    return {
        "ttft_ms": round(1000 * statistics.median(ttft[1:]), 1),
        "decode_tok_s": round(statistics.median(short[1:]), 1),
        "decode_after_prompt_tok_s": round(statistics.median(long[1:]), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", default="gemma3_text,qwen3,smollm3")
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgeroute-families"))
    ap.add_argument("--prompt", type=int, default=500)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the exported folders")
    args = ap.parse_args()
    from edgeroute.errors import ExportError
    from edgeroute.export import export_model

    results = {}
    for family in args.families.split(","):
        root = args.work / family
        ckpt = _checkpoint(family, root / "ckpt")
        row: dict[str, object] = {}
        for label, kw in (
            ("optimum fp32", {"backend": "optimum", "validate": False}),
            ("fused fp32", {"backend": "fused"}),
            ("fused int4", {"backend": "fused", "quantize": "int4", "validate": False}),
        ):
            out = root / label.replace(" ", "-")
            t0 = time.perf_counter()
            try:
                if not (out / "edgeroute.json").is_file():
                    export_model(ckpt, out, context_length=2048, **kw)  # type: ignore[arg-type]
            except ExportError as e:  # optimum cannot export every checkpoint: say why, measure the rest
                row[label] = {"error": str(e)}
                print(family, label, json.dumps(row[label]), flush=True)
                continue
            man = json.loads((out / "edgeroute.json").read_text())
            entry: dict[str, object] = {"export_s": round(time.perf_counter() - t0, 1)}
            entry["size_mb"] = round(sum(f.stat().st_size for f in out.iterdir()) / 2**20, 1)
            v = man["provenance"].get("validation")
            if v:
                entry["max_abs_logit_diff"] = v["max_abs_logit_diff"]
                entry["greedy_identical"] = v.get("greedy_identical")
            if "embedding" in man["quantization"]:
                entry["embedding"] = man["quantization"]["embedding"]
            entry.update(_measure(out, args.prompt, args.new, args.rounds, args.threads))
            row[label] = entry
            print(family, label, json.dumps(entry), flush=True)
            if not args.keep and label == "optimum fp32":
                shutil.rmtree(out)
        base = row["optimum fp32"]
        for label in ("fused fp32", "fused int4"):
            e = row[label]
            if "error" in base or "error" in e:
                continue
            for k in ("decode_tok_s", "decode_after_prompt_tok_s"):
                e[f"{k}_vs_optimum"] = round(e[k] / base[k], 2)  # type: ignore[index, operator]
            e["ttft_vs_optimum"] = round(base["ttft_ms"] / e["ttft_ms"], 2)  # type: ignore[index, operator]
        results[family] = row
        if not args.keep:
            shutil.rmtree(root)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
