"""NER and classification speed and accuracy (issue 36): edgeroute's ``entities`` / ``classify`` (fp32 and int8)
against transformers' pipeline on PyTorch and optimum's ORTModel + pipeline, on the same checkpoint, each system
in its own process, one after another.

Per system: throughput (texts/s, tokens/s) on short texts (the test split's sentences, ~15 tokens) and long ones
(sentences joined to ~250 tokens, cut at the model's length) at batch 1 and 32; one short text's latency p50/p95;
the process's peak RSS; for NER the entity-level precision/recall/F1 against the test split's gold spans (exact
label and span; aggregation ``first``) and, for edgeroute int8, against edgeroute fp32's entities.

    python bench/ner_finetune.py --out /tmp/minilm-ner              # the fine-tuned tagger and its test split
    edgeroute export /tmp/minilm-ner /tmp/ner-fp32
    edgeroute export /tmp/minilm-ner /tmp/ner-int8 --quantize int8
    python bench/encoder_tasks.py /tmp/minilm-ner --fp32 /tmp/ner-fp32 --int8 /tmp/ner-int8

A classifier folder (``--task classification``) is timed the same way (no gold labels: speed only).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SYSTEMS = ("transformers", "optimum", "edgeroute", "edgeroute-int8")


def workloads(folder: Path) -> tuple[list[str], list[str], list[dict]]:
    """(short texts, long texts, the test split) from the checkpoint folder's ``ner_test.jsonl`` (a classifier
    folder without one: the built-in quality texts)."""
    split = folder / "ner_test.jsonl"
    if split.is_file():
        from ner_finetune import load_split

        test = load_split(split)
        short = [x["text"] for x in test]
    else:
        from edgeroute.export.encoder_quality import QUALITY_TEXTS

        test, short = [], list(QUALITY_TEXTS) * 4
    short = short[:256]
    long = [" ".join(short[i : i + 16]) for i in range(0, 16 * 32, 16)][:32]
    return short, [x for x in long if x], test


def child(system: str, folder: str, exports: dict[str, str], task: str) -> None:
    """One system's figures, as one JSON line."""
    short, long, test = workloads(Path(folder))
    if system.startswith("edgeroute"):
        import edgeroute as er

        model = er.EncoderModel.load(exports[system])

        def run(batch: list[str]) -> list:
            if task == "ner":
                return model.entities(batch, aggregation="first", overflow="truncate")
            return model.classify(batch, overflow="truncate")

        def spans(found: list) -> list[list[tuple[str, int, int]]]:
            return [[(e.label, e.start, e.end) for e in g] for g in found]

        def count(batch: list[str]) -> int:
            return sum(min(n, model.max_length) for n in model.count_tokens(batch))
    else:
        import transformers

        tok = transformers.AutoTokenizer.from_pretrained(folder)
        name = "token-classification" if task == "ner" else "text-classification"
        if system == "optimum":
            from optimum.onnxruntime import ORTModelForSequenceClassification, ORTModelForTokenClassification

            auto = ORTModelForTokenClassification if task == "ner" else ORTModelForSequenceClassification
            net = auto.from_pretrained(folder, export=True)
        else:
            net = folder
        kw = {"aggregation_strategy": "first"} if task == "ner" else {}
        pipe = transformers.pipeline(name, model=net, tokenizer=tok, device="cpu", **kw)

        def run(batch: list[str]) -> list:
            return (
                pipe(batch, batch_size=len(batch), truncation=True)
                if task != "ner"
                else pipe(batch, batch_size=len(batch))
            )

        def spans(found: list) -> list[list[tuple[str, int, int]]]:
            return [[(e["entity_group"], int(e["start"]), int(e["end"])) for e in g] for g in found]

        def count(batch: list[str]) -> int:
            return sum(len(x) for x in tok(batch, truncation=True)["input_ids"])

    from encoders import throughputs

    out: dict[str, object] = {"system": system}
    throughputs(out, run, count, {"short": short, "long": long})
    lat = []
    for t in short[:100]:
        t0 = time.perf_counter()
        run([t])
        lat.append(1000 * (time.perf_counter() - t0))
    lat.sort()
    out["p50_ms"] = statistics.median(lat)
    out["p95_ms"] = lat[int(0.95 * len(lat)) - 1]
    if task == "ner" and test:
        from ner_finetune import entity_f1

        found = []
        for i in range(0, len(test), 32):
            found += spans(run([x["text"] for x in test[i : i + 32]]))
        gold = [[(e["label"], e["start"], e["end"]) for e in x["entities"]] for x in test]
        out["gold"] = entity_f1(gold, found)
        Path(f"/tmp/bench-encoder-tasks-{system}.json").write_text(json.dumps(found))
    from edgeroute.cli.bench_cmd import peak_rss_mb

    out["rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", help="the fine-tuned checkpoint (a ner_finetune.py folder, or a classifier)")
    ap.add_argument("--fp32", required=True, help="its edgeroute fp32 export")
    ap.add_argument("--int8", required=True, help="its edgeroute int8 export")
    ap.add_argument("--task", choices=["ner", "classification"], default="ner")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    exports = {"edgeroute": a.fp32, "edgeroute-int8": a.int8}
    if a.child:
        child(a.child, a.folder, exports, a.task)
        return
    from encoders import child_result, cpu_name

    rows = []
    for system in a.systems.split(","):
        cmd = [sys.executable, __file__, a.folder, "--fp32", a.fp32, "--int8", a.int8, "--task", a.task]
        result = child_result([*cmd, "--child", system], system, 3600)
        if result is not None:
            rows.append(result)
    print(f"{cpu_name()}; {a.folder} ({a.task})")
    cols = ["short_b1", "short_b32", "long_b1", "long_b32"]
    head = f"{'system':<16}" + "".join(f"{c + ' texts/s':>18}" for c in cols)
    print(head + f"{'p50 ms':>9}{'p95 ms':>9}{'RSS MB':>9}" + (f"{'entity F1':>11}" if a.task == "ner" else ""))
    base = next((r for r in rows if r["system"] == "transformers"), None)
    for r in rows:
        cells = "".join(f"{r[c + '_texts_s']:>18.1f}" for c in cols)
        f1 = f"{100 * r['gold']['f1']:>11.2f}" if "gold" in r else ""
        print(f"{r['system']:<16}{cells}{r['p50_ms']:>9.2f}{r['p95_ms']:>9.2f}{r['rss_mb']:>9.0f}{f1}")
    if base:
        for r in rows:
            ratios = ", ".join(f"{c} {r[c + '_texts_s'] / base[c + '_texts_s']:.2f}x" for c in cols)
            print(f"{r['system']} / transformers: {ratios}")
    if rows:
        r = rows[0]
        print(f"tokens per text: short {r['short_tokens_per_text']:.1f}, long {r['long_tokens_per_text']:.1f}")
    fp32, int8 = (Path(f"/tmp/bench-encoder-tasks-{s}.json") for s in ("edgeroute", "edgeroute-int8"))
    if a.task == "ner" and fp32.exists() and int8.exists():
        from ner_finetune import entity_f1

        agree = entity_f1(
            [[tuple(e) for e in g] for g in json.loads(fp32.read_text())],
            [[tuple(e) for e in g] for g in json.loads(int8.read_text())],
        )
        print(f"edgeroute int8 entities against fp32: F1 {100 * agree['f1']:.2f}")


if __name__ == "__main__":
    main()
