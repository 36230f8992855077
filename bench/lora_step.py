"""One decode step of LoRA graphs against the plain graph, at the onnxruntime level (issue 37's single-stream cost).

    python bench/lora_step.py models/adapters-bench/int4-plain models/adapters-bench/int4-r8 \\
        models/adapters-bench/int4-r16 [--threads 1 2] [--rounds 8]

Each graph (an edgeroute export folder; the first is the baseline) gets one session per thread count, each in a
process of its own (sessions of one process would fight over the cores with their spinning thread pools), fed as
the runtime feeds a decode step (IO binding bound once: one token after 64 cached positions, batch 1; a LoRA
graph's A/B inputs hold random adapter weights). The processes take turns for ``--rounds`` rounds of 50 timed
steps after 10 untimed (a pause before each, so that the last one's threads have stopped spinning); the figures
are medians over rounds, the ratio the median of the rounds' baseline step time over the graph's, per thread
count. It also prints the float32 bytes a step reads from the adapter inputs. ``bench/adapters.py`` measures the
same graphs end to end (generation, the engine, llama.cpp); this isolates the graph step: what the adapter's nodes
cost on one and on two intra-op threads.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

PAST = 64


def binding(session, rng: np.random.Generator):  # noqa: ANN001, ANN201
    """An IO binding of one decode step's inputs (bound once) and the adapter inputs' bytes."""
    import onnxruntime as ort

    io, lora_bytes = session.io_binding(), 0
    for i in session.get_inputs():
        n = i.name
        if n == "input_ids":
            value = np.array([[42]], dtype=np.int64)
        elif n == "seqlens_k":
            value = np.array([PAST], dtype=np.int32)
        elif n == "total_sequence_length":
            value = np.array(PAST + 1, dtype=np.int32)
        elif n == "logits_to_keep":
            value = np.array([1], dtype=np.int64)
        elif n == "query_seqlens":
            value = np.array([1], dtype=np.int32)
        elif n.startswith("lora."):
            value = ((rng.random((1, *i.shape[1:])) - 0.5) * 0.01).astype(np.float32)
            lora_bytes += value.nbytes
        elif n.startswith("past_key_values"):
            value = rng.random((1, i.shape[1], PAST, i.shape[3])).astype(np.float32)
        else:
            raise SystemExit(f"{n}: an input this bench does not know")
        io.bind_ortvalue_input(n, ort.OrtValue.ortvalue_from_numpy(value))
    for o in session.get_outputs():
        io.bind_output(o.name)
    return io, lora_bytes


def worker(folder: Path, threads: int) -> None:
    """Load one session; for every line on stdin time 10 + 50 steps and print the ms a step (and the bytes)."""
    import sys

    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    session = ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])
    io, lora_bytes = binding(session, np.random.default_rng(0))
    print(f"ready {lora_bytes}", flush=True)
    for _ in sys.stdin:
        for _ in range(10):
            session.run_with_iobinding(io)
        t0 = time.perf_counter()
        for _ in range(50):
            session.run_with_iobinding(io)
        print(f"{(time.perf_counter() - t0) / 50 * 1e3:.6f}", flush=True)


def main() -> None:
    import subprocess
    import sys

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("graphs", nargs="*", type=Path, help="export folders; the first is the baseline")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(Path(a.worker[0]), int(a.worker[1]))
        return
    procs, lora, times = {}, {}, {}
    for folder in a.graphs:
        for t in a.threads:
            cmd = [sys.executable, __file__, "--worker", str(folder), str(t)]
            p = procs[folder, t] = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert p.stdout is not None
            lora[folder, t] = int(p.stdout.readline().split()[1])
            times[folder, t] = []
    try:
        for _ in range(a.rounds):
            for key, p in procs.items():
                assert p.stdin is not None and p.stdout is not None
                time.sleep(0.1)
                p.stdin.write("go\n")
                p.stdin.flush()
                times[key].append(float(p.stdout.readline()))
    finally:
        for p in procs.values():
            if p.stdin is not None:
                p.stdin.close()
            p.wait(30)
    base = a.graphs[0]
    print(f"one decode step (batch 1, {PAST} cached positions), medians of {a.rounds} rounds x 50 steps")
    print(f"{'graph':<44}{'threads':>8}{'ms/step':>9}{'x base':>8}{'adapter MB':>12}")
    for (folder, t), ms in times.items():
        ratio = statistics.median(b / x for b, x in zip(times[base, t], ms, strict=True))
        print(f"{str(folder):<44}{t:>8}{statistics.median(ms):>9.3f}{ratio:>8.2f}{lora[folder, t] / 2**20:>12.1f}")


if __name__ == "__main__":
    main()
