"""One graph run's cost by its shape: ``ROWS x POSITIONS`` new positions after ``--past`` cached ones, every
position's logits kept (what scoring computes), on an edgeroute export (its shared KV buffers bound as past and
present, as the engine binds them) and, with ``--genai``, on an onnxruntime-genai Model Builder export (fed as
lm-eval's onnxruntime backend feeds it: ``session.run`` with an attention mask). Each graph in its own session,
2 intra-op threads by default, the median of ``--rounds`` rounds of ``--runs`` runs taking turns; ``--profile``
adds onnxruntime's per-operator split for the edgeroute graph.

    python bench/graph_runs.py /tmp/qs/smol-fp32 --genai /tmp/genai-fp32 --shapes 1x10 1x22 1x40 16x21
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort


def options(threads: int, profile: bool = False) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.enable_profiling = profile
    return so


def edgeroute_run(folder: Path, rows: int, n: int, past: int, so: ort.SessionOptions) -> tuple[Any, Any]:
    m = json.loads((folder / "edgeroute.json").read_text(encoding="utf-8"))
    s = ort.InferenceSession(str(folder / m["graph"]), so, providers=["CPUExecutionProvider"])
    io, held = s.io_binding(), []
    shape = (rows, m["num_kv_heads"], past + n, m["head_size"])
    for layer in range(m["num_layers"]):
        for kind in ("key", "value"):
            v = ort.OrtValue.ortvalue_from_numpy(np.random.rand(*shape).astype(np.float32))
            held.append(v)
            io.bind_ortvalue_input(m["inputs"][f"past_{kind}"].format(layer=layer), v)
            io.bind_ortvalue_output(m["outputs"][f"present_{kind}"].format(layer=layer), v)
    small = {
        "input_ids": np.random.randint(0, m["vocab_size"], (rows, n)).astype(np.int64),
        "seqlens_k": np.full(rows, past + n - 1, np.int32),
        "total_sequence_length": np.array(past + n, np.int32),
        "logits_to_keep": np.array([n], np.int64),
        "query_seqlens": np.full(rows, n, np.int32),
    }
    for key, value in small.items():
        if m["inputs"].get(key):
            v = ort.OrtValue.ortvalue_from_numpy(value)
            held.append(v)
            io.bind_ortvalue_input(m["inputs"][key], v)
    logits = ort.OrtValue.ortvalue_from_numpy(np.empty((rows, n, m["vocab_size"]), np.float32))
    held.append(logits)
    io.bind_ortvalue_output(m["outputs"]["logits"], logits)
    return s, lambda: s.run_with_iobinding(io)


def genai_run(folder: Path, rows: int, n: int, past: int, so: ort.SessionOptions) -> tuple[Any, Any]:
    s = ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])
    feeds = {"input_ids": np.random.randint(0, 49152, (rows, n)).astype(np.int64)}
    feeds["attention_mask"] = np.ones((rows, past + n), np.int64)
    for i in s.get_inputs():
        if i.name.startswith("past_key_values"):
            feeds[i.name] = np.random.rand(rows, i.shape[1], past, i.shape[3]).astype(np.float32)
    return s, lambda: s.run(None, feeds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("export", type=Path)
    ap.add_argument("--genai", type=Path, default=None)
    ap.add_argument("--shapes", nargs="+", default=["1x10", "1x22", "1x40", "16x21"], help="ROWSxPOSITIONS")
    ap.add_argument("--past", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    print(f"{'shape':<10}{'graph':<12}{'ms a run':>10}{'ms a position':>15}")
    for shape in a.shapes:
        rows, n = (int(x) for x in shape.split("x"))
        runs = {"edgeroute": edgeroute_run(a.export, rows, n, a.past, options(a.threads, a.profile))}
        if a.genai is not None:
            runs["genai"] = genai_run(a.genai, rows, n, a.past, options(a.threads))
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(a.rounds):
            for name, (_, run) in runs.items():
                run()
                t = time.perf_counter()
                for _ in range(a.runs):
                    run()
                times[name].append((time.perf_counter() - t) / a.runs * 1e3)
        for name, ms in times.items():
            med = statistics.median(ms)
            print(f"{shape:<10}{name:<12}{med:>10.2f}{med / (rows * n):>15.3f}")
        if a.profile:
            path = runs["edgeroute"][0].end_profiling()
            spent: dict[str, float] = collections.defaultdict(float)
            for e in json.loads(Path(path).read_text(encoding="utf-8")):
                if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                    spent[e["args"]["op_name"]] += e["dur"]
            total_runs = a.rounds * (a.runs + 1)
            for op, us in sorted(spent.items(), key=lambda x: -x[1])[:6]:
                print(f"{'':<10}  {op:<34}{us / total_runs / 1e3:>8.2f} ms a run")
            os.remove(path)


if __name__ == "__main__":
    main()
