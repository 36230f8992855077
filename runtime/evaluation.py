"""Routing you can see: sweep router settings over a prompt set and measure diversity against quality.

:func:`evaluate` generates ``samples`` completions per prompt and per setting (sample j of prompt i always has the
seed ``seed + i * samples + j``: every setting meets the same random numbers) and reports, per setting:

- diversity: distinct-1/2/3 (unique n-grams / n-grams over a prompt's samples, whitespace words), Self-BLEU-4 (the
  corpus BLEU of each sample against the prompt's other samples, by sacrebleu, on 0-1), and the repetition rate
  within a sample (``1 - unique/total`` of its word 4-grams, Welleck et al.'s seq-rep-4);
- quality: the perplexity of the samples (given their prompt) under a judge model (default: the model itself), the
  mean length in tokens, and with a constraint the share of samples that are valid (JSON Schema by ``jsonschema``,
  a regex or grammar by a fresh llguidance matcher that must accept the whole text);
- a bootstrap 95% interval on every figure (percentile bootstrap over prompts, the unit that is sampled), the time
  taken and the tokens per second.

A *setting* is a set of request parameters (``edgeroute.params``'s names) laid over a common base; a *family* is
the settings of one sweep (:func:`parse_sweep`): ``"temperature=0.3,0.7,1.0"`` is a family of three,
``"explore-exp: explore=0.05,0.1 explore_schedule=exponential explore_end=0.001 explore_steps=32"`` a named one.
Samples come from an :class:`~edgeroute.Engine` (continuous batching where the graph allows it; a batched row may
round differently from a Generator alone, which can flip a sampled token). sacrebleu and jsonschema are the
``eval`` extra, imported when used; :mod:`edgeroute.evalplots` draws the figures (matplotlib, same extra).
"""

from __future__ import annotations

import itertools
import json
import math
import re
import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import GenerationConfig
from .constraint import JsonSchema
from .engine import Engine
from .errors import ConfigError, MissingExtraError
from .output import Completion
from .params import Flows, from_params
from .sampling import log_softmax

if TYPE_CHECKING:
    from .model import Model
    from .protocols import ModelLike

INSTALL_HINT = "edgeroute eval needs the eval extra: pip install 'edgeroute[eval]' (sacrebleu, matplotlib, jsonschema)"
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

# The built-in prompt set: short prompts of several kinds, written for edgeroute (stories, explanations, lists,
# advice, descriptions, dialogue, verse, opinions), where many different answers are good ones.
PROMPTS: tuple[tuple[str, str], ...] = (
    ("story", "Write the opening lines of a story about a lighthouse keeper who finds a message in a bottle."),
    ("story", "Tell a short story about a robot that wants to learn how to cook."),
    ("story", "Begin a story set in a city where it has not rained for ten years."),
    ("story", "Write a short fable about a fox and a crow who become friends."),
    ("story", "Describe the first day of a new student at a school for wizards."),
    ("explain", "Explain why the sky is blue to a ten-year-old."),
    ("explain", "Explain how a bicycle stays upright when it moves."),
    ("explain", "What causes the seasons on Earth?"),
    ("explain", "Explain what a computer's memory does."),
    ("explain", "Why do we need to sleep?"),
    ("list", "Give some ideas for a rainy afternoon at home."),
    ("list", "List a few good habits for learning a new language."),
    ("list", "Suggest names for a small bakery by the sea."),
    ("list", "What are some things to pack for a weekend of camping?"),
    ("advice", "How can I make my mornings less stressful?"),
    ("advice", "Give advice to someone who is nervous about speaking in public."),
    ("advice", "How should I start running if I have never done sport?"),
    ("advice", "What is a good way to keep a small garden on a balcony?"),
    ("describe", "Describe a busy market early in the morning."),
    ("describe", "Describe the taste of a ripe peach."),
    ("describe", "Describe a forest after a storm."),
    ("describe", "Describe your ideal house."),
    ("dialogue", "Write a short conversation between a customer and a shopkeeper who sells only hats."),
    ("dialogue", "Write a dialogue in which two friends plan a trip to the mountains."),
    ("dialogue", "Write what a cat might say to its owner if it could talk."),
    ("verse", "Write a short poem about the moon."),
    ("verse", "Write a few lines of verse about autumn leaves."),
    ("verse", "Write a haiku about the sea."),
    ("opinion", "Is it better to live in a city or in the countryside? Give your view."),
    ("opinion", "What makes a good teacher?"),
    ("opinion", "Should every child learn to play a musical instrument?"),
    ("opinion", "What is the most useful invention of the last hundred years, and why?"),
)


