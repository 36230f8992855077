"""Export: tiny random checkpoints (tests/checkpoints.py) of five families, LoRA, precisions, atomic output,
errors, the CLI."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import edgeroute as er
import numpy as np
import pytest

pytestmark = pytest.mark.export
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("optimum.exporters.onnx")

from edgeroute.export import export_model  # noqa: E402


@pytest.fixture(scope="module")
def llama_ckpt(checkpoint: Callable[..., Path]) -> Path:
    return checkpoint("llama")  # shared with the other modules' tests (read only)


def _torch_logits(ckpt: Path, ids: list[int]) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


FAMILIES = [("llama", "auto"), ("mistral", "auto"), ("qwen2", "auto"), ("phi3", "auto"), ("gpt2", "auto")]
FAMILIES += [("llama", "optimum"), ("mistral", "optimum"), ("qwen2", "optimum"), ("phi3", "optimum")]


@pytest.mark.parametrize(("arch", "backend"), FAMILIES)
def test_export_each_family(arch: str, backend: str, tmp_path: Path, checkpoint: Callable[..., Path]) -> None:
    ckpt = checkpoint(arch)
    out = export_model(ckpt, tmp_path / "out", backend=backend)
    man = json.loads((out / "edgeroute.json").read_text())
    fused = backend == "auto" and arch != "gpt2"
    assert man["provenance"]["backend"] == ("fused" if fused else "optimum")
    assert man["kv_layout"] == ("shared" if fused else "concat")
    assert man["schema_version"] == 1 and man["logits"] == "keep" and man["precision"] == "fp32"
    assert man["num_layers"] == 2 and man["head_size"] == 16
    assert man["num_kv_heads"] == (4 if arch == "gpt2" else 2)
    assert man["provenance"]["model_type"] == arch and man["chat_template"]
    assert man["generation_defaults"] == {"temperature": 0.6, "top_p": 0.9}
    v = man["provenance"]["validation"]
    assert v["max_abs_logit_diff"] <= 1e-3 and v["quality"]["top1_agreement"] > 0.99 and v["greedy_identical"]
    model = er.Model.load(out)
    ids = model.tokenizer.encode("The capital of France is")
    got = model.forward_last(np.array([ids]), model.new_cache(), len(ids))[0]
    assert np.abs(got - _torch_logits(ckpt, ids)).max() <= 1e-3
    assert sorted(p.name for p in out.iterdir()) == [
        "edgeroute.json",
        "model.onnx",
        "model.onnx.data",
        "tokenizer.json",
    ]
    assert model.generate("Hello", er.GenerationConfig(max_new_tokens=4)).usage.completion_tokens >= 1


def test_prefill_returns_only_last_logits(llama_ckpt: Path, tmp_path: Path) -> None:
    out = export_model(llama_ckpt, tmp_path / "out", validate=False, backend="optimum")
    model = er.Model.load(out)
    ids = list(range(5, 105))
    feeds = model.manifest.contract.feeds(np.array([ids]), model.manifest.contract.empty_past(), 1)
    assert feeds["logits_to_keep"].tolist() == [1] and feeds["attention_mask"].shape == (1, 100)
    logits = model.session.run(["logits"], feeds)[0]
    assert logits.shape == (1, 1, model.vocab_size)  # the graph itself returns one row, not 100
    three = model.forward_last(np.array([ids]), model.new_cache(), 3)[0]
    assert np.allclose(three, _torch_logits(llama_ckpt, ids)[-3:], atol=1e-3)


@pytest.mark.parametrize(("dtype", "quantize"), [("fp16", "none"), ("fp32", "int8"), ("fp32", "int4")])
def test_precisions(llama_ckpt: Path, tmp_path: Path, dtype: str, quantize: str) -> None:
    out = export_model(llama_ckpt, tmp_path / "out", dtype=dtype, quantize=quantize)
    man = json.loads((out / "edgeroute.json").read_text())
    assert man["precision"] == dtype and man["quantization"]["method"] == quantize
    assert man["kv_dtype"] == ("float16" if dtype == "fp16" else "float32")
    q = man["provenance"]["validation"]["quality"]
    assert 0 <= q["top1_agreement"] <= 1 and np.isfinite(q["perplexity_change_pct"])
    assert q["top1_agreement"] > 0.5  # a random tiny model still mostly agrees with itself
    import onnx

    ops = {n.op_type for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node}
    if quantize != "none":
        assert "MatMulNBits" in ops and man["quantization"]["block_size"] == 32
        assert man["quantization"]["bits"] == int(quantize[3:])
        g = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
        inits = {i.name for i in g.initializer}
        # every weight MatMul (the LM head included) is quantised; attention's activation MatMuls stay float
        assert [n.name for n in g.node if n.op_type == "MatMul" and n.input[1] in inits] == []
    model = er.Model.load(out)
    assert len(model.generate("Hi", er.GenerationConfig(max_new_tokens=3)).token_ids) <= 3
    from edgeroute.quality import measure

    again = measure(model, q)  # what `bench --quality` measures reproduces what the export measured
    assert again["top1_agreement"] == q["top1_agreement"] and len(q["reference_top1"]) == q["tokens"]
    assert again["perplexity"] == pytest.approx(q["perplexity"], rel=1e-6)


def test_calibration_importance_is_the_mean_squared_input_pytorch_sees(llama_ckpt: Path, tmp_path: Path) -> None:
    """The int4 quantiser's channel weights are each weight MatMul's mean squared input over the calibration
    text: the graph's activations, read by onnxruntime, equal the inputs PyTorch's Linear layers receive."""
    from edgeroute.export import calibrate

    out = export_model(llama_ckpt, tmp_path / "fp32", validate=False)
    ids = er.Model.load(out).tokenizer.encode(calibrate.CALIBRATION_TEXT)[:300]  # two chunks of 256 and 44
    names = {"layers.0.input_layernorm/out": "model.layers.0.self_attn.q_proj",
             "layers.1.mlp/prod": "model.layers.1.mlp.down_proj", "final_norm/out": "lm_head"}  # fmt: skip
    contract = er.Model.load(out).manifest.contract
    got = calibrate.importance(out / "model.onnx", list(names), ids, 512, contract)
    assert sorted(p.name for p in out.iterdir()) == [
        "edgeroute.json",
        "model.onnx",
        "model.onnx.data",
        "tokenizer.json",
    ]
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_ckpt).eval()
    seen: dict[str, list[np.ndarray]] = {m: [] for m in names.values()}
    hooks = [
        model.get_submodule(m).register_forward_pre_hook(lambda mod, a, m=m: seen[m].append(a[0][0].detach().numpy()))
        for m in names.values()
    ]
    with torch.no_grad():
        for start in range(0, len(ids), calibrate.CHUNK):
            model(torch.tensor([ids[start : start + calibrate.CHUNK]]))
    for h in hooks:
        h.remove()
    for graph_name, module in names.items():
        x = np.concatenate(seen[module]).astype(np.float64)
        mean = (x * x).mean(axis=0)
        want = mean + calibrate.SMOOTH * mean.mean()
        assert got[graph_name].shape == want.shape
        assert np.allclose(got[graph_name], want, rtol=1e-3), graph_name


@pytest.mark.parametrize("backend", ["fused", "optimum"])
def test_int4_calibration_is_recorded_and_optional(llama_ckpt: Path, tmp_path: Path, backend: str) -> None:
    """int4 exports weigh the rounding by calibration activations on either graph form (recorded in the
    manifest); --no-calibration gives the unweighted quantiser, with other weights."""
    import onnx
    from click.testing import CliRunner
    from edgeroute.cli import cli
    from onnx import numpy_helper

    weighted = export_model(llama_ckpt, tmp_path / "w", quantize="int4", backend=backend, validate=False)
    res = CliRunner().invoke(
        cli, ["export", str(llama_ckpt), str(tmp_path / "u"), "--quantize", "int4", "--backend", backend,
              "--no-calibration", "--no-validate"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    qw = json.loads((weighted / "edgeroute.json").read_text())["quantization"]
    qu = json.loads((tmp_path / "u" / "edgeroute.json").read_text())["quantization"]
    assert qw["calibration"]["tokens"] > 500 and "calibration" in qw["scheme"]
    assert qu["calibration"] == "none" and "calibration" not in qu["scheme"]

    def q4(folder: Path) -> dict[str, np.ndarray]:
        g = onnx.load(str(folder / "model.onnx")).graph
        return {i.name: numpy_helper.to_array(i) for i in g.initializer if i.name.endswith("_Q4")}

    a, b = q4(weighted), q4(tmp_path / "u")
    per_layer = 4 if backend == "fused" else 7  # packed q|k|v and gate|up, or one MatMul per projection
    assert a.keys() == b.keys() and len(a) == 2 * per_layer + 1  # and the LM head
    assert sum(not np.array_equal(a[k], b[k]) for k in a) == len(a)
    assert er.Model.load(weighted).generate("Hi", er.GenerationConfig(max_new_tokens=3)).usage.completion_tokens >= 1


def test_calibration_refuses_inputs_it_cannot_feed() -> None:
    from types import SimpleNamespace

    from edgeroute.contract import GraphContract
    from edgeroute.errors import ExportError
    from edgeroute.export import calibrate

    contract = GraphContract(num_layers=1, num_kv_heads=2, head_size=16, vocab_size=10)

    def session(*inputs: tuple[str, list, str]) -> SimpleNamespace:
        ins = [SimpleNamespace(name=n, shape=shape, type=t) for n, shape, t in inputs]
        outs = [SimpleNamespace(name=n, shape=[1, "n", 10]) for n in contract.output_names()]
        return SimpleNamespace(get_inputs=lambda: ins, get_outputs=lambda: outs)

    kv = [(n, [1, 2, "n", 16], "tensor(float)") for pair in contract.past_names() for n in pair]
    plain = [("input_ids", [1, "n"], "tensor(int64)"), ("attention_mask", [1, "n"], "tensor(int64)")]
    plain.append(("position_ids", [1, "n"], "tensor(int64)"))
    calibrate._check(contract, session(*plain, *kv))  # what the contract feeds: accepted
    with pytest.raises(ExportError, match="token_type_ids"):
        calibrate._check(contract, session(*plain, *kv, ("token_type_ids", [1, "n"], "tensor(int64)")))
    with pytest.raises(ExportError, match="past_key_values.0.value"):
        calibrate._check(contract, session(*plain, kv[0]))
    with pytest.raises(ExportError, match="head_size"):
        calibrate._check(contract, session(*plain, kv[0], (kv[1][0], [1, 2, "n", 8], "tensor(float)")))


def test_lora_adapter_is_merged(llama_ckpt: Path, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    base = transformers.AutoModelForCausalLM.from_pretrained(llama_ckpt)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    lora = peft.get_peft_model(base, cfg)
    adapter = tmp_path / "adapter"
    lora.save_pretrained(adapter)
    cfg_path = adapter / "adapter_config.json"
    data = json.loads(cfg_path.read_text())
    data["base_model_name_or_path"] = str(llama_ckpt)
    cfg_path.write_text(json.dumps(data))
    out = export_model(adapter, tmp_path / "out")
    man = json.loads((out / "edgeroute.json").read_text())
    assert man["provenance"]["source_kind"] == "lora"
    model = er.Model.load(out)
    ids = model.tokenizer.encode("Once upon a time")
    merged = transformers.AutoModelForCausalLM.from_pretrained(llama_ckpt)
    merged = peft.PeftModel.from_pretrained(merged, adapter).merge_and_unload().eval()
    with torch.no_grad():
        want = merged(torch.tensor([ids])).logits[0, -1].numpy()
    got = model.forward(np.array([ids]), model.new_cache())[0]
    assert np.abs(got - want).max() <= 1e-3
    assert np.abs(want - _torch_logits(llama_ckpt, ids)[-1]).max() > 1e-3  # the adapter changed the model
    # a missing base gives a clear error; --base fixes it
    data["base_model_name_or_path"] = "someone/missing-base"
    cfg_path.write_text(json.dumps(data))
    with pytest.raises(er.ExportError, match="needs its base model someone/missing-base"):
        export_model(adapter, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()
    assert export_model(adapter, tmp_path / "out3", base=llama_ckpt, validate=False).is_dir()


def test_force_replaces_only_after_success(llama_ckpt: Path, tmp_path: Path) -> None:
    out = export_model(llama_ckpt, tmp_path / "out", validate=False)
    stamp = (out / "edgeroute.json").stat().st_mtime_ns
    with pytest.raises(er.ExportError, match="already exists"):
        export_model(llama_ckpt, out, validate=False)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(er.ExportError):
        export_model(broken, out, force=True)
    assert (out / "edgeroute.json").stat().st_mtime_ns == stamp  # the old folder survived the failed export
    export_model(llama_ckpt, out, force=True, validate=False)
    assert (out / "edgeroute.json").stat().st_mtime_ns != stamp
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".edgeroute-export")] == []
    assert oct(out.stat().st_mode & 0o777) != oct(0o700)


def test_force_never_destroys_the_source(llama_ckpt: Path, tmp_path: Path) -> None:
    import shutil

    self_src = Path(shutil.copytree(llama_ckpt, tmp_path / "selfsrc"))
    before = sorted(p.name for p in self_src.iterdir())
    with pytest.raises(er.ExportError, match="is the source"):
        export_model(self_src, self_src, force=True, validate=False)
    par = tmp_path / "par"
    shutil.copytree(llama_ckpt, par / "ckpt")
    (par / "notes.txt").write_text("n\n")
    with pytest.raises(er.ExportError, match="holds the source"):
        export_model(par / "ckpt", par, force=True, validate=False)
    assert sorted(p.name for p in self_src.iterdir()) == before and (par / "notes.txt").is_file()
    out = export_model(self_src, par / "ckpt" / "onnx", validate=False)  # a folder inside the source is fine
    files = json.loads((out / "edgeroute.json").read_text())["files"]
    assert sorted(files) == sorted(p.name for p in out.iterdir() if p.name != "edgeroute.json")
    er.Model.load(out)  # the recorded sizes hold


def test_failed_parity_raises_and_leaves_nothing(llama_ckpt: Path, tmp_path: Path, monkeypatch) -> None:
    from edgeroute.export import validate as validation

    real = validation._torch_logits
    monkeypatch.setattr(validation, "_torch_logits", lambda m, ids: real(m, ids) + 0.01)
    with pytest.raises(er.ExportValidationError, match="parity check failed"):
        export_model(llama_ckpt, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    assert export_model(llama_ckpt, tmp_path / "out", validate=False).is_dir()  # --no-validate skips it


BAD_SOURCES = [
    # (files to create under tmp_path: name -> text, None for a folder), the source, the error expected
    ({}, "HuggingFaceTB/SmolLM2-135M-Instruct", "model hub id.*never downloads"),
    ({}, "missing", "not a local checkpoint"),
    ({"empty": None}, "empty", "neither config.json"),
    ({"t5/config.json": '{"model_type": "t5"}'}, "t5", "'t5' is not supported.*llama"),
    ({"noweights/config.json": '{"model_type": "llama"}'}, "noweights", "no weights"),
    ({"badjson/config.json": "{"}, "badjson", "not valid JSON"),
    ({"x.bin": "1"}, "x.bin", "not a .gguf"),
    ({"bad.gguf": "not a gguf at all"}, "bad.gguf", "not a readable GGUF"),
]


@pytest.mark.parametrize(("files", "source", "match"), BAD_SOURCES, ids=[b[1] for b in BAD_SOURCES])
def test_bad_sources(tmp_path: Path, files: dict, source: str, match: str) -> None:
    for name, text in files.items():
        path = tmp_path / name
        if text is None:
            path.mkdir()
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    src = source if "/" in source else tmp_path / source
    with pytest.raises(er.ExportError, match=match):
        export_model(src, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_bad_options(tmp_path: Path) -> None:
    with pytest.raises(er.ConfigError) as e:
        export_model(tmp_path, tmp_path / "o", quantize="int3")
    assert e.value.field == "quantize"
    with pytest.raises(er.ConfigError) as e:
        export_model(tmp_path, tmp_path / "o", dtype="fp16", quantize="int4", backend="optimum")
    assert e.value.field == "quantize"
    assert not (tmp_path / "o").exists()


def test_corrupt_weights(llama_ckpt: Path, tmp_path: Path) -> None:
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(llama_ckpt, bad)
    (bad / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(er.ExportError, match="cannot load the checkpoint"):
        export_model(bad, tmp_path / "o")
    assert not (tmp_path / "o").exists()


SLOW_EXPORT = """
import sys, time
from pathlib import Path
from edgeroute.export import export_model
def progress(stage, event, seconds):
    if stage == "export" and event == "done":
        Path(sys.argv[3]).write_text("mid-way")
        time.sleep(60)
