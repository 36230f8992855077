"""lm-evaluation-harness against ``edgeroute serve``: the same per-sample log-likelihoods as its ``--model hf``.

Runs, on a multiple-choice JSONL file (``{"context", "choices", "answer"}`` per line, as ``edgeroute eval
--choices`` reads it):

1. ``edgeroute serve EXPORT`` on a free port of 127.0.0.1;
2. ``lm_eval --model local-completions`` against it, with no tokenizer argument (lm-eval finds the server's
   ``/tokenizer_info``, ``/tokenize`` and ``/detokenize``);
3. ``lm_eval --model hf`` on the PyTorch checkpoint the export was made from (fp32);
4. ``edgeroute eval EXPORT --choices FILE``;

and prints the largest difference between the per-sample log-likelihoods, and each run's acc and acc_norm.
lm-eval lives in its own environment (it pins its own transformers): give its Python with ``--lm-eval-python``
(``python -m venv /tmp/lmeval && /tmp/lmeval/bin/pip install 'lm_eval[api,hf]==0.4.13' torch==2.13.0
transformers==4.57.6``).

    python bench/lm_eval_check.py --checkpoint CKPT --export EXPORT --items items.jsonl \\
        --lm-eval-python /tmp/lmeval/bin/python
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edgeroute.eval.choices import LM_EVAL_TASK, read_items, write_lm_eval_task

from serve import Server, free_port  # bench/serve.py

NAME = LM_EVAL_TASK


def write_task(folder: Path, items: Path) -> Path:
    """An lm-eval task folder for a multiple-choice JSONL file (``--include_path`` it, ``--tasks`` :data:`NAME`)."""
    return write_lm_eval_task(folder, read_items(items))


def lm_eval(python: str, tasks: Path, model: str, args: str, out: Path, samples: bool = True) -> list[str]:
    """The lm_eval command line for ``model`` (with ``--model_args args``) over the task folder ``tasks``."""
    cmd = [python, "-m", "lm_eval", "--model", model, "--tasks", NAME, "--include_path", str(tasks)]
    cmd += ["--model_args", args, "--output_path", str(out)] + (["--log_samples"] if samples else [])
    return cmd + (["--device", "cpu"] if model == "hf" else [])


def accuracy(out: Path) -> tuple[float, float]:
    """(acc, acc_norm) of an lm_eval run's results under ``out``."""
    (results,) = out.glob("**/results_*.json")
    r = json.loads(results.read_text(encoding="utf-8"))["results"][NAME]
    return r["acc,none"], r["acc_norm,none"]


def loglikelihoods(out: Path) -> dict[int, list[float]]:
    """Each item's choices' log-likelihoods from an lm_eval run's logged samples under ``out``."""
    (samples,) = out.glob(f"**/samples_{NAME}_*.jsonl")
    lls = {}
    for line in samples.read_text(encoding="utf-8").splitlines():
        s = json.loads(line)
        lls[s["doc_id"]] = [float(r[0]) for r in s["filtered_resps"]]
    return lls


def run_lm_eval(python: str, tasks: Path, model: str, args: str, out: Path) -> dict[int, list[float]]:
    t0 = time.perf_counter()
    subprocess.run(lm_eval(python, tasks, model, args, out), check=True, capture_output=True, text=True, timeout=3600)
    acc, norm = accuracy(out)
    print(f"lm_eval --model {model}: {time.perf_counter() - t0:.1f} s, acc {acc:.4f}  acc_norm {norm:.4f}")
    return loglikelihoods(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True, help="the PyTorch checkpoint folder (for --model hf)")
    ap.add_argument("--export", required=True, help="its edgeroute export (fp32)")
    ap.add_argument("--items", required=True, help="multiple-choice JSONL")
    ap.add_argument("--lm-eval-python", required=True)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lm-eval-check-"))
    tasks = write_task(work / "tasks", Path(a.items))
    exe = Path(sys.executable).parent / "edgeroute"
    port = free_port()
    server = Server("lm-eval-check", [str(exe), "serve", a.export, "--port", str(port), "--model-name", "m"], port)
    try:
        args = f"model=m,base_url={server.url}/v1/completions"
        served = run_lm_eval(a.lm_eval_python, tasks, "local-completions", args, work / "s")
    finally:
        server.stop()
    hf = run_lm_eval(a.lm_eval_python, tasks, "hf", f"pretrained={a.checkpoint},dtype=float32", work / "h")
    ours = subprocess.run(
        [str(exe), "eval", a.export, "--choices", a.items, "--json"], check=True, capture_output=True, text=True
    )
    data = json.loads(ours.stdout)
    print(f"edgeroute eval --choices: acc {data['acc']['value']:.4f}  acc_norm {data['acc_norm']['value']:.4f}")
    gap = max(abs(x - y) for d in hf for x, y in zip(served[d], hf[d], strict=True))
    gap_eval = max(
        abs(x - y) for d, s in enumerate(data["samples"]) for x, y in zip(s["loglikelihoods"], hf[d], strict=True)
    )
    print(f"{len(hf)} items; max |log-likelihood difference| with --model hf: served {gap:.2e}, eval {gap_eval:.2e}")
    sys.exit(0 if max(gap, gap_eval) <= 1e-3 else 1)


if __name__ == "__main__":
    main()