def require(plots: bool = False, constraint: bool = False) -> None:
    """Check the extras a run needs before it starts (it is long work): sacrebleu, and matplotlib for the
    pictures, jsonschema for a constraint's validity; ``MissingExtraError`` with the install line otherwise."""
    import importlib.util

    needed = ["sacrebleu"] + (["matplotlib"] if plots else []) + (["jsonschema"] if constraint else [])
    if any(importlib.util.find_spec(name) is None for name in needed):
        raise MissingExtraError(INSTALL_HINT)


# -- settings ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    """One point of a sweep: its family, a label (the swept parameters), and every parameter it sets."""

    family: str
    label: str
    params: Mapping[str, Any]
    swept: Mapping[str, Any] = field(default_factory=dict)


_INT = re.compile(r"[+-]?\d+")


def parse_value(text: str) -> Any:
    """A sweep value: an int, a float (``inf``, ``-inf``), ``true``/``false``, ``none``, else the text."""
    low = text.strip().lower()
    if _INT.fullmatch(low):
        return int(low)
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    try:
        value = float(low)
    except ValueError:
        return text
    return value if not math.isnan(value) else text


def parse_sweep(spec: str) -> list[Setting]:
    """``[NAME:] key=v1,v2 key2=v ...`` -> the family's settings (the product of the keys with several values).

    Raises ``ConfigError`` (field ``sweep``) for a spec that is not of that form.
    """
    text = spec.strip()
    name = None
    head, sep, rest = text.partition(":")
    if sep and "=" not in head and head.strip() and " " not in head.strip():
        name, text = head.strip(), rest
    try:
        items = shlex.split(text)
    except ValueError as e:
        raise ConfigError("sweep", spec, f"cannot be parsed ({e})") from None
    if not items:
        raise ConfigError("sweep", spec, "is empty: write key=v1,v2 ...")
    keys: dict[str, list[Any]] = {}
    for item in items:
        key, eq, values = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not key or not values:
            raise ConfigError("sweep", item, "is not key=value[,value...]")
        if key in keys:
            raise ConfigError("sweep", item, f"sets {key} twice")
        if key == "seed":
            raise ConfigError("sweep", item, "eval sets the seeds itself (give --seed for the base)")
        keys[key] = [parse_value(v) for v in values.split(",")]
    varying = [k for k, v in keys.items() if len(v) > 1]
    fixed = {k: v[0] for k, v in keys.items() if len(v) == 1}
    family = name or ("×".join(varying) if varying else " ".join(items))
    out = []
    for combo in itertools.product(*(keys[k] for k in varying)):
        swept = dict(zip(varying, combo, strict=True))
        label = " ".join(f"{k}={_show(v)}" for k, v in swept.items()) or " ".join(items)
        out.append(Setting(family, label, {**fixed, **swept}, swept))
    return out


def parse_sweeps(specs: Sequence[str]) -> list[Setting]:
    """Several sweeps (command-line ``--sweep`` values or the lines of a sweep file); labels must differ."""
    settings = [s for spec in specs for s in parse_sweep(spec)]
    seen: set[tuple[str, str]] = set()
    for s in settings:
        if (s.family, s.label) in seen:
            raise ConfigError("sweep", f"{s.family}: {s.label}", "appears twice (name the sweeps: NAME: key=...)")
        seen.add((s.family, s.label))
    return settings


def read_sweep_file(path: str | Path) -> list[str]:
    """A sweep file: one sweep per line, ``#`` comments and blank lines ignored."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [s for s in (line.split("#", 1)[0].strip() for line in lines) if s]


def _show(v: Any) -> str:
    if isinstance(v, float):
        return "inf" if v == math.inf else "-inf" if v == -math.inf else f"{v:g}"
    return str(v)


# -- texts ------------------------------------------------------------------------------------------------------
def read_texts(path: str | Path, key: str = "prompt") -> list[str]:
    """One text per non-empty line, or JSON Lines with a ``key`` (or ``"text"``) field."""
    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(str(path), f"line {n}", f"is not valid JSON ({e.msg})") from None
            value = obj.get(key, obj.get("text")) if isinstance(obj, dict) else None
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(str(path), f"line {n}", f'needs a non-empty "{key}" or "text" string')
            line = value
        out.append(line)
    if not out:
        raise ConfigError(str(path), "empty", "holds no text")
    return out


# -- metrics ----------------------------------------------------------------------------------------------------
def words(text: str) -> list[str]:
    """The word tokens the diversity figures count: whitespace-separated."""
    return text.split()


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct(texts: Sequence[str], n: int) -> tuple[int, int]:
    """(unique, total) word n-grams over ``texts`` pooled (distinct-n = unique / total)."""
    grams = [g for t in texts for g in ngrams(words(t), n)]
    return len(set(grams)), len(grams)


def repetition(text: str, n: int = 4) -> float | None:
    """The share of a text's word n-grams that repeat an earlier one (``1 - unique/total``); None without any."""
    grams = ngrams(words(text), n)
    return 1.0 - len(set(grams)) / len(grams) if grams else None


