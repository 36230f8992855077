"""edgeroute's 4-bit quantiser: MatMulNBits layout (checked against onnxruntime itself), padding, searched scales."""

from __future__ import annotations

import numpy as np
import pytest
from edgeroute.export import quant4


def _matmul_nbits(w_shape: tuple[int, int], packed, scales, zeros, block: int, x: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    k, n = w_shape
    node = helper.make_node(
        "MatMulNBits", ["X", "B", "S", "Z"], ["Y"], domain="com.microsoft", K=k, N=n, bits=4, block_size=block,
        accuracy_level=0,
    )  # fmt: skip
    inits = [numpy_helper.from_array(a, name) for a, name in ((packed, "B"), (scales, "S"), (zeros, "Z"))]
    g = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, n])], inits,
    )  # fmt: skip
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"X": x})[0]


@pytest.mark.parametrize(("k", "n", "block"), [(64, 48, 32), (96, 40, 64), (100, 24, 32), (576, 16, 128)])
def test_layout_is_what_onnxruntime_computes(k: int, n: int, block: int) -> None:
    """Our dequantisation equals onnxruntime's MatMulNBits over the same bytes (odd block counts, K padded)."""
    rng = np.random.default_rng(k + n)
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    w[:, 0] = 0.0  # an all-zero column
    w[:, 1] = np.abs(w[:, 1])  # all positive: the zero point sits at 0
    packed, scales, zeros = quant4.quantize(w, block)
    blocks = -(-k // block)
    assert packed.shape == (n, blocks, block // 2) and scales.shape == (n * blocks,)
    assert zeros.shape == (n * -(-blocks // 2),)
    deq = quant4.dequantize(packed, scales, zeros, k)
    assert np.all(deq[:, 0] == 0)
    x = rng.standard_normal((3, k)).astype(np.float32)
    assert np.allclose(_matmul_nbits((k, n), packed, scales, zeros, block, x), x @ deq, atol=1e-4)


def test_searched_scales_beat_round_to_nearest() -> None:
    """Each block's squared error is at most a plain min/max grid's (the search includes it and refits), and over
    a matrix clearly below the symmetric round-to-nearest grid the export used before (largest magnitude at -8)."""
    rng = np.random.default_rng(0)
    w = (rng.standard_t(4, size=(256, 64)) * 0.02).astype(np.float32)  # heavy tails, like real weights
    deq = quant4.dequantize(*quant4.quantize(w, 32), 256)
    blocks = w.T.reshape(64, 8, 32)
    lo, hi = np.minimum(blocks.min(-1), 0), np.maximum(blocks.max(-1), 0)
    s = (hi - lo) / 15
    z = np.clip(np.rint(-lo / s), 0, 15)
    rtn = (np.clip(np.rint(blocks / s[..., None]) + z[..., None], 0, 15) - z[..., None]) * s[..., None]
    err_rtn = ((rtn - blocks) ** 2).sum(-1)
    err = ((deq.T.reshape(64, 8, 32) - blocks) ** 2).sum(-1)
    assert np.all(err <= err_rtn * (1 + 1e-5))
    big = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1) / -8
    sym = np.clip(np.rint(blocks / big), -8, 7) * big
    assert err.sum() < 0.8 * ((sym - blocks) ** 2).sum()


def test_importance_weights_the_error_where_activations_are_large() -> None:
    """With per-channel importance the quantiser trades error on quiet channels for error on loud ones: the
    importance-weighted error (what a MatMul's output error is made of) falls well below the unweighted
    quantiser's; weights of 1 give exactly the unweighted result."""
    rng = np.random.default_rng(1)
    k, n = 256, 96
    w = (rng.standard_t(4, size=(k, n)) * 0.02).astype(np.float32)
    h = np.full(k, 0.05, dtype=np.float32)
    h[rng.choice(k, 24, replace=False)] = 20.0  # a few outlier channels, as in real activations
    plain = quant4.dequantize(*quant4.quantize(w, 32), k)
    weighted = quant4.dequantize(*quant4.quantize(w, 32, h), k)

    def err(d: np.ndarray) -> float:
        return float((h[:, None] * (d - w) ** 2).sum())

    assert err(weighted) < 0.7 * err(plain)
    same = quant4.quantize(w, 32, np.ones(k, dtype=np.float32))
    for a, b in zip(same, quant4.quantize(w, 32), strict=True):
        assert np.array_equal(a, b)
