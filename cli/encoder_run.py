"""``edgeroute run`` on an encoder model: one text (the argument, or standard input with ``-``) or a JSONL file of
inputs (``--input FILE``, ``-`` for standard input: batch work, a progress bar on stderr, one JSON line out per
input, in order).

By the model's task: a token classifier prints its entities (highlighted in the text on a terminal, a table
otherwise, ``--json`` for JSON), a classifier its labels with scores, an embedding model a summary of the
embedding (the whole vector with ``--json``). A JSONL input line is a JSON string or an object with ``"text"``
(and ``"pair"`` for a classifier taking text pairs). Every line is read and checked (JSON, length against the
model's limit under ``--overflow``) before any result is written: a bad line is one error naming it, and
``--output FILE`` is written whole or not at all.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import edgeroute as er
import numpy as np
from edgeroute.encoder_math import spread as _spread

from .options import F
from .progress import Steps

BATCH = 256  # inputs per library call in batch work (results are written between calls)
ENCODER_PARAMS = ("overflow", "aggregation", "words", "decode", "stride", "pair", "input_file", "output")


def encoder_options(f: F) -> F:
    """Options for encoder models (refused for decoders)."""
    f = click.option(
        "--output",
        type=click.Path(dir_okay=False, writable=True),
        default=None,
        help="An encoder model with --input: write the JSON lines to this file (whole, or not at all).",
    )(f)
    f = click.option(
        "--input",
        "input_file",
        type=click.Path(dir_okay=False, allow_dash=True),
        default=None,
        help="An encoder model: a JSONL file of inputs ('-': standard input), one result line per input.",
    )(f)
    f = click.option("--pair", default=None, help="A classifier: the second text of a text pair.")(f)
    f = click.option(
        "--stride",
        type=click.IntRange(min=0),
        default=None,
        help="A token classifier: run a long text in overlapping windows sharing N tokens.",
    )(f)
    f = click.option(
        "--decode",
        type=click.Choice(["argmax", "viterbi"]),
        default="argmax",
        show_default=True,
        help="A token classifier: each token's best tag, or the best valid tag sequence (no I-X after O).",
    )(f)
    f = click.option(
        "--words",
        type=click.Choice(["pipeline", "text"]),
        default="pipeline",
        show_default=True,
        help="A token classifier: transformers' sub-word rules and words, or the tokenizer's word ids and the"
        " text's own words.",
    )(f)
    f = click.option(
        "--aggregation",
        type=click.Choice(["none", "simple", "first", "average", "max"]),
        default="simple",
        show_default=True,
        help="A token classifier: how tokens make entities (transformers' aggregation strategies).",
    )(f)
    f = click.option(
        "--overflow",
        type=click.Choice(["refuse", "truncate", "chunk"]),
        default="refuse",
        show_default=True,
        help="An encoder model: a text over its maximum length is refused, cut at the end, or run in windows.",
    )(f)
    return f


def run_encoder(model: er.EncoderModel, text: str | None, as_json: bool, options: dict[str, Any]) -> None:
    """``edgeroute run`` for an encoder model (module docstring); ``text`` None with ``--input``."""
    if options["pair"] is not None and model.task != "classification":
        raise click.UsageError("--pair is for classifiers (text pairs)")
    ner = ("aggregation", "words", "decode", "stride")
    if model.task != "token-classification" and any(_given(k) for k in ner):
        raise click.UsageError(f"--{next(k for k in ner if _given(k))} is for token classifiers")
    if options["output"] is not None and options["input_file"] is None:
        raise click.UsageError("--output needs --input FILE")
    if options["pair"] is not None and options["input_file"] is not None:
        raise click.UsageError('--pair is for one text: with --input, give each line its "pair"')
    if options["samples"] > 1 and model.task == "embedding":
        raise click.UsageError("-n (stochastic passes) is for classifiers and token classifiers")
    if options["stride"] is not None:  # windows sharing the stride: long texts run whole
        options = {**options, "overflow": "chunk"}
    call = _call(model, options)
    if options["input_file"] is None:
        assert text is not None
        result = call([text], [options["pair"]] if options["pair"] is not None else None)[0]
        _print(model, text, result, as_json)
        return
    numbered = _read_jsonl(options["input_file"], model.task == "classification")
    items = [(t, p) for t, p, _ in numbered]
    texts = [t for t, _ in items]
    pairs = [p for _, p in items]
    if any(p is not None for p in pairs) and any(p is None for p in pairs):
        raise er.ConfigError("pair", "some lines", "every line needs a pair, or none")
    if options["overflow"] == "refuse":
        counts = model.count_tokens([(t, p) if p is not None else t for t, p in items])
        over = [i for i, n in enumerate(counts) if n > model.max_length]
        if over:
            raise er.ConfigError(
                f"line {numbered[over[0]][2]}",
                f"{counts[over[0]]} tokens",
                f"is over the model's {model.max_length}: --overflow truncate or chunk",
            )
    with _sink(options["output"]) as write, Steps("run") as steps:
        steps.start("inputs", len(items), "inputs")
        for start in range(0, len(items), BATCH):
            part = texts[start : start + BATCH]
            given = pairs[start : start + BATCH]
            results = call(part, [p or "" for p in given] if given[0] is not None else None)
            for t, r in zip(part, results, strict=True):
                write(json.dumps(_json(model, t, r), ensure_ascii=False) + "\n")
            steps.advance(len(part))


def _given(name: str) -> bool:
    ctx = click.get_current_context()
    return ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT


def _call(model: er.EncoderModel, o: dict[str, Any]) -> Callable[[list[str], list[str] | None], list[Any]]:
    """The library call for the model's task: texts (and pairs) -> one result per text."""
    overflow, samples = o["overflow"], o["samples"]
    if model.task == "token-classification":
        opts = dict(aggregation=o["aggregation"], words=o["words"], decode=o["decode"], stride=o["stride"])
        return lambda texts, pairs: model.entities(texts, overflow=overflow, samples=samples, **opts)
    if model.task == "classification":
        return lambda texts, pairs: model.classify(texts, top_k=None, pairs=pairs, overflow=overflow, samples=samples)

    def embed(texts: list[str], pairs: list[str] | None) -> list[Any]:
        r = model.embed(texts, overflow=overflow)
        return [(r.vectors[i], r.tokens[i], r.truncated[i], r.windows[i]) for i in range(len(texts))]

    return embed


