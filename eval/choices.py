"""Multiple-choice evaluation from a local JSON Lines file, as lm-evaluation-harness scores its ``multiple_choice``
tasks (HellaSwag, ARC, PIQA, ...): each choice is the continuation ``delimiter + choice`` of the item's context,
scored by its log-likelihood under the model (:meth:`edgeroute.Model.score_items`: short items' choices as rows of
batched graph runs, long ones with the context computed once for all its choices); ``acc`` is the share of items
whose most likely choice is the answer, ``acc_norm`` the same with each log-likelihood divided by the choice's
length in characters. Both with lm-eval's standard error (the sample
standard deviation over the square root of the count).

One item per line: ``{"context": str, "choices": [str, ...], "answer": int}`` (``"query"``/``"question"`` and
``"gold"``/``"label"`` are read too).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import edgeroute as er
from edgeroute.errors import ConfigError

MAX_CHOICES = 26


@dataclass(frozen=True)
class Item:
    context: str
    choices: tuple[str, ...]
    answer: int


@dataclass
class ChoiceReport:
    """Per item: the choices' log-likelihoods and greedy flags; the accuracies with their standard errors."""

    items: list[Item]
    loglikelihoods: list[list[float]] = field(default_factory=list)
    greedy: list[list[bool]] = field(default_factory=list)
    seconds: float = 0.0

    def _correct(self, norm: bool) -> list[float]:
        out = []
        for item, lls in zip(self.items, self.loglikelihoods, strict=True):
            values = [ll / len(c) for ll, c in zip(lls, item.choices, strict=True)] if norm else lls
            out.append(float(max(range(len(values)), key=values.__getitem__) == item.answer))
        return out

    def as_dict(self) -> dict[str, Any]:
        n = len(self.loglikelihoods)
        figures = {}
        for name, norm in (("acc", False), ("acc_norm", True)):
            hits = self._correct(norm)
            mean = sum(hits) / n
            var = sum((h - mean) ** 2 for h in hits) / (n - 1) if n > 1 else 0.0
            figures[name] = {"value": mean, "stderr": math.sqrt(var / n)}
        return {
            "items": n,
            **figures,
            "seconds": self.seconds,
            "items_per_second": n / self.seconds if self.seconds > 0 else None,
            "samples": [
                {"answer": item.answer, "loglikelihoods": lls, "greedy": g}
                for item, lls, g in zip(self.items, self.loglikelihoods, self.greedy, strict=True)
            ],
        }


def read_items(path: str | Path) -> list[Item]:
    """The items of a JSON Lines file; a malformed line is a ``ConfigError`` naming the file and the line."""
    items = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"line {n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(str(path), where, f"is not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise ConfigError(str(path), where, "must be a JSON object")
        context = next((obj[k] for k in ("context", "query", "question") if k in obj), None)
        choices = obj.get("choices")
        answer = next((obj[k] for k in ("answer", "gold", "label") if k in obj), None)
        if not isinstance(context, str):
            raise ConfigError(str(path), where, 'needs a "context" string')
        if (
            not isinstance(choices, list)
            or not 2 <= len(choices) <= MAX_CHOICES
            or not all(isinstance(c, str) and c for c in choices)
        ):
            raise ConfigError(str(path), where, f'needs "choices": 2 to {MAX_CHOICES} non-empty strings')
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise ConfigError(
                str(path), where, f'needs "answer": the index of the right choice (0 to {len(choices) - 1})'
            )
        items.append(Item(context, tuple(choices), answer))
    if not items:
        raise ConfigError(str(path), "empty", "holds no item")
    return items


def evaluate_choices(
    model: er.Model,
    items: Sequence[Item],
    delimiter: str = " ",
    progress: Callable[[int], None] | None = None,
) -> ChoiceReport:
    """Score every item's choices (``delimiter + choice`` after the context) and report the accuracies."""
    report = ChoiceReport(list(items))
    start = time.perf_counter()
    pairs = [(item.context, [delimiter + c for c in item.choices]) for item in items]
    for scores in model.score_items(pairs, progress=progress):  # short items as rows of batched graph runs
        report.loglikelihoods.append([s.logprob for s in scores])
        report.greedy.append([s.greedy for s in scores])
    report.seconds = time.perf_counter() - start
    return report


# -- the same items as an lm-evaluation-harness task --------------------------------------------------------------
LM_EVAL_TASK = "edgeroute_mc"
_TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {items}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def write_lm_eval_task(folder: str | Path, items: Sequence[Item]) -> Path:
    """``items`` as a local lm-evaluation-harness task named :data:`LM_EVAL_TASK` in ``folder`` (give lm_eval
    ``--include_path FOLDER --tasks edgeroute_mc``): lm-eval scores it as :func:`evaluate_choices` does (the
    context, then ``" " + choice``; acc and acc_norm), so the two can be compared item by item."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{LM_EVAL_TASK}.jsonl"
    lines = [json.dumps({"context": i.context, "choices": list(i.choices), "answer": i.answer}) for i in items]
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / f"{LM_EVAL_TASK}.yaml").write_text(
        _TASK_YAML.format(name=LM_EVAL_TASK, items=data.resolve()), encoding="utf-8"
    )
    return folder
