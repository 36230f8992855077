"""The command line on the tiny model: every command, --help, JSON output, chat over stdin, user mistakes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import edgeroute as er
import pytest
from click.testing import CliRunner
from edgeroute.cli import COMMANDS, cli

EXE = str(Path(sys.executable).parent / "edgeroute")


def invoke(*args: str, input: str | None = None):
    return CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)


def sh(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([EXE, *args], capture_output=True, text=True, input=input, env=env, timeout=120)


@pytest.mark.parametrize("command", [None, *sorted(COMMANDS)])
def test_help(command: str | None) -> None:
    res = invoke(*([command] if command else []), "--help")
    assert res.exit_code == 0 and "Usage:" in res.output


def test_run_streams_and_matches_the_library(tiny: er.Model, tiny_dir: Path) -> None:
    res = invoke("run", str(tiny_dir), "The capital of France is", "--temperature", "0", "--max-new-tokens", "12")
    assert res.exit_code == 0
    want = tiny.generate(
        "The capital of France is", er.GenerationConfig(max_new_tokens=12, sampling=er.SamplingConfig(temperature=0))
    ).text
    assert res.stdout == want + "\n"


def test_run_json_samples_and_seeds(tiny_dir: Path) -> None:
    args = [
        "run",
        str(tiny_dir),
        "Hello",
        "--json",
        "-n",
        "3",
        "--seed",
        "5",
        "--max-new-tokens",
        "8",
        "--top-k",
        "20",
        "--top-p",
        "0.9",
        "--min-p",
        "0.01",
        "--repetition-penalty",
        "1.2",
    ]
    a = [json.loads(line) for line in invoke(*args).stdout.splitlines()]
    b = [json.loads(line) for line in invoke(*args).stdout.splitlines()]
    # same seeds, same samples (timings aside)
    assert len(a) == 3 and a == [dict(x, usage=y["usage"]) for x, y in zip(b, a, strict=True)]
    assert len({tuple(s["token_ids"]) for s in a}) > 1  # seed+i per sample
    for s in a:
        assert set(s) == {"sample", "text", "token_ids", "finish_reason", "usage"}
        assert s["finish_reason"] in ("stop", "length") and len(s["token_ids"]) <= 8
        assert s["usage"]["prompt_tokens"] > 0 and s["usage"]["time_to_first_token"] > 0
        assert set(s["usage"]) == {"prompt_tokens", "completion_tokens", "time_to_first_token", "tokens_per_second"}


def test_run_chat_stdin_bias_stop_logprobs(tiny: er.Model, tiny_dir: Path) -> None:
    res = invoke(
        "run",
        str(tiny_dir),
        "-",
        "--chat",
        "--system",
        "Be brief.",
        "--json",
        "--temperature",
        "0",
        "--max-new-tokens",
        "6",
        "--logprobs",
        "2",
        input="Hi there\n",
    )
    out = json.loads(res.stdout)
    ids = tiny.tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there\n"}]
    )
    assert out["usage"]["prompt_tokens"] == len(ids)
    assert len(out["logprobs"]) == len(out["token_ids"]) + (out["finish_reason"] == "stop")
    assert all(len(lp["top"]) == 2 for lp in out["logprobs"])
    first = out["token_ids"][0]
    banned = invoke(
        "run",
        str(tiny_dir),
        "-",
        "--chat",
        "--json",
        "--temperature",
        "0",
        "--max-new-tokens",
        "6",
        "--system",
        "Be brief.",
        "--logit-bias",
        f"{first}=ban",
        input="Hi there\n",
    )
    assert json.loads(banned.stdout)["token_ids"][0] != first
    word_ids = tiny.tokenizer.encode("robot", add_special_tokens=False)
    by_text = invoke(
        "run",
        str(tiny_dir),
        "Hello",
        "--json",
        "--temperature",
        "0",
        "--max-new-tokens",
        "3",
        "--logit-bias",
        "robot=100",
    )
    assert json.loads(by_text.stdout)["token_ids"][0] in word_ids  # text biases every token of the text
    full = json.loads(invoke("run", str(tiny_dir), "Hello world", "--json", "--temperature", "0").stdout)["text"]
    stop = full[2:4]
    stopped = json.loads(
        invoke("run", str(tiny_dir), "Hello world", "--json", "--temperature", "0", "--stop", stop).stdout
    )
    assert stopped["finish_reason"] == "stop" and stopped["text"] == full[: full.index(stop)]


def test_defaults_come_from_the_manifest(make_tiny, tmp_path: Path) -> None:
    import shutil

    folder = shutil.copytree(make_tiny(), tmp_path / "m")
    man = json.loads((folder / "edgeroute.json").read_text())
    man["generation_defaults"] = {"temperature": 0.0, "max_new_tokens": 5}
    (folder / "edgeroute.json").write_text(json.dumps(man))
    a = json.loads(invoke("run", str(folder), "Hello", "--json").stdout)
    b = json.loads(invoke("run", str(folder), "Hello", "--json").stdout)
    assert a["token_ids"] == b["token_ids"] and len(a["token_ids"]) <= 5  # greedy, 5 tokens: the manifest's
    c = json.loads(
        invoke("run", str(folder), "Hello", "--json", "--max-new-tokens", "7", "--min-new-tokens", "7").stdout
    )
    assert len(c["token_ids"]) == 7  # flags win


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (["run", "/nonexistent/model", "hi"], 1, "model folder not found"),
        (["run", "{m}", "hi", "--top-p", "1.5"], 1, "top_p=1.5"),
        (["run", "{m}", "hi", "--temperature", "hot"], 2, "'hot' is not a valid float"),
        (["run", "{m}", "hi", "--max-new-tokens", "0"], 2, "--max-new-tokens"),
        (["run", "{m}", "hi", "--logit-bias", "5"], 2, "TOKEN=BIAS"),
        (["run", "{m}", "hi", "--logit-bias", "99999=1"], 2, "outside the vocabulary"),
        (["run", "{m}", "hi", "--system", "x"], 2, "--system needs --chat"),
        (["run", "{m}", "x" * 600], 1, "context holds 512"),
        (["run", "{m}", "hi", "--provider", "cuda"], 1, "provider 'cuda' is not available"),
        (["run", "{m}", "hi", "--cuda-graph"], 1, "cuda_graph=True: CUDA graphs need provider 'cuda'"),
        (["chat", "{m}", "--cuda-graph"], 1, "CUDA graphs need provider 'cuda'"),
        (["serve", "{m}", "--cuda-graph", "--ray"], 2, "--cuda-graph is for a single server"),
        (["run", "{m}", "hi", "--explore", "0.5", "--explore-schedule", "linear"], 1, "explore_steps"),
        (["info", "/nonexistent/model"], 1, "model folder not found"),
        (["bench", "{m}", "--runs", "0"], 2, "--runs"),
        (["nosuchcommand"], 2, "No such command"),
    ],
)
def test_user_mistakes_are_one_line(tiny_dir: Path, args: list[str], code: int, fragment: str) -> None:
    res = sh(*[a.replace("{m}", str(tiny_dir)) for a in args])
    assert res.returncode == code, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgeroute: error:"), res.stderr
    assert fragment in lines[0] and "Traceback" not in res.stderr


def test_verbose_shows_the_traceback() -> None:
    res = sh("--verbose", "run", "/nonexistent/model", "hi")
    assert res.returncode != 0 and "Traceback" in res.stderr and "ModelLoadError" in res.stderr
    res = sh("run", "/nonexistent/model", "hi", "--verbose")
    assert res.returncode != 0 and "Traceback" in res.stderr


def test_info(tiny_dir: Path) -> None:
    res = invoke("info", str(tiny_dir))
    assert "geometry      2 layers, 2 KV heads x 8" in res.stdout and "chat template yes" in res.stdout
    assert "cpu available" in res.stdout
    data = json.loads(invoke("info", str(tiny_dir), "--json").stdout)
    assert data["vocab_size"] == 320 and data["context_length"] == 512 and data["providers_available"] == ["cpu"]


def test_info_counts_the_nodes_each_provider_runs(tiny_dir: Path, tmp_path: Path) -> None:
    """--provider: every node of the graph onnxruntime partitions (after its basic optimisations; later fusions keep
    a node's provider) is counted once, on the provider it was given; a provider this machine lacks is a one-line
    error; a CUDA session's CPU nodes warn."""
    import onnx
    import onnxruntime as ort
    from edgeroute.cli.info_cmd import nodes_line

    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.intra_op_num_threads = 1
    ort.InferenceSession(str(tiny_dir / "model.onnx"), sess_options=so, providers=["CPUExecutionProvider"])
    nodes = len(onnx.load(str(tmp_path / "optimised.onnx"), load_external_data=False).graph.node)
    data = json.loads(invoke("info", str(tiny_dir), "--provider", "cpu", "--json").stdout)
    assert data["node_providers"] == {"CPUExecutionProvider": nodes} and "node_provider_warning" not in data
    res = invoke("info", str(tiny_dir), "--provider", "cpu")
    assert f"nodes         {nodes} on CPUExecutionProvider (as onnxruntime placed them on cpu)" in res.stdout
    if "cuda" not in er.available_providers():
        res = sh("info", str(tiny_dir), "--provider", "cuda")
        assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1 and "cuda" in res.stderr
    line, warning = nodes_line({"CUDAExecutionProvider": 300, "CPUExecutionProvider": 6}, "cuda")
    assert "300 on CUDAExecutionProvider, 6 on CPUExecutionProvider" in line
    assert warning is not None and warning.startswith("6 of 306 nodes ran on the CPU provider")
    assert nodes_line({"CUDAExecutionProvider": 306}, "cuda")[1] is None


def test_bench_json(tiny_dir: Path) -> None:
    res = invoke("bench", str(tiny_dir), "--runs", "2", "--warmup", "0", "--new-tokens", "6", "--json")
    data = json.loads(res.stdout)
    assert data["completion_tokens"] == 6 and data["runs"] == 2
    for key in ("ttft_ms", "prefill_tok_s", "decode_tok_s", "router_us_per_token", "peak_rss_mb"):
        assert data[key] > 0
    text = invoke("bench", str(tiny_dir), "--runs", "1", "--new-tokens", "4", "--quality")
    assert "decode" in text.stdout and "router" in text.stdout


def test_chat_over_stdin_keeps_the_conversation(tiny: er.Model, tiny_dir: Path) -> None:
    script = "Hello\n/system Be terse.\nAnd again?\n/reset\n/bogus\nHello\n/exit\nnever read\n"
    res = sh("chat", str(tiny_dir), "--temperature", "0", "--max-new-tokens", "5", input=script)
    assert res.returncode == 0, res.stderr
    cfg = er.GenerationConfig(max_new_tokens=5, sampling=er.SamplingConfig(temperature=0))
    session = er.ChatSession(tiny, cfg)
    first = "".join(s.text for s in session.send("Hello"))
    session.set_system("Be terse.")
    second = "".join(s.text for s in session.send("And again?"))
    third = "".join(s.text for s in er.ChatSession(tiny, cfg, system="Be terse.").send("Hello"))
    # /reset forgets the conversation but keeps the system message
    assert res.stdout == f"{first}\n{second}\n{third}\n"
    assert "[conversation reset]" in res.stderr and "unknown command /bogus" in res.stderr


def test_the_cli_reference_page_is_what_help_prints() -> None:
    """docs/cli-reference.md is generated from every command's --help: a flag added or changed without running
    ``python docs/make_cli_reference.py`` fails here."""
    import importlib.util

    page = Path(__file__).resolve().parent.parent / "docs" / "make_cli_reference.py"
    spec = importlib.util.spec_from_file_location("make_cli_reference", page)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.PAGE.read_text() == module.render(), "run: python docs/make_cli_reference.py"
