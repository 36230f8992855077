"""Tiny random-weight Hugging Face checkpoints (the export tests' sources), and building a folder once for the
whole run.

Test modules do not import one another: they take checkpoints and exports through conftest.py's session fixtures
(``checkpoint``, ``exported``, ``smollm2_dir``), which build each folder with :func:`build_once` the first time a
test asks for it. Under pytest-xdist the folder is shared by the workers: a file lock makes a second worker wait
for the first one's build and then reuse it, never build it again. ``tests/data/make_gguf_golden.py`` imports
:func:`make_checkpoint` from here.

torch and transformers are imported when a checkpoint is made, not when this module is imported.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: one process, nothing to lock against
    fcntl = None  # type: ignore[assignment]

COMMON = dict(  # head size 16: the smallest GroupQueryAttention's rotary takes (fused backend)
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)

NEW_FAMILIES = ("qwen3", "gemma3_text", "smollm3")


def _configs(vocab: int) -> dict[str, Any]:
    import transformers as t

    return {
        "llama": (t.LlamaConfig(vocab_size=vocab, **COMMON), t.LlamaForCausalLM),
        "mistral": (t.MistralConfig(vocab_size=vocab, sliding_window=None, **COMMON), t.MistralForCausalLM),
        "qwen2": (t.Qwen2Config(vocab_size=vocab, **COMMON), t.Qwen2ForCausalLM),
        "phi3": (t.Phi3Config(vocab_size=vocab, pad_token_id=0, **COMMON), t.Phi3ForCausalLM),
        "gpt2": (t.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=512), t.GPT2LMHeadModel),
        # the families of issue 18: q/k norms; Gemma 3's sliding/global layers with two rotary bases, a query scale
        # that is not 1/sqrt(head size) and a final logit softcap; SmolLM3's NoPE layer
        "qwen3": (t.Qwen3Config(vocab_size=vocab, head_dim=16, **COMMON), t.Qwen3ForCausalLM),
        # as a GGUF: transformers' GGUF loader takes Qwen3's head size from its default (128), not the file
        "qwen3_head128": (t.Qwen3Config(vocab_size=vocab, head_dim=128, **COMMON), t.Qwen3ForCausalLM),
        "gemma3_text": (
            t.Gemma3TextConfig(
                vocab_size=vocab,
                head_dim=32,
                query_pre_attn_scalar=24,
                layer_types=["sliding_attention", "full_attention"],
                sliding_window=8,
                rope_theta=1_000_000.0,
                rope_local_base_freq=10_000.0,
                final_logit_softcapping=10.0,
                pad_token_id=0,
                **{**COMMON, "num_key_value_heads": 1},
            ),
            t.Gemma3ForCausalLM,
        ),
        "smollm3": (
            t.SmolLM3Config(vocab_size=vocab, no_rope_layers=[1, 0], pad_token_id=0, **COMMON),
            t.SmolLM3ForCausalLM,
        ),  # fmt: skip
    }


def _perturb_norms(model: Any) -> None:
    """Random norm weights: Gemma initialises its (1 + w) weights to zero and Qwen3 its q/k norms to one, which
    would hide a wrong weight form."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.3 * torch.randn_like(param))


def make_checkpoint(folder: Path, arch: str = "llama", seed: int = 0) -> Path:
    """A tiny random-weight checkpoint with a real (byte-level BPE) tokenizer and a chat template."""
    import torch
    import transformers
    from tiny_model import CHATML, build_tokenizer

    tok = build_tokenizer()
    hf_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|im_start|>", pad_token="<|endoftext|>"
    )
    hf_tok.chat_template = CHATML
    cfg, cls = _configs(tok.get_vocab_size())[arch]
    cfg.eos_token_id = 0
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    if arch in NEW_FAMILIES or arch.startswith("qwen3"):
        _perturb_norms(model)
    model.generation_config.do_sample = True
    model.generation_config.temperature = 0.6
    model.generation_config.top_p = 0.9
    model.save_pretrained(folder)
    hf_tok.save_pretrained(folder)
    return folder


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (created if missing) across processes: xdist workers, other runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_UN)


