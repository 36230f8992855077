"""A tiny synthetic decoder as an ONNX graph, with its manifest and a byte-level BPE tokenizer.

Two graph forms, as edgeroute's two KV layouts (``write_tiny_model(..., kv_layout=...)``):

``"concat"`` (default): the input/output contract of optimum's ``text-generation-with-past`` export (``input_ids``,
``attention_mask``, optional ``position_ids``, ``past_key_values.N.key/value`` -> ``logits``,
``present.N.key/value``), real causal attention over the KV cache with padding masks, learned position
embeddings (from ``position_ids``, or derived from the attention mask inside the graph when the graph has no
``position_ids`` input), and deterministic random weights.

``"shared"``: the contract of edgeroute's fused export, the runtime's default decode path: onnxruntime's
``GroupQueryAttention`` with rotary embeddings over one past/present buffer per layer that the runtime binds to
both (``seqlens_k``, ``total_sequence_length``, ``logits_to_keep`` inputs, no mask), a packed Q|K|V projection,
the LM head on the last ``logits_to_keep`` positions only. Both are built in milliseconds with no torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from edgeroute.contract import SHARED_GRAPH_INPUTS
from onnx import TensorProto, helper, numpy_helper
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Once upon a time a little robot learned to paint the sea and the sky.",
    "Hello world! edgeroute routes tokens with numpy outside the graph.",
    "El niño comió una manzana. Das Mädchen läuft schnell. 日本語のテキスト 🤖🎨",
] * 4
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(vocab_size: int = 320) -> Tokenizer:
    """A byte-level BPE tokenizer (GPT-2/SmolLM2 style): multi-byte characters split across tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok


