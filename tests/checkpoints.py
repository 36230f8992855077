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


def write_bert_tokenizer(folder: Path, model_max_length: int | None = None, token_types: bool = True) -> Any:
    """A tiny WordPiece tokenizer (BERT's: [CLS] ... [SEP]) saved into ``folder``; returns transformers' view.
    ``model_max_length`` goes into its tokenizer_config.json (by default transformers' "no limit");
    ``token_types=False``: it gives no ``token_type_ids`` (DistilBERT's)."""
    import transformers
    from tiny_model import CORPUS
    from tokenizers import BertWordPieceTokenizer, processors

    tok = BertWordPieceTokenizer(lowercase=True)

    tok.train_from_iterator(CORPUS, vocab_size=160, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    ids = {t: tok.token_to_id(t) for t in ("[CLS]", "[SEP]")}
    tok._tokenizer.post_processor = processors.BertProcessing(("[SEP]", ids["[SEP]"]), ("[CLS]", ids["[CLS]"]))
    limit = {} if model_max_length is None else {"model_max_length": model_max_length}
    if not token_types:
        limit["model_input_names"] = ["input_ids", "attention_mask"]
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok._tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        **limit,
    )
    fast.save_pretrained(folder)
    return fast


# -- more encoder architectures: DistilBERT, XLM-RoBERTa, DeBERTa-v2, ModernBERT ------------------------------------
ENCODER_ARCHS = ("bert", "distilbert", "xlm-roberta", "deberta-v2", "modernbert")
BIO_LABELS = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC")
TINY_MAX_LENGTH = 64  # the tokens a tiny encoder takes, special tokens included (TINY_BERT's positions)
_CLASS_PREFIX = {
    "bert": "Bert",
    "distilbert": "DistilBert",
    "xlm-roberta": "XLMRoberta",
    "deberta-v2": "DebertaV2",
    "modernbert": "ModernBert",
}
# the Unigram (SentencePiece) tokenizers' special tokens in id order, the one that is unknown, and the last one
# (the mask, appended after the pieces as the real vocabularies have it)
_SPM_SPECIALS = {
    "xlm-roberta": (("<s>", "<pad>", "</s>", "<unk>"), "<unk>", "<mask>"),
    "deberta-v2": (("[PAD]", "[CLS]", "[SEP]", "[UNK]"), "[UNK]", "[MASK]"),
}
UNIGRAM_SUFFIXES = ("s", "es", "ed", "er", "ing", "ian", "ly", "al", "ity")  # the sub-words of unseen words


def unigram_pieces() -> list[tuple[str, float]]:
    """A hand-made SentencePiece vocabulary (piece, log probability): every word and punctuation mark of
    ``tiny_model.CORPUS`` whole (``▁word``), a few suffixes, and single characters (ASCII letters, digits and
    punctuation, the corpus's other characters), so that a word not in the corpus splits into sub-words (``▁Paris``
    ``ian``) and a character in none of them (an emoji other than the corpus's) is unknown."""
    import re
    import string

    from tiny_model import CORPUS

    words = sorted({w for line in CORPUS for w in re.findall(r"\w+|[^\w\s]", line)})
    ascii = string.ascii_letters + string.digits + string.punctuation
    chars = sorted(set(ascii) | {c for line in CORPUS for c in line if not c.isspace()})
    pieces = [("▁", -3.0)] + [(f"▁{w}", -4.0) for w in words] + [(x, -5.0) for x in UNIGRAM_SUFFIXES]
    known = {p for p, _ in pieces}
    return pieces + [(c, -6.0) for c in chars if c not in known]


