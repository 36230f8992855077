"""A GGUF file's tokenizer as llama.cpp defines it, rebuilt as a ``tokenizers.Tokenizer`` from the file's metadata.

llama.cpp is what gives a GGUF's vocabulary its meaning (``src/llama-vocab.cpp``), and transformers' GGUF
conversion does not always agree with it: Gemma's SentencePiece-style vocabulary came out as a BPE whose merges
split ``capital`` into ``▁c ap it al``, and every GGUF's ``add_bos_token`` was ignored. So the export builds the
tokenizer itself:

- ``tokenizer.ggml.model == "llama"`` (SentencePiece-style: tokens with scores): llama.cpp merges the adjacent pair
  whose concatenation is a token with the highest score, leftmost first, and falls back to ``<0xXX>`` byte tokens;
  a BPE whose merges are every split of every token ranked by the merged token's score computes the same thing.
  A space is prefixed to each stretch of text at the start or after a special token when ``add_space_prefix``
  (llama.cpp's rule), spaces become ``▁``;
- ``tokenizer.ggml.model == "gpt2"`` (byte-level BPE with merges): the pre-tokenizer regexes llama.cpp applies for
  the file's ``tokenizer.ggml.pre``, one split after another, then byte-level BPE (whole pre-tokens that are tokens
  kept whole where llama.cpp ignores merges);
- control, user-defined and unknown tokens are matched in the text before anything else (they are what llama.cpp
  partitions out with ``parse_special``); BOS/EOS are added where ``add_bos_token``/``add_eos_token`` say, with
  llama.cpp's defaults when the file does not say.

Anything else (other tokenizer models, pre-tokenizers not listed here) raises ``ExportError`` with the hint to
pass the original checkpoint's tokenizer (``--tokenizer DIR``): a tokenizer that is wrong is worse than an error.
``tests/test_gguf_tokenizer.py`` checks the ids against llama.cpp's own tokenizer (llama-cpp-python).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeroute.errors import ExportError, first_line

# llama.cpp's token types (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> (llama.cpp's regexes, applied in turn; whether whole pre-tokens skip the merges)
PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool]] = {
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "dbrx", "smaug-bpe"), ((_LLAMA3,), True)
    ),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez", "stablelm2"), ((_QWEN2,), False)),
    **dict.fromkeys(
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"), ((r"\p{N}", _GPT2), False)
    ),
    **dict.fromkeys(("gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4"), ((_GPT2,), False)),
}
_ADD_BOS_BY_PRE = {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral"}  # llama.cpp's defaults
HINT = "pass the original checkpoint's tokenizer with --tokenizer DIR (a folder with tokenizer.json)"


@dataclass
class Vocab:
    """A GGUF file's tokenizer metadata (``tokenizer.ggml.*``)."""

    model: str
    pre: str | None
    tokens: list[str]
    types: list[int]
    scores: list[float]
    merges: list[str]
    special: dict[str, int] = field(default_factory=dict)  # bos / eos / unknown / padding -> id
    add_bos: bool | None = None
    add_eos: bool | None = None
    add_space_prefix: bool | None = None
    chat_template: str | None = None

    def token(self, role: str) -> str | None:
        i = self.special.get(role)  # read_vocab keeps only ids inside the vocabulary
        return None if i is None else self.tokens[i]


def read_vocab(path: str | Path) -> Vocab:
    """The ``tokenizer.ggml.*`` fields of a GGUF file (raises ``ExportError`` when they are missing)."""
    from gguf import GGUFReader

    try:
        fields = GGUFReader(str(path)).fields
    except Exception as e:
        raise ExportError(f"{path} is not a readable GGUF file: {first_line(e)}") from e

    def get(key: str) -> Any:
        f = fields.get(f"tokenizer.{key}")
        return None if f is None else f.contents()

    def flag(key: str) -> bool | None:
        value = get(key)
        return None if value is None else bool(value)

    tokens = get("ggml.tokens")
    if not tokens:
        raise ExportError(f"{path} has no tokenizer (tokenizer.ggml.tokens): {HINT}")
    n = len(tokens)
    special = {}
    for role in ("bos", "eos", "unknown", "padding"):
        value = get(f"ggml.{role}_token_id")
        if value is not None and 0 <= int(value) < n:
            special[role] = int(value)
    pre = get("ggml.pre")
    return Vocab(
        model=str(get("ggml.model") or "llama"),
        pre=None if pre is None else str(pre),
        tokens=[t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)],  # llama.cpp's name for an empty token
        types=[int(t) for t in (get("ggml.token_type") or [NORMAL] * n)],
        scores=[float(s) for s in (get("ggml.scores") or [0.0] * n)],
        merges=list(get("ggml.merges") or []),
        special=special,
        add_bos=flag("ggml.add_bos_token"),
        add_eos=flag("ggml.add_eos_token"),
        add_space_prefix=flag("ggml.add_space_prefix"),
        chat_template=get("chat_template"),
    )


