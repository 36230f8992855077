"""edgeroute.eval: routing you can see. Sweep router settings over a prompt set and measure diversity against
quality (``edgeroute eval MODEL``; the ``eval`` extra).

>>> import edgeroute as er
>>> from edgeroute.eval import evaluate, parse_sweeps, write_plots
>>> model = er.Model.load("models/smollm2-135m")                                          # doctest: +SKIP
>>> report = evaluate(model, parse_sweeps(["temperature=0.3,0.7,1.0"]), samples=4)        # doctest: +SKIP
>>> report.write("out") + write_plots(report.as_dict(), "out")  # eval.json, eval.csv, PNGs  # doctest: +SKIP

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
the settings of one sweep (:func:`parse_sweep`). Samples come from an :class:`~edgeroute.Engine`.

The modules, one concept each: ``sweep`` (settings and their configs), ``prompts`` (the built-in prompt set, text
files), ``metrics`` (figures of texts alone), ``judge`` (perplexity under a judge model), ``intervals`` (one
setting's figures with bootstrap intervals), ``report`` (JSON, CSV), ``run`` (:func:`evaluate`), ``plots`` (the
PNGs), ``extra`` (the install line). Importing this package imports none of the extra's libraries: sacrebleu and
jsonschema are imported when a figure needs them, matplotlib when a picture is drawn; :func:`require` checks them
before a run. The runtime never imports this package.
"""

from __future__ import annotations

from .extra import INSTALL_HINT, require
from .intervals import BOOTSTRAP, CONFIDENCE, DIVERSITY, METRICS, Figure, figures
from .judge import Judge
from .metrics import distinct, is_valid, ngrams, repetition, self_bleu, words
from .plots import pareto, write_plots
from .prompts import PROMPTS, read_texts
from .report import Report, SettingResult
from .run import evaluate, reference_figures
from .sweep import Setting, parse_sweep, parse_sweeps, parse_value, read_sweep_file, setting_configs

__all__ = [
    "BOOTSTRAP",
    "CONFIDENCE",
    "DIVERSITY",
    "INSTALL_HINT",
    "METRICS",
    "PROMPTS",
    "Figure",
    "Judge",
    "Report",
    "Setting",
    "SettingResult",
    "distinct",
    "evaluate",
    "figures",
    "is_valid",
    "ngrams",
    "parse_sweep",
    "parse_sweeps",
    "parse_value",
    "pareto",
    "read_sweep_file",
    "read_texts",
    "reference_figures",
    "repetition",
    "require",
    "self_bleu",
    "setting_configs",
    "words",
    "write_plots",
]