def self_bleu(texts: Sequence[str]) -> float | None:
    """Self-BLEU-4 on 0-1: sacrebleu's corpus BLEU of every text against all the others as its references;
    None for fewer than two texts."""
    k = len(texts)
    if k < 2:
        return None
    try:
        from sacrebleu.metrics import BLEU
    except ImportError:
        raise MissingExtraError(INSTALL_HINT) from None
    refs = [[texts[(i + j) % k] for i in range(k)] for j in range(1, k)]
    return float(BLEU(max_ngram_order=4).corpus_score(list(texts), refs).score) / 100.0


def is_valid(constraint: Any, text: str, model: ModelLike) -> bool:
    """Whether ``text`` is in the constraint's language: a JSON Schema is checked by ``jsonschema`` on the parsed
    text, a regex or grammar by a fresh llguidance matcher that consumes the text's tokens and must accept."""
    if isinstance(constraint, JsonSchema):
        try:
            import jsonschema
        except ImportError:
            raise MissingExtraError(INSTALL_HINT) from None
        try:
            jsonschema.validate(json.loads(text), constraint.schema_dict)
        except (json.JSONDecodeError, jsonschema.ValidationError):
            return False
        return True
    from .constraint import load_llguidance
    from .grammar import grammar_tokenizer

    llg = load_llguidance()
    matcher = llg.LLMatcher(grammar_tokenizer(model), constraint.grammar, log_level=0)
    for t in model.tokenizer.encode(text, add_special_tokens=False):
        if not matcher.consume_token(t):
            return False
    return bool(matcher.is_accepting())


class Judge:
    """Scores text under a model: the negative log-likelihood of a continuation given its context."""

    def __init__(self, model: ModelLike, generator_model: ModelLike) -> None:
        if model.manifest.logits == "last":
            raise ConfigError("judge", _name(model), "needs a graph with logits for every position")
        self.model = model
        self.same_vocab = _same_tokenizer(model, generator_model)

    def nll(self, context: list[int], continuation: list[int]) -> tuple[float, int]:
        """(sum of -log p, tokens) of ``continuation`` after ``context`` (at least one token)."""
        if not continuation:
            return 0.0, 0
        ids = context + continuation
        limit = self.model.context_length
        if len(ids) > limit:
            raise ConfigError("judge", _name(self.model), f"context {limit} cannot hold {len(ids)} tokens")
        n = len(continuation)
        logits = self.model.forward_last(np.array([ids]), self.model.new_cache(), n + 1)[0][:-1]
        logp = np.stack([log_softmax(row.astype(np.float64)) for row in logits])
        return float(-logp[np.arange(n), continuation].sum()), n

    def sample(self, prompt_text: str, prompt_ids: list[int], completion: Completion, chat: bool) -> tuple[float, int]:
        if self.same_vocab:
            return self.nll(prompt_ids, list(completion.token_ids))
        m = self.model
        ctx = m.tokenizer.apply_chat_template([{"role": "user", "content": prompt_text}]) if chat else None
        ctx = ctx or m.encode_prompt(prompt_text)
        return self.nll(ctx, m.tokenizer.encode(completion.text, add_special_tokens=False))

    def text(self, text: str, max_tokens: int) -> tuple[float, int]:
        """A reference text on its own: its first ``max_tokens`` tokens given the BOS token (or its first)."""
        m = self.model
        ids = m.tokenizer.encode(text, add_special_tokens=False)[:max_tokens]
        bos = m.manifest.bos_token_id
        return self.nll([bos], ids) if bos is not None else self.nll(ids[:1], ids[1:])


def _name(model: Any) -> str:
    return str(getattr(model, "path", model))


def _same_tokenizer(a: ModelLike, b: ModelLike) -> bool:
    from .generator import _same_tokenizer as same

    return a is b or same(a, b)


# -- figures and intervals --------------------------------------------------------------------------------------
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


