"""The fused backend: build a CPU-fast decoder graph straight from a Llama-family PyTorch checkpoint.

One graph serves prefill, chunked prefill, multi-token verification and decoding:

- embeddings ``Gather``; per layer ``SimplifiedLayerNormalization`` / ``SkipSimplifiedLayerNormalization`` (RMSNorm
  fused with the residual add), one packed Q|K|V ``MatMul`` (+ bias for Qwen2), onnxruntime's
  ``GroupQueryAttention`` with rotary embeddings inside (cos/sin tables computed by the checkpoint's own rotary
  module, so linear/llama3/yarn scaling come for free), ``o_proj``, one packed gate|up ``MatMul``, ``QuickGelu``
  with alpha 1 (SiLU) times up, ``down_proj``;
- the LM head runs on the last ``logits_to_keep`` positions only;
- the KV cache is one buffer per layer that is both the ``past`` input and the ``present`` output
  (``kv_layout: "shared"``): the runtime binds the same memory to both, so nothing is copied or concatenated per
  step. Its length is the runtime's context cap; ``seqlens_k`` (each row's total length - 1, int32),
  ``total_sequence_length`` (int32 scalar) and ``query_seqlens`` (each row's valid positions in this run, int32;
  the rest right padding) tell GroupQueryAttention what is valid, so rows of one run may append different numbers
  of positions after different pasts (scoring's continuations after one shared context).

Families differ in a few places, each described by a ``_Family`` read off the checkpoint:

- Qwen3 and Gemma 3 normalise queries and keys per head (RMSNorm over the head size) before the rotary
  embedding: the packed projection is split into q, k, v, normalised, and given to GroupQueryAttention apart;
- Gemma 3: RMSNorm weights of the form ``(1 + w)`` (folded into the constant), embeddings scaled by
  ``sqrt(hidden_size)``, a GELU-tanh gated MLP (``FastGelu``), norms before *and after* attention and the MLP
  (the post-norm's output is what the next fused norm adds to the residual), attention scaled by
  ``query_pre_attn_scalar ** -0.5``, and sliding-window layers with their own rotary base (two cos/sin tables);
- SmolLM3's NoPE layers run GroupQueryAttention without rotary;
- sliding windows are per layer (``layer_types``), as the checkpoint's own attention masks apply them.

Every MatMul has a constant weight, so ``graph.quantize_weights`` turns them all into MatMulNBits.

With ``lora`` (``export --lora-rank R``) the projections adapters may change also add ``(x·A)·B``, where ``A``
``[batch, in, rank]`` and ``B`` ``[batch, rank, out]`` are graph inputs, one matrix per row (``edgeroute.adapters``
says how the runtime fills them; zeros give the base model exactly). Packed projections pack their modules' LoRA
too: ``A`` side by side (``R`` columns per module), ``B`` block-diagonal. These MatMuls have no constant weight:
quantisation leaves them float.
Supported: llama, mistral, qwen2, phi3, qwen3, gemma3_text, smollm3 with static rotary embeddings. Anything else
goes through the optimum backend (``backend="optimum"``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from edgeroute.contract import DEFAULT_OUTPUTS, LORA_INPUT, SHARED_GRAPH_INPUTS, GraphContract, Name
from edgeroute.errors import ExportError

from .steps import NO_STEP, Step

FUSED_ARCHITECTURES = ("llama", "mistral", "qwen2", "phi3", "qwen3", "gemma3_text", "smollm3")
_STATIC_ROPE = (None, "default", "linear", "llama3", "yarn")
_GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new")  # the tanh approximation, as FastGelu computes it


def _activation(cfg: Any) -> str:
    if cfg.model_type == "gemma3_text":
        return str(getattr(cfg, "hidden_activation", None) or "gelu_pytorch_tanh")
    return str(getattr(cfg, "hidden_act", "silu"))


def unsupported_reason(model: Any) -> str | None:
    """Why ``model`` cannot take the fused backend, or None when it can."""
    cfg = model.config
    if cfg.model_type not in FUSED_ARCHITECTURES:
        return f"architecture {cfg.model_type!r} (fused: {', '.join(FUSED_ARCHITECTURES)})"
    act = _activation(cfg)
    if act not in ("silu", "swish", *_GELU_TANH):
        return f"activation {act!r} (fused: silu, gelu with tanh)"
    if getattr(cfg, "use_bidirectional_attention", False):
        return "bidirectional attention (fused: causal)"
    rope = getattr(cfg, "rope_scaling", None) or {}
    kind = rope.get("rope_type", rope.get("type"))
    if kind not in _STATIC_ROPE:
        return f"rope scaling {kind!r} depends on the sequence length (fused: {', '.join(map(str, _STATIC_ROPE))})"
    head = _head_size(cfg)
    if head % 16:
        return f"head size {head} (GroupQueryAttention's rotary needs a multiple of 16)"
    return None


def _head_size(cfg: Any) -> int:
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def _np(t: Any) -> np.ndarray:
    return t.detach().to("cpu").float().numpy()


def _rotary_tables(rot: Any, length: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin ``[length, rotary_dim / 2]`` from the checkpoint's own rotary module (scaling included)."""
    import torch

    pos = torch.arange(length, dtype=torch.int64)[None]
    with torch.no_grad():
        cos, sin = rot(torch.zeros(1, dtype=torch.float32), pos)
    half = cos.shape[-1] // 2
    return _np(cos[0, :, :half]).copy(), _np(sin[0, :, :half]).copy()


