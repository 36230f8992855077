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
import glob
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

TASK = """task: edgeroute_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {items}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def lm_eval(python: str, tasks: Path, model: str, args: str, out: Path) -> dict[int, list[float]]:
    cmd = [python, "-m", "lm_eval", "--model", model, "--tasks", "edgeroute_mc", "--include_path", str(tasks)]
    cmd += ["--model_args", args, "--log_samples", "--output_path", str(out)]
    if model == "hf":
        cmd += ["--device", "cpu"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=3600)
    print(f"lm_eval --model {model}: {time.perf_counter() - t0:.1f} s")
    (samples,) = glob.glob(f"{out}/**/samples_edgeroute_mc_*.jsonl", recursive=True)
    lls = {}
    for line in Path(samples).read_text(encoding="utf-8").splitlines():
        s = json.loads(line)
        lls[s["doc_id"]] = [float(r[0]) for r in s["filtered_resps"]]
    (results,) = glob.glob(f"{out}/**/results_*.json", recursive=True)
    r = json.loads(Path(results).read_text(encoding="utf-8"))["results"]["edgeroute_mc"]
    print(f"  acc {r['acc,none']:.4f}  acc_norm {r['acc_norm,none']:.4f}")
    return lls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True, help="the PyTorch checkpoint folder (for --model hf)")
    ap.add_argument("--export", required=True, help="its edgeroute export (fp32)")
    ap.add_argument("--items", required=True, help="multiple-choice JSONL")
    ap.add_argument("--lm-eval-python", required=True)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lm-eval-check-"))
    (work / "tasks").mkdir()
    (work / "tasks" / "edgeroute_mc.yaml").write_text(TASK.format(items=Path(a.items).resolve()), encoding="utf-8")
    port = free_port()
    exe = Path(sys.executable).parent / "edgeroute"
    server = subprocess.Popen(
        [str(exe), "serve", a.export, "--port", str(port), "--model-name", "m"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(300):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        url = f"http://127.0.0.1:{port}/v1/completions"
        served = lm_eval(a.lm_eval_python, work / "tasks", "local-completions", f"model=m,base_url={url}", work / "s")
    finally:
        server.terminate()
        server.wait(timeout=60)
    hf = lm_eval(a.lm_eval_python, work / "tasks", "hf", f"pretrained={a.checkpoint},dtype=float32", work / "h")
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
