"""llama.cpp's own token ids for the test GGUFs, committed under ``tests/data/gguf-vocab/`` (how llama.cpp tests its
vocabularies: ``models/ggml-vocab-*.gguf.inp/.out``), so that the tests need no llama.cpp build.

``python tests/data/make_gguf_golden.py`` (with the ``llamacpp`` extra: ``make golden``) writes them again: each
case's GGUF is built here by the builders of ``gguf_files.py`` and tokenized by llama-cpp-python. Each file records
the digest of the vocabulary it was made from; a test whose GGUF has another vocabulary fails and says to rerun it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import astuple
from pathlib import Path

from gguf_files import (
    MIXED,
    PRE_TEXT,
    SMOLLM2_SPECIALS,
    SPM_SPECIALS,
    TEXTS,
    write_hf_gguf,
    write_spm_gguf,
    write_vocab_gguf,
)

GOLDEN = Path(__file__).parent / "data" / "gguf-vocab"
PRE_TOKENIZERS = ("llama-bpe", "qwen2", "gpt-2", "starcoder")
SPM_CHAT = "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"  # gguf_files.CHAT_TEMPLATE, one "Hi"


def cases(
    smollm2: Callable[[], Path], qwen3_checkpoint: Callable[[Path], Path]
) -> dict[str, tuple[Callable[[Path], Path], list[str]]]:
    """Case name -> (a function writing its GGUF into a folder, the texts whose ids are recorded)."""
    out: dict[str, tuple[Callable[[Path], Path], list[str]]] = {
        "smollm2": (lambda d: smollm2(), [MIXED, MIXED + SMOLLM2_SPECIALS, *TEXTS]),
    }
    for pre in PRE_TOKENIZERS:
        out[f"pre-{pre}"] = (
            lambda d, pre=pre: write_vocab_gguf(d / f"{pre}.gguf", smollm2(), pre),
            [PRE_TEXT, *TEXTS],
        )
    for style, prefix in (("llama-style", True), ("gemma-style", False)):
        out[f"spm-{style}"] = (
            lambda d, prefix=prefix: write_spm_gguf(d / "tiny-spm.gguf", add_space_prefix=prefix),
            [MIXED, MIXED + SPM_SPECIALS, *TEXTS, SPM_CHAT],
        )
    out["qwen3"] = (
        lambda d: write_hf_gguf(d / "qwen3.gguf", qwen3_checkpoint(d), "qwen3"),
        [MIXED + "<|im_start|>", *TEXTS],
    )
    return out


def vocab_digest(gguf: Path) -> str:
    """SHA-256 of everything a GGUF says about its tokenizer (``tokenizer.ggml.*``)."""
    from edgeroute.export.gguf_tokenizer import read_vocab

    fields = list(astuple(read_vocab(gguf)))
    return hashlib.sha256(json.dumps(fields, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def golden_ids(case: str, gguf: Path) -> dict[tuple[str, bool], list[int]]:
    """``(text, add_bos) -> llama.cpp's ids`` of ``case``, checked to come from ``gguf``'s vocabulary."""
    data = json.loads((GOLDEN / f"{case}.json").read_text())
    assert data["vocab_sha256"] == vocab_digest(gguf), (
        f"tests/data/gguf-vocab/{case}.json was made from another vocabulary: run make golden"
    )
    return {(e["text"], e["add_bos"]): e["ids"] for e in data["ids"]}


def assert_ids_equal(case: str, gguf: Path, encode: Callable[[str, bool], list[int]], texts: list[str]) -> None:
    """``encode(text, add_bos)`` gives llama.cpp's ids for every text, with and without BOS."""
    want = golden_ids(case, gguf)
    for text in texts:
        for add in (True, False):
            assert (text, add) in want, f"{case}: no golden ids for {text[:40]!r}: run make golden"
            assert encode(text, add) == want[(text, add)], (case, text[:40], add)