def _windows(cfg: Any, n_layers: int) -> list[int]:
    """Each layer's GroupQueryAttention ``local_window_size`` (-1: none): the checkpoint's ``sliding_window`` as is
    (checked against PyTorch in tests/test_fused.py; sliding_window - 1 or + 1 differ at every position past the
    window) on the layers whose mask is the sliding one (``layer_types``, as transformers builds its masks)."""
    sw = getattr(cfg, "sliding_window", None)
    if not sw or (cfg.model_type in ("qwen2", "qwen3", "smollm3") and not getattr(cfg, "use_sliding_window", False)):
        return [-1] * n_layers
    types = getattr(cfg, "layer_types", None)
    if types is None:  # mistral: every layer slides
        return [int(sw)] * n_layers
    return [int(sw) if t == "sliding_attention" else -1 for t in types]


class _Family:
    """What differs between the fused families, read off the checkpoint's config and modules."""

    def __init__(self, model: Any) -> None:
        cfg = model.config
        gemma = cfg.model_type == "gemma3_text"
        n = len(model.model.layers)
        self.norm_offset = 1.0 if gemma else 0.0  # Gemma's RMSNorm multiplies by (1 + w)
        self.embed_scale = float(cfg.hidden_size) ** 0.5 if gemma else None
        self.qk_norm = hasattr(model.model.layers[0].self_attn, "q_norm")
        self.post_norms = gemma  # post-attention and post-feed-forward norms before each residual add
        self.gelu = _activation(cfg) in _GELU_TANH
        self.scale = float(cfg.query_pre_attn_scalar) ** -0.5 if gemma else 0.0  # 0: 1/sqrt(head size)
        self.final_softcap = float(getattr(cfg, "final_logit_softcapping", None) or 0.0)
        self.windows = _windows(cfg, n)
        types = getattr(cfg, "layer_types", None) or ["full_attention"] * n
        # which cos/sin table each layer rotates with: "global", "local" (Gemma's sliding layers) or None (NoPE)
        self.rotary: list[str | None] = []
        for i, layer in enumerate(model.model.layers):
            if not getattr(layer.self_attn, "use_rope", True):
                self.rotary.append(None)
            elif gemma and types[i] == "sliding_attention":
                self.rotary.append("local")
            else:
                self.rotary.append("global")


