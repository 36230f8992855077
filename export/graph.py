"""Graph post-processing: last-positions logits, fp16, int8 and int4 weight quantisation, and reading the
graph's contract (names, KV geometry) for the manifest. Needs ``onnx`` (and onnxruntime's quantisation tools)."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any

import numpy as np
from edgeroute.contract import DEFAULT_INPUTS, GraphContract, Name
from edgeroute.errors import ExportError

from .steps import NO_STEP, Stages, Step

KEEP_INPUT = Name.LOGITS_TO_KEEP  # the graph name edgeroute gives it, as its logical name
DATA_SUFFIX = ".data"
_PASSTHROUGH = {"Add", "Mul", "Div", "Sub", "Tanh", "Cast", "Identity"}


def load(path: Path) -> Any:
    import onnx

    return onnx.load(str(path), load_external_data=True)


def save(model: Any, path: Path) -> None:
    """Save with all weights in one external data file beside the graph (``model.onnx.data``)."""
    import onnx

    data = path.name + DATA_SUFFIX
    onnx.save_model(
        model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data, size_threshold=1024
    )


def add_logits_to_keep(model: Any, logits_name: str = "logits") -> Any:
    """Add an int64 input ``logits_to_keep`` (shape [1]) and compute logits for the last n positions only.

    The hidden state entering the LM head's MatMul is sliced to its last n positions, so a 1,000-token prefill
    never materialises a [1000, vocabulary] array; speculative verification asks for k+1.
    """
    import onnx
    from onnx import TensorProto, helper

    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    inits = {i.name for i in g.initializer}
    node = producer.get(logits_name)
    while node is not None and node.op_type in _PASSTHROUGH:
        acts = [i for i in node.input if i not in inits and i in producer]
        if len(acts) != 1:
            break
        node = producer[acts[0]]
    if node is None or node.op_type not in ("MatMul", "Gemm"):
        raise ExportError(f"cannot find the LM head MatMul feeding {logits_name!r}: graph form not supported")
    act_idx = 0 if node.input[0] not in inits else 1
    hidden = node.input[act_idx]
    g.input.append(helper.make_tensor_value_info(KEEP_INPUT, TensorProto.INT64, [1]))
    g.initializer.extend(
        [
            helper.make_tensor("edgeroute_keep_end", TensorProto.INT64, [1], [2**62]),
            helper.make_tensor("edgeroute_keep_axis", TensorProto.INT64, [1], [-2]),
        ]
    )
    neg = helper.make_node("Neg", [KEEP_INPUT], ["edgeroute_keep_start"], name="edgeroute_keep_neg")
    sl = helper.make_node(
        "Slice",
        [hidden, "edgeroute_keep_start", "edgeroute_keep_end", "edgeroute_keep_axis"],
        ["edgeroute_hidden_last"],
        name="edgeroute_keep_slice",
    )
    node.input[act_idx] = "edgeroute_hidden_last"
    pos = list(g.node).index(node)
    g.node.insert(pos, sl)
    g.node.insert(pos, neg)
    for o in g.output:
        if o.name == logits_name and len(o.type.tensor_type.shape.dim) == 3:
            o.type.tensor_type.shape.dim[1].dim_param = "logits_length"
    if model.ByteSize() < 2**31:  # the checker cannot hold larger protos in memory
        onnx.checker.check_model(model)
    return model


def to_fp16(model: Any, logits_name: str = "logits") -> Any:
    """Weights and activations in fp16, the KV cache fp16, logits kept float32 for the router."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(model, keep_io_types=[logits_name], disable_shape_infer=True)


def _weight_matmuls(model: Any) -> list[tuple[Any, Any]]:
    """``(node, weight initializer)`` for every MatMul whose second input is a constant 2-D weight."""
    inits = {i.name: i for i in model.graph.initializer}
    return [
        (n, inits[n.input[1]])
        for n in model.graph.node
        if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in inits and len(inits[n.input[1]].dims) == 2
    ]


