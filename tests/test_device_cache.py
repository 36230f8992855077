"""The device-resident KV cache (``runtime/device_cache.py``) on the CPU provider: the memory onnxruntime allocates
and binds by address, the copy graph, row views, and the captured-decode total, against the host-memory cache.
The same class on CUDA is exercised by ``test_cuda.py`` (``gpu`` marker)."""

from __future__ import annotations

from pathlib import Path

import edgeroute as er
import numpy as np
import pytest
from conftest import generate_in_threads
from edgeroute.device_cache import DeviceKVCache, _copy_graph
from edgeroute.kv_cache import SharedKVCache
from edgeroute.session import check_placement, node_placement

TEXTS = ["Once upon a time", "The robot painted a picture of the sea", "hello", "a b c d e f g h i j"]


@pytest.fixture(scope="module")
def shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("device") / "model", kv_layout="shared")


@pytest.fixture(scope="module")
def host(shared_dir: Path) -> er.Model:
    return er.Model.load(shared_dir, context_size=96)


@pytest.fixture(scope="module")
def device(shared_dir: Path) -> er.Model:
    model = er.Model.load(shared_dir, context_size=96, kv="device")
    assert model.kv == "device" and isinstance(model.new_cache(), DeviceKVCache)
    return model


def configs() -> list[er.GenerationConfig]:
    greedy = er.SamplingConfig(temperature=0)
    return [
        er.GenerationConfig(max_new_tokens=14, sampling=greedy),
        er.GenerationConfig(max_new_tokens=11, sampling=er.SamplingConfig(temperature=0.9, seed=3)),
        er.GenerationConfig(max_new_tokens=9, logprobs=2, sampling=er.SamplingConfig(top_k=5, seed=8)),
        er.GenerationConfig(max_new_tokens=12, prefill_chunk=3, sampling=greedy),
    ]


def test_placement_defaults_and_refusals(host: er.Model, shared_dir: Path, tiny_dir: Path) -> None:
    assert host.kv == "host" and type(host.new_cache()) is SharedKVCache  # the CPU default stays NumPy memory
    for kw, field in (
        ({"kv": "gpu"}, "kv"),
        ({"cuda_graph": True}, "cuda_graph"),  # CUDA graphs on the CPU provider
        ({"kv": "host", "cuda_graph": True}, "cuda_graph"),
    ):
        with pytest.raises(er.ConfigError) as e:
            er.Model.load(shared_dir, **kw)
        assert e.value.field == field
    with pytest.raises(er.ConfigError, match="shared KV buffer") as e:
        er.Model.load(tiny_dir, kv="device")  # a concatenated cache is host-only
    assert e.value.field == "kv"
    assert er.Model.load(tiny_dir).kv == "host"


def test_generation_equals_the_host_cache(host: er.Model, device: er.Model) -> None:
    """Greedy, seeded sampling with logprobs, chunked prefill; a batch of prompts (row views, one run per step)."""
    for text, cfg in zip(TEXTS, configs(), strict=True):
        a, b = host.generate(text, cfg), device.generate(text, cfg)
        assert b.token_ids == a.token_ids and b.text == a.text and len(b.token_ids) > 3
        if cfg.logprobs:
            assert [t.logprob for t in b.logprobs] == [t.logprob for t in a.logprobs]
    cfg = er.GenerationConfig(max_new_tokens=10, sampling=er.SamplingConfig(temperature=0.8, seed=2))
    assert [c.token_ids for c in device.generate(TEXTS, cfg)] == [c.token_ids for c in host.generate(TEXTS, cfg)]


def test_speculative_decoding_and_beam_search(host: er.Model, device: er.Model) -> None:
    """Rejected draft tokens rewind the cache (``trim``); beams copy rows inside device memory (``widen``,
    ``reorder``)."""
    cfg = er.GenerationConfig(max_new_tokens=16, sampling=er.SamplingConfig(temperature=0))
    spec = device.generate(TEXTS[1], cfg, draft="ngram", draft_k=4)
    assert spec.usage.draft_proposed > 0 and spec.token_ids == host.generate(TEXTS[1], cfg).token_ids
    beams = er.GenerationConfig(max_new_tokens=10, num_beams=3, num_return_sequences=3)
    a, b = host.generate(TEXTS[0], beams), device.generate(TEXTS[0], beams)
    assert [h.token_ids for h in b.sequences or ()] == [h.token_ids for h in a.sequences or ()]
    assert len(b.sequences or ()) == 3 and b.usage.beam_rows_copied > 0
    assert [h.score for h in b.sequences or ()] == pytest.approx([h.score for h in a.sequences or ()], abs=1e-6)