def _linear(module: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """``(weight [in, out], bias [out] | None)`` of a ``torch.nn.Linear``."""
    w = _np(module.weight).T.copy()
    b = _np(module.bias) if getattr(module, "bias", None) is not None else None
    return w, b


def _qkv(layer: Any) -> tuple[np.ndarray, np.ndarray | None]:
    attn = layer.self_attn
    if hasattr(attn, "qkv_proj"):  # phi3: already packed q|k|v
        return _linear(attn.qkv_proj)
    parts = [_linear(getattr(attn, n)) for n in ("q_proj", "k_proj", "v_proj")]
    w = np.concatenate([p[0] for p in parts], axis=1)
    biases = [p[1] for p in parts]
    if all(b is None for b in biases):
        return w, None
    zeros = [np.zeros(p[0].shape[1], np.float32) for p in parts]
    b = np.concatenate([bb if bb is not None else z for bb, z in zip(biases, zeros, strict=True)])
    return w, b


def _gate_up(layer: Any) -> tuple[np.ndarray, np.ndarray | None]:
    mlp = layer.mlp
    if hasattr(mlp, "gate_up_proj"):  # phi3: gate first, then up
        return _linear(mlp.gate_up_proj)
    (wg, bg), (wu, bu) = _linear(mlp.gate_proj), _linear(mlp.up_proj)
    b = None if bg is None and bu is None else np.concatenate([bg, bu])
    return np.concatenate([wg, wu], axis=1), b


class _Builder:
    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.inits: list[Any] = []

    def const(self, name: str, arr: np.ndarray) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str], name: str, domain: str = "", **attrs: Any) -> None:
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain or None, **attrs))

    def linear(
        self, x: str, w: np.ndarray, b: np.ndarray | None, name: str, lora: tuple[str, str] | None = None
    ) -> str:
        """``x·w (+ b)``; with ``lora`` (the names of the row-wise inputs A and B) plus ``(x·A)·B``."""
        out = f"{name}/out"
        base = f"{name}/base" if lora else out
        mm = base if b is None else f"{name}/mm"
        self.node("MatMul", [x, self.const(f"{name}.weight", w)], [mm], f"{name}/MatMul")
        if b is not None:
            self.node("Add", [mm, self.const(f"{name}.bias", b)], [base], f"{name}/Add")
        if lora:
            self.node("MatMul", [x, lora[0]], [f"{name}/lora_a"], f"{name}/LoraA")
            self.node("MatMul", [f"{name}/lora_a", lora[1]], [f"{name}/lora_b"], f"{name}/LoraB")
            self.node("Add", [base, f"{name}/lora_b"], [out], f"{name}/LoraAdd")
        return out


def lora_layout(model: Any, rank: int, targets: tuple[str, ...] | None) -> dict[str, Any]:
    """The manifest's ``lora`` field for adapters of at most ``rank`` on ``targets`` (None: every linear module of
    the layers): each packed projection's input and output widths and the modules it takes (``edgeroute.adapters``).
    """
    cfg = model.config
    layer = model.model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    hidden = int(cfg.hidden_size)
    q_out, kv_out = cfg.num_attention_heads * _head_size(cfg), cfg.num_key_value_heads * _head_size(cfg)
    inter = int(mlp.down_proj.weight.shape[1])
    packed_qkv, packed_mlp = hasattr(attn, "qkv_proj"), hasattr(mlp, "gate_up_proj")
    qkv = [("qkv_proj", 0, q_out + 2 * kv_out)] if packed_qkv else [
        ("q_proj", 0, q_out), ("k_proj", q_out, kv_out), ("v_proj", q_out + kv_out, kv_out)]  # fmt: skip
    gate_up = [("gate_up_proj", 0, 2 * inter)] if packed_mlp else [("gate_proj", 0, inter), ("up_proj", inter, inter)]
    projections = {
        "qkv_proj": (hidden, q_out + 2 * kv_out, qkv),
        "o_proj": (q_out, hidden, [("o_proj", 0, hidden)]),
        "gate_up_proj": (hidden, 2 * inter, gate_up),
        "down_proj": (inter, hidden, [("down_proj", 0, hidden)]),
    }
    known = [m for _, _, subs in projections.values() for m, _, _ in subs]
    wanted = known if targets is None else list(targets)
    unknown = [t for t in wanted if t not in known]
    if unknown:
        raise ExportError(
            f"LoRA target(s) {', '.join(unknown)} are not linear modules of this model's layers (it has:"
            f" {', '.join(known)}); embeddings and the LM head stay the base's"
        )
    out: dict[str, Any] = {}
    for name, (width_in, width_out, subs) in projections.items():
        kept = [[m, off, w] for m, off, w in subs if m in wanted]
        if kept:
            out[name] = {"in": width_in, "out": width_out, "subs": kept}
    return {"rank": int(rank), "targets": [m for m in known if m in wanted], "projections": out}


