"""One setting's figures from its samples, each with a percentile-bootstrap 95% interval over prompts (the unit
that is sampled): diversity (distinct-1/2/3, Self-BLEU-4, repetition-4), judge perplexity, mean length, validity."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .metrics import distinct, repetition, self_bleu

METRICS = (
    "distinct_1",
    "distinct_2",
    "distinct_3",
    "self_bleu4",
    "repetition4",
    "perplexity",
    "mean_length",
    "validity",
)
DIVERSITY = ("distinct_1", "distinct_2", "distinct_3", "self_bleu4", "repetition4")
BOOTSTRAP = 1000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Figure:
    """A figure and its bootstrap interval (None where nothing could be measured)."""

    value: float | None
    low: float | None = None
    high: float | None = None

    def as_dict(self) -> dict[str, float | None]:
        return {"value": self.value, "low": self.low, "high": self.high}


def _mean_figure(values: Sequence[float | None], idx: np.ndarray) -> Figure:
    v = np.array([np.nan if x is None else x for x in values], dtype=np.float64)
    if np.isnan(v).all():
        return Figure(None)
    picked = v[idx]
    seen = (~np.isnan(picked)).sum(axis=1)
    boot = np.nansum(picked, axis=1)[seen > 0] / seen[seen > 0]  # a resample of only unmeasured prompts: skipped
    lo, hi = np.percentile(boot, [50 * (1 - CONFIDENCE), 50 * (1 + CONFIDENCE)])
    return Figure(float(np.nanmean(v)), float(lo), float(hi))


def _ratio_figure(num: Sequence[float], den: Sequence[float], idx: np.ndarray, exp: bool = False) -> Figure:
    n, d = np.asarray(num, np.float64), np.asarray(den, np.float64)
    if d.sum() == 0:
        return Figure(None)
    with np.errstate(invalid="ignore", divide="ignore"):
        boot = n[idx].sum(axis=1) / d[idx].sum(axis=1)
    boot = boot[np.isfinite(boot)]
    f = np.exp if exp else (lambda x: x)
    lo, hi = np.percentile(boot, [50 * (1 - CONFIDENCE), 50 * (1 + CONFIDENCE)])
    return Figure(float(f(n.sum() / d.sum())), float(f(lo)), float(f(hi)))


def figures(
    groups: Sequence[Sequence[str]],
    nll: Sequence[tuple[float, int]],
    lengths: Sequence[Sequence[int]],
    valid: Sequence[Sequence[bool]] | None = None,
    resamples: int = BOOTSTRAP,
    seed: int = 0,
) -> dict[str, Figure]:
    """Every figure of one setting from its samples grouped by prompt (``groups[i]``: prompt i's texts), the
    judge's ``(nll, tokens)`` per prompt, the token lengths, and the validity per sample when constrained."""
    p = len(groups)
    idx = np.random.default_rng(seed).integers(0, p, size=(resamples, p))
    out: dict[str, Figure] = {}
    for n in (1, 2, 3):
        counts = [distinct(g, n) for g in groups]
        out[f"distinct_{n}"] = _mean_figure([u / t if t else None for u, t in counts], idx)
    out["self_bleu4"] = _mean_figure([self_bleu(g) for g in groups], idx)
    reps = []
    for g in groups:
        r = [x for x in (repetition(t) for t in g) if x is not None]
        reps.append(float(np.mean(r)) if r else None)
    out["repetition4"] = _mean_figure(reps, idx)
    out["perplexity"] = _ratio_figure([a for a, _ in nll], [b for _, b in nll], idx, exp=True)
    out["mean_length"] = _ratio_figure([sum(x) for x in lengths], [len(x) for x in lengths], idx)
    if valid is not None:
        out["validity"] = _ratio_figure([sum(v) for v in valid], [len(v) for v in valid], idx)
    return out