def _t(name: str, arr: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(arr, name)


# The one set of defaults: write_tiny_model passes every field to both the graph and its manifest.
GEOMETRY = dict(
    num_layers=2, num_kv_heads=2, head_size=8, context_length=512, position_ids=True, kv_dtype="float32", logits="all"
)
WEIGHTS = dict(seed=0, logit_scale=3.0)


def build_graph(
    vocab: int,
    *,
    num_layers: int,
    num_kv_heads: int,
    head_size: int,
    context_length: int,
    position_ids: bool,
    kv_dtype: str,
    logits: str,
    seed: int,
    logit_scale: float,
) -> onnx.ModelProto:
    """The decoder graph (see the module docstring)."""
    rng = np.random.default_rng(seed)
    h, dh = num_kv_heads, head_size
    d = h * dh
    f = np.float32
    kv_elem = TensorProto.FLOAT if kv_dtype == "float32" else TensorProto.FLOAT16
    inits = [
        _t("emb", rng.normal(0, 1, (vocab, d)).astype(f)),
        _t("pos_emb", rng.normal(0, 0.5, (context_length, d)).astype(f)),
        _t("lm", (rng.normal(0, 1, (d, vocab)) * logit_scale / np.sqrt(d)).astype(f)),
        _t("one_f", np.array(1.0, f)),
        _t("neg_big", np.array(-1e9, f)),
        _t("scale", np.array(1 / np.sqrt(dh), f)),
        _t("one_i", np.array([1], np.int64)),
        _t("zero_i", np.array(0, np.int64)),
        _t("big_i", np.array([2**62], np.int64)),
        _t("axis1", np.array([1], np.int64)),
        _t("axes12", np.array([1, 2], np.int64)),
        _t("shape_bshd", np.array([0, 0, h, dh], np.int64)),
        _t("shape_bsd", np.array([0, 0, d], np.int64)),
    ]
    nodes: list[onnx.NodeProto] = []

    def n(op: str, ins: list[str], out: str, **kw: Any) -> str:
        nodes.append(helper.make_node(op, ins, [out], name=out, **kw))
        return out

    # sizes: S = new tokens, T = past + S, P = T - S
    n("Shape", ["input_ids"], "ids_shape")
    n("Gather", ["ids_shape", "one_i"], "S")  # [1]
    n("Shape", ["attention_mask"], "mask_shape")
    n("Gather", ["mask_shape", "one_i"], "T")
    n("Sub", ["T", "S"], "P")
    n("Squeeze", ["P"], "P0")
    # positions
    if position_ids:
        pos = "position_ids"
    else:
        n("CumSum", ["attention_mask", "axis1"], "cs")
        n("Sub", ["cs", "one_i"], "cs1")
        n("Max", ["cs1", "zero_i"], "cs2")
        n("Neg", ["S"], "negS")
        pos = n("Slice", ["cs2", "negS", "big_i", "axis1"], "pos_derived")
    n("Gather", ["emb", "input_ids"], "tok_x")
    n("Gather", ["pos_emb", pos], "pos_x")
    x = n("Add", ["tok_x", "pos_x"], "x0")
    # additive attention bias [B,1,S,T]: causal (offset by P) and padding
    n("Concat", ["S", "T"], "st", axis=0)
    n("ConstantOfShape", ["st"], "ones_st", value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0]))
    n("Trilu", ["ones_st", "P0"], "causal", upper=0)
    n("Cast", ["attention_mask"], "pad_f", to=TensorProto.FLOAT)
    n("Unsqueeze", ["pad_f", "axes12"], "pad_b")  # [B,1,1,T]
    n("Mul", ["causal", "pad_b"], "ok")
    n("Sub", ["one_f", "ok"], "not_ok")
    n("Mul", ["not_ok", "neg_big"], "attn_bias")

    graph_inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
    ]
    if position_ids:
        graph_inputs.append(helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]))
    graph_outputs = []
    for i in range(num_layers):
        for w in ("wq", "wk", "wv", "wo"):
            inits.append(_t(f"{w}{i}", rng.normal(0, 1 / np.sqrt(d), (d, d)).astype(f)))
        inits.append(_t(f"w1_{i}", rng.normal(0, 1 / np.sqrt(d), (d, 2 * d)).astype(f)))
        inits.append(_t(f"w2_{i}", rng.normal(0, 1 / np.sqrt(2 * d), (2 * d, d)).astype(f)))
        heads = {}
        for w in ("q", "k", "v"):
            n("MatMul", [x, f"w{w}{i}"], f"{w}{i}_flat")
            n("Reshape", [f"{w}{i}_flat", "shape_bshd"], f"{w}{i}_bshd")
            heads[w] = n("Transpose", [f"{w}{i}_bshd"], f"{w}{i}", perm=[0, 2, 1, 3])
        for kind in ("key", "value"):
            name = f"past_key_values.{i}.{kind}"
            graph_inputs.append(helper.make_tensor_value_info(name, kv_elem, ["batch", h, "past", dh]))
            graph_outputs.append(
                helper.make_tensor_value_info(f"present.{i}.{kind}", kv_elem, ["batch", h, "total", dh])
            )
            w = "k" if kind == "key" else "v"
            if kv_dtype == "float32":
                n("Concat", [name, heads[w]], f"present.{i}.{kind}", axis=2)
                heads[w + "_all"] = f"present.{i}.{kind}"
            else:
                n("Cast", [name], f"past{i}{w}_f", to=TensorProto.FLOAT)
                heads[w + "_all"] = n("Concat", [f"past{i}{w}_f", heads[w]], f"all{i}{w}", axis=2)
                n("Cast", [heads[w + "_all"]], f"present.{i}.{kind}", to=TensorProto.FLOAT16)
        n("Transpose", [heads["k_all"]], f"kt{i}", perm=[0, 1, 3, 2])
        n("MatMul", [heads["q"], f"kt{i}"], f"sc{i}")
        n("Mul", [f"sc{i}", "scale"], f"scs{i}")
        n("Add", [f"scs{i}", "attn_bias"], f"scm{i}")
        n("Softmax", [f"scm{i}"], f"att{i}", axis=-1)
        n("MatMul", [f"att{i}", heads["v_all"]], f"ctx{i}")
        n("Transpose", [f"ctx{i}"], f"ctxt{i}", perm=[0, 2, 1, 3])
        n("Reshape", [f"ctxt{i}", "shape_bsd"], f"ctxf{i}")
        n("MatMul", [f"ctxf{i}", f"wo{i}"], f"o{i}")
        x = n("Add", [x, f"o{i}"], f"xa{i}")
        n("MatMul", [x, f"w1_{i}"], f"m1_{i}")
        n("Tanh", [f"m1_{i}"], f"m1t_{i}")
        n("MatMul", [f"m1t_{i}", f"w2_{i}"], f"m2_{i}")
        x = n("Add", [x, f"m2_{i}"], f"xm{i}")
    if logits == "last":
        x = n("Slice", [x, "neg_one", "big_i", "axis1"], "x_last")
        inits.append(_t("neg_one", np.array([-1], np.int64)))
    n("MatMul", [x, "lm"], "logits")
    graph_outputs.insert(0, helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq_out", vocab]))
    graph = helper.make_graph(nodes, "tiny_decoder", graph_inputs, graph_outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def build_shared_graph(
    vocab: int,
    *,
    num_layers: int,
    num_kv_heads: int,
    head_size: int,
    context_length: int,
    seed: int,
    logit_scale: float,
    query_seqlens: bool = True,
) -> onnx.ModelProto:
    """The shared-KV decoder graph (see the module docstring); ``head_size`` a multiple of 16 (GQA's rotary).
    ``query_seqlens=False``: without that input, as exports before it were."""
    rng = np.random.default_rng(seed)
    h, dh = num_kv_heads, head_size
    d = h * dh
    f = np.float32
    inv = 1.0 / (10000.0 ** (np.arange(0, dh, 2, dtype=np.float64) / dh))
    angles = np.outer(np.arange(context_length, dtype=np.float64), inv)
    inits = [
        _t("emb", rng.normal(0, 1, (vocab, d)).astype(f)),
        _t("lm", (rng.normal(0, 1, (d, vocab)) * logit_scale / np.sqrt(d)).astype(f)),
        _t("cos", np.cos(angles).astype(f)),
        _t("sin", np.sin(angles).astype(f)),
        _t("keep_end", np.array([2**62], np.int64)),
        _t("axis1", np.array([1], np.int64)),
    ]
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["x0"], name="embed")]
    ins = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
        helper.make_tensor_value_info("logits_to_keep", TensorProto.INT64, [1]),
    ]
    if query_seqlens:
        ins.append(helper.make_tensor_value_info("query_seqlens", TensorProto.INT32, ["batch"]))
    query = [*[""] * 7, "query_seqlens"] if query_seqlens else []
    outs = []
    x = "x0"
    for i in range(num_layers):
        inits += [
            _t(f"wqkv{i}", rng.normal(0, 1 / np.sqrt(d), (d, 3 * d)).astype(f)),
            _t(f"wo{i}", rng.normal(0, 1 / np.sqrt(d), (d, d)).astype(f)),
            _t(f"w1_{i}", rng.normal(0, 1 / np.sqrt(d), (d, 2 * d)).astype(f)),
            _t(f"w2_{i}", rng.normal(0, 1 / np.sqrt(2 * d), (2 * d, d)).astype(f)),
        ]
        past, present = (
            [f"past_key_values.{i}.{k}" for k in ("key", "value")],
            [f"present.{i}.{k}" for k in ("key", "value")],
        )
        kv_dims = ["batch", h, "kv_length", dh]
        ins += [helper.make_tensor_value_info(n, TensorProto.FLOAT, kv_dims) for n in past]
        outs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, kv_dims) for n in present]
        nodes += [
            helper.make_node("MatMul", [x, f"wqkv{i}"], [f"qkv{i}"], name=f"qkv{i}"),
            helper.make_node(
                "GroupQueryAttention",
                [f"qkv{i}", "", "", *past, "seqlens_k", "total_sequence_length", "cos", "sin", *query],
                [f"att{i}", *present],
                name=f"gqa{i}",
                domain="com.microsoft",
                num_heads=h,
                kv_num_heads=h,
                do_rotary=1,
            ),
            helper.make_node("MatMul", [f"att{i}", f"wo{i}"], [f"o{i}"], name=f"o{i}"),
            helper.make_node("Add", [x, f"o{i}"], [f"xa{i}"], name=f"xa{i}"),
            helper.make_node("MatMul", [f"xa{i}", f"w1_{i}"], [f"m1_{i}"], name=f"m1_{i}"),
            helper.make_node("Tanh", [f"m1_{i}"], [f"m1t_{i}"], name=f"m1t_{i}"),
            helper.make_node("MatMul", [f"m1t_{i}", f"w2_{i}"], [f"m2_{i}"], name=f"m2_{i}"),
            helper.make_node("Add", [f"xa{i}", f"m2_{i}"], [f"xm{i}"], name=f"xm{i}"),
        ]
        x = f"xm{i}"
    nodes += [
        helper.make_node("Neg", ["logits_to_keep"], ["keep_start"], name="keep_start"),
        helper.make_node("Slice", [x, "keep_start", "keep_end", "axis1"], ["x_kept"], name="keep"),
        helper.make_node("MatMul", ["x_kept", "lm"], ["logits"], name="lm_head"),
    ]
    outs.insert(0, helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "kept", vocab]))
    graph = helper.make_graph(nodes, "tiny_shared_decoder", ins, outs, inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 8
    return model


def manifest_dict(
    vocab: int,
    tok: Tokenizer,
    *,
    num_layers: int,
    num_kv_heads: int,
    head_size: int,
    context_length: int,
    position_ids: bool,
    kv_dtype: str,
    logits: str,
    chat_template: str | None,
) -> dict[str, Any]:
    eos = tok.token_to_id("<|endoftext|>")
    im_end = tok.token_to_id("<|im_end|>")
    inputs = {"position_ids": "position_ids" if position_ids else None}
    return {
        "schema_version": 1,
        "graph": "model.onnx",
        "inputs": inputs,
        "logits": logits,
        "num_layers": num_layers,
        "num_kv_heads": num_kv_heads,
        "head_size": head_size,
        "kv_dtype": kv_dtype,
        "vocab_size": vocab,
        "context_length": context_length,
        "bos_token_id": None,
        "eos_token_ids": [eos, im_end],
        "pad_token_id": eos,
        "special_tokens": {"eos_token": "<|endoftext|>", "bos_token": "<|im_start|>"},
        "chat_template": chat_template,
        "generation_defaults": {},
        "precision": "fp32" if kv_dtype == "float32" else "fp16",
        "quantization": {"method": "none"},
        "provenance": {"source": "tests/tiny_model.py"},
    }


def write_tiny_model(folder: str | Path, **kw: Any) -> Path:
    """Write a complete tiny model folder (graph, tokenizer, manifest) and return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(kw.pop("tokenizer_vocab", 320))
    if kw.pop("thinking_tokens", False):  # <think> and </think> as one token each, not special (Qwen3's)
        tok.add_tokens([AddedToken("<think>", special=False), AddedToken("</think>", special=False)])
    vocab = tok.get_vocab_size()
    geometry = {k: kw.pop(k, v) for k, v in GEOMETRY.items()}
    weights = {k: kw.pop(k, v) for k, v in WEIGHTS.items()}
    chat_template = kw.pop("chat_template", CHATML)
    layout = kw.pop("kv_layout", "concat")
    query_seqlens = kw.pop("query_seqlens", True)
    if kw:
        raise TypeError(f"unknown tiny-model options {sorted(kw)}")
    if layout == "shared":
        geometry["head_size"] = max(16, geometry["head_size"])  # GroupQueryAttention's rotary
        shared = {k: geometry[k] for k in ("num_layers", "num_kv_heads", "head_size", "context_length")}
        graph = build_shared_graph(vocab, **shared, **weights, query_seqlens=query_seqlens)
        onnx.save(graph, str(folder / "model.onnx"))
    else:
        onnx.save(build_graph(vocab, **geometry, **weights), str(folder / "model.onnx"))
    tok.save(str(folder / "tokenizer.json"))
    manifest = manifest_dict(vocab, tok, **geometry, chat_template=chat_template)
    if layout == "shared":
        inputs = {**SHARED_GRAPH_INPUTS, **({} if query_seqlens else {"query_seqlens": None})}
        manifest.update(inputs=inputs, logits="keep", kv_layout="shared")  # the export's names
    (folder / "edgeroute.json").write_text(json.dumps(manifest, indent=2))
    return folder