def _json(model: er.EncoderModel, text: str, result: Any) -> dict[str, Any]:
    if model.task == "token-classification":
        rows = [
            {"label": e.label, "score": e.score, "word": e.word, "start": e.start, "end": e.end} | _spread(e)
            for e in result
        ]
        return {"entities": rows, "truncated": result.truncated, "windows": result.windows}
    if model.task == "classification":
        rows = [{"label": x.label, "score": x.score} | _spread(x) for x in result]
        return {"labels": rows, "truncated": result[0].truncated, "windows": result[0].windows}
    vector, tokens, truncated, windows = result
    return {"embedding": [float(x) for x in vector], "tokens": tokens, "truncated": truncated, "windows": windows}


def _uncertain(x: Any) -> str:
    s = _spread(x)
    return f"\tH {s['entropy']:.3f} MI {s['mutual_information']:.3f}" if "entropy" in s else ""


def _print(model: er.EncoderModel, text: str, result: Any, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(_json(model, text, result), ensure_ascii=False))
        return
    cut = _cut_note(*(_json(model, text, result)[k] for k in ("truncated", "windows")))
    if model.task == "token-classification":
        if sys.stdout.isatty():  # the text with its entities highlighted
            click.echo(_highlighted(text, result))
        for e in result:
            click.echo(f"{e.label}\t{e.score:.4f}\t{text[e.start : e.end]}\t[{e.start}:{e.end}]{_uncertain(e)}")
    elif model.task == "classification":
        for x in result:
            click.echo(f"{x.label}\t{x.score:.4f}{_uncertain(x)}")
    else:
        vector, tokens, _, _ = result
        head = ", ".join(f"{x:+.4f}" for x in vector[:6])
        click.echo(
            f"embedding: {len(vector)} dimensions, L2 norm {float(np.linalg.norm(vector)):.4f}, {tokens} tokens"
            f" ({model.pooling} pooling); first values [{head}, ...]"
        )
    if cut:
        click.echo(cut, err=True)


def _cut_note(truncated: bool, windows: int) -> str:
    if truncated:
        return "note: truncated: the text was cut at the model's maximum length (--overflow truncate)"
    return f"note: the text ran in {windows} windows (--overflow chunk)" if windows > 1 else ""


_COLOURS = ("cyan", "magenta", "yellow", "green", "blue", "red")


def _highlighted(text: str, entities: list[Any]) -> str:
    """``text`` with each entity bold and coloured by its label, the label after it."""
    colours: dict[str, str] = {}
    out, at = [], 0
    for e in sorted(entities, key=lambda e: e.start):
        if e.start < at:
            continue
        colour = colours.setdefault(e.label, _COLOURS[len(colours) % len(_COLOURS)])
        out += [text[at : e.start], click.style(f"{text[e.start : e.end]}", fg=colour, bold=True)]
        out.append(click.style(f"[{e.label}]", fg=colour))
        at = e.end
    return "".join(out) + text[at:]


def _read_jsonl(path: str, pairs: bool) -> list[tuple[str, str | None, int]]:
    """The inputs of a JSONL file (``-``: standard input): each line a JSON string or an object with ``text``
    (and ``pair``); blank lines skipped. -> (text, pair, line number); a ``ConfigError`` names the first bad
    line."""
    from .run_cmd import decode_input

    data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    items: list[tuple[str, str | None, int]] = []
    for n, line in enumerate(decode_input(data, path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as e:
            raise er.ConfigError(f"line {n}", line[:40], f"is not JSON: {e}") from None
        if isinstance(value, dict):
            extra = set(value) - {"text", "pair"}
            if extra:
                raise er.ConfigError(f"line {n}", sorted(extra)[0], "is not a field of an input (text, pair)")
            text, pair = value.get("text"), value.get("pair")
        else:
            text, pair = value, None
        if not isinstance(text, str) or not text:
            raise er.ConfigError(f"line {n}", line[:40], 'must be a JSON string or an object with a "text" string')
        if pair is not None and (not pairs or not isinstance(pair, str) or not pair):
            raise er.ConfigError(f"line {n}", "pair", "is a non-empty string, for a classifier only")
        items.append((text, pair, n))
    if not items:
        raise er.ConfigError("input", path, "holds no inputs")
    return items


class _sink:
    """Where batch results go: standard output, or ``path`` written to a temporary file beside it and moved into
    place when every line is written (nothing half-written)."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._tmp: Any = None

    def __enter__(self) -> Callable[[str], None]:
        if self.path is None:
            return lambda line: (sys.stdout.write(line), None)[1]
        target = Path(self.path)
        self._tmp = tempfile.NamedTemporaryFile(
            "w", encoding="utf-8", dir=target.parent or ".", prefix=f".{target.name}.", delete=False
        )
        return self._tmp.write

    def __exit__(self, kind: Any, *rest: Any) -> None:
        if self._tmp is None:
            sys.stdout.flush()
            return
        self._tmp.close()
        if kind is None:
            os.replace(self._tmp.name, self.path)  # type: ignore[arg-type]
        else:
            os.unlink(self._tmp.name)