# -- the run ----------------------------------------------------------------------------------------------------
@dataclass
class SettingResult:
    setting: Setting
    figures: dict[str, Figure]
    seconds: float
    tokens: int
    gated_share: float | None = None
    samples: list[list[str]] = field(default_factory=list)

    def as_dict(self, with_samples: bool = False) -> dict[str, Any]:
        s = self.setting
        out: dict[str, Any] = {
            "family": s.family,
            "label": s.label,
            "swept": {k: _json_number(v) for k, v in s.swept.items()},
            "params": {k: _json_number(v) for k, v in s.params.items()},
            "figures": {k: f.as_dict() for k, f in self.figures.items()},
            "seconds": self.seconds,
            "tokens": self.tokens,
            "tokens_per_second": self.tokens / self.seconds if self.seconds > 0 else None,
        }
        if self.gated_share is not None:
            out["gated_share"] = self.gated_share
        if with_samples:
            out["samples"] = self.samples
        return out


def _json_number(v: Any) -> Any:
    """JSON has no infinity: ``inf``/``-inf`` as the strings the parameters accept."""
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return v


@dataclass
class Report:
    meta: dict[str, Any]
    results: list[SettingResult]
    reference: dict[str, Figure] | None = None

    def as_dict(self, with_samples: bool = False) -> dict[str, Any]:
        return {
            **self.meta,
            "settings": [r.as_dict(with_samples) for r in self.results],
            "reference": None if self.reference is None else {k: f.as_dict() for k, f in self.reference.items()},
        }

    def write(self, out: str | Path) -> list[Path]:
        """``eval.json`` (with the samples) and ``eval.csv`` (one row per setting) in ``out``."""
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        js = folder / "eval.json"
        js.write_text(json.dumps(self.as_dict(with_samples=True), indent=1, ensure_ascii=False) + "\n", "utf-8")
        csv_path = folder / "eval.csv"
        import csv

        names = [m for m in METRICS if any(m in r.figures for r in self.results)]
        with csv_path.open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(
                ["family", "setting", *[f"{m}{s}" for m in names for s in ("", "_low", "_high")]]
                + ["gated_share", "seconds", "tokens_per_second"]
            )
            for r in self.results:
                row: list[Any] = [r.setting.family, r.setting.label]
                for m in names:
                    fig = r.figures.get(m, Figure(None))
                    row += [fig.value, fig.low, fig.high]
                row += [r.gated_share, round(r.seconds, 3), round(r.tokens / r.seconds, 2) if r.seconds else None]
                w.writerow(row)
        return [js, csv_path]


