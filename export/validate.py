"""Export validation: the exported folder, run by edgeroute's own runtime, against the source in PyTorch.

- fp32: max |Δlogit| over every position of three prompts must be <= 1e-3, and a 64-token greedy continuation of
  each prompt must be token-for-token identical (a divergence is tolerated only at a near-tie of PyTorch's own
  top two logits, which random-weight test checkpoints have).
- every precision: top-1 agreement with PyTorch fp32 over a fixed text and the perplexity change.
- the tokenizer (every precision): the parity check compares edgeroute and PyTorch on the *same* tokenizer, so it
  cannot see a wrong one (a GGUF's Gemma vocabulary once split ``capital`` into ``▁c ap it al``). On the quality
  text: ``decode(encode(text)) == text``; of the words the vocabulary holds whole (``▁word`` or ``Ġword``), the
  share that come out as that one token (a fragmenting tokenizer scores near 0, a right one ~1); characters per
  token, reported. A failure raises ``ExportValidationError`` with the hint to pass ``--tokenizer DIR``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
from edgeroute.errors import ExportValidationError
from edgeroute.quality import QUALITY_TEXT, next_token_figures, text_ids

from .steps import NO_STEP, Step

PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, a little robot",
)
FP32_TOLERANCE = 1e-3
FP16_PERPLEXITY_TOLERANCE_PCT = 1.0  # fp16 rounds each value to 11 bits (2^-11 relative): SmolLM2-135M's fused fp16
# graph moves logits by up to 0.075 and perplexity by -0.01%; beyond 1% the model overflows or loses range in fp16
NEAR_TIE = 1e-3
WHOLE_WORD_RATE = 0.9  # below this share of whole-token words, the tokenizer is splitting words it should not
MIN_WHOLE_WORDS = 10  # the rate is judged only over at least this many words (tiny test vocabularies hold few)
TOKENIZER_HINT = (
    "pass the original checkpoint's tokenizer with --tokenizer DIR (or --no-validate to keep this one anyway)"
)


def tokenizer_check(tok: Any, text: str = QUALITY_TEXT) -> dict[str, Any]:
    """Figures that tell a wrong tokenizer from a right one without a reference; ``problems`` lists failures."""
    ids = tok.encode(text, add_special_tokens=False)
    roundtrip = tok.decode(ids, skip_special_tokens=False) == text
    words = sorted(set(re.findall(r"(?<= )[A-Za-z]+(?=[ ,.;:])", text)))
    whole = {}
    for w in words:  # the word with its leading space as SentencePiece (▁) or byte-level BPE (Ġ) write it
        i = tok.token_to_id("▁" + w)
        i = tok.token_to_id("Ġ" + w) if i is None else i
        if i is not None:
            whole[w] = i
    present = set(ids)
    rate = sum(i in present for i in whole.values()) / len(whole) if whole else None
    problems = []
    if not roundtrip:
        problems.append("decoding its own ids does not give the text back")
    if rate is not None and len(whole) >= MIN_WHOLE_WORDS and rate < WHOLE_WORD_RATE:
        problems.append(
            f"only {100 * rate:.0f}% of the {len(whole)} words its vocabulary holds as one token come out as that"
            " token (it splits words into fragments)"
        )
    return {
        "roundtrip": roundtrip,
        "chars_per_token": round(len(text) / max(len(ids), 1), 3),
        "whole_words": len(whole),
        "whole_word_rate": None if rate is None else round(rate, 4),
        "problems": problems,
    }


def _torch_logits(model: Any, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(torch.tensor([ids], device=model.device))
    return out.logits[0].float().cpu().numpy()


def _torch_greedy(model: Any, ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy continuation with the KV cache; also PyTorch's top-1/top-2 margin at every step."""
    import torch

    toks, margins = [], []
    with torch.no_grad():
        out = model(torch.tensor([ids], device=model.device), use_cache=True)
        for _ in range(n):
            last = out.logits[0, -1].float()
            top2 = torch.topk(last, 2).values
            tok = int(torch.argmax(last))
            toks.append(tok)
            margins.append(float(top2[0] - top2[1]))
            out = model(torch.tensor([[tok]], device=model.device), past_key_values=out.past_key_values, use_cache=True)
    return toks, margins


