"""The fused backend's newer families on tiny random checkpoints: Qwen3 (q/k norms), Gemma 3 (sliding and global
layers with two rotary bases crossed inside the test, (1 + w) norms, pre- and post-norms, GELU-tanh, scaled
embeddings, a query scale of its own, a final softcap) and SmolLM3 (a NoPE layer) against PyTorch at every
position: prefill, one token at a time, after a past, after a rewind, in a batch; greedy tokens; the engine,
speculative decoding, int8/int4."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import edgeroute as er
import numpy as np
import pytest

pytestmark = pytest.mark.export
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from checkpoints import NEW_FAMILIES, make_checkpoint  # noqa: E402
from edgeroute.export import export_model  # noqa: E402

TEXT = "Once upon a time a little robot learned to paint the sea while the wind sang over the water"
GREEDY = er.GenerationConfig(max_new_tokens=24, min_new_tokens=24, sampling=er.SamplingConfig(temperature=0))


@pytest.fixture(scope="module", params=NEW_FAMILIES)
def family(
    request: pytest.FixtureRequest, checkpoint: Callable[..., Path], exported: Callable[..., Path]
) -> dict[str, object]:
    arch = str(request.param)
    ckpt = checkpoint(arch, seed=3)
    out = exported(arch, seed=3)  # auto: these families take the fused backend
    return {
        "arch": arch,
        "ckpt": ckpt,
        "folder": out,
        "model": er.Model.load(out),
        "torch": transformers.AutoModelForCausalLM.from_pretrained(ckpt).eval(),
    }


def _full(family: dict[str, object], ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return family["torch"](torch.tensor([ids])).logits[0].numpy()  # type: ignore[operator]


def test_export_takes_the_fused_backend_and_validates(family: dict[str, object]) -> None:
    import onnx

    man = json.loads((Path(str(family["folder"])) / "edgeroute.json").read_text())
    assert man["provenance"]["backend"] == "fused" and man["kv_layout"] == "shared"
    assert man["provenance"]["model_type"] == family["arch"]
    v = man["provenance"]["validation"]
    assert v["max_abs_logit_diff"] <= 1e-4 and v["greedy_identical"]
    ops = [
        n.op_type
        for n in onnx.load(str(Path(str(family["folder"])) / "model.onnx"), load_external_data=False).graph.node
    ]
    assert ops.count("GroupQueryAttention") == 2 and "Concat" not in ops
    if family["arch"] == "gemma3_text":
        assert ops.count("FastGelu") == 2 and ops.count("Tanh") == 1  # GELU-tanh MLPs, the final softcap


def test_every_position_matches_pytorch(family: dict[str, object]) -> None:
    model: er.Model = family["model"]  # type: ignore[assignment]
    ids = model.tokenizer.encode(TEXT)
    assert len(ids) > 3 * 8  # Gemma's sliding window (8) is crossed several times
    full = _full(family, ids)
    cache = model.new_cache()
    assert np.allclose(model.forward_last(np.array([ids[:10]]), cache, 10)[0], full[:10], atol=1e-4)  # prefill
    assert np.allclose(model.forward_last(np.array([ids[10:20]]), cache, 10)[0], full[10:20], atol=1e-4)  # past
    for i in range(20, len(ids)):  # one token at a time
        assert np.allclose(model.forward(np.array([ids[i : i + 1]]), cache)[0], full[i], atol=1e-4)
    cache.trim(15)  # rewind past the window: the stale positions are overwritten
    again = model.forward_last(np.array([ids[-15:]]), cache, 15)[0]
    assert np.allclose(again, full[-15:], atol=1e-4)
    wrong = list(ids)
    wrong[-20] = (wrong[-20] + 7) % 300
    assert not np.allclose(_full(family, wrong)[-1], full[-1], atol=1e-4)  # the check sees a changed past


def test_greedy_and_batches_equal_pytorch(family: dict[str, object]) -> None:
    model: er.Model = family["model"]  # type: ignore[assignment]
    ids = model.tokenizer.encode(TEXT)
    with torch.no_grad():
        ref = (
            family["torch"]
            .generate(  # type: ignore[attr-defined]
                torch.tensor([ids]), max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0
            )[0, len(ids) :]
            .tolist()
        )
    assert model.generate(ids, GREEDY).token_ids == ref
    assert model.generate(ids, GREEDY.replace(prefill_chunk=7)).token_ids == ref
    prompts = [TEXT, "Hi", "The capital of France is", "日本語 🤖"]
    for c, p in zip(model.generate(prompts, GREEDY), prompts, strict=True):
        assert c.token_ids == model.generate(p, GREEDY).token_ids


def test_engine_and_speculation(family: dict[str, object]) -> None:
    model: er.Model = family["model"]  # type: ignore[assignment]
    prompts = [TEXT, "Hi there", "The capital of France is"]
    alone = [model.generate(p, GREEDY).token_ids for p in prompts]
    with er.Engine(model, max_batch=4) as engine:
        reqs = [engine.submit(p, GREEDY) for p in prompts]
        assert [r.result(timeout=60).token_ids for r in reqs] == alone
    spec = model.generate(prompts[0], GREEDY, draft=model, draft_k=4)
    assert spec.token_ids == alone[0] and spec.usage.acceptance_rate == 1.0
    ngram = model.generate(prompts[0], GREEDY, draft="ngram", draft_k=4)
    assert ngram.token_ids == alone[0]


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantised_exports(family: dict[str, object], quantize: str, tmp_path: Path) -> None:
    out = export_model(Path(str(family["ckpt"])), tmp_path / quantize, quantize=quantize)
    man = json.loads((out / "edgeroute.json").read_text())
    assert man["provenance"]["backend"] == "fused" and man["quantization"]["method"] == quantize
    q = man["provenance"]["validation"]["quality"]
    # random tiny models are near-uniform (perplexity ~ the vocabulary), so top-1 flips at near-ties: the
    # perplexity is the figure that says the quantised graph computes the same model
    assert q["top1_agreement"] > 0.5 and abs(q["perplexity_change_pct"]) < 2
    if family["arch"] == "gemma3_text":  # tied: the embedding reads the LM head's quantised table
        assert man["quantization"]["embedding"] == "shares the LM head's quantised weights"
    model = er.Model.load(out)
    assert len(model.generate(TEXT, GREEDY).token_ids) == 24


def test_an_int4_export_with_an_int8_head(tmp_path: Path, checkpoint: Callable[..., Path]) -> None:
    """--head int8: the LM head (and Gemma's tied embedding, which reads its table) at 8 bits, every layer at 4,
    through the command; the head's precision is refused without quantisation or below the layers' bits."""
    import onnx
    from click.testing import CliRunner
    from edgeroute.cli import cli

    ckpt = checkpoint("gemma3_text", seed=5)
    res = CliRunner().invoke(cli, ["export", str(ckpt), str(tmp_path / "h8"), "--quantize", "int4", "--head", "int8"])
    assert res.exit_code == 0, res.output
    man = json.loads((tmp_path / "h8" / "edgeroute.json").read_text())
    assert man["quantization"]["method"] == "int4" and man["quantization"]["lm_head"] == "int8"
    q = man["provenance"]["validation"]["quality"]
    assert q["top1_agreement"] > 0.5 and abs(q["perplexity_change_pct"]) < 2
    graph = onnx.load(str(tmp_path / "h8" / "model.onnx"), load_external_data=False).graph

    def bits(node: onnx.NodeProto) -> int:
        return next(a.i for a in node.attribute if a.name == "bits")

    heads = {n.name: bits(n) for n in graph.node if n.op_type == "MatMulNBits"}
    assert [b for name, b in heads.items() if name.startswith("lm_head")] == [8]
    assert {b for name, b in heads.items() if not name.startswith("lm_head")} == {4}
    assert [bits(n) for n in graph.node if n.op_type == "GatherBlockQuantized"] == [8]
    model = er.Model.load(tmp_path / "h8")
    assert len(model.generate(TEXT, GREEDY).token_ids) == 24
    for args, needle in (
        (["--head", "int8"], "add --quantize"),
        (["--quantize", "int8", "--head", "int4"], "fewer bits than the int8 layers"),
        (["--quantize", "int4", "--head", "int2"], "int2"),
    ):
        res = CliRunner().invoke(cli, ["export", str(ckpt), str(tmp_path / "bad"), *args])
        assert res.exit_code != 0 and needle in res.output and "Traceback" not in res.output, res.output
        assert not (tmp_path / "bad").exists()


def test_unsupported_variants_fall_back_with_the_reason(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", "gemma3_text")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["use_bidirectional_attention"] = True
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(er.ExportError, match="fused backend does not support bidirectional attention"):
        export_model(ckpt, tmp_path / "out", backend="fused")
    assert not (tmp_path / "out").exists()