def build_fused(
    model: Any, path: Path, max_positions: int, step: Step = NO_STEP, lora: dict[str, Any] | None = None
) -> GraphContract:
    """Write the fused graph of ``model`` (fp32) to ``path``; return its contract for the manifest. ``step`` counts
    the layers built; ``lora`` (:func:`lora_layout`) adds per-row adapter inputs."""
    from onnx import TensorProto, helper

    from . import graph as graph_io

    why = unsupported_reason(model)
    if why is not None:
        raise ExportError(f"the fused backend does not support {why}; use backend 'optimum'")
    cfg = model.config
    fam = _Family(model)
    layers = model.model.layers
    n_layers, heads, kv_heads = len(layers), cfg.num_attention_heads, cfg.num_key_value_heads
    head = _head_size(cfg)
    eps = float(cfg.rms_norm_eps)
    vocab = int(model.lm_head.weight.shape[0])
    inter = int(layers[0].mlp.down_proj.weight.shape[1])
    contract = GraphContract(
        n_layers, kv_heads, head, vocab, SHARED_GRAPH_INPUTS, DEFAULT_OUTPUTS, logits="keep", kv_layout="shared",
        lora=lora,
    )  # fmt: skip
    lora_in = {name: shape for name, shape in contract.lora_inputs()}
    ids_in, keep = str(contract.name(Name.INPUT_IDS)), str(contract.name(Name.LOGITS_TO_KEEP))
    seqlens, total = str(contract.name(Name.SEQLENS_K)), str(contract.name(Name.TOTAL_SEQUENCE_LENGTH))
    query = str(contract.name(Name.QUERY_SEQLENS))
    bld = _Builder()
    for kind in sorted({r for r in fam.rotary if r}):  # the tables some layer rotates with
        rot = model.model.rotary_emb_local if kind == "local" else model.model.rotary_emb
        cos, sin = _rotary_tables(rot, max_positions)
        bld.const(f"rotary.{kind}.cos", cos)
        bld.const(f"rotary.{kind}.sin", sin)
    bld.const("split.gate_up", np.array([inter, inter], dtype=np.int64))
    bld.node("Gather", [bld.const("embed_tokens.weight", _np(model.model.embed_tokens.weight)), ids_in],
             ["embed/gather" if fam.embed_scale else "embed/out"], "embed/Gather")  # fmt: skip
    if fam.embed_scale is not None:
        scale = bld.const("embed.scale", np.array(fam.embed_scale, dtype=np.float32))
        bld.node("Mul", ["embed/gather", scale], ["embed/out"], "embed/Scale")
    if fam.qk_norm:
        bld.const("split.qkv", np.array([heads * head, kv_heads * head, kv_heads * head], dtype=np.int64))
        bld.const("shape.q_heads", np.array([0, 0, heads, head], dtype=np.int64))
        bld.const("shape.kv_heads", np.array([0, 0, kv_heads, head], dtype=np.int64))
        bld.const("shape.flat", np.array([0, 0, -1], dtype=np.int64))
    residual, pending = "embed/out", None  # the residual stream, and the block output still to be added to it
    kv_dims = ["batch_size", kv_heads, "kv_length", head]
    ins = [
        helper.make_tensor_value_info(ids_in, TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info(seqlens, TensorProto.INT32, ["batch_size"]),
        helper.make_tensor_value_info(total, TensorProto.INT32, []),
        helper.make_tensor_value_info(keep, TensorProto.INT64, [1]),
        helper.make_tensor_value_info(query, TensorProto.INT32, ["batch_size"]),
    ]
    outs = []
    step.total(n_layers)

    def adapted(i: int, proj: str) -> tuple[str, str] | None:
        """The LoRA inputs of layer ``i``'s ``proj`` (declared here), or None when adapters do not change it."""
        a, b = (LORA_INPUT.format(layer=i, projection=proj, side=side) for side in "AB")
        if a not in lora_in:
            return None
        for name in (a, b):
            ins.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch_size", *lora_in[name]]))
        return a, b

    def weight(w: Any, name: str) -> str:
        return bld.const(f"{name}.weight", _np(w) + np.float32(fam.norm_offset))

    def norm(w: Any, name: str) -> str:
        nonlocal residual, pending
        if pending is None:
            bld.node("SimplifiedLayerNormalization", [residual, weight(w, name)], [f"{name}/out"], name, axis=-1,
                     epsilon=eps)  # fmt: skip
        else:
            bld.node("SkipSimplifiedLayerNormalization", [residual, pending, weight(w, name)],
                     [f"{name}/out", "", "", f"{name}/sum"], name, domain="com.microsoft", epsilon=eps)  # fmt: skip
            residual, pending = f"{name}/sum", None
        return f"{name}/out"

    def plain_norm(x: str, w: Any, name: str) -> str:
        bld.node("SimplifiedLayerNormalization", [x, weight(w, name)], [f"{name}/out"], name, axis=-1, epsilon=eps)
        return f"{name}/out"

    def head_norm(x: str, w: Any, shape: str, name: str) -> str:
        """RMSNorm over each head's vector: [B, S, H*D] -> [B, S, H, D] -> norm -> [B, S, H*D]."""
        bld.node("Reshape", [x, shape], [f"{name}/heads"], f"{name}/Reshape")
        y = plain_norm(f"{name}/heads", w, name)
        bld.node("Reshape", [y, "shape.flat"], [f"{name}/flat"], f"{name}/Flatten")
        return f"{name}/flat"

    for i, (layer, (past_k, past_v), (pres_k, pres_v)) in enumerate(
        zip(layers, contract.past_names(), contract.present_names(), strict=True)
    ):
        p = f"layers.{i}"
        attn = layer.self_attn
        x = norm(layer.input_layernorm.weight, f"{p}.input_layernorm")
        qkv = bld.linear(x, *_qkv(layer), f"{p}.attn.qkv_proj", adapted(i, "qkv_proj"))
        if fam.qk_norm:
            q, k, v = (f"{p}.attn/{n}" for n in ("q", "k", "v"))
            bld.node("Split", [qkv, "split.qkv"], [q, k, v], f"{p}.attn/Split", axis=-1)
            q = head_norm(q, attn.q_norm.weight, "shape.q_heads", f"{p}.attn.q_norm")
            k = head_norm(k, attn.k_norm.weight, "shape.kv_heads", f"{p}.attn.k_norm")
            qkv_in = [q, k, v]
        else:
            qkv_in = [qkv, "", ""]
        ins += [helper.make_tensor_value_info(n, TensorProto.FLOAT, kv_dims) for n in (past_k, past_v)]
        outs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, kv_dims) for n in (pres_k, pres_v)]
        rot = fam.rotary[i]
        rotary_in = [f"rotary.{rot}.cos", f"rotary.{rot}.sin"] if rot else ["", ""]
        # no attention softcap: transformers' Gemma 3 reads attn_logit_softcapping but never applies it
        extra = {"scale": fam.scale} if fam.scale else {}
        # inputs 9-15 (position ids, bias, sinks, KV scales, Q/K norms) unused; 16: each row's valid positions
        bld.node("GroupQueryAttention", [*qkv_in, past_k, past_v, seqlens, total, *rotary_in, *[""] * 7, query],
                 [f"{p}.attn/out", pres_k, pres_v], f"{p}.attn/GroupQueryAttention", domain="com.microsoft",
                 num_heads=heads, kv_num_heads=kv_heads, do_rotary=int(rot is not None), rotary_interleaved=0,
                 local_window_size=fam.windows[i], **extra)  # fmt: skip
        pending = bld.linear(f"{p}.attn/out", *_linear(attn.o_proj), f"{p}.attn.o_proj", adapted(i, "o_proj"))
        if fam.post_norms:
            pending = plain_norm(pending, layer.post_attention_layernorm.weight, f"{p}.post_attention_layernorm")
            x = norm(layer.pre_feedforward_layernorm.weight, f"{p}.pre_feedforward_layernorm")
        else:
            x = norm(layer.post_attention_layernorm.weight, f"{p}.post_attention_layernorm")
        gu = bld.linear(x, *_gate_up(layer), f"{p}.mlp.gate_up_proj", adapted(i, "gate_up_proj"))
        bld.node("Split", [gu, "split.gate_up"], [f"{p}.mlp/gate", f"{p}.mlp/up"], f"{p}.mlp/Split", axis=-1)
        if fam.gelu:
            bld.node("FastGelu", [f"{p}.mlp/gate"], [f"{p}.mlp/act"], f"{p}.mlp/GeluTanh", domain="com.microsoft")
        else:
            bld.node("QuickGelu", [f"{p}.mlp/gate"], [f"{p}.mlp/act"], f"{p}.mlp/SiLU", domain="com.microsoft",
                     alpha=1.0)  # fmt: skip
        bld.node("Mul", [f"{p}.mlp/act", f"{p}.mlp/up"], [f"{p}.mlp/prod"], f"{p}.mlp/Mul")
        pending = bld.linear(
            f"{p}.mlp/prod", *_linear(layer.mlp.down_proj), f"{p}.mlp.down_proj", adapted(i, "down_proj")
        )
        if fam.post_norms:
            pending = plain_norm(pending, layer.post_feedforward_layernorm.weight, f"{p}.post_feedforward_layernorm")
        step.advance()
    # the LM head sees only the last logits_to_keep positions: slice before the final norm
    bld.const("keep.end", np.array([2**62], dtype=np.int64))
    bld.const("keep.axis", np.array([1], dtype=np.int64))
    bld.node("Neg", [keep], ["keep/start"], "keep/Neg")
    for name in ("residual", "pending"):
        src = residual if name == "residual" else pending
        assert src is not None  # the last block left its output pending
        bld.node("Slice", [src, "keep/start", "keep.end", "keep.axis"], [f"keep/{name}"], f"keep/Slice_{name}")
    residual, pending = "keep/residual", "keep/pending"
    x = norm(model.model.norm.weight, "final_norm")
    head_out = bld.linear(x, _np(model.lm_head.weight).T.copy(), None, "lm_head")
    if fam.final_softcap:  # logits = cap * tanh(logits / cap)
        cap = bld.const("final_softcap", np.array(fam.final_softcap, dtype=np.float32))
        bld.node("Div", [head_out, cap], ["softcap/div"], "softcap/Div")
        bld.node("Tanh", ["softcap/div"], ["softcap/tanh"], "softcap/Tanh")
        bld.node("Mul", ["softcap/tanh", cap], ["softcap/out"], "softcap/Mul")
        head_out = "softcap/out"
    logits = contract.outputs[Name.LOGITS]
    bld.node("Identity", [head_out], [logits], "logits/Identity")
    outs.insert(0, helper.make_tensor_value_info(logits, TensorProto.FLOAT, ["batch_size", "logits_length", vocab]))
    g = helper.make_graph(bld.nodes, "edgeroute-fused", ins, outs, initializer=bld.inits)
    proto = helper.make_model(
        g,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
        producer_name="edgeroute",
    )
    proto.ir_version = 8
    graph_io.save(proto, path)
    return contract