def fold_constant_transposes(model: Any) -> Any:
    """Replace ``Transpose(initializer)`` by a transposed initializer.

    optimum's graphs of tied-embedding models (SmolLM2) feed the LM head ``Transpose(embed_tokens)``: folding it
    makes the LM head a MatMul with a constant weight, so it is quantised like every other projection.
    """
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    for node in list(model.graph.node):
        if node.op_type == "Transpose" and node.input[0] in inits:
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            arr = numpy_helper.to_array(inits[node.input[0]]).transpose(perm)
            model.graph.initializer.append(numpy_helper.from_array(arr.copy(), node.output[0]))
            model.graph.node.remove(node)
    return model


def quantize_weights(
    src: Path,
    dst: Path,
    bits: int,
    block_size: int = 32,
    accuracy_level: int = 4,
    calibration: tuple[list[int], int, GraphContract] | None = None,
    head_bits: int | None = None,
    stages: Stages | None = None,
) -> dict[str, Any]:
    """Block-wise weight quantisation of every MatMul with a constant weight (LM head included) to
    onnxruntime's MatMulNBits, activations quantised to int8 per block at run time (accuracy level 4).

    4 bits: edgeroute's own asymmetric quantiser with a searched scale per block (``quant4``), each input channel's
    error weighted by its mean squared activation over ``calibration = (token ids, context length, the graph's
    contract)`` when given
    (``calibrate.importance``; None: unweighted). 8 bits: onnxruntime's
    symmetric round-to-nearest (94.5% top-1 / +0.1% perplexity on SmolLM2 at block 32: nothing to win there).
    ``head_bits=8`` with ``bits=4`` quantises the LM head (and so the tied embedding that reads its table) with the
    8-bit scheme first, then every other MatMul with 4 bits (Gemma 3 270M: +17% perplexity instead of +21%).
    Why not onnxruntime's ``quantize_dynamic`` for int8: its per-tensor activation scales meet SmolLM2's
    activation outliers (MLP down_proj inputs) and measured 57% top-1 agreement / +67% perplexity.
    ``stages`` reports the steps (``edgeroute.export.steps``): ``calibrate`` (with calibration: reading the graph
    and its calibration chunks) and ``quantise`` (the weights quantised, the graph written).
    """
    stages = stages or Stages()
    calibrating = bits == 4 and calibration is not None
    calibrated = None
    head_bits = head_bits or bits
    with contextlib.ExitStack() as stack:  # reading the graph belongs to the first step: calibrate or quantise
        step = stack.enter_context(stages("calibrate" if calibrating else "quantise"))
        model = fold_constant_transposes(load(src))
        tied = _tied_embeddings(model)
        if head_bits != bits:  # the LM head (and a tied embedding, which reads its weights) at its precision first
            head = _lm_head(model)
            if head is None:
                raise ExportError("the graph has no MatMul LM head whose precision --head could set")
            model = _quantize_int8(model, block_size, accuracy_level, [head.name])
        weights = None
        if calibrating and calibration is not None:
            from . import calibrate

            ids, context, contract = calibration
            names = sorted({node.input[0] for node, _ in _weight_matmuls(model)})
            weights = calibrate.importance(src, names, ids, context, contract, step)
            calibrated = {"tokens": len(ids), "text": "edgeroute built-in"}
            stack.close()  # calibrated: the quantise step starts
            step = stack.enter_context(stages("quantise"))
        if bits == 4:
            _quantize_int4(model, block_size, accuracy_level, weights, step)
            weighted = " weighted by calibration activations" if weights is not None else ""
            scheme = f"MatMulNBits (weight-only, asymmetric, searched scales{weighted}, int8 activations)"
        else:
            step.total(len(_weight_matmuls(model)))  # onnxruntime's quantiser does them all in one call
            model = _quantize_int8(model, block_size, accuracy_level)
            step.advance(sum(1 for node in model.graph.node if node.op_type == "MatMulNBits"))
            scheme = "MatMulNBits (weight-only, symmetric RTN, int8 activations)"
        shared = _share_quantized_embeddings(model, tied, head_bits, block_size)
        save(model, dst)
    n = sum(1 for node in model.graph.node if node.op_type == "MatMulNBits")
    return {
        "method": f"int{bits}",
        "scheme": scheme,
        "bits": bits,
        "block_size": block_size,
        "accuracy_level": accuracy_level,
        "nodes": n,
        "calibration": calibrated or "none",
        "lm_head": f"int{head_bits}",
        "embedding": "shares the LM head's quantised weights" if shared else "float",
    }