export_model(sys.argv[1], sys.argv[2], progress=progress)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_interrupted_export_leaves_nothing(llama_ckpt: Path, tmp_path: Path, sig: int) -> None:
    out, marker = tmp_path / "out", tmp_path.parent / f"marker-{tmp_path.name}"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_EXPORT, str(llama_ckpt), str(out), str(marker)])
    deadline = time.time() + 120
    while not marker.exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".edgeroute-export")]  # work in progress
    os.kill(proc.pid, sig)
    assert proc.wait(timeout=60) != 0
    assert not out.exists()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".edgeroute-export")]
    if sig == signal.SIGKILL:  # nothing can clean up after SIGKILL; the next export does
        assert leftovers
        export_model(llama_ckpt, tmp_path / "next", validate=False)
        leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".edgeroute-export")]
    assert leftovers == []


def test_cli_export(llama_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner
    from edgeroute.cli import cli, progress

    monkeypatch.setattr(progress, "PLAIN_EVERY", float("inf"))  # a slow machine's "where it stands" lines: none
    runner = CliRunner()
    res = runner.invoke(cli, ["export", str(llama_ckpt), str(tmp_path / "out"), "--quantize", "int4"])
    assert res.exit_code == 0, res.output
    assert "top-1 agreement" in res.output and "int4" in res.output
    assert "warning" not in res.output  # the tiny model's int4 perplexity is within QUALITY_WARN_PCT
    # not a terminal: each step's start and end as a plain line on stderr, with its count, no carriage return
    assert "\r" not in res.stderr
    lines = [line for line in res.stderr.splitlines() if line.startswith("export: ")]
    steps = [  # label, count (a regular expression)
        (f"loading {llama_ckpt.name}", ""),
        ("building the graph", r" \(2 layers\)"),
        ("calibrating", r" \(\d+ chunks\)"),
        ("quantising int4", r" \(9 weights\)"),  # 2 layers x (qkv, o, gate|up, down) + the LM head
        ("validating against PyTorch", r" \(4 texts\)"),
    ]
    assert len(lines) == 2 * len(steps), lines
    for (label, count), start, end in zip(steps, lines[::2], lines[1::2], strict=True):
        assert start == f"export: {label} ..."
        assert re.fullmatch(rf"export: {re.escape(label)} done in \d+\.\d s{count}", end), end
    exe = Path(sys.executable).parent / "edgeroute"
    again = subprocess.run([str(exe), "export", str(llama_ckpt), str(tmp_path / "out")], capture_output=True, text=True)
    assert again.returncode == 1
    lines = again.stderr.strip().splitlines()
    assert len(lines) == 1 and "already exists" in lines[0] and "Traceback" not in again.stderr
    bad = subprocess.run(
        [str(exe), "export", str(llama_ckpt), str(tmp_path / "o2"), "--quantize", "int3"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "int3" in bad.stderr


def test_a_quantised_export_that_loses_much_is_flagged() -> None:
    """Gemma 3 270M's measured int4 figures (bench/gemma3.py) get the warning line with what to compare."""
    from edgeroute.cli.export_cmd import quality_warning

    def manifest(method: str, change: float | None) -> dict:
        quality = None if change is None else {"perplexity_change_pct": change, "top1_agreement": 0.745}
        return {"quantization": {"method": method}, "provenance": {"validation": {"quality": quality}}}

    line = quality_warning(manifest("int4", 21.19))
    assert line is not None and "21.2%" in line and "74.5%" in line and "--quantize int8" in line
    assert "no quantisation" in str(quality_warning(manifest("int8", 12.0)))
    assert quality_warning(manifest("int4", 3.0)) is None
    assert quality_warning(manifest("none", 50.0)) is None
    assert quality_warning(manifest("int4", None)) is None  # --no-validate


@pytest.mark.slow
def test_smollm2_gguf_export_parity(smollm2_dir: Path) -> None:
    man = json.loads((smollm2_dir / "edgeroute.json").read_text())
    v = man["provenance"]["validation"]
    assert v["max_abs_logit_diff"] <= 1e-3
    assert v["greedy_tokens"] == 64 and v["greedy_identical"] is True
    assert man["num_layers"] == 30 and man["num_kv_heads"] == 3 and man["vocab_size"] == 49152
    assert man["provenance"]["source_kind"] == "gguf"
    model = er.Model.load(smollm2_dir)
    ids = model.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    out = model.generate(ids, er.GenerationConfig(max_new_tokens=32, sampling=er.SamplingConfig(temperature=0)))
    assert out.text == "The capital of France is Paris." and out.finish_reason == "stop"
