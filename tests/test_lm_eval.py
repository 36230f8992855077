"""lm-evaluation-harness itself against ``edgeroute serve`` (issue 35): its ``--model local-completions`` on a local
multiple-choice task, with no tokenizer argument (it finds the server's ``/tokenizer_info``, ``/tokenize`` and
``/detokenize``), gives the per-sample log-likelihoods and accuracies of its ``--model hf`` on the PyTorch
checkpoint the export was made from (fp32, 1e-3), and ``edgeroute eval --choices`` gives the same again.

lm-eval runs in a child process (its imports are heavy and set up logging), both backends in one
``simple_evaluate`` each; the server runs here, on a free port of 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import edgeroute as er
import pytest
from edgeroute.eval.choices import LM_EVAL_TASK, Item, evaluate_choices, write_lm_eval_task
from edgeroute.serve import Settings, create_app
from serve_helpers import Running

pytestmark = pytest.mark.export

ITEMS = [
    Item("The capital of France is", ("Paris.", "Rome.", "a robot.", "the sea."), 0),
    Item("Once upon a time a little robot", ("learned to paint.", "is Paris.", "El niño.", "läuft schnell."), 0),
    Item("Hello world! edgeroute routes", ("tokens with numpy.", "the sky.", "Rome", "a manzana"), 0),
    Item("The capital of Italy", ("is Rome.", "is Paris.", "and the sea", "🤖🎨"), 0),
    Item("Das Mädchen", ("läuft schnell.", "comió una manzana.", "paints the sky.", "routes tokens."), 0),
    Item("El niño comió", ("una manzana.", "the capital.", "a robot", "Hello"), 0),
]

RUN = """
import json, sys
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager

tasks, name, url, ckpt = sys.argv[1:5]
out = {}
for model, args in (
    ("local-completions", f"model=m,base_url={url}/v1/completions"),
    ("hf", f"pretrained={ckpt},dtype=float32"),
):
    r = simple_evaluate(
        model=model, model_args=args, tasks=[name], task_manager=TaskManager(include_path=tasks),
        log_samples=True, device="cpu",
    )
    samples = sorted(r["samples"][name], key=lambda s: s["doc_id"])
    out[model] = {
        "lls": [[float(x[0]) for x in s["filtered_resps"]] for s in samples],
        "acc": r["results"][name]["acc,none"],
        "acc_norm": r["results"][name]["acc_norm,none"],
    }
print("RESULT " + json.dumps(out))
"""


def test_lm_eval_local_completions_equals_its_hf_backend(
    checkpoint: Callable[..., Path], exported: Callable[..., Path], tmp_path: Path
) -> None:
    pytest.importorskip("lm_eval")
    model = er.Model.load(exported("llama"))
    tasks = write_lm_eval_task(tmp_path / "tasks", ITEMS)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env["TOKENIZERS_PARALLELISM"] = "false"
    with Running(create_app(model, Settings("m"))) as srv:
        run = subprocess.run(
            [sys.executable, "-c", RUN, str(tasks), LM_EVAL_TASK, srv.url, str(checkpoint("llama"))],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
    assert run.returncode == 0, run.stderr[-3000:]
    (line,) = [x for x in run.stdout.splitlines() if x.startswith("RESULT ")]
    got = json.loads(line[len("RESULT ") :])
    served, hf = got["local-completions"], got["hf"]
    assert len(served["lls"]) == len(hf["lls"]) == len(ITEMS)
    for a, b in zip(served["lls"], hf["lls"], strict=True):
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) <= 1e-3, (a, b)
    assert (served["acc"], served["acc_norm"]) == (hf["acc"], hf["acc_norm"])
    ours = evaluate_choices(model, ITEMS).as_dict()
    assert (ours["acc"]["value"], ours["acc_norm"]["value"]) == (hf["acc"], hf["acc_norm"])
    for a, b in zip(ours["samples"], hf["lls"], strict=True):
        assert max(abs(x - y) for x, y in zip(a["loglikelihoods"], b, strict=True)) <= 1e-3