def _quantize_int8(model: Any, block_size: int, accuracy_level: int, only: list[str] | None = None) -> Any:
    """onnxruntime's symmetric 8-bit round-to-nearest MatMulNBits for every MatMul with a constant weight (or the
    nodes named in ``only``); returns the new model."""
    import logging

    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    matmuls = _weight_matmuls(model)
    sizes = sorted({int(init.dims[0]) for n, init in matmuls if only is None or n.name in only})
    if any(k % block_size for k in sizes):
        raise ExportError(f"int8 block size {block_size} does not divide the weights' input sizes {sizes}")
    others = [n.name for n, _ in matmuls if only is not None and n.name not in only]
    q = MatMulNBitsQuantizer(
        model, bits=8, block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level, nodes_to_exclude=others
    )
    q.process()
    return q.model.model


def _lm_head(model: Any) -> Any:
    """The MatMul with a constant weight that computes the logits: the one whose weight has the vocabulary's width
    (the ``logits`` output's last dimension), the last such in the graph."""
    out = next((o for o in model.graph.output if o.name == "logits"), None)
    dims = out.type.tensor_type.shape.dim if out is not None else []
    vocab = dims[-1].dim_value if dims and dims[-1].HasField("dim_value") else None
    heads = [n for n, init in _weight_matmuls(model) if vocab is not None and int(init.dims[1]) == vocab]
    return heads[-1] if heads else None