def build_once(folder: Path, build: Callable[[Path], object], done: str | None = None) -> Path:
    """``folder``, built by ``build(path)`` unless a finished one is already there, under the lock
    ``<folder>.lock``: a process that finds the lock taken waits for the build and then reuses it.

    ``done`` names the file the build writes last and atomically (an export's ``edgeroute.json``: the export
    writes its folder atomically): the build goes to ``folder`` itself. Without it the build goes to a scratch
    folder that is renamed into place once complete, so a build cut short is never taken for a finished one."""
    finished = folder / done if done else folder
    if finished.exists():
        return folder
    with locked(folder.parent / f"{folder.name}.lock"):
        if finished.exists():  # built by another process while this one waited
            return folder
        if done:
            build(folder)
            return folder
        scratch = folder.parent / f".{folder.name}.partial"
        shutil.rmtree(scratch, ignore_errors=True)
        build(scratch)
        scratch.rename(folder)
    return folder


TINY_BERT = dict(  # the tiny encoders' geometry
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64
)


def write_bert_tokenizer(folder: Path) -> Any:
    """A tiny WordPiece tokenizer (BERT's: [CLS] ... [SEP]) saved into ``folder``; returns transformers' view."""
    import transformers
    from tiny_model import CORPUS
    from tokenizers import BertWordPieceTokenizer, processors

    tok = BertWordPieceTokenizer(lowercase=True)

    tok.train_from_iterator(CORPUS, vocab_size=160, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    ids = {t: tok.token_to_id(t) for t in ("[CLS]", "[SEP]")}
    tok._tokenizer.post_processor = processors.BertProcessing(("[SEP]", ids["[SEP]"]), ("[CLS]", ids["[CLS]"]))
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok._tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    fast.save_pretrained(folder)
    return fast


def write_token_classifier(folder: Path, labels: tuple[str, ...] = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC")) -> Path:
    """A tiny random ``BertForTokenClassification`` checkpoint (BIO tags) with the tiny WordPiece tokenizer."""
    import torch
    import transformers

    folder.mkdir(parents=True)
    fast = write_bert_tokenizer(folder)
    torch.manual_seed(2)
    config = transformers.BertConfig(
        vocab_size=fast.vocab_size,
        **TINY_BERT,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={x: i for i, x in enumerate(labels)},
    )
    model = transformers.BertForTokenClassification(config).eval()
    with torch.no_grad():  # a wider spread of tags than a random head gives, so that every strategy has entities
        model.classifier.weight.mul_(8.0)
    model.save_pretrained(folder)
    return folder


def write_sequence_classifier(folder: Path, problem_type: str = "single_label_classification", labels: int = 3) -> Path:
    """A tiny random ``BertForSequenceClassification`` checkpoint with the tiny WordPiece tokenizer."""
    import torch
    import transformers

    folder.mkdir(parents=True)
    fast = write_bert_tokenizer(folder)
    torch.manual_seed(1)
    config = transformers.BertConfig(
        vocab_size=fast.vocab_size,
        **TINY_BERT,
        num_labels=labels,
        problem_type=problem_type,
        id2label={i: f"LABEL_{chr(65 + i)}" for i in range(labels)},
        label2id={f"LABEL_{chr(65 + i)}": i for i in range(labels)},
    )
    transformers.BertForSequenceClassification(config).eval().save_pretrained(folder)
    return folder


def write_sentence_transformers(folder: Path, pooling: str = "mean", normalize: bool = True) -> Path:
    """A tiny random BERT as a sentence-transformers folder: WordPiece tokenizer, Pooling, [Normalize]."""
    import torch
    import transformers

    folder.mkdir(parents=True)
    fast = write_bert_tokenizer(folder)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=fast.vocab_size, **TINY_BERT)
    transformers.BertModel(config).eval().save_pretrained(folder)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]
    modules.append({"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"})
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (folder / "2_Normalize").mkdir()
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    keys = {"mean": "mean_tokens", "cls": "cls_token", "max": "max_tokens", "mean_sqrt_len": "mean_sqrt_len_tokens"}
    keys["last"] = "lasttoken"
    pooling_config = {"word_embedding_dimension": 32, **{f"pooling_mode_{v}": k == pooling for k, v in keys.items()}}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling_config))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 32, "do_lower_case": False}))
    return folder
