"""The CUDA path on a GPU (``gpu`` marker; skipped, with the reason, where onnxruntime has no CUDA provider): the
tiny shared-KV model cast to fp16 runs with its KV cache in device memory, with and without CUDA graphs, in the
engine, against the CPU provider; an fp32 graph (GroupQueryAttention has no fp32 CUDA kernel) is refused."""

from __future__ import annotations

from pathlib import Path

import edgeroute as er
import numpy as np
import pytest
from edgeroute.device_cache import DeviceKVCache

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif("cuda" not in er.available_providers(), reason="needs a CUDA device and onnxruntime-gpu"),
]
TEXTS = ["Once upon a time", "The robot painted a picture of the sea", "hello", "a b c d e f g h i j"]
GREEDY = er.GenerationConfig(max_new_tokens=16, sampling=er.SamplingConfig(temperature=0))


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import json
    import shutil

    from edgeroute.export import graph
    from tiny_model import write_tiny_model

    fp32 = write_tiny_model(tmp_path_factory.mktemp("cuda") / "fp32", kv_layout="shared")
    fp16 = fp32.parent / "fp16"
    shutil.copytree(fp32, fp16)
    graph.save(graph.to_fp16(graph.load(fp32 / "model.onnx")), fp16 / "model.onnx")
    manifest = json.loads((fp16 / "edgeroute.json").read_text())
    manifest.update(kv_dtype="float16", precision="fp16")
    manifest.pop("files", None)
    (fp16 / "edgeroute.json").write_text(json.dumps(manifest))
    return {"fp32": fp32, "fp16": fp16}


def test_fp16_on_cuda_with_a_device_cache(folders: dict[str, Path]) -> None:
    gpu, cpu = er.Model.load(folders["fp16"], provider="cuda"), er.Model.load(folders["fp16"])
    assert gpu.kv == "device" and isinstance(gpu.new_cache(), DeviceKVCache)
    assert set(gpu.node_providers()) <= {"CUDAExecutionProvider", "CPUExecutionProvider"}
    ids = gpu.tokenizer.encode(TEXTS[1])
    a = gpu.forward_last(np.array([ids]), gpu.new_cache(), len(ids))[0]
    b = cpu.forward_last(np.array([ids]), cpu.new_cache(), len(ids))[0]
    assert np.abs(a - b).max() < 0.05 and np.mean(a.argmax(-1) == b.argmax(-1)) >= 0.9
    plain = [gpu.generate(t, GREEDY).token_ids for t in TEXTS]
    graphed = er.Model.load(folders["fp16"], provider="cuda", cuda_graph=True)
    assert [graphed.generate(t, GREEDY).token_ids for t in TEXTS] == plain  # captured once, replayed
    with er.Engine(graphed, max_batch=3, prefill_budget=5) as engine:
        assert [r.result(timeout=60).token_ids for r in [engine.submit(t, GREEDY) for t in TEXTS]] == plain
    beams = er.GenerationConfig(max_new_tokens=8, num_beams=3)
    assert (
        gpu.generate(TEXTS[0], beams).token_ids
        == er.Model.load(folders["fp16"], provider="cuda", kv="host").generate(TEXTS[0], beams).token_ids
    )


def test_an_fp32_fused_graph_is_refused_on_cuda(folders: dict[str, Path]) -> None:
    with pytest.raises(er.ProviderUnavailableError, match="GroupQueryAttention"):
        er.Model.load(folders["fp32"], provider="cuda")