def test_row_copies_inside_device_memory(host: er.Model, device: er.Model) -> None:
    """``reorder`` with a cycle (row 0 <- 2, 2 <- 0: staged through a scratch buffer), ``widen`` and ``copy``
    leave exactly what the host cache's NumPy copies leave in every row's valid positions (the device copies
    whole rows, the host only the used positions: what lies beyond a row's length is never read)."""
    prompts = [host.encode_prompt(t) for t in TEXTS[:3]]
    caches = []
    for model in (host, device):
        cache = model.new_cache(3)
        cache.prefill_rows(model.session, prompts, 4)
        caches.append(cache)
    hc, dc = caches
    assert isinstance(hc, SharedKVCache) and isinstance(dc, DeviceKVCache)

    def same() -> None:
        np.testing.assert_array_equal(hc.lengths, dc.lengths)
        for h, d in zip(hc.buffers, dc.host_buffers(), strict=True):
            for r, n in enumerate(hc.lengths):
                np.testing.assert_array_equal(h[r, :, :n], d[r, :, :n])

    same()
    parents = np.array([2, 1, 0])
    assert hc.reorder(parents) == dc.reorder(parents) == 2
    same()
    twin = dc.copy()
    dc.widen(3)
    hc.widen(3)
    same()
    n = int(twin.lengths[1])
    assert not np.array_equal(twin.host_buffers()[0][1, :, :n], dc.host_buffers()[0][1, :, :n])  # the copy's own
    ids = np.array([[5], [6], [7]])
    np.testing.assert_array_equal(hc.run(host.session, ids, 1), dc.run(device.session, ids, 1))
    with pytest.raises(AttributeError, match="host_buffers"):
        _ = dc.buffers


def test_the_engine_batches_device_rows(host: er.Model, device: er.Model) -> None:
    cfgs = configs()
    alone = [host.generate(t, c) for t, c in zip(TEXTS, cfgs, strict=True)]
    with er.Engine(device, max_batch=3, prefill_budget=5) as engine:
        assert engine.mode == "batched"
        got = [r.result(timeout=60) for r in [engine.submit(t, c) for t, c in zip(TEXTS, cfgs, strict=True)]]
    assert [g.token_ids for g in got] == [a.token_ids for a in alone]


def test_a_captured_decode_total_at_the_capacity_gives_the_same_tokens(shared_dir: Path, host: er.Model) -> None:
    """Under CUDA graphs a decode step's total_sequence_length is held at the buffer's capacity (it cannot change
    between replays); GroupQueryAttention takes each row's length from seqlens_k, so the tokens do not change. The
    CPU provider runs the same binding with the total held (no graph ids: those need CUDA)."""
    model = er.Model.load(shared_dir, context_size=96, kv="device")
    assert model.device is not None
    model.device.hold_total = True
    cfg = configs()[1]
    cache = model.new_cache()
    gen = model.generator(cfg)
    gen.append(model.encode_prompt(TEXTS[1]))
    assert gen.run().token_ids == host.generate(TEXTS[1], cfg).token_ids
    cache.run(model.session, np.array([[3]]), 1)
    assert cache.binding is not None and int(cache.binding.total) == cache.capacity


def test_the_copy_graph_is_valid_onnx() -> None:
    """The copy graph is written without the onnx package; onnx's checker accepts it."""
    import onnx

    model = onnx.load_from_string(_copy_graph(3))
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node] == ["Identity"] * 3
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [onnx.TensorProto.UINT8] * 3


def test_a_gpu_session_refuses_compute_nodes_on_the_cpu(host: er.Model) -> None:
    """The placement onnxruntime recorded for the session; on another provider, compute operators placed on the CPU
    raise ProviderUnavailableError naming them, shape arithmetic does not."""
    placed = node_placement(host.session)
    assert list(placed) == ["CPUExecutionProvider"]
    assert host.node_providers() == {"CPUExecutionProvider": sum(placed["CPUExecutionProvider"].values())}
    with pytest.raises(er.ProviderUnavailableError, match=r"GroupQueryAttention x\d+.*MatMul x\d+"):
        check_placement(placed, "CUDAExecutionProvider")
    check_placement({"CUDAExecutionProvider": {"MatMul": 9}, "CPUExecutionProvider": {"Neg": 1, "Slice": 1}}, "x")


def test_generators_in_threads_share_the_device(host: er.Model, device: er.Model) -> None:
    """One model's generators in several threads: their caches are their own, the copy graph (beams) is shared."""
    cfg = er.GenerationConfig(max_new_tokens=10, num_beams=3)
    assert generate_in_threads(device, TEXTS, cfg) == [host.generate(t, cfg).token_ids for t in TEXTS]