def write_unigram_tokenizer(folder: Path, style: str = "xlm-roberta", model_max_length: int | None = None) -> Any:
    """A tiny SentencePiece-style Unigram tokenizer (:func:`unigram_pieces`) saved into ``folder`` as the slow-to-fast
    converter of transformers makes them; returns transformers' fast view (``AutoTokenizer`` loads the folder).

    ``style`` ``"xlm-roberta"``: ``<s>``=0 ``<pad>``=1 ``</s>``=2 ``<unk>``=3 ... ``<mask>`` (last), ``<s> $A </s>``,
    the normaliser NFKC (for the real charsmap), right strip, runs of spaces to ``▁``; ``"deberta-v2"`` (v3's
    vocabulary): ``[PAD]``=0 ``[CLS]``=1 ``[SEP]``=2 ``[UNK]``=3 ... ``[MASK]``, ``[CLS] $A [SEP]``, strip, NFKC,
    runs of spaces to one. Both: a Metaspace pre-tokenizer and decoder (``▁`` prepended always)."""
    import transformers
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    specials, unk, mask = _SPM_SPECIALS[style]
    vocab = [(t, 0.0) for t in specials] + unigram_pieces() + [(mask, 0.0)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=specials.index(unk), byte_fallback=False))
    tok.add_special_tokens([*specials, mask])
    nfkc = normalizers.NFKC()
    if style == "xlm-roberta":
        steps = [nfkc, normalizers.Strip(left=False, right=True), normalizers.Replace(Regex(" {2,}"), "▁")]
        cls, sep, pair = "<s>", "</s>", "<s> $A </s> </s> $B </s>"
    else:
        steps = [normalizers.Strip(), nfkc, normalizers.Replace(Regex(" {2,}"), " ")]
        cls, sep, pair = "[CLS]", "[SEP]", "[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1"
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0",
        pair=pair,
        special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))],
    )
    limit = {} if model_max_length is None else {"model_max_length": model_max_length}
    if style == "xlm-roberta":
        fast = transformers.XLMRobertaTokenizerFast(tokenizer_object=tok, **limit)
    else:
        fast = transformers.DebertaV2TokenizerFast(tokenizer_object=tok, **limit)
    fast.save_pretrained(folder)
    return fast


def write_byte_bpe_tokenizer(folder: Path, model_max_length: int | None = None) -> Any:
    """A tiny byte-level BPE tokenizer as ModernBERT's (``[CLS] $A [SEP]``, the special tokens after the merges,
    no unknown token) saved into ``folder``; returns transformers' fast view."""
    import transformers
    from tiny_model import CORPUS
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=480, initial_alphabet=alphabet, show_progress=False))
    tok.add_special_tokens(["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"])
    ids = {t: tok.token_to_id(t) for t in ("[CLS]", "[SEP]")}
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0", pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1", special_tokens=list(ids.items())
    )
    limit = {} if model_max_length is None else {"model_max_length": model_max_length}
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        mask_token="[MASK]",
        model_input_names=["input_ids", "attention_mask"],
        **limit,
    )
    fast.save_pretrained(folder)
    return fast


def write_encoder_tokenizer(folder: Path, arch: str = "bert", save_max_length: bool | None = None) -> Any:
    """``arch``'s kind of tokenizer, tiny, saved into ``folder``: WordPiece (BERT, DistilBERT), Unigram
    (XLM-RoBERTa's and DeBERTa-v3's conversions), byte-level BPE (ModernBERT). ``save_max_length``: write
    :data:`TINY_MAX_LENGTH` as its ``model_max_length`` (default: yes, but not for BERT, whose tiny tokenizer never
    did)."""
    if save_max_length is None:
        save_max_length = arch != "bert"
    limit = TINY_MAX_LENGTH if save_max_length else None
    if arch in ("bert", "distilbert"):
        return write_bert_tokenizer(folder, limit, token_types=arch == "bert")
    if arch in _SPM_SPECIALS:
        return write_unigram_tokenizer(folder, arch, limit)
    if arch == "modernbert":
        return write_byte_bpe_tokenizer(folder, limit)
    raise ValueError(f"no tiny tokenizer for {arch!r} (one of {ENCODER_ARCHS})")


