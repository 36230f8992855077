"""LoRA adapters at run time (issue 37): adapters kept apart from the base graph, chosen per request, mixed in one
engine batch, loaded and unloaded while requests run; exactly the merged model's tokens on fp32 graphs."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import edgeroute as er
import numpy as np
import pytest
from edgeroute import safetensors_io
from edgeroute.adapter_folder import remove_from_folder
from edgeroute.adapters import read_adapter, write_adapter

pytest.importorskip("peft")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPT = "Once upon a time the robot"


def cfg(adapter: str | None, seed: int | None = None, temperature: float = 0.0, **kw: object) -> er.GenerationConfig:
    sampling = er.SamplingConfig(temperature=temperature, top_p=0.9 if temperature else 1.0, seed=seed)
    return er.GenerationConfig(**{"max_new_tokens": 12, **kw}, sampling=sampling, adapter=adapter)


ROUTES = [(None, 0.0), (7, 0.9)]  # greedy, and seeded sampling with top-p


@pytest.fixture(scope="module")
def model(lora_dir: Path) -> er.Model:
    return er.Model.load(lora_dir)


@pytest.fixture(scope="module")
def merged(shared_dir: Path, checkpoint: Callable[..., Path], lora: Callable[..., Path]) -> dict[str, er.Model]:
    """Each adapter merged into the base by PEFT and exported alone (``edgeroute export ADAPTER --base``)."""
    from checkpoints import build_once
    from edgeroute.export import export_model

    out = {}
    for name in ("qv4", "all8"):
        folder = shared_dir / "export" / f"llama-merged-{name}"
        build_once(folder, lambda d, n=name: export_model(lora(n), d, base=checkpoint("llama")), done="edgeroute.json")
        out[name] = er.Model.load(folder)
    return out


def peft_logits(ckpt: Path, adapter: Path, ids: list[int]) -> np.ndarray:
    import peft

    base = transformers.AutoModelForCausalLM.from_pretrained(ckpt)
    wrapped = peft.PeftModel.from_pretrained(base, str(adapter)).eval()
    with torch.no_grad():
        return wrapped(torch.tensor([ids])).logits[0].numpy()


# -- exactness ---------------------------------------------------------------------------------------------------
def test_adapter_equals_merged_and_peft(
    model: er.Model, merged: dict[str, er.Model], checkpoint, lora, exported
) -> None:
    man = json.loads((model.path / "edgeroute.json").read_text())
    assert man["lora"]["rank"] == 8 and set(man["adapters"]) == {"qv4", "all8"}
    ids = model.tokenizer.encode("The committee met on Tuesday to review the budget")
    base_logits = model.forward_last(np.array([ids]), model.new_cache(), len(ids))[0]
    for name in ("qv4", "all8"):
        assert man["adapters"][name]["validation"]["max_abs_logit_diff"] <= 1e-3  # the export's own check
        want = peft_logits(checkpoint("llama"), lora(name), ids)
        got = model.forward_last(np.array([ids]), model.new_cache(adapter=name), len(ids))[0]
        assert np.abs(got - want).max() <= 1e-4
        assert np.abs(base_logits - want).max() > 1e-2  # the adapter changes the model
        for seed, t in ROUTES:  # the tokens of the merged model run alone
            want_ids = merged[name].generate(PROMPT, cfg(None, seed, t)).token_ids
            assert model.generate(PROMPT, cfg(name, seed, t)).token_ids == want_ids
    # no adapter: the base model's tokens (zeros in the LoRA inputs change nothing)
    plain = er.Model.load(exported("llama"))
    assert model.generate(PROMPT, cfg(None)).token_ids == plain.generate(PROMPT, cfg(None)).token_ids


def test_every_path_honours_the_adapter(model: er.Model, merged: dict[str, er.Model]) -> None:
    ref = merged["all8"]
    # batches of prompts, beam search, a chat session, guidance, speculation and scoring
    prompts = [PROMPT, "The weather today"]
    assert [c.token_ids for c in model.generate(prompts, cfg("all8"))] == [
        c.token_ids for c in ref.generate(prompts, cfg(None))
    ]
    beams = cfg("all8", num_beams=3, num_return_sequences=2)
    got_beams = model.generate(PROMPT, beams).sequences
    want_beams = ref.generate(PROMPT, cfg(None, num_beams=3, num_return_sequences=2)).sequences
    assert got_beams and want_beams and [h.token_ids for h in got_beams] == [h.token_ids for h in want_beams]
    chat = er.ChatSession(model, cfg("all8"))
    ref_chat = er.ChatSession(ref, cfg(None))
    for turn in ("Hello", "And then?"):
        assert [s.token_id for s in chat.send(turn)] == [s.token_id for s in ref_chat.send(turn)]
    guided = model.generate(PROMPT, cfg("all8"), guidance=1.5, negative_prompt="dull")
    assert guided.token_ids == ref.generate(PROMPT, cfg(None), guidance=1.5, negative_prompt="dull").token_ids
    assert model.generate(PROMPT, cfg("all8"), draft="ngram").token_ids == ref.generate(PROMPT, cfg(None)).token_ids
    got = model.score("The robot", [" paints", " sings"], adapter="all8")
    want = ref.score("The robot", [" paints", " sings"])
    assert np.allclose([s.logprob for s in got], [s.logprob for s in want], atol=1e-4)
    items = [("The robot", [" paints", " sings"]), ("A cat", [" sleeps"])]
    got_items = model.score_items(items, adapter="all8")
    assert np.allclose([s.logprob for s in got_items[0]], [s.logprob for s in want], atol=1e-4)


def test_engine_mixes_adapters_in_one_batch(model: er.Model) -> None:
    alone = {(a, s): model.generate(PROMPT, cfg(a, s, t)).token_ids for a in (None, "qv4", "all8") for s, t in ROUTES}
    with er.Engine(model, max_batch=6) as engine:
        started = [(a, s, engine.submit(PROMPT, cfg(a, s, t))) for a in ("all8", None, "qv4") for s, t in ROUTES]
        for a, s, request in started:
            assert request.result().token_ids == alone[(a, s)], a
        # the same prompt again on other adapters: a slot's cached prefix is only reused on its own adapter
        before = engine.stats().reused_prompt_tokens
        again = [(a, s, engine.submit(PROMPT, cfg(a, s, t))) for a in ("qv4", "all8", None) for s, t in ROUTES]
        for a, s, request in again:
            assert request.result().token_ids == alone[(a, s)], a
        assert engine.stats().reused_prompt_tokens > before  # reuse still happens where the adapter matches


def test_prefix_reuse_never_crosses_adapters_or_reloads(model: er.Model, lora) -> None:
    prompt = model.encode_prompt(PROMPT * 3)
    with er.Engine(model, max_batch=1) as engine:

        def reused(adapter: str | None) -> int:
            before = engine.stats().reused_prompt_tokens
            engine.submit(prompt, cfg(adapter)).result()
            return engine.stats().reused_prompt_tokens - before

        assert reused("qv4") == 0
        assert reused("qv4") == len(prompt) - 1  # the same load of the same adapter: reused
        assert reused("all8") == 0
        assert reused(None) == 0
        assert reused(None) == len(prompt) - 1
        model.load_adapter("again", lora("qv4"))
        try:
            assert reused("again") == 0
            model.unload_adapter("again")
            model.load_adapter("again", lora("qv4b"))  # the same name, other weights: a new load
            assert reused("again") == 0
            assert reused("again") == len(prompt) - 1
        finally:
            model.unload_adapter("again")


# -- load and unload at run time --------------------------------------------------------------------------------
def test_load_unload_while_requests_run(model: er.Model, lora, tmp_path: Path) -> None:
    model.load_adapter("live", lora("qv4b"))
    try:
        alone = model.generate(PROMPT, cfg("live", max_new_tokens=40)).token_ids
        with er.Engine(model, max_batch=2) as engine:
            running = engine.submit(PROMPT, cfg("live", max_new_tokens=40))
            other = engine.submit(PROMPT, cfg("qv4"))
            next(iter(running))  # it has started
            model.unload_adapter("live")  # not under the running request: it finishes on what its row holds
            with pytest.raises(er.ConfigError, match="adapter='live': is not loaded"):
                engine.submit(PROMPT, cfg("live"))
            assert running.result().token_ids == alone
            assert other.result().finish_reason == "length"
    finally:
        if "live" in model.adapters:
            model.unload_adapter("live")
    # an edgeroute adapter file loads like the PEFT folder it came from
    write_adapter(read_adapter(lora("qv4b"), "x"), tmp_path / "x.safetensors")
    model.load_adapter("from-file", tmp_path / "x.safetensors")
    try:
        assert model.generate(PROMPT, cfg("from-file", max_new_tokens=40)).token_ids == alone
    finally:
        model.unload_adapter("from-file")


def test_loads_from_threads_are_safe(lora_dir: Path, lora) -> None:
    model = er.Model.load(lora_dir, max_adapters=4)
    errors: list[BaseException] = []

    def load(i: int) -> None:
        try:
            model.load_adapter(f"t{i}", lora("qv4b"))
        except er.AdapterError as e:
            errors.append(e)

    threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    # the folder's two and two of the four: the limit holds under concurrent loads
    assert len(model.adapters) == 4 and len(errors) == 2
    assert all("max_adapters 4" in str(e) for e in errors)


# -- refusals ----------------------------------------------------------------------------------------------------
def test_refusals_name_the_problem(model: er.Model, lora, exported, tmp_path: Path) -> None:
    with pytest.raises(er.ConfigError, match="adapter='nope': is not loaded .loaded: all8, qv4"):
        model.generate(PROMPT, cfg("nope"))
    with pytest.raises(er.AdapterError, match="rank 16 is above the graph's 8"):
        model.load_adapter("big", lora("rs16"))
    with pytest.raises(er.AdapterError, match="already loaded"):
        model.load_adapter("qv4", lora("qv4"))
    with pytest.raises(er.AdapterError, match="not loaded"):
        model.unload_adapter("nope")
    with pytest.raises(er.ConfigError, match="name"):
        model.load_adapter("bad name!", lora("qv4"))
    # an adapter of another base: its shapes do not fit (refused at load, not at the first token)
    with pytest.raises(er.AdapterError, match="do not fit the model's 64 -> 64: an adapter of another base"):
        model.load_adapter("other", lora("qv4", "gemma3_text"))
    # PEFT features edgeroute does not run, a corrupt file, a folder that is not an adapter
    for key, value, match in (
        ("use_dora", True, "DoRA"),
        ("bias", "lora_only", "biases"),
        ("modules_to_save", ["lm_head"], "modules_to_save"),
        ("peft_type", "IA3", "not a LoRA adapter"),
    ):
        bad = tmp_path / key
        shutil.copytree(lora("qv4"), bad)
        conf = json.loads((bad / "adapter_config.json").read_text())
        conf[key] = value
        (bad / "adapter_config.json").write_text(json.dumps(conf))
        with pytest.raises(er.AdapterError, match=match):
            model.load_adapter("bad", bad)
    cut = tmp_path / "cut"
    shutil.copytree(lora("qv4"), cut)
    data = (cut / "adapter_model.safetensors").read_bytes()
    (cut / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(er.AdapterError, match="not a readable safetensors file: tensor .* inside the file"):
        model.load_adapter("cut", cut)
    with pytest.raises(er.AdapterError, match="neither a PEFT adapter folder nor an adapter file"):
        model.load_adapter("none", tmp_path / "missing")
    assert model.adapters.names() == ["all8", "qv4"]  # nothing half-loaded
    # a graph without adapter inputs, and a LoRA graph asked for a device cache
    plain = er.Model.load(exported("llama"))
    with pytest.raises(er.AdapterError, match="takes no adapters"):
        plain.load_adapter("qv4", lora("qv4"))
    with pytest.raises(er.ConfigError, match="this model's graph takes no adapters|is not loaded"):
        plain.generate(PROMPT, cfg("qv4"))
    with pytest.raises(er.ConfigError, match="kv='device'.*host KV cache"):
        er.Model.load(model.path, kv="device")


def test_targets_limit_what_adapters_may_change(checkpoint, lora, tmp_path: Path) -> None:
    from edgeroute.export import export_model

    out = export_model(checkpoint("llama"), tmp_path / "qv", lora_rank=4, lora_targets=["q_proj", "v_proj"])
    m = er.Model.load(out)
    assert m.manifest.lora is not None and list(m.manifest.lora["projections"]) == ["qkv_proj"]
    m.load_adapter("qv4", lora("qv4"))
    with pytest.raises(er.AdapterError, match="layer 0 down_proj: this model's graph takes adapters on q_proj, v_proj"):
        m.load_adapter("all8", lora("all8"))
    with pytest.raises(er.ExportError, match="lm_head are not linear modules"):
        export_model(checkpoint("llama"), tmp_path / "x", lora_rank=4, lora_targets=["lm_head"])
    with pytest.raises(er.ConfigError, match="dtype"):
        export_model(checkpoint("llama"), tmp_path / "x", lora_rank=4, dtype="fp16")
    assert not (tmp_path / "x").exists()


# -- the model folder's adapters and the CLI ---------------------------------------------------------------------
def test_adapter_added_later_without_reexport(lora_dir: Path, lora, tmp_path: Path) -> None:
    from click.testing import CliRunner
    from edgeroute.cli import cli

    folder = tmp_path / "m"
    shutil.copytree(lora_dir, folder)
    graph_bytes = (folder / "model.onnx").read_bytes()
    runner = CliRunner()
    res = runner.invoke(cli, ["adapter", "add", str(folder), "later", str(lora("qv4b"))])
    assert res.exit_code == 0, res.output
    assert "added adapter later" in res.output and "rank 4" in res.output
    assert (folder / "model.onnx").read_bytes() == graph_bytes  # the base is untouched
    res = runner.invoke(cli, ["adapter", "list", str(folder)])
    assert "later: rank 4" in res.output and "qv4: rank 4" in res.output
    m = er.Model.load(folder)
    assert m.adapters.names() == ["all8", "later", "qv4"]
    res = runner.invoke(
        cli, ["run", str(folder), PROMPT, "--adapter", "later", "--max-new-tokens", "8", "--temperature", "0", "--json"]
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["token_ids"] == m.generate(PROMPT, cfg("later", max_new_tokens=8)).token_ids
    res = runner.invoke(cli, ["adapter", "add", str(folder), "later", str(lora("qv4"))])
    assert res.exit_code == 1 and "already in" in res.output and "--force" in res.output
    res = runner.invoke(cli, ["adapter", "add", str(folder), "big", str(lora("rs16"))])
    assert res.exit_code == 1 and "rank 16 is above the graph's 8" in res.output
    assert not (folder / "adapters" / "big.safetensors").exists()
    res = runner.invoke(cli, ["run", str(folder), PROMPT, "--adapter", "nope"])
    assert res.exit_code == 2 and "neither an adapter of the model" in res.output
    # a changed adapter file is caught at load, like the graph's
    with open(folder / "adapters" / "later.safetensors", "ab") as f:
        f.write(b"x")
    with pytest.raises(er.ModelLoadError, match="later.safetensors is .* bytes but was exported"):
        er.Model.load(folder)
    remove_from_folder(folder, "later")
    assert not (folder / "adapters" / "later.safetensors").exists()
    assert er.Model.load(folder).adapters.names() == ["all8", "qv4"]
    with pytest.raises(er.AdapterError, match="not in"):
        remove_from_folder(folder, "later")


def test_quantised_base_keeps_adapters_in_float(checkpoint, lora, shared_dir: Path) -> None:
    from checkpoints import build_once
    from edgeroute.export import export_model

    folder = build_once(
        shared_dir / "export" / "llama-lora-int4",
        lambda d: export_model(checkpoint("llama"), d, quantize="int4", loras={"all8": lora("all8")}),
        done="edgeroute.json",
    )
    m = er.Model.load(folder)
    entry = m.manifest.adapters["all8"]
    assert 0.0 <= entry["validation"]["top1_agreement"] <= 1.0  # recorded against PEFT, not gated (int4 base)
    a = m.generate(PROMPT, cfg("all8")).token_ids
    assert a != m.generate(PROMPT, cfg(None)).token_ids


@pytest.mark.parametrize("arch", ["phi3", "qwen3", "gemma3_text"])
def test_families(arch: str, checkpoint, lora, tmp_path: Path) -> None:
    """Packed modules (phi3's qkv_proj/gate_up_proj), q/k norms after the adapter's delta (Qwen3, Gemma 3): the
    export checks each adapter against PEFT (fp32: within 1e-3, or it raises)."""
    from edgeroute.export import export_model

    out = export_model(checkpoint(arch), tmp_path / arch, loras={"a": lora("qv4", arch), "b": lora("all8", arch)})
    m = er.Model.load(out)
    for name in ("a", "b"):
        assert m.manifest.adapters[name]["validation"]["max_abs_logit_diff"] <= 1e-3
    with er.Engine(m, max_batch=3) as engine:
        rows = {a: engine.submit(PROMPT, cfg(a)) for a in ("a", "b", None)}
        for a, request in rows.items():
            assert request.result().token_ids == m.generate(PROMPT, cfg(a)).token_ids


# -- the file format ---------------------------------------------------------------------------------------------
def test_safetensors_io_matches_the_package(tmp_path: Path) -> None:
    st = pytest.importorskip("safetensors.torch")
    tensors = {
        "f32": torch.randn(3, 5),
        "f16": torch.randn(4, 2).half(),
        "bf16": torch.randn(2, 7).bfloat16(),
    }
    st.save_file(tensors, tmp_path / "a.safetensors", metadata={"k": "v"})
    got, meta = safetensors_io.read(tmp_path / "a.safetensors")
    assert meta == {"k": "v"}
    for name, t in tensors.items():
        assert np.array_equal(got[name], t.float().numpy())
    safetensors_io.write(tmp_path / "b.safetensors", {"x": got["f32"]}, {"format": "f"})
    back = st.load_file(tmp_path / "b.safetensors")
    assert np.array_equal(back["x"].numpy(), got["f32"])
    for data in (b"", b"\xff" * 8 + b"{}", (5).to_bytes(8, "little") + b"[1,2]"):
        (tmp_path / "c").write_bytes(data)
        with pytest.raises(ValueError):
            safetensors_io.read(tmp_path / "c")


def test_manifest_lora_field_is_checked(lora_dir: Path, tmp_path: Path) -> None:
    data = json.loads((lora_dir / "edgeroute.json").read_text())
    for change, match in (
        (lambda d: d["lora"].__setitem__("rank", 0), "positive integer 'rank'"),
        (lambda d: d["lora"].__setitem__("targets", ["q_proj"]), "targets must be"),
        (lambda d: d["lora"]["projections"]["o_proj"].__setitem__("subs", [["o_proj", 60, 8]]), "inside"),
        (lambda d: d["adapters"]["qv4"].__setitem__("file", "../x"), "adapters/NAME"),
        (lambda d: d.pop("lora"), "needs a LoRA graph"),
    ):
        bad = json.loads(json.dumps(data))
        change(bad)
        with pytest.raises(er.ManifestError, match=match):
            er.Manifest.from_dict(bad)