def _quantize_int4(
    model: Any,
    block_size: int,
    accuracy_level: int,
    importance: dict[str, np.ndarray] | None = None,
    step: Step = NO_STEP,
) -> None:
    """Replace every MatMul with a constant 2-D weight by a 4-bit MatMulNBits (``quant4`` layout), in place;
    ``importance`` maps a MatMul's input tensor to its per-channel error weights; ``step`` counts the weights."""
    from onnx import helper, numpy_helper

    from . import quant4

    g = model.graph
    matmuls = _weight_matmuls(model)
    step.total(len(matmuls))
    for node, init in matmuls:
        w = numpy_helper.to_array(init)
        k, n = w.shape
        h = None if importance is None else importance[node.input[0]]
        packed, scales, zeros = quant4.quantize(w, block_size, h)
        name = init.name
        new = [
            numpy_helper.from_array(packed, f"{name}_Q4"),
            numpy_helper.from_array(scales, f"{name}_scales"),
            numpy_helper.from_array(zeros, f"{name}_zero_points"),
        ]
        g.initializer.extend(new)
        q = helper.make_node(
            "MatMulNBits", [node.input[0], *(t.name for t in new)], list(node.output), f"{node.name}_Q4",
            domain="com.microsoft", K=k, N=n, bits=4, block_size=block_size, accuracy_level=accuracy_level,
        )  # fmt: skip
        g.node.insert(list(g.node).index(node), q)
        g.node.remove(node)
        if not any(name in other.input for other in g.node):
            g.initializer.remove(init)
        step.advance()
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def _tied_embeddings(model: Any) -> list[tuple[str, str]]:
    """``(gather node name, matmul output)`` pairs where an embedding table ``E`` [V, K] feeds a Gather and its
    transpose is the constant weight of a MatMul (a tied LM head)."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    pairs = []
    for g in model.graph.node:
        if g.op_type != "Gather" or g.input[0] not in inits:
            continue
        e = inits[g.input[0]]
        for mm in model.graph.node:
            if (
                mm.op_type != "MatMul"
                or mm.input[1] not in inits
                or list(inits[mm.input[1]].dims) != list(e.dims)[::-1]
            ):
                continue
            if np.array_equal(numpy_helper.to_array(inits[mm.input[1]]).T, numpy_helper.to_array(e)):
                pairs.append((g.name, mm.output[0]))
    return pairs


def _share_quantized_embeddings(model: Any, tied: list[tuple[str, str]], bits: int, block_size: int) -> bool:
    """Make each tied embedding Gather read the LM head's MatMulNBits weights (GatherBlockQuantized, as
    onnxruntime-genai does) so the float table is not kept too: -113 MB for SmolLM2."""
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    done = False
    for gather_name, mm_out in tied:
        gather = next((n for n in g.node if n.name == gather_name), None)
        q = next((n for n in g.node if n.op_type == "MatMulNBits" and n.output[0] == mm_out), None)
        if gather is None or q is None:
            continue
        table = inits[gather.input[0]]
        if int(table.dims[1]) % block_size:  # padded blocks: the gathered rows would be too long
            continue
        parts = [inits[q.input[1]], inits[q.input[2]]]
        if len(q.input) > 3 and q.input[3]:
            parts.append(inits[q.input[3]])  # zero points, packed like the weights
        shape = numpy_helper.from_array(np.array([int(parts[0].dims[0]), -1], dtype=np.int64), f"{gather_name}/shape")
        g.initializer.append(shape)
        i = list(g.node).index(gather)
        flat = [f"{gather_name}/{part}" for part in ("q", "scales", "zero_points")[: len(parts)]]
        for j, (t, out) in enumerate(zip(parts, flat, strict=True)):
            g.node.insert(i + j, helper.make_node("Reshape", [t.name, shape.name], [out], f"{out}/Reshape"))
        g.node.insert(i + len(parts), helper.make_node(
            "GatherBlockQuantized", [flat[0], gather.input[1], *flat[1:]],
            list(gather.output), f"{gather_name}/Quantized", domain="com.microsoft",
            bits=bits, block_size=block_size, gather_axis=0, quantize_axis=1))  # fmt: skip
        g.node.remove(gather)
        if not any(table.name in n.input for n in g.node):
            g.initializer.remove(table)
        done = True
    return done


def describe(model: Any) -> GraphContract:
    """The graph's contract for the manifest: input/output names and patterns, KV geometry and dtype, vocab."""
    from onnx import TensorProto

    ins = {i.name: i for i in model.graph.input}
    outs = {o.name: o for o in model.graph.output}

    def pattern(names: list[str], kind: str) -> tuple[str, int]:
        keys = [n for n in names if n.endswith(f".{kind}") or n.endswith(f"_{kind}")]
        layers = sorted(int(re.findall(r"\d+", n)[-1]) for n in keys)
        if not keys or layers != list(range(len(layers))):
            raise ExportError(f"graph has no consistent {kind} cache inputs/outputs ({keys[:3]})")
        sample = keys[0]
        num = re.findall(r"\d+", sample)[-1]
        i = sample.rfind(num)
        return sample[:i] + "{layer}" + sample[i + len(num) :], len(layers)

    past_k, layers = pattern([n for n in ins if "past" in n], "key")
    past_v, _ = pattern([n for n in ins if "past" in n], "value")
    pres_k, _ = pattern([n for n in outs if "present" in n], "key")
    pres_v, _ = pattern([n for n in outs if "present" in n], "value")
    first = ins[past_k.format(layer=0)].type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in first.shape.dim]
    if len(dims) != 4 or dims[1] is None or dims[3] is None:
        raise ExportError(f"past key input has shape {dims}: expected [batch, kv_heads, length, head_size]")
    kv_dtype = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16"}.get(first.elem_type)
    if kv_dtype is None:
        raise ExportError(f"KV cache element type {first.elem_type} is not supported")
    logits_dims = outs["logits"].type.tensor_type.shape.dim
    vocab = logits_dims[-1].dim_value if logits_dims and logits_dims[-1].HasField("dim_value") else None
    inputs: dict[str, str | None] = {
        **DEFAULT_INPUTS,
        Name.POSITION_IDS: pos if (pos := DEFAULT_INPUTS[Name.POSITION_IDS]) in ins else None,
        Name.PAST_KEY: past_k,
        Name.PAST_VALUE: past_v,
    }
    if KEEP_INPUT in ins:
        inputs[Name.LOGITS_TO_KEEP] = KEEP_INPUT
    return GraphContract(
        num_layers=layers,
        num_kv_heads=dims[1],
        head_size=dims[3],
        vocab_size=vocab,
        inputs=inputs,
        outputs={Name.LOGITS: "logits", Name.PRESENT_KEY: pres_k, Name.PRESENT_VALUE: pres_v},
        logits="keep" if KEEP_INPUT in ins else "all",
        kv_dtype=kv_dtype,
    )