def _spm_merges(vocab: Vocab, ids: dict[str, int]) -> list[tuple[str, str]]:
    """Every split ``a + b`` of every token into two tokens, ranked by the merged token's score (highest first);
    equal scores keep the tokens' order."""
    ranked = []
    for i, piece in enumerate(vocab.tokens):
        if vocab.types[i] == BYTE:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                ranked.append((-vocab.scores[i], i, left, right))
    ranked.sort()
    return [(a, b) for _, _, a, b in ranked]


def _added_tokens(vocab: Vocab) -> list[Any]:
    from tokenizers import AddedToken

    return [
        AddedToken(text, special=kind != USER_DEFINED, normalized=False)
        for text, kind in zip(vocab.tokens, vocab.types, strict=True)
        if kind in (CONTROL, USER_DEFINED, UNKNOWN) and not text.startswith("[EMPTY_")
    ]


def _post_processor(vocab: Vocab, add_bos: bool, add_eos: bool) -> Any:
    """BOS/EOS around the text as the file asks (``build`` has checked that the asked ones exist)."""
    from tokenizers import processors

    bos, eos = ([(vocab.tokens[vocab.special[r]], vocab.special[r])] if on else [] for r, on in
                (("bos", add_bos), ("eos", add_eos)))  # fmt: skip
    single = [*(t for t, _ in bos), "$A", *(t for t, _ in eos)]
    second = [*(t for t, _ in bos), "$B:1", *(t for t, _ in eos)]
    specials = sorted(set(bos + eos))
    return processors.TemplateProcessing(
        single=" ".join(single), pair=" ".join(single + second), special_tokens=specials
    )


def build(vocab: Vocab, source: str = "the GGUF file") -> Any:
    """The ``tokenizers.Tokenizer`` that gives llama.cpp's ids for this vocabulary."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    ids = {t: i for i, t in enumerate(vocab.tokens)}
    if len(ids) != len(vocab.tokens):
        raise ExportError(f"{source}: its vocabulary holds the same token twice; {HINT}")
    unk = vocab.token("unknown")
    if vocab.model == "llama":
        add_bos = True if vocab.add_bos is None else vocab.add_bos
        add_eos = False if vocab.add_eos is None else vocab.add_eos
        prefix = True if vocab.add_space_prefix is None else vocab.add_space_prefix
        model = BPE(ids, _spm_merges(vocab, ids), unk_token=unk, fuse_unk=True, byte_fallback=True)
        tok = Tokenizer(model)
        replace = normalizers.Replace(" ", "▁")
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), replace]) if prefix else replace
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        tok.decoder = decoders.Sequence([*steps, decoders.Strip(" ", 1, 0)] if prefix else steps)
    elif vocab.model == "gpt2":
        if vocab.pre not in PRE_TOKENIZERS:
            raise ExportError(
                f"{source}: pre-tokenizer {vocab.pre!r} (tokenizer.ggml.pre) is not one edgeroute reproduces"
                f" ({', '.join(sorted(PRE_TOKENIZERS))}); {HINT}"
            )
        regexes, ignore_merges = PRE_TOKENIZERS[vocab.pre]
        add_bos = (vocab.pre in _ADD_BOS_BY_PRE) if vocab.add_bos is None else vocab.add_bos
        add_eos = False if vocab.add_eos is None else vocab.add_eos
        merges = [tuple(m.split(" ", 1)) for m in vocab.merges]
        if not merges or any(len(m) != 2 for m in merges):
            raise ExportError(f"{source}: a BPE vocabulary without valid merges (tokenizer.ggml.merges); {HINT}")
        tok = Tokenizer(BPE(ids, merges, unk_token=unk, ignore_merges=ignore_merges))
        splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        tok.pre_tokenizer = pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
    else:
        raise ExportError(
            f"{source}: tokenizer model {vocab.model!r} (tokenizer.ggml.model) is not one edgeroute reproduces"
            f" (llama, gpt2); {HINT}"
        )
    added = _added_tokens(vocab)
    tok.add_special_tokens([t for t in added if t.special])  # add_special_tokens marks everything special:
    tok.add_tokens([t for t in added if not t.special])  # user-defined pieces are text (decoded, never skipped)
    if (add_bos and vocab.token("bos") is None) or (add_eos and vocab.token("eos") is None):
        raise ExportError(f"{source}: asks for a BOS/EOS token it does not define; {HINT}")
    tok.post_processor = _post_processor(vocab, add_bos, add_eos)
    return tok


def load(path: str | Path) -> tuple[Any, Vocab]:
    """``(transformers fast tokenizer, vocab)`` for the GGUF file at ``path``."""
    from transformers import PreTrainedTokenizerFast

    vocab = read_vocab(path)
    backend = build(vocab, str(path))
    roles = {"bos": "bos_token", "eos": "eos_token", "unknown": "unk_token", "padding": "pad_token"}
    named = {roles[r]: vocab.tokens[i] for r, i in vocab.special.items()}
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False, **named)
    if vocab.chat_template:
        tok.chat_template = vocab.chat_template
    return tok, vocab
