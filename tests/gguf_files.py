"""Small GGUF files written in the tests with the ``gguf`` package: a tiny random Llama whose tokenizer is a
SentencePiece BPE vocabulary (scores, byte fallback, control and user-defined pieces) trained here with
``sentencepiece``, in two flavours: Llama-style (space prefix, BOS added) and Gemma-style (no space prefix)."""

from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np

# the tokenizer test's text: English, code, digits, whitespace runs, CJK, emoji, accents, the special tokens
MIXED = (
    "The capital of France is Paris.  Hello   world!\n\n\tTabs\tand  spaces   \n"
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # 12345 678.90\n"
    "日本語のテキスト、中文文本。한국어 🤖🚀👍🏽 café naïve — “quotes” ’s 1,000,000 3.14159 0x1F\n"
)
TEXTS = ["", "Hi", " leading space", "a\n\n\nb   c  ", "The capital of France is"]
SMOLLM2_SPECIALS = "<|im_start|>user\nHi<|im_end|>\n<|endoftext|>  trailing  "
SPM_SPECIALS = "<start_of_turn>user\nHi<end_of_turn>\n<tool> x\n\n\ny <start_of_turn>"
PRE_TEXT = MIXED + " I'LL don't 1234567 x\r\n\r\n  \n y<|im_start|>"  # pre-tokenizers' cases
TRAINING = [
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "Once upon a time a little robot learned to paint the sea while the wind sang over the water.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "Numbers like 12345, 678.90 and 3.14159 appear in tables, in code and in prose.",
    "日本語のテキストと中文文本、そして한국어의 문장이 섞여 있습니다。",
    "Café, naïve, résumé: accents are characters too; “quotes” and dashes — as well.",
    "Hello world! Hello again, world. The world says hello back to the robot.",
] * 4
CONTROL = ["<start_of_turn>", "<end_of_turn>"]
USER_DEFINED = ["<tool>", "\n\n"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def spm_pieces(add_dummy_prefix: bool, vocab_size: int = 420) -> list[tuple[str, float, int]]:
    """``(piece, score, type)`` of a SentencePiece BPE model trained on ``TRAINING`` (types as GGUF numbers them)."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAINING),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        add_dummy_prefix=add_dummy_prefix,
        control_symbols=CONTROL,
        user_defined_symbols=USER_DEFINED,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_by_whitespace=False,
        hard_vocab_limit=False,
        minloglevel=2,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
    )
    proto = pb.ModelProto()
    proto.ParseFromString(buf.getvalue())
    return [(p.piece, float(p.score), int(p.type)) for p in proto.pieces]


def write_spm_gguf(path: Path, add_space_prefix: bool = True, seed: int = 0) -> Path:
    """A tiny random Llama (2 layers, hidden 64, head size 16) with a SentencePiece-style vocabulary."""
    import gguf

    pieces = spm_pieces(add_dummy_prefix=add_space_prefix)
    vocab = len(pieces)
    hidden, inter, layers, heads, kv_heads = 64, 96, 2, 4, 2
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-spm")
    w.add_context_length(512)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(hidden // heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list([p for p, _, _ in pieces])
    w.add_token_scores([s for _, s, _ in pieces])
    w.add_token_types([t for _, _, t in pieces])
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(add_space_prefix)
    w.add_chat_template(CHAT_TEMPLATE)
    rng = np.random.default_rng(seed)

    def t(name: str, *shape: int, scale: float = 0.08) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * scale).astype(np.float32))

    t("token_embd.weight", vocab, hidden, scale=0.5)
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))
        t(f"blk.{i}.attn_q.weight", hidden, hidden)
        t(f"blk.{i}.attn_k.weight", kv_heads * hidden // heads, hidden)
        t(f"blk.{i}.attn_v.weight", kv_heads * hidden // heads, hidden)
        t(f"blk.{i}.attn_output.weight", hidden, hidden)
        t(f"blk.{i}.ffn_gate.weight", inter, hidden)
        t(f"blk.{i}.ffn_up.weight", inter, hidden)
        t(f"blk.{i}.ffn_down.weight", hidden, inter)
    w.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    t("output.weight", vocab, hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@functools.lru_cache(maxsize=2)
def _vocab_fields(source: Path) -> dict[str, object]:
    """The vocabulary fields of ``source``, read once per process (gguf's reader takes ~2 s over 49k tokens)."""
    import gguf

    keys = ("tokens", "token_type", "merges", "bos_token_id", "eos_token_id")
    fields = gguf.GGUFReader(str(source)).fields
    return {f"tokenizer.ggml.{k}": fields[f"tokenizer.ggml.{k}"].contents() for k in keys}


def write_vocab_gguf(path: Path, source: Path, pre: str) -> Path:
    """A GGUF holding only ``source``'s byte-level BPE vocabulary (tokens, types, merges, special ids) under the
    pre-tokenizer name ``pre``, with a tiny Llama's hyper-parameters and no tensors: enough for llama.cpp's
    ``vocab_only`` load and for edgeroute's tokenizer builder."""
    import gguf

    get = _vocab_fields(source).__getitem__
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(512)
    w.add_embedding_length(64)
    w.add_block_count(1)
    w.add_feed_forward_length(96)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(get("tokenizer.ggml.tokens"))
    w.add_token_types(get("tokenizer.ggml.token_type"))
    w.add_token_merges(get("tokenizer.ggml.merges"))
    w.add_bos_token_id(int(get("tokenizer.ggml.bos_token_id")))  # type: ignore[call-overload]
    w.add_eos_token_id(int(get("tokenizer.ggml.eos_token_id")))  # type: ignore[call-overload]
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_hf_gguf(path: Path, ckpt: Path, arch: str, pre: str = "qwen2") -> Path:
    """``ckpt`` (a tiny transformers checkpoint with a byte-level BPE tokenizer.json) written as a GGUF of
    architecture ``arch`` with gguf's own tensor-name map, F32 weights and the tokenizer's vocabulary and merges."""
    import json

    import gguf
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32)
    cfg = model.config
    tok = json.loads((ckpt / "tokenizer.json").read_text())
    vocab = dict(tok["model"]["vocab"])
    vocab.update({t["content"]: t["id"] for t in tok["added_tokens"]})
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda p: p[1])]
    added = {t["id"] for t in tok["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    kind = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(kind, cfg.num_hidden_layers)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(float(cfg.rope_theta))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if i in added else 1 for i in range(len(tokens))])
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab["<|im_start|>"])
    w.add_eos_token_id(vocab["<|endoftext|>"])
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        w.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), tensor.numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
