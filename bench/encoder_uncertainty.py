"""Does the uncertainty of stochastic passes rank errors? (issue 36, point 5.)

On a real fine-tune (``bench/ner_finetune.py``: all-MiniLM-L6-v2 tagging PER/ORG/LOC/MISC) and its test split:
``EncoderModel.entities(texts, samples=N)`` runs N passes with the fine-tune's dropout on and gives each entity its
mean score, predictive entropy and mutual information. Each entity is then an error or not (its label and span
are not a gold entity), and changed under int8 or not (the int8 export's deterministic entities lack it). The AUROC
says how well a score ranks the errors (changes) above the rest: 0.5 is chance, 1.0 perfect. Scores compared:
the mutual information, the predictive entropy, and the plain confidence of one deterministic-equivalent score
(1 - the entity's mean probability).

    python bench/encoder_uncertainty.py /tmp/minilm-ner --fp32 /tmp/ner-fp32 --int8 /tmp/ner-int8 --samples 20
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def auroc(scores: list[float], positive: list[bool]) -> float:
    """The probability that a random positive scores above a random negative (ties: half), by ranks."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(positive, dtype=bool)
    if y.all() or not y.any():
        return float("nan")
    order = s.argsort(kind="mergesort")
    ranks = np.empty(len(s))
    ranks[order] = np.arange(1, len(s) + 1)
    for value in np.unique(s):  # average ranks of ties
        tie = s == value
        ranks[tie] = ranks[tie].mean()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def main() -> None:
    import edgeroute as er
    from encoders import cpu_name
    from ner_finetune import entity_f1, load_split

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", help="the fine-tuned checkpoint folder (with ner_test.jsonl)")
    ap.add_argument("--fp32", required=True)
    ap.add_argument("--int8", required=True)
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--split", default="ner_test.jsonl")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    a = ap.parse_args()
    test = load_split(Path(a.folder) / a.split)
    texts = [x["text"] for x in test]
    gold = [{(e["label"], e["start"], e["end"]) for e in x["entities"]} for x in test]
    fp32, int8 = er.EncoderModel.load(a.fp32), er.EncoderModel.load(a.int8)
    opts = {"aggregation": "first", "overflow": "truncate"}
    t0 = time.perf_counter()
    plain = fp32.entities(texts, **opts)
    plain_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    mc = fp32.entities(texts, samples=a.samples, **opts)
    mc_s = time.perf_counter() - t0
    quantised = [{(e.label, e.start, e.end) for e in g} for g in int8.entities(texts, **opts)]
    rows = []
    for i, g in enumerate(mc):
        for e in g:
            key = (e.label, e.start, e.end)
            rows.append((e.mutual_information, e.entropy, 1 - e.score, key not in gold[i], key not in quantised[i]))
    mi, h, conf, wrong, changed = (list(x) for x in zip(*rows, strict=True))
    spans = lambda found: [[(e.label, e.start, e.end) for e in g] for g in found]  # noqa: E731
    gold_lists = [sorted(g) for g in gold]
    figures = {
        "cpu": cpu_name(),
        "texts": len(texts),
        "samples": a.samples,
        "entities": len(rows),
        "errors": int(sum(wrong)),
        "int8_changes": int(sum(changed)),
        "f1_fp32": entity_f1(gold_lists, spans(plain))["f1"],
        "f1_fp32_mc_mean": entity_f1(gold_lists, spans(mc))["f1"],
        "f1_int8": entity_f1(gold_lists, [sorted(q) for q in quantised])["f1"],
        "auroc_errors": {
            "mutual_information": auroc(mi, wrong),
            "entropy": auroc(h, wrong),
            "1-score": auroc(conf, wrong),
        },
        "auroc_int8_changes": {
            "mutual_information": auroc(mi, changed),
            "entropy": auroc(h, changed),
            "1-score": auroc(conf, changed),
        },
        "mean_mi": {
            "errors": float(np.mean([m for m, w in zip(mi, wrong, strict=True) if w] or [np.nan])),
            "correct": float(np.mean([m for m, w in zip(mi, wrong, strict=True) if not w] or [np.nan])),
        },
        "seconds": {"deterministic": plain_s, f"{a.samples} passes": mc_s},
    }
    print(json.dumps(figures, indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