def _edgeroute_greedy(model: Any, ids: list[int], n: int) -> list[int]:
    cache = model.new_cache()
    logits = model.forward(np.array([ids]), cache)[0]
    toks = []
    for _ in range(n):
        tok = int(np.argmax(logits))
        toks.append(tok)
        logits = model.forward(np.array([[tok]]), cache)[0]
    return toks


def quality(ref: np.ndarray, got: np.ndarray, ids: list[int]) -> dict[str, Any]:
    """Top-1 agreement and perplexities of the next token over a text, reference vs exported, and the
    reference's top-1 tokens (``edgeroute bench --quality`` measures the folder against them later)."""
    ref_top1, ppl_ref = next_token_figures(ref, ids)
    top1, ppl = next_token_figures(got, ids)
    return {
        "top1_agreement": float((ref_top1 == top1).mean()),
        "perplexity_reference": ppl_ref,
        "perplexity": ppl,
        "perplexity_change_pct": 100.0 * (ppl / ppl_ref - 1.0),
        "tokens": len(ids) - 1,
        "reference_top1": [int(t) for t in ref_top1],
    }


def validate(
    folder: Path,
    torch_model: Any,
    precision: str,
    quantized: bool,
    greedy_tokens: int = 64,
    threads: int | None = None,
    step: Step = NO_STEP,
) -> dict[str, Any]:
    """Run the checks; returns the figures for the manifest. Raises ``ExportValidationError`` for fp32. ``step``
    counts the texts compared with PyTorch (each prompt, then the quality text)."""
    import edgeroute

    model = edgeroute.Model.load(folder, threads=threads)
    strict = precision == "fp32" and not quantized
    tok = model.tokenizer
    report: dict[str, Any] = {"prompts": len(PROMPTS), "tokenizer": tokenizer_check(tok)}
    if report["tokenizer"]["problems"]:
        raise ExportValidationError(f"tokenizer check failed: {report['tokenizer']['problems'][0]}; {TOKENIZER_HINT}")
    diffs: list[float] = []
    greedy: list[dict[str, Any]] = []
    step.total(len(PROMPTS) + 1)
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        ref = _torch_logits(torch_model, ids)
        got = model.forward_last(np.array([ids]), model.new_cache(), len(ids))[0]
        diffs.append(float(np.abs(ref - got).max()))
        if strict and greedy_tokens:
            want, margins = _torch_greedy(torch_model, ids, greedy_tokens)
            have = _edgeroute_greedy(model, ids, greedy_tokens)
            first = next((i for i, (a, b) in enumerate(zip(want, have, strict=False)) if a != b), None)
            greedy.append(
                {
                    "prompt": prompt,
                    "identical": first is None,
                    "first_divergence": first,
                    "margin_at_divergence": None if first is None else margins[first],
                }
            )
        step.advance()
    report["max_abs_logit_diff"] = max(diffs)
    if greedy:
        report["greedy_tokens"] = greedy_tokens
        report["greedy_identical"] = all(g["identical"] for g in greedy)
        report["greedy"] = greedy
    ids = text_ids(model)
    report["quality"] = quality(
        _torch_logits(torch_model, ids), model.forward_last(np.array([ids]), model.new_cache(), len(ids))[0], ids
    )
    step.advance()
    change = report["quality"]["perplexity_change_pct"]
    if precision == "fp16" and not quantized and abs(change) > FP16_PERPLEXITY_TOLERANCE_PCT:
        raise ExportValidationError(
            f"fp16 check failed: perplexity {change:+.2f}% against PyTorch fp32 on the quality text (more than"
            f" {FP16_PERPLEXITY_TOLERANCE_PCT:g}%: the model overflows or loses range in fp16; export fp32, or use"
            " --no-validate to keep it anyway)"
        )
    if strict:
        if report["max_abs_logit_diff"] > FP32_TOLERANCE:
            raise ExportValidationError(
                f"parity check failed: max |Δlogit| {report['max_abs_logit_diff']:.2e} > {FP32_TOLERANCE:g}"
                " between the exported graph and PyTorch (use --no-validate to keep it anyway)"
            )
        for g in greedy:
            if not g["identical"] and g["margin_at_divergence"] > NEAR_TIE:
                raise ExportValidationError(
                    f"parity check failed: greedy continuation of {g['prompt']!r} diverges from PyTorch at token"
                    f" {g['first_divergence']} where PyTorch's top-2 margin is {g['margin_at_divergence']:.3g}"
                )
    return report
