"""The model folder contract: manifest loading, validation, and the graph/manifest match; provider errors."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import edgeroute as er
import onnxruntime as ort
import pytest
from edgeroute.manifest import Manifest


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit(folder: Path, **changes: object) -> None:
    path = folder / "edgeroute.json"
    data = json.loads(path.read_text())
    for k, v in changes.items():
        if v is ...:
            data.pop(k)
        else:
            data[k] = v
    path.write_text(json.dumps(data))


def test_roundtrip(tiny_dir: Path, tmp_path: Path) -> None:
    m = Manifest.load(tiny_dir)
    m.save(tmp_path)
    assert Manifest.load(tmp_path) == m
    assert m.past_names()[1] == ("past_key_values.1.key", "past_key_values.1.value")
    assert m.present_names()[0] == ("present.0.key", "present.0.value")


def test_missing_folder_and_files(tiny_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(er.ModelLoadError, match="not found"):
        er.Model.load(tmp_path / "nope")
    d = _copy(tiny_dir, tmp_path / "m1")
    (d / "edgeroute.json").unlink()
    with pytest.raises(er.ModelLoadError, match="edgeroute.json is missing"):
        er.Model.load(d)
    d = _copy(tiny_dir, tmp_path / "m2")
    (d / "model.onnx").unlink()
    with pytest.raises(er.ModelLoadError, match="graph file"):
        er.Model.load(d)
    d = _copy(tiny_dir, tmp_path / "m3")
    (d / "tokenizer.json").unlink()
    with pytest.raises(er.ModelLoadError, match="tokenizer.json is missing"):
        er.Model.load(d)


def test_corrupt_files(tiny_dir: Path, tmp_path: Path) -> None:
    d = _copy(tiny_dir, tmp_path / "c1")
    (d / "edgeroute.json").write_text("{not json")
    with pytest.raises(er.ManifestError, match="not valid JSON"):
        er.Model.load(d)
    d = _copy(tiny_dir, tmp_path / "c2")
    (d / "model.onnx").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(er.ModelLoadError, match="cannot load graph"):
        er.Model.load(d)
    d = _copy(tiny_dir, tmp_path / "c3")
    (d / "tokenizer.json").write_text('{"version": "1.0", "model": 5}')
    with pytest.raises(er.ModelLoadError, match="not a valid tokenizer"):
        er.Model.load(d)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"schema_version": 2}, "schema_version 2 is not supported"),
        ({"schema_version": ...}, "schema_version None"),
        ({"num_layers": ...}, "'num_layers' is missing"),
        ({"num_layers": 0}, "'num_layers' must be a positive integer"),
        ({"head_size": "8"}, "'head_size'"),
        ({"eos_token_ids": []}, "eos_token_ids"),
        ({"eos_token_ids": [10**9]}, "eos_token_ids"),
        ({"kv_dtype": "int8"}, "kv_dtype"),
        ({"logits": "some"}, "logits"),
        ({"graph": "../x.onnx"}, "graph"),
        ({"inputs": {"past_key": "past.key"}}, "must contain {layer}"),
        ({"surprise": 1}, "unknown field"),
        ({"chat_template": 5}, "chat_template"),
        ({"kv_layout": "paged"}, "kv_layout"),
        ({"kv_layout": "shared"}, "needs a name for 'seqlens_k'"),
        ({"inputs": {"attention_mask": None}}, "needs a name for 'attention_mask'"),
        (
            {"kv_layout": "shared", "inputs": {"seqlens_k": "s", "total_sequence_length": "t", "logits_to_keep": "k"}},
            "'logits' must be 'keep' with kv_layout 'shared'",
        ),
    ],
)
def test_bad_manifest_fields(tiny_dir: Path, tmp_path: Path, changes: dict, match: str) -> None:
    d = _copy(tiny_dir, tmp_path / "m")
    _edit(d, **changes)
    with pytest.raises(er.ManifestError, match=match):
        er.Model.load(d)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"num_layers": 3}, "missing inputs"),
        ({"num_layers": 1}, "undescribed inputs"),
        ({"inputs": {"position_ids": None}}, "undescribed inputs \\['position_ids'\\]"),
        ({"kv_dtype": "float16"}, "kv_dtype float16"),
        ({"num_kv_heads": 4}, "num_kv_heads"),
        ({"head_size": 16}, "head_size"),
        ({"vocab_size": 100}, "vocab_size"),
        ({"outputs": {"logits": "scores"}}, "missing outputs"),
        (
            {
                "kv_layout": "shared",
                "logits": "keep",
                "inputs": {"seqlens_k": "s", "total_sequence_length": "t", "logits_to_keep": "k"},
            },
            "missing inputs .*'s'",
        ),
    ],
)
def test_graph_must_match_manifest(tiny_dir: Path, tmp_path: Path, changes: dict, match: str) -> None:
    d = _copy(tiny_dir, tmp_path / "m")
    if "vocab_size" in changes:  # keep the EOS ids valid so the graph check is what fails
        _edit(d, eos_token_ids=[0], pad_token_id=0)
    _edit(d, **changes)
    with pytest.raises(er.ModelLoadError, match=match):
        er.Model.load(d)


def test_graph_without_position_ids_needs_manifest_to_say_so(make_tiny, tmp_path: Path) -> None:
    d = _copy(make_tiny(position_ids=False), tmp_path / "m")
    _edit(d, inputs={"position_ids": "position_ids"})
    with pytest.raises(er.ModelLoadError, match="missing inputs \\['position_ids'\\]"):
        er.Model.load(d)


def test_cuda_unavailable_names_what_is_installed(tiny_dir: Path) -> None:
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA; the error path needs a CPU-only onnxruntime")
    with pytest.raises(er.ProviderUnavailableError) as e:
        er.Model.load(tiny_dir, provider="cuda")
    msg = str(e.value)
    assert "cuda" in msg and ort.__version__ in msg and "CPUExecutionProvider" in msg
    assert er.available_providers() == ["cpu"]


def test_unknown_provider_and_bad_threads(tiny_dir: Path) -> None:
    with pytest.raises(er.ConfigError) as e:
        er.Model.load(tiny_dir, provider="tpu")
    assert e.value.field == "provider"
    with pytest.raises(er.ConfigError) as e:
        er.Model.load(tiny_dir, threads=0)
    assert e.value.field == "threads"


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this platform")
def test_default_threads_follow_the_cpus_the_process_may_use() -> None:
    """A process confined to some CPUs (taskset, a container's cpuset, an xdist worker) gets that many intra-op
    threads by default, not the machine's count."""
    from edgeroute.session import default_threads

    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(before)})
        assert default_threads() == 1
    finally:
        os.sched_setaffinity(0, before)
    assert default_threads() == len(before)