def encoder_config(arch: str, fast: Any, labels: dict[int, str] | None = None, **extra: Any) -> Any:
    """A tiny random encoder's transformers config for ``arch`` (:data:`TINY_BERT`'s geometry) and the tokenizer
    ``fast``: its vocabulary and special ids; ``labels`` (id -> name) for a head."""
    import transformers as t

    heads = {} if labels is None else {"id2label": labels, "label2id": {v: k for k, v in labels.items()}}
    common = dict(vocab_size=len(fast), pad_token_id=fast.pad_token_id, **heads, **extra)
    if arch == "bert":
        return t.BertConfig(**TINY_BERT, **common)
    if arch == "distilbert":
        return t.DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64, **common)
    if arch == "xlm-roberta":  # positions count from pad_token_id + 1: two more than the tokens it takes
        ids = dict(bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id)
        return t.XLMRobertaConfig(**{**TINY_BERT, "max_position_embeddings": TINY_MAX_LENGTH + 2}, **ids, **common)
    if arch == "deberta-v2":  # v3's attention: relative positions in log buckets (from 8 apart), no absolute ones
        return t.DebertaV2Config(
            **TINY_BERT,
            type_vocab_size=0,
            relative_attention=True,
            position_buckets=16,
            max_relative_positions=-1,
            pos_att_type=["p2c", "c2p"],
            norm_rel_ebd="layer_norm",
            share_att_key=True,
            position_biased_input=False,
            **common,
        )
    if arch == "modernbert":  # a local (sliding 8-token window) layer after the global one; mean-pooled head
        ids = dict(cls_token_id=fast.cls_token_id, sep_token_id=fast.sep_token_id)
        return t.ModernBertConfig(
            **{k: v for k, v in TINY_BERT.items() if k != "max_position_embeddings"},
            max_position_embeddings=TINY_MAX_LENGTH,
            global_attn_every_n_layers=2,
            local_attention=8,
            classifier_pooling="mean",
            bos_token_id=fast.cls_token_id,
            eos_token_id=fast.sep_token_id,
            **ids,
            **common,
        )
    raise ValueError(f"no tiny config for {arch!r} (one of {ENCODER_ARCHS})")


def write_token_classifier(
    folder: Path, labels: tuple[str, ...] = BIO_LABELS, arch: str = "bert", save_max_length: bool | None = None
) -> Path:
    """A tiny random ``*ForTokenClassification`` checkpoint (BIO tags) of ``arch`` (:data:`ENCODER_ARCHS`) with
    its tiny tokenizer (:func:`write_encoder_tokenizer`)."""
    import torch
    import transformers

    folder.mkdir(parents=True)
    fast = write_encoder_tokenizer(folder, arch, save_max_length)
    torch.manual_seed(2)
    config = encoder_config(arch, fast, labels=dict(enumerate(labels)))
    model = getattr(transformers, f"{_CLASS_PREFIX[arch]}ForTokenClassification")(config).eval()
    with torch.no_grad():  # a wider spread of tags than a random head gives, so that every strategy has entities
        model.classifier.weight.mul_(8.0)
    model.save_pretrained(folder)
    return folder


def write_sequence_classifier(
    folder: Path,
    problem_type: str = "single_label_classification",
    labels: int = 3,
    arch: str = "bert",
    save_max_length: bool | None = None,
) -> Path:
    """A tiny random ``*ForSequenceClassification`` checkpoint of ``arch`` (:data:`ENCODER_ARCHS`) with its tiny
    tokenizer (:func:`write_encoder_tokenizer`)."""
    import torch
    import transformers

    folder.mkdir(parents=True)
    fast = write_encoder_tokenizer(folder, arch, save_max_length)
    torch.manual_seed(1)
    names = {i: f"LABEL_{chr(65 + i)}" for i in range(labels)}
    config = encoder_config(arch, fast, labels=names, problem_type=problem_type)
    getattr(transformers, f"{_CLASS_PREFIX[arch]}ForSequenceClassification")(config).eval().save_pretrained(folder)
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


def make_lora(folder: Path, checkpoint: Path, r: int, targets: Any, seed: int, **options: Any) -> None:
    """A PEFT LoRA adapter on ``checkpoint`` saved into ``folder``, with random weights in both A and B (PEFT's
    default B = 0 would change nothing), scaled by ``lora_alpha = 2r`` unless ``options`` say otherwise."""
    import peft
    import torch
    import transformers

    torch.manual_seed(seed)
    base = transformers.AutoModelForCausalLM.from_pretrained(checkpoint)
    options = {"lora_alpha": 2 * r, **options}
    config = peft.LoraConfig(r=r, target_modules=targets, init_lora_weights=False, **options)
    peft.get_peft_model(base, config).save_pretrained(folder)
