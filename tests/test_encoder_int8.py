"""Encoder int8 exports and their quality gate (issue 36): dynamic int8 measured against fp32 on a text set and
refused below the gate unless forced; a deliberately broken checkpoint (an outlier weight that fp32 never feels
but int8's per-tensor scale does) is refused, written with ``--force-quality`` (recorded as such), and measured
better per channel."""

from __future__ import annotations

import json
from pathlib import Path

import edgeroute as er
import numpy as np
import pytest
from click.testing import CliRunner
from edgeroute.cli import cli
from edgeroute.export import export_model
from edgeroute.export.encoder_quality import GATES, QUALITY_TEXTS

pytestmark = pytest.mark.export


def test_int8_embeddings_and_labels_pass_the_gate(tiny_st: Path, encoder_dir: Path, tmp_path: Path) -> None:
    from checkpoints import write_sequence_classifier

    out = export_model(tiny_st, tmp_path / "st8", quantize="int8")
    manifest = json.loads((out / "edgeroute.json").read_text())
    q = manifest["provenance"]["quality"]
    assert manifest["precision"] == "int8" and manifest["quantization"]["per_channel"] is True
    assert q["passed"] and not q["forced"] and q["texts"] == len(QUALITY_TEXTS)
    assert q["thresholds"] == dict(GATES["embedding"]) and q["min_cosine"] >= 0.98
    assert not (out / "fp32").exists()
    fp32, int8 = er.EncoderModel.load(encoder_dir), er.EncoderModel.load(out)
    a = fp32.embed(QUALITY_TEXTS[:8], overflow="truncate").vectors
    b = int8.embed(QUALITY_TEXTS[:8], overflow="truncate").vectors
    assert not np.array_equal(a, b) and 0.98 <= float((a * b).sum(1).min()) <= 1.0 + 1e-6  # close, and not fp32
    cls = write_sequence_classifier(tmp_path / "cls")
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(QUALITY_TEXTS[:10]) + "\n\n")
    res = CliRunner().invoke(
        cli,
        [
            "export",
            str(cls),
            str(tmp_path / "cls8"),
            "--quantize",
            "int8",
            "--quality-texts",
            str(texts),
            "--per-tensor",
        ],
    )
    assert res.exit_code == 0 and "int8 against fp32 over 10 texts: label agreement" in res.output, res.output
    manifest = json.loads((tmp_path / "cls8" / "edgeroute.json").read_text())
    assert manifest["quantization"]["per_channel"] is False and manifest["provenance"]["quality"]["passed"]


def test_fp16_for_cuda_is_measured_like_int8(tiny_st: Path, encoder_dir: Path, tmp_path: Path) -> None:
    """``--dtype fp16``: the fp32 graph cast (inputs and outputs float32), measured against fp32 on the CPU."""
    res = CliRunner().invoke(cli, ["export", str(tiny_st), str(tmp_path / "fp16"), "--dtype", "fp16"])
    assert res.exit_code == 0 and "fp16 against fp32 over 64 texts: min cosine" in res.output, res.output
    manifest = json.loads((tmp_path / "fp16" / "edgeroute.json").read_text())
    assert manifest["precision"] == "fp16" and manifest["provenance"]["quality"]["passed"]
    import onnx

    graph = onnx.load(str(tmp_path / "fp16" / "model.onnx"))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.graph.initializer)
    a = er.EncoderModel.load(encoder_dir).embed(QUALITY_TEXTS[:8], overflow="truncate").vectors
    b = er.EncoderModel.load(tmp_path / "fp16").embed(QUALITY_TEXTS[:8], overflow="truncate").vectors
    # fp16 changed the vectors (not the fp32 graph again), and they stay within the gate's cosine; a cosine may
    # round to exactly 1.0 in float32 even where the vectors differ, so the difference is checked on the vectors.
    assert b.dtype == np.float32 and not np.array_equal(a, b)
    assert 0.999 <= float((a * b).sum(1).min()) <= 1.0 + 1e-6


def broken_tagger(folder: Path) -> Path:
    """A tiny tagger whose hidden feature 0 is always zero (every LayerNorm's weight and bias there), with a huge
    weight reading that feature in every projection: nothing in fp32, but int8's per-tensor scale rounds every
    other weight of those layers to zero."""
    import torch
    import transformers
    from checkpoints import write_token_classifier

    write_token_classifier(folder)
    model = transformers.AutoModelForTokenClassification.from_pretrained(folder)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight[0] = module.bias[0] = 0.0
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.in_features == model.config.hidden_size:
                module.weight[0, 0] = 1000.0
    model.save_pretrained(folder)
    return folder


def test_the_gate_refuses_a_broken_int8_model_unless_forced(tmp_path: Path) -> None:
    source = broken_tagger(tmp_path / "broken")
    run = CliRunner().invoke
    out = tmp_path / "int8"
    res = run(cli, ["export", str(source), str(out), "--quantize", "int8"])
    assert res.exit_code == 1 and "entity f1 against fp32 is" in res.output and "--force-quality" in res.output
    assert "Traceback" not in res.output and not out.exists() and not list(tmp_path.glob(".edgeroute-*"))
    res = run(cli, ["export", str(source), str(out), "--quantize", "int8", "--per-tensor", "--force-quality"])
    assert res.exit_code == 0 and "BELOW THE GATE" in res.output and "warning:" in res.output, res.output
    forced = json.loads((out / "edgeroute.json").read_text())["provenance"]["quality"]
    assert forced["forced"] and not forced["passed"] and forced["entity_f1"] < 0.5
    fp32 = export_model(source, tmp_path / "fp32")  # the broken checkpoint is fine in fp32
    assert json.loads((fp32 / "edgeroute.json").read_text())["provenance"]["validation"]["same_labels"]
    res = run(cli, ["export", str(source), str(tmp_path / "pc"), "--quantize", "int8", "--force-quality"])
    per_channel = json.loads((tmp_path / "pc" / "edgeroute.json").read_text())["provenance"]["quality"]
    assert per_channel["entity_f1"] > forced["entity_f1"] + 0.3  # the outlier spoils one channel, not the layer
    assert not per_channel["passed"]  # (refused above: per channel is the default)
    model, reference = er.EncoderModel.load(out), er.EncoderModel.load(fp32)
    assert model.entities(QUALITY_TEXTS[:4]) != reference.entities(QUALITY_TEXTS[:4])


def test_encoder_precision_mistakes(tiny_st: Path, tmp_path: Path) -> None:
    run = CliRunner().invoke
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    for args, needle in (
        (["--quantize", "int4"], "quantize"),
        (["--per-tensor"], "add --quantize int8"),
        (["--force-quality"], "for int8 and fp16"),
        (["--quantize", "int8", "--quality-texts", str(empty)], "2 to"),
        (["--dtype", "fp16", "--quantize", "int8"], "dtype"),
        (["--block-size", "64"], "block_size"),
    ):
        res = run(cli, ["export", str(tiny_st), str(tmp_path / "x"), *args])
        assert res.exit_code == 1 and needle in res.output and "Traceback" not in res.output, (args, res.output)
        assert not (tmp_path / "x").exists()
    with pytest.raises(er.ConfigError) as e:
        export_model(tmp_path / "nothing.gguf", tmp_path / "y", per_tensor=True)
    assert e.value.field == "per_tensor"
    np.testing.assert_equal(len(set(QUALITY_TEXTS)), len(QUALITY_TEXTS))
