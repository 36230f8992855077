"""User mistakes and hostile input: the CLI's, the API's and corrupt model folders'. Each gets a clear one-line
error (CLI: ``edgeroute: error: ...``, a non-zero exit, no traceback), a typed exception (library), nothing lost
or half-written, and never a silent wrong answer. One test (or more) per finding of the hardening pass; later
issues extend this module."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import edgeroute as er
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from edgeroute import chat_template
from edgeroute.cli import cli
from edgeroute.kv_cache import SharedKVCache
from edgeroute.manifest import file_entries
from edgeroute.quality import next_token_figures, text_ids
from tiny_model import GEOMETRY, WEIGHTS, build_graph, build_tokenizer, write_tiny_model

EXE = str(Path(sys.executable).parent / "edgeroute")
GREEDY = er.GenerationConfig(max_new_tokens=8, sampling=er.SamplingConfig(temperature=0))


def invoke(*args: str, input: str | bytes | None = None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input, catch_exceptions=False)


def one_line_error(res, code: int = 1) -> str:
    """The single ``edgeroute: error:`` line of a failed command (asserting there is exactly one)."""
    assert res.exit_code == code, (res.exit_code, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgeroute: error:"), res.stderr
    assert "Traceback" not in res.stderr
    return lines[0]


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_manifest(folder: Path, **changes) -> Path:
    path = folder / "edgeroute.json"
    data = json.loads(path.read_text())
    for dotted, value in changes.items():
        node = data
        *parents, last = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path.write_text(json.dumps(data))
    return folder


def with_template(tmp_path: Path, template: str) -> Path:
    return write_tiny_model(tmp_path / f"t{abs(hash(template))}", chat_template=template)


# -- 1. data loss: --force ------------------------------------------------------------------------------------
def fake_checkpoint(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(b"weights")
    return folder


def intact(folder: Path, names: list[str]) -> bool:
    return all((folder / n).is_file() for n in names)


def test_force_never_replaces_the_source(tmp_path: Path) -> None:
    src = fake_checkpoint(tmp_path / "selfsrc")
    line = one_line_error(invoke("export", src, src, "--force", "--no-validate"))
    assert "is the source" in line
    assert intact(src, ["config.json", "model.safetensors"])


def test_force_never_replaces_a_folder_holding_the_source(tmp_path: Path) -> None:
    par = tmp_path / "par"
    fake_checkpoint(par / "ckpt")
    (par / "notes.txt").write_text("n\n")
    (par / "edgeroute.json").write_text("{}")  # even one that looks like a model folder
    line = one_line_error(invoke("export", par / "ckpt", par, "--force"))
    assert "holds the source" in line
    assert intact(par, ["notes.txt", "ckpt/config.json", "ckpt/model.safetensors"])
    link = tmp_path / "link"
    link.symlink_to(par)  # through a symlink too
    assert "holds the source" in one_line_error(invoke("export", par / "ckpt", link, "--force"))
    assert intact(par, ["notes.txt", "ckpt/config.json"])


def test_force_replaces_only_an_edgeroute_folder(tmp_path: Path) -> None:
    src = fake_checkpoint(tmp_path / "ckpt")
    other = tmp_path / "other"
    other.mkdir()
    (other / "thesis.tex").write_text("years of work")
    line = one_line_error(invoke("export", src, other, "--force"))
    assert "not an edgeroute model folder" in line and "edgeroute.json" in line
    assert (other / "thesis.tex").read_text() == "years of work"


# -- 2 and 6. chat templates that hang or fail -------------------------------------------------------------------
NESTED = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x"


LIST_LOOPS = "{% for a in messages * 100000 %}{% for b in messages * 100000 %}{% endfor %}{% endfor %}x"


@pytest.mark.parametrize("template", [NESTED, LIST_LOOPS])
def test_a_hanging_template_is_stopped_and_named(tmp_path: Path, monkeypatch, template: str) -> None:
    monkeypatch.setattr(chat_template, "RENDER_SECONDS", 0.5)
    folder = with_template(tmp_path, template)
    model = er.Model.load(folder)
    t0 = time.monotonic()
    with pytest.raises(er.ChatTemplateError, match="took longer than 0.5 s") as e:
        model.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert time.monotonic() - t0 < 20  # stopped, not run to completion (10^10 steps)
    assert str(folder / "edgeroute.json") in str(e.value)
    line = one_line_error(invoke("run", folder, "hi", "--chat"))
    assert "chat template" in line and "took longer" in line


@pytest.mark.parametrize(
    ("template", "fragment"),
    [
        ("{{ 1/0 }}", "ZeroDivisionError"),
        ("{{ messages + 1 }}", "TypeError"),
        ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recursed too deeply"),
        ("{{ range(10**9) | list }}", "passes 1000000000"),
        ("{% include 'other.jinja' %}", "failed"),
        ("{{ 'a' * 10**9 }}", "repeats a value"),
        ("{{ '{:>2000000000}'.format('a') }}", "width"),
        ("{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "builds"),
        ("{% for %}", "does not compile"),
    ],
)
def test_template_failures_are_typed(tmp_path: Path, template: str, fragment: str) -> None:
    folder = with_template(tmp_path, template)
    model = er.Model.load(folder)
    with pytest.raises(er.ChatTemplateError, match="chat template") as e:
        model.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert fragment in str(e.value)


@pytest.mark.parametrize("command", ["run", "chat", "bench"])
def test_template_failures_are_one_line_in_every_command(tmp_path: Path, command: str) -> None:
    folder = with_template(tmp_path, "{{ 1/0 }}")
    args = {
        "run": ["run", folder, "hi", "--chat"],
        "chat": ["chat", folder],
        "bench": ["bench", folder, "--runs", "1", "--new-tokens", "2"],
    }[command]
    line = one_line_error(invoke(*args, input="hi\n"))
    assert "ZeroDivisionError" in line and str(folder / "edgeroute.json") in line


def test_a_template_refusing_the_messages_is_a_config_error(tmp_path: Path) -> None:
    model = er.Model.load(with_template(tmp_path, "{{ raise_exception('roles must alternate') }}"))
    with pytest.raises(er.ConfigError, match="roles must alternate") as e:
        model.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert e.value.field == "messages"


def test_real_templates_still_render_within_the_budget(tiny: er.Model) -> None:
    messages = [{"role": "user", "content": "x" * 100_000}]  # long content is not a budget problem
    assert len(tiny.tokenizer.render_chat(messages)) > 100_000


# -- 3. symlinks out of the folder ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["model.onnx", "tokenizer.json", "edgeroute.json"])
def test_files_that_resolve_outside_the_folder_are_refused(tiny_dir: Path, tmp_path: Path, name: str) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    folder = copy_model(tiny_dir, tmp_path / "m")
    shutil.move(folder / name, outside / name)
    (folder / name).symlink_to(outside / name)
    with pytest.raises(er.ModelLoadError, match="resolves outside the model folder"):
        er.Model.load(folder)
    assert "resolves outside" in one_line_error(invoke("info", folder))


def test_a_symlink_inside_the_folder_is_fine(tiny_dir: Path, tmp_path: Path) -> None:
    folder = copy_model(tiny_dir, tmp_path / "m")
    (folder / "model.onnx").rename(folder / "model-real.onnx")
    (folder / "model.onnx").symlink_to("model-real.onnx")
    er.Model.load(folder).generate("Hello", GREEDY)


# -- 4. values that overflow float32 --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", 1e-45),
        ("temperature", 1e-38),
        ("temperature", 1e39),
        ("repetition_penalty", 1e-45),
        ("repetition_penalty", 1e39),
        ("logit_bias", {7: 1e40}),
        ("logit_bias", {7: 101.0}),
        ("logit_bias", {7: -1e40}),
    ],
)
def test_values_that_would_overflow_are_refused_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(er.ConfigError) as e:
        er.SamplingConfig(**{field: value})
    assert e.value.field == field


def test_the_ranges_edges_are_accepted_and_finite(tiny: er.Model) -> None:
    for kw in (
        dict(temperature=1e-3),
        dict(temperature=1e3),
        dict(temperature=0.7, repetition_penalty=0.01, penalty_last_n=-1),
        dict(temperature=0.7, repetition_penalty=100.0),
        dict(temperature=0.7, logit_bias={7: 100.0, 8: -100.0}, top_p=0.9),
    ):
        cfg = er.GenerationConfig(max_new_tokens=6, sampling=er.SamplingConfig(seed=1, **kw))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no NumPy RuntimeWarning either
            out = tiny.generate("Hello", cfg)
        assert len(out.token_ids) >= 1 and all(0 <= t < tiny.vocab_size for t in out.token_ids)


def test_a_huge_bias_picks_its_token_not_token_zero(tiny: er.Model) -> None:
    for extra in ({}, {"top_p": 0.9}, {"top_k": 5}):
        cfg = er.GenerationConfig(
            max_new_tokens=4, sampling=er.SamplingConfig(temperature=0.8, seed=1, logit_bias={42: 100.0}, **extra)
        )
        assert tiny.generate("Hello", cfg).token_ids == [42] * 4


def test_guidance_weight_is_bounded(tiny: er.Model) -> None:
    for w in (1e308, -1e3, 101.0):
        with pytest.raises(er.ConfigError) as e:
            tiny.generator(GREEDY, guidance=w)
        assert e.value.field == "guidance"
    assert "guidance" in one_line_error(invoke("run", tiny.path, "hi", "--guidance", "1e308"))


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_banning_every_token_is_a_clear_error(tiny: er.Model, temperature: float) -> None:
    every = {i: -math.inf for i in range(tiny.vocab_size)}
    cfg = er.GenerationConfig(max_new_tokens=4, sampling=er.SamplingConfig(temperature=temperature, logit_bias=every))
    with pytest.raises(er.ConfigError, match="bans every token") as e:
        tiny.generate("Hello", cfg)
    assert e.value.field == "logit_bias"


@pytest.mark.parametrize("extra", [{"temperature": 0.0}, {"temperature": 0.8}, {"temperature": 0.8, "top_k": 8}])
def test_bans_and_suppression_that_leave_nothing_are_a_clear_error(tiny: er.Model, extra: dict) -> None:
    stops = set(tiny.manifest.eos_token_ids)
    bans = {i: -math.inf for i in range(tiny.vocab_size) if i not in stops}  # only the stop tokens remain...
    cfg = er.GenerationConfig(max_new_tokens=4, min_new_tokens=2, sampling=er.SamplingConfig(logit_bias=bans, **extra))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(er.ConfigError, match="leave no token") as e:  # ... and they are suppressed
            tiny.generate("Hello", cfg)
    assert e.value.field == "logit_bias"


@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 0.8}, {"temperature": 0.8, "top_k": 8}])
def test_nan_logits_are_an_inference_error(tmp_path: Path, sampling: dict) -> None:
    folder = write_tiny_model(tmp_path / "nan", logit_scale=math.nan)
    cfg = er.GenerationConfig(max_new_tokens=4, sampling=er.SamplingConfig(seed=0, **sampling))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(er.InferenceError, match="not finite"):
            er.Model.load(folder).generate("Hello", cfg)


def test_the_router_distribution_refuses_what_it_cannot_draw() -> None:
    router = er.make_chain(er.SamplingConfig(temperature=0.8), 16)
    with pytest.raises(er.InferenceError):
        router.distribution(np.full(16, np.nan, np.float32), np.zeros(0, np.int64))
    with pytest.raises(er.ConfigError):
        router.distribution(np.full(16, -np.inf, np.float32), np.zeros(0, np.int64))


def test_cli_overflow_values_are_one_line(tiny_dir: Path) -> None:
    assert "temperature=1e-45" in one_line_error(invoke("run", tiny_dir, "hi", "--temperature", "1e-45"))
    assert "logit_bias" in one_line_error(invoke("run", tiny_dir, "hi", "--logit-bias", "7=1e40", "--seed", "1"))
    line = one_line_error(invoke("run", tiny_dir, "hi", "--repetition-penalty", "1e-45"))
    assert "repetition_penalty" in line


# -- 5. invalid UTF-8 and lone surrogates ---------------------------------------------------------------------
def test_invalid_utf8_on_stdin_is_one_line(tiny_dir: Path) -> None:
    line = one_line_error(invoke("run", tiny_dir, "-", input=b"\xff\xfe"))
    assert "not valid UTF-8" in line
    res = subprocess.run([EXE, "run", str(tiny_dir), "-"], input=b"ab\xff\xfe", capture_output=True, timeout=120)
    assert res.returncode == 1 and b"Traceback" not in res.stderr and b"not valid UTF-8" in res.stderr


def test_chat_skips_a_line_that_is_not_utf8_and_goes_on(tiny: er.Model, tiny_dir: Path) -> None:
    script = b"Hello\n\xff\xfe\nHello\n"
    res = invoke("chat", tiny_dir, "--temperature", "0", "--max-new-tokens", "4", input=script)
    assert res.exit_code == 0, res.stderr
    assert "not valid UTF-8" in res.stderr and "skipped" in res.stderr
    cfg = er.GenerationConfig(max_new_tokens=4, sampling=er.SamplingConfig(temperature=0))
    session = er.ChatSession(tiny, cfg)
    first = "".join(s.text for s in session.send("Hello"))
    second = "".join(s.text for s in session.send("Hello"))
    assert res.stdout == f"{first}\n{second}\n"


def test_lone_surrogates_through_the_api(tiny: er.Model) -> None:
    bad = "caf\udce9"  # what b"caf\xe9" becomes under surrogateescape
    with pytest.raises(er.ConfigError) as e:
        tiny.generate(bad, GREEDY)
    assert e.value.field == "prompt" and "not valid UTF-8" in str(e.value)
    with pytest.raises(er.ConfigError) as e:
        tiny.tokenizer.apply_chat_template([{"role": "user", "content": bad}])
    assert e.value.field == "messages"
    with pytest.raises(er.ConfigError) as e:
        er.GenerationConfig(stop=(bad,))
    assert e.value.field == "stop"
    session = er.ChatSession(tiny, GREEDY)
    with pytest.raises(er.ConfigError):
        list(session.send(bad))
    assert session.messages == []  # the failed turn left nothing behind
    assert "".join(s.text for s in session.send("Hello"))  # and the session goes on


def test_surrogates_in_argv_are_one_line(tiny_dir: Path) -> None:
    res = subprocess.run(
        [os.fsencode(EXE), b"run", os.fsencode(tiny_dir), b"caf\xe9"], capture_output=True, timeout=120
    )
    assert res.returncode == 1 and b"Traceback" not in res.stderr and b"not valid UTF-8" in res.stderr


# -- 7. loose manifest values ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"generation_defaults__max_new_tokens": "abc"}, "generation_defaults.max_new_tokens"),
        ({"generation_defaults__max_new_tokens": 5.7}, "generation_defaults.max_new_tokens"),
        ({"generation_defaults__temperature": "hot"}, "generation_defaults.temperature"),
        ({"generation_defaults__top_p": 3}, "generation_defaults.top_p"),
        ({"generation_defaults__beam_width": 4}, "unknown key(s) beam_width"),
        ({"provenance__parameters": "many"}, "provenance.parameters"),
        ({"provenance__validation__max_abs_logit_diff": "small"}, "provenance.validation.max_abs_logit_diff"),
        ({"provenance__validation__quality__top1_agreement": None}, "provenance.validation.quality.top1_agreement"),
        ({"quantization__method": ["int4"]}, "quantization.method"),
        ({"quantization__block_size": "32"}, "quantization.block_size"),
        ({"precision": "fp8"}, "precision"),
        ({"files": {"../model.onnx": {"bytes": 1, "sha256": "0" * 64}}}, "files"),
    ],
)
def test_loose_manifest_values_name_the_field_and_file(tiny_dir: Path, tmp_path: Path, change, fragment) -> None:
    folder = edit_manifest(copy_model(tiny_dir, tmp_path / "m"), **change)
    with pytest.raises(er.ManifestError) as e:
        er.Model.load(folder)
    assert fragment in str(e.value) and str(folder / "edgeroute.json") in str(e.value)
    for command in (["run", folder, "hi"], ["info", folder], ["bench", folder, "--runs", "1"]):
        line = one_line_error(invoke(*command))
        assert fragment in line and "edgeroute.json" in line


def test_valid_defaults_still_apply(tiny_dir: Path, tmp_path: Path) -> None:
    folder = edit_manifest(copy_model(tiny_dir, tmp_path / "m"), generation_defaults__max_new_tokens=3)
    out = json.loads(invoke("run", folder, "Hello", "--json", "--min-new-tokens", "3").stdout)
    assert len(out["token_ids"]) == 3


# -- 8. a negative --logit-bias id ----------------------------------------------------------------------------
def test_negative_bias_ids_are_refused(tiny_dir: Path) -> None:
    line = one_line_error(invoke("run", tiny_dir, "hi", "--logit-bias=-5=100"), code=2)
    assert "token id -5 is negative" in line


def test_quoted_numbers_are_text(tiny: er.Model, tiny_dir: Path) -> None:
    ids = tiny.tokenizer.encode("-5", add_special_tokens=False)
    out = json.loads(invoke("run", tiny_dir, "hi", "--json", "--temperature", "0", '--logit-bias="-5"=100').stdout)
    assert out["token_ids"][0] in ids


# -- 9. info and bench --quality check what they describe -----------------------------------------------------
def recorded_model(folder: Path) -> Path:
    """A tiny folder as an export writes it: files recorded, and a quality reference (the tiny graph itself
    plays PyTorch's part)."""
    write_tiny_model(folder)
    model = er.Model.load(folder)
    ids = text_ids(model)
    top1, ppl = next_token_figures(model.forward_last(np.array([ids]), model.new_cache(), len(ids))[0], ids)
    quality = {
        "top1_agreement": 1.0,
        "perplexity_reference": ppl,
        "perplexity": ppl,
        "perplexity_change_pct": 0.0,
        "tokens": len(ids) - 1,
        "reference_top1": top1.tolist(),
    }
    files = file_entries(folder, ["model.onnx", "tokenizer.json"])
    return edit_manifest(folder, provenance__validation__quality=quality, files=files)


def zero_the_lm_head(folder: Path) -> None:
    """Rewrite the graph with the LM head's weights zeroed: the same size, other contents."""
    vocab = build_tokenizer().get_vocab_size()
    before = (folder / "model.onnx").stat().st_size
    onnx.save(build_graph(vocab, **GEOMETRY, **{**WEIGHTS, "logit_scale": 0.0}), str(folder / "model.onnx"))
    assert (folder / "model.onnx").stat().st_size == before


def test_info_checks_the_files_it_describes(tmp_path: Path, tiny_dir: Path) -> None:
    folder = recorded_model(tmp_path / "m")
    data = json.loads(invoke("info", folder, "--json").stdout)
    assert data["files_verified"] == ["model.onnx", "tokenizer.json"]
    assert "2 checked against the export's sizes and SHA-256" in invoke("info", folder).stdout
    zero_the_lm_head(folder)
    assert "does not match the SHA-256" in one_line_error(invoke("info", folder))
    (folder / "model.onnx").write_bytes(b"cut")
    assert "is 3 bytes but was exported as" in one_line_error(invoke("info", folder))
    with pytest.raises(er.ModelLoadError, match="was exported as"):  # sizes are checked at every load
        er.Model.load(folder)
    (folder / "model.onnx").unlink()
    assert "model.onnx" in one_line_error(invoke("info", folder))
    old = copy_model(tiny_dir, tmp_path / "old")  # a folder without recorded files: still checked for presence
    (old / "model.onnx").unlink()
    assert "graph file" in one_line_error(invoke("info", old))


def test_bench_quality_measures_the_graph(tmp_path: Path) -> None:
    folder = recorded_model(tmp_path / "m")
    good = json.loads(invoke("bench", folder, "--runs", "1", "--new-tokens", "2", "--quality", "--json").stdout)
    assert good["quality"]["top1_agreement"] == 1.0 and abs(good["quality"]["perplexity_change_pct"]) < 1e-6
    zero_the_lm_head(folder)
    res = invoke("bench", folder, "--runs", "1", "--new-tokens", "2", "--quality", "--json")
    q = json.loads(res.stdout)["quality"]
    vocab = er.Model.load(folder).vocab_size
    assert q["top1_agreement"] < 0.2  # uniform logits: argmax is token 0 everywhere
    assert q["perplexity"] == pytest.approx(vocab, rel=1e-3)  # measured, not the figures stored at export
    text = invoke("bench", folder, "--runs", "1", "--new-tokens", "2", "--quality").stdout
    assert "top-1 agreement" in text and f"{100 * q['top1_agreement']:.1f}%" in text


def test_bench_quality_without_a_reference_measures_perplexity(tiny_dir: Path) -> None:
    text = invoke("bench", tiny_dir, "--runs", "1", "--new-tokens", "2", "--quality").stdout
    assert "perplexity" in text and "not measured: the export recorded no PyTorch reference" in text


# -- 10. usage means the same in every path -------------------------------------------------------------------
class HookedSession:
    """An onnxruntime session whose every graph run first calls ``before()``."""

    def __init__(self, session, before) -> None:
        self._session, self._before = session, before

    def run(self, *a, **k):
        self._before()
        return self._session.run(*a, **k)

    def run_with_iobinding(self, *a, **k):
        self._before()
        return self._session.run_with_iobinding(*a, **k)

    def __getattr__(self, name: str):
        return getattr(self._session, name)


def slow_model(folder: Path, seconds: float) -> er.Model:
    """The model with every graph run made ``seconds`` slower (to see what the usage counts)."""
    model = er.Model.load(folder)
    model.session = HookedSession(model.session, lambda: time.sleep(seconds))
    return model


def test_batched_tokens_per_second_counts_the_graph(tiny_dir: Path) -> None:
    model = slow_model(tiny_dir, 0.02)
    cfg = er.GenerationConfig(max_new_tokens=6, min_new_tokens=6, sampling=er.SamplingConfig(temperature=0))
    single = model.generate("Hello", cfg).usage
    batch = model.generate(["Hello", "Once upon a time"], cfg)
    for u in [single, *(c.usage for c in batch)]:
        assert u.completion_tokens == 6
        assert u.decode_seconds >= 0.02 * 5  # five decode steps, each with a (slowed) graph run
        assert 0 < u.tokens_per_second <= 50
        assert u.router_seconds > 0


# -- 11. bytes, out-of-vocabulary biases, a small tokenizer, repeated biases --------------------------------------
def test_bytes_are_not_token_ids(tiny: er.Model) -> None:
    for prompt in (b"Hello", bytearray(b"Hello")):
        with pytest.raises(er.ConfigError, match="bytes") as e:
            tiny.generate(prompt, GREEDY)
        assert e.value.field == "prompt"
    with pytest.raises(er.ConfigError):
        tiny.generator(GREEDY).append("Hello")  # type: ignore[arg-type]
    ids = tiny.tokenizer.encode("Hello")
    assert tiny.generate(np.array(ids), GREEDY).token_ids == tiny.generate(ids, GREEDY).token_ids


def test_api_bias_outside_the_vocabulary_is_refused(tiny: er.Model) -> None:
    cfg = GREEDY.replace(sampling=er.SamplingConfig(temperature=0, logit_bias={tiny.vocab_size: 5.0}))
    with pytest.raises(er.ConfigError, match="outside the vocabulary") as e:
        tiny.generate("Hello", cfg)
    assert e.value.field == "logit_bias"


def test_ids_beyond_a_smaller_tokenizer_are_never_generated(tiny_dir: Path, tmp_path: Path) -> None:
    folder = copy_model(tiny_dir, tmp_path / "m")
    small = build_tokenizer(300)  # the graph has 320 rows (a padded vocabulary): 300..319 have no text
    small.save(str(folder / "tokenizer.json"))
    model = er.Model.load(folder)
    assert model.tokenizer.vocab_size == 300 and model.vocab_size == 320
    pulls = {i: 100.0 for i in range(300, 320)}  # even biased towards them
    for temperature in (0.0, 1.5):
        cfg = er.GenerationConfig(max_new_tokens=40, sampling=er.SamplingConfig(temperature=temperature, seed=3))
        pulled = cfg.replace(sampling=cfg.sampling.replace(logit_bias=pulls))
        for c in (cfg, pulled):
            assert all(t < 300 for t in model.generate("Hello", c).token_ids)
    assert "ids 300..319 have no text" in invoke("info", folder).stdout


def test_one_bias_per_token_on_the_command_line(tiny: er.Model, tiny_dir: Path) -> None:
    line = one_line_error(invoke("run", tiny_dir, "hi", "--logit-bias", "5=1", "--logit-bias", "5=2"), code=2)
    assert "one bias per token" in line
    res = invoke("run", tiny_dir, "hi", "--logit-bias", "5=1", "--logit-bias", "5=1", "--max-new-tokens", "2")
    assert res.exit_code == 0  # the same bias twice is no conflict


# -- 12. one Generator from two threads -----------------------------------------------------------------------
def test_a_generator_used_from_two_threads_raises(tiny_dir: Path) -> None:
    model = er.Model.load(tiny_dir)
    inside, release = threading.Event(), threading.Event()
    holding = False

    def hold() -> None:
        if holding:
            inside.set()
            release.wait(10)

    model.session = HookedSession(model.session, hold)
    gen = model.generator(GREEDY)
    gen.append(model.tokenizer.encode("Hello"))
    steps = [gen.step()]  # the prompt's logits were at hand: the next step runs the graph
    holding = True
    worker = threading.Thread(target=lambda: steps.append(gen.step()))
    worker.start()
    assert inside.wait(10)
    for call in (gen.step, lambda: gen.append([5]), lambda: gen.rewind(1)):
        with pytest.raises(er.ConcurrentUseError, match="another thread"):
            call()
    release.set()
    worker.join(10)
    holding = False
    steps += list(gen)  # the generator is intact: no step lost or repeated, max_new_tokens at most
    assert len(steps) == GREEDY.max_new_tokens or steps[-1].finish_reason == "stop"
    alone = model.generate("Hello", GREEDY)
    assert [s.token_id for s in steps][: len(alone.token_ids)] == alone.token_ids


# -- 13. a length cut-off inside a character ------------------------------------------------------------------
def test_a_cut_inside_a_character_never_emits_u_fffd(tiny: er.Model) -> None:
    target = tiny.tokenizer.encode("ab🤖", add_special_tokens=False)
    full = tiny.tokenizer.encode("ab", add_special_tokens=False)
    assert len(target) - len(full) >= 2  # the emoji spans several tokens
    for cut in range(len(full) + 1, len(target)):  # every cut inside the emoji
        gen = tiny.generator(er.GenerationConfig(max_new_tokens=cut, sampling=er.SamplingConfig(temperature=0)))
        gen.append(tiny.tokenizer.encode("x"))
        steps = []
        for t in target[:cut]:
            gen._seq.chooser.router = er.make_chain(
                er.SamplingConfig(temperature=0, logit_bias={t: 100.0}), tiny.vocab_size
            )
            steps.append(gen.step())
        assert [s.token_id for s in steps] == target[:cut] and steps[-1].finish_reason == "length"
        text = "".join(s.text for s in steps)
        assert text == "ab" and gen.completion().text == "ab"
        assert gen.completion().token_ids == target[:cut]


# -- 14. a KV buffer the system will not reserve --------------------------------------------------------------
def test_an_unreservable_kv_buffer_names_its_size_and_the_flag(tiny: er.Model) -> None:
    with pytest.raises(er.ConfigError) as e:
        SharedKVCache(tiny.manifest, 2**40)
    assert e.value.field == "context_size"
    assert "GiB" in str(e.value) and "--ctx-size" in str(e.value) and "positions" in str(e.value)


# -- 15 and 16. empty prompts ---------------------------------------------------------------------------------
def test_a_template_that_renders_nothing_names_the_template(tmp_path: Path) -> None:
    folder = with_template(tmp_path, "{% if false %}x{% endif %}")
    with pytest.raises(er.ChatTemplateError, match="rendered no text"):
        er.Model.load(folder).tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    line = one_line_error(invoke("run", folder, "hi", "--chat"))
    assert "rendered no text" in line and "append a prompt" not in line


def test_one_rule_for_empty_prompts(tiny: er.Model, tiny_dir: Path) -> None:
    with pytest.raises(er.ConfigError, match="encodes to no tokens"):
        tiny.generate("", GREEDY)
    with pytest.raises(er.ConfigError, match="at least one token"):
        tiny.generate([], GREEDY)
    with pytest.raises(er.ConfigError, match="encodes to no tokens"):
        tiny.generate(["Hello", ""], GREEDY)
    arg = one_line_error(invoke("run", tiny_dir, ""))
    stdin = one_line_error(invoke("run", tiny_dir, "-", input=""))
    assert "encodes to no tokens" in arg and "encodes to no tokens" in stdin
    # whitespace is text: the same answer whether given as an argument or on standard input
    a = invoke("run", tiny_dir, "  ", "--temperature", "0", "--max-new-tokens", "4")
    b = invoke("run", tiny_dir, "-", "--temperature", "0", "--max-new-tokens", "4", input="  ")
    assert a.exit_code == b.exit_code == 0 and a.stdout == b.stdout


# -- 17. small inconsistencies --------------------------------------------------------------------------------
def test_export_takes_verbose_after_the_subcommand(tmp_path: Path) -> None:
    src = fake_checkpoint(tmp_path / "src")
    res = subprocess.run([EXE, "export", str(src), str(src), "--verbose"], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "Traceback" in res.stderr and "ExportError" in res.stderr
    assert "No such option" not in res.stderr


def test_numpy_scalars_are_accepted_as_python_numbers(tiny: er.Model) -> None:
    s = er.SamplingConfig(
        temperature=np.float32(0.7),
        top_k=np.int64(5),
        top_p=np.float64(0.9),
        seed=np.int32(3),
        logit_bias={np.int64(7): np.float32(2)},
    )
    assert type(s.temperature) is float and type(s.top_k) is int and type(s.seed) is int
    assert s.temperature == pytest.approx(0.7) and dict(s.logit_bias) == {7: 2.0}
    g = er.GenerationConfig(max_new_tokens=np.int64(4), stop_token_ids=[np.int64(1)], sampling=s)
    assert type(g.max_new_tokens) is int and g.stop_token_ids == (1,)
    assert len(tiny.generate("Hello", g).token_ids) <= 4
    with pytest.raises(er.ConfigError):
        er.SamplingConfig(top_k=np.bool_(True))


def test_the_library_emits_no_runtime_warnings(tiny: er.Model) -> None:
    configs = [
        er.SamplingConfig(temperature=0),
        er.SamplingConfig(temperature=0.7, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.1, seed=1),
        er.SamplingConfig(temperature=1.3, typical_p=0.8, explore=0.2, logit_bias={3: -math.inf}, seed=2),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for s in configs:
            tiny.generate("Hello", er.GenerationConfig(max_new_tokens=12, logprobs=3, sampling=s))
        tiny.generate(["Hello", "Once"], er.GenerationConfig(max_new_tokens=6, sampling=configs[1]))
        sampled = er.GenerationConfig(max_new_tokens=8, sampling=configs[1])
        tiny.generate("Hello", sampled, guidance=3.0, negative_prompt="Once")
        tiny.generate("Hello", sampled, contrast=tiny, contrast_alpha=0.5)
        tiny.generate("Hello Hello Hello", sampled, draft="ngram")
