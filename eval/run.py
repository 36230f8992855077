"""The run: sample every setting over the prompts through an :class:`~edgeroute.Engine` and measure the samples.

Sample j of prompt i always has the seed ``seed + i * samples + j``: every setting meets the same random numbers.
Samples come from an Engine (continuous batching where the graph allows it; a batched row may round differently
from a Generator alone, which can flip a sampled token).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from edgeroute.engine import Engine
from edgeroute.errors import ConfigError
from edgeroute.output import Completion

from .intervals import BOOTSTRAP, CONFIDENCE, Figure, figures
from .judge import Judge, model_name
from .metrics import is_valid
from .prompts import PROMPTS
from .report import Report, SettingResult, json_number
from .sweep import Setting, setting_configs

if TYPE_CHECKING:
    from edgeroute.graph import Graph
    from edgeroute.model import Model


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
    """Run every setting over the prompts, ``samples`` completions each, and measure them (see :mod:`edgeroute.eval`).

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
        "model": model_name(model),
        "judge": model_name(judge),
        "prompts": len(texts),
        "samples": k,
        "max_new_tokens": max_new_tokens,
        "chat": use_chat,
        "base": {k2: json_number(v) for k2, v in (base or {}).items()},
        "seeds": {"first": seed, "last": seed + len(texts) * k - 1, "rule": "seed + prompt_index * samples + sample"},
        "bootstrap": {"resamples": resamples, "confidence": CONFIDENCE, "unit": "prompt", "method": "percentile"},
        "engine_batch": max_batch,
        "seconds": time.perf_counter() - t_start,
    }
    return Report(meta, results, ref)


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


def _prompt_ids(model: Graph, text: str, chat: bool) -> list[int]:
    if chat:
        return model.tokenizer.apply_chat_template([{"role": "user", "content": text}])
    return model.encode_prompt(text)
