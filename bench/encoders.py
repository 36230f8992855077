"""Embedding speed (issue 36): edgeroute's ``EncoderModel.embed`` (fp32, and int8 with ``--int8``) against
sentence-transformers on PyTorch and on its own ONNX backend (``backend="onnx"``: optimum's export, onnxruntime),
and fastembed (``--fastembed-python``), on the same sentence-transformers folder, each system in its own process,
one after another.

Per system: throughput (texts/s and tokens/s) on short texts (~16 tokens) and long ones (~256 tokens) at batch
1 and 32, and on a corpus of 256 texts of mixed lengths embedded in one call (each system batching its own way:
sentence-transformers and fastembed in batches of 32, edgeroute by its token budget), single-text latency p50/p95
(short texts), and the process's peak RSS. Also the largest difference
between edgeroute's vectors and the others' (cosine) on the same texts.

    python bench/encoders.py /tmp/minilm --export /tmp/minilm-er [--int8 /tmp/minilm-int8] \
        [--fastembed-python /tmp/fe-venv/bin/python]

``--export`` is the edgeroute export of the folder (``edgeroute export FOLDER OUT``). fastembed downloads its
models from a hub at run time, which this machine may not do: it runs from a local folder instead
(``specific_model_path``) holding the export's graph (optimum's feature-extraction graph, the one fastembed
ships for all-MiniLM-L6-v2) and the folder's tokenizer files, with fastembed's own settings for the model
(:data:`FASTEMBED_MODEL`); install it in a venv of its own (``python -m venv /tmp/fe-venv &&
/tmp/fe-venv/bin/pip install fastembed==0.9.1``).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

FASTEMBED_MODEL = "sentence-transformers/all-MiniLM-L6-v2"  # fastembed's name for the model (its settings)
FASTEMBED_DIR = "/tmp/bench-encoders-fastembed-model"
WORDS = (
    "the bees carry pollen from flower to flower while the little robot paints the sea and the sky in the evening "
    "light and the historians debate the causes of the industrial revolution in great britain"
).split()


def texts(n: int, words: int, seed: int) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(n)]


def child(system: str, folder: str, export: str) -> None:
    """One system's figures, as one JSON line (``export``: the system's edgeroute folder)."""
    import numpy as np

    if system.startswith("edgeroute"):
        import edgeroute as er

        model = er.EncoderModel.load(export)

        def embed(batch: list[str], size: int | None = None) -> np.ndarray:  # (its own batching: a token budget)
            return model.embed(batch, overflow="truncate").vectors  # (cut as the others cut, said so)

        def count(batch: list[str]) -> int:
            return sum(model.count_tokens(batch))
    elif system == "fastembed":  # (run by the fastembed venv's Python: fastembed and numpy only)
        from fastembed import TextEmbedding
        from tokenizers import Tokenizer

        fe = TextEmbedding(model_name=FASTEMBED_MODEL, specific_model_path=export, threads=2)
        tok = Tokenizer.from_file(str(Path(export) / "tokenizer.json"))

        def embed(batch: list[str], size: int | None = None) -> np.ndarray:
            return np.array(list(fe.embed(batch, batch_size=size or len(batch))))

        def count(batch: list[str]) -> int:
            return sum(len(e.ids) for e in tok.encode_batch(batch))
    else:
        from sentence_transformers import SentenceTransformer

        kw = {"backend": "onnx"} if system == "st-onnx" else {}
        st = SentenceTransformer(folder, device="cpu", **kw)

        def embed(batch: list[str], size: int | None = None) -> np.ndarray:
            return st.encode(batch, batch_size=size or 32, convert_to_numpy=True)

        def count(batch: list[str]) -> int:
            return sum(len(x) for x in st.tokenizer(batch)["input_ids"])

    out: dict[str, object] = {"system": system}
    throughputs(out, embed, count, {"short": texts(64, 12, 1), "long": texts(64, 200, 1)})
    import random

    rng = random.Random(5)  # mixed lengths in one call, as a corpus is embedded: each system batches its own way
    mixed = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 200))) for _ in range(256)]
    embed(mixed[:8], 32)
    t0 = time.perf_counter()
    embed(mixed, 32)
    dt = time.perf_counter() - t0
    out["mixed_texts_s"] = len(mixed) / dt
    out["mixed_tokens_per_text"] = count(mixed) / len(mixed)
    lat = []
    for t in texts(60, 12, 2):
        t0 = time.perf_counter()
        embed([t])
        lat.append(time.perf_counter() - t0)
    out["p50_ms"] = 1000 * statistics.median(lat)
    out["p95_ms"] = 1000 * sorted(lat)[int(0.95 * len(lat)) - 1]
    probe = texts(8, 40, 3)
    np.save(f"/tmp/bench-encoders-{system}.npy", embed(probe))
    out["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out))


def throughputs(out: dict[str, object], run: Any, count: Any, pools: dict[str, list[str]]) -> None:
    """``out[f"{pool}_b{batch}_texts_s"]`` (and ``_tokens_s``) for batches of 1 and 32 of each pool of texts,
    ``run(batch)`` timed after a warm-up; ``count(texts)``: their tokens."""
    for name, pool in pools.items():
        run(pool[:4])  # warm-up
        for batch in (1, 32):
            chunks = [pool[i : i + batch] for i in range(0, len(pool), batch)]
            t0 = time.perf_counter()
            for c in chunks:
                run(c)
            dt = time.perf_counter() - t0
            out[f"{name}_b{batch}_texts_s"] = len(pool) / dt
            out[f"{name}_b{batch}_tokens_s"] = count(pool) / dt
        out[f"{name}_tokens_per_text"] = count(pool) / len(pool)


def child_result(cmd: list[str], system: str, timeout: int) -> dict[str, Any] | None:
    """Run one system's child process; its ``RESULT`` JSON line, or None (said on stdout) when it failed."""
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    line = [x for x in run.stdout.splitlines() if x.startswith("RESULT ")]
    if run.returncode != 0 or not line:
        print(f"{system}: failed: {run.stderr.strip().splitlines()[-3:]}")
        return None
    return json.loads(line[0][len("RESULT ") :])


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return re.sub(r"\s+", " ", line.split(":", 1)[1]).strip()
    except OSError:
        pass
    return platform.processor() or "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", help="a sentence-transformers folder")
    ap.add_argument("--export", required=True, help="its edgeroute export")
    ap.add_argument("--int8", default=None, help="its edgeroute int8 export (a row of its own)")
    ap.add_argument(
        "--fastembed-python",
        default=None,
        help="a Python with fastembed installed (its own venv): a fastembed row, the model from the export's graph",
    )
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        where = {"edgeroute-int8": a.int8, "fastembed": FASTEMBED_DIR}.get(a.child, a.export)
        child(a.child, a.folder, where)
        return
    import numpy as np

    rows = []
    for stale in Path("/tmp").glob("bench-encoders-*.npy"):  # (the vectors compared below are this run's)
        stale.unlink()
    systems = ["edgeroute", "st-torch", "st-onnx"] + (["edgeroute-int8"] if a.int8 else [])
    if a.fastembed_python:  # fastembed reads a local model folder: the same graph, the folder's tokenizer files
        import shutil

        Path(FASTEMBED_DIR).mkdir(exist_ok=True)
        shutil.copy(Path(a.export) / "model.onnx", FASTEMBED_DIR)
        for name in ("tokenizer.json", "config.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (Path(a.folder) / name).is_file():
                shutil.copy(Path(a.folder) / name, FASTEMBED_DIR)
        systems.append("fastembed")
    for system in systems:
        python = a.fastembed_python if system == "fastembed" else sys.executable
        cmd = [python, __file__, a.folder, "--export", a.export, "--child", system]
        cmd += ["--int8", a.int8] if a.int8 else []
        result = child_result(cmd, system, 1800)
        if result is not None:
            rows.append(result)
    print(f"{cpu_name()}; {a.folder}")
    cols = ["short_b1", "short_b32", "long_b1", "long_b32", "mixed"]
    print(
        f"{'system':<15}" + "".join(f"{c + ' texts/s':>20}" for c in cols) + f"{'p50 ms':>9}{'p95 ms':>9}{'RSS MB':>9}"
    )
    for r in rows:
        cells = "".join(f"{r[c + '_texts_s']:>20.1f}" for c in cols)
        print(f"{r['system']:<15}{cells}{r['p50_ms']:>9.2f}{r['p95_ms']:>9.2f}{r['rss_mb']:>9.0f}")
    if rows:
        r = rows[0]
        print(
            f"tokens per text: short {r['short_tokens_per_text']:.1f}, long {r['long_tokens_per_text']:.1f},"
            f" mixed {r['mixed_tokens_per_text']:.1f} (256 texts of 4-200 words in one call, batches of 32)"
        )
    if not Path("/tmp/bench-encoders-edgeroute.npy").exists():
        return
    ours = np.load("/tmp/bench-encoders-edgeroute.npy")
    for other in ("st-torch", "st-onnx", "edgeroute-int8", "fastembed"):
        path = Path(f"/tmp/bench-encoders-{other}.npy")
        if path.exists():
            theirs = np.load(path)
            cos = (ours * theirs).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1))
            print(f"cosine edgeroute vs {other}: min {cos.min():.6f}")


if __name__ == "__main__":
    main()