def evaluate(
    model: Model,
    settings: Sequence[Setting],
    prompts: Sequence[str] | None = None,
    *,
    samples: int = 4,
    max_new_tokens: int = 64,
    seed: int = 0,
    judge: Model | None = None,
    reference: Sequence[str] | None = None,
    chat: bool | None = None,
    base: Mapping[str, Any] | None = None,
    load: Callable[[str], Model] | None = None,
    progress: Callable[[int], None] | None = None,
    max_batch: int = 8,
    resamples: int = BOOTSTRAP,
) -> Report:
    """Run every setting over the prompts, ``samples`` completions each, and measure them (module docstring).

    Args:
        model: the model that generates (a :class:`~edgeroute.Model`).
        settings: the points to measure (:func:`parse_sweeps`).
        prompts: the prompt texts (default: the built-in set, :data:`PROMPTS`).
        samples: completions per prompt and setting (Self-BLEU needs two).
        max_new_tokens: the length limit of every sample (a setting may set its own).
        seed: the seed of sample 0 of prompt 0; sample j of prompt i uses ``seed + i * samples + j``.
        judge: the model whose perplexity measures quality (default: ``model``).
        reference: human texts: their own figures (first ``max_new_tokens`` tokens each, in groups of
            ``samples`` for the diversity figures) are the reference point.
        chat: apply the chat template to each prompt (default: when the model has one).
        base: parameters every setting starts from (a setting's own win); edgeroute's defaults below them, not the
            model's generation defaults, so that every setting is exactly what it says.
        load: resolves a model named in a setting (``contrast``) to a Model.
        progress: called with the number of samples finished since the last call.
        max_batch: the engine's batch (requests generating at once).
        resamples: bootstrap resamples.

    Raises:
        ConfigError: a bad setting (naming the parameter and the setting), no prompts, fewer than 1 sample.
    """
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise ConfigError("samples", samples, "must be an integer >= 1")
    if not settings:
        raise ConfigError("sweep", [], "give at least one setting to measure")
    texts = list(prompts) if prompts is not None else [p for _, p in PROMPTS]
    if not texts:
        raise ConfigError("prompts", [], "needs at least one prompt")
    judge = judge or model
    scorer = Judge(judge, model)
    use_chat = model.tokenizer.chat_template is not None if chat is None else chat
    ids = [_prompt_ids(model, t, use_chat) for t in texts]
    configs = setting_configs(settings, base, max_new_tokens, load)
    k, t_start = samples, time.perf_counter()
    results = []
    with Engine(model, max_batch=max_batch, max_queue=len(texts) * k) as engine:
        for setting, (config, flows) in zip(settings, configs, strict=True):
            t0 = time.perf_counter()
            handles = []
            for i, prompt in enumerate(ids):
                for j in range(k):
                    cfg = config.replace(sampling=config.sampling.replace(seed=seed + i * k + j))
                    handles.append(engine.submit(prompt, cfg, flows))
            done: list[Completion] = []
            for h in handles:
                done.append(h.result())
                if progress is not None:
                    progress(1)
            seconds = time.perf_counter() - t0
            groups = [[c.text for c in done[i * k : (i + 1) * k]] for i in range(len(ids))]
            lengths = [[len(c.token_ids) for c in done[i * k : (i + 1) * k]] for i in range(len(ids))]
            nll = []
            for i, prompt in enumerate(ids):
                per = [scorer.sample(texts[i], prompt, c, use_chat) for c in done[i * k : (i + 1) * k]]
                nll.append((sum(a for a, _ in per), sum(b for _, b in per)))
            valid = None
            if config.constraint is not None:
                valid = [
                    [is_valid(config.constraint, c.text, model) for c in done[i * k : (i + 1) * k]]
                    for i in range(len(ids))
                ]
            figs = figures(groups, nll, lengths, valid, resamples)
            gated = None
            if flows.guidance is not None or flows.contrast is not None:
                steps = sum(c.usage.flow_steps for c in done)
                gated = sum(c.usage.flow_skipped for c in done) / steps if steps else 0.0
            tokens = sum(c.usage.completion_tokens for c in done)
            results.append(SettingResult(setting, figs, seconds, tokens, gated, groups))
    ref = None
    if reference is not None:
        ref = reference_figures(reference, scorer, k, max_new_tokens, resamples)
    meta = {
        "model": _name(model),
        "judge": _name(judge),
        "prompts": len(texts),
        "samples": k,
        "max_new_tokens": max_new_tokens,
        "chat": use_chat,
        "base": {k2: _json_number(v) for k2, v in (base or {}).items()},
        "seeds": {"first": seed, "last": seed + len(texts) * k - 1, "rule": "seed + prompt_index * samples + sample"},
        "bootstrap": {"resamples": resamples, "confidence": CONFIDENCE, "unit": "prompt", "method": "percentile"},
        "engine_batch": max_batch,
        "seconds": time.perf_counter() - t_start,
    }
    return Report(meta, results, ref)


def setting_configs(
    settings: Sequence[Setting],
    base: Mapping[str, Any] | None = None,
    max_new_tokens: int = 64,
    load: Callable[[str], Model] | None = None,
) -> list[tuple[GenerationConfig, Flows]]:
    """Every setting's configs (base, then the setting), validated before anything runs; a ``ConfigError`` names
    the parameter and the setting."""
    out = []
    for s in settings:
        params = {"max_new_tokens": max_new_tokens, **(base or {}), **s.params}
        try:
            out.append(from_params(params, None, load))
        except ConfigError as e:
            where = s.label if s.family == s.label else f"{s.family}: {s.label}"
            raise ConfigError(e.field, e.value, f"{e.reason} (in the setting {where})") from None
    return out


def reference_figures(
    texts: Sequence[str], judge: Judge, group: int, max_tokens: int, resamples: int = BOOTSTRAP
) -> dict[str, Figure]:
    """Human text's own figures, measured as the samples are: each text cut to ``max_tokens`` tokens (of the
    judge's tokenizer), in groups of ``group`` texts for the diversity figures, its perplexity given only BOS."""
    tok = judge.model.tokenizer
    cut = [tok.decode(tok.encode(t, add_special_tokens=False)[:max_tokens]) for t in texts]
    if len(cut) < max(group, 2):
        raise ConfigError("reference", len(cut), f"needs at least {max(group, 2)} texts (groups of --samples)")
    groups = [cut[i : i + group] for i in range(0, len(cut) - group + 1, group)]
    nll = []
    lengths = []
    for g in groups:
        per = [judge.text(t, max_tokens) for t in g]
        nll.append((sum(a for a, _ in per), sum(b for _, b in per)))
        lengths.append([b for _, b in per])
    return figures(groups, nll, lengths, None, resamples)


def _prompt_ids(model: ModelLike, text: str, chat: bool) -> list[int]:
    if chat:
        return model.tokenizer.apply_chat_template([{"role": "user", "content": text}])
    return model.encode_prompt(text)
